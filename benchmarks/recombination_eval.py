"""Benchmark: the N x N recombination matrix, extractor features computed once, against recombining every pair.

    python benchmarks/recombination_eval.py                        # 3 ResNet-20s (split layer2, width 32), CPU
    python benchmarks/recombination_eval.py --networks 4 --per-class 100 --repeats 5
    python benchmarks/recombination_eval.py --device cuda --per-class 400

Both ways compute the same matrix: entry ``[i, j]`` is extractor ``i`` with head ``j`` on network ``i``'s test
images of the common classes, predicting among the common classes, BN with batch statistics.

* fast: :func:`timm_compat.evaluation.recombination_matrix`, which runs each extractor once per batch and feeds
  its features to all N heads: N extractor passes and N^2 head passes per test image;
* naive: for every pair ``(i, j)``, ``timm_compat.recombine(extractor_i, head_j, force=True)`` evaluated with
  :func:`timm_compat.evaluation.accuracy`: N^2 extractor passes and N^2 head passes.

Throughput counts image-head evaluations: one matrix scores ``N * sum_i |test_i|`` of them. The FLOP-ideal
speed-up is ``N (E + H) / (E + N H)`` with E and H the extractor's and head's forward FLOPs per image. Because BN
normalises with the statistics of each batch, and both ways see the same batches in the same order, the matrices
must agree exactly; the script checks this to 1e-6.
"""
import argparse
import statistics
import time
from typing import Callable, Dict, List, Sequence, Tuple

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import timm_compat
from timm_compat.classes import canonical_class_name, common_classes
from timm_compat.data import ImageData, normalize
from timm_compat.evaluation import accuracy, format_matrix, recombination_matrix
from timm_compat.fit import ClassificationTask, fit
from timm_compat.synthetic import make_synthetic
from common import load_average, setup  # benchmarks/ is on sys.path


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--networks', type=int, default=3, help='N: networks, hence an N x N matrix')
    parser.add_argument('--backbone', default='resnet20_cifar')
    parser.add_argument('--split', default='layer2')
    parser.add_argument('--width', type=int, default=32, help='interface width')
    parser.add_argument('--per-class', type=int, default=50, help='synthetic test images per class and network')
    parser.add_argument('--train-steps', type=int, default=30,
                        help='SGD steps per network on its synthetic training split before timing')
    parser.add_argument('--batch-size', type=int, default=250, help='evaluation batch size (train.py default)')
    parser.add_argument('--bn', default='batch', choices=['batch', 'running'])
    parser.add_argument('--repeats', type=int, default=3, help='timed (fast, naive) pairs')
    parser.add_argument('--device', default='auto', choices=['auto', 'cpu', 'cuda'])
    parser.add_argument('--threads', type=int, default=None, help='torch CPU threads (default: the cores we may use)')
    parser.add_argument('--default-malloc', action='store_true',
                        help="on CPU, skip train.py's keep_freed_memory() and use glibc's defaults")
    return parser.parse_args(argv)


class CommonColumns(nn.Module):
    """A recombined model whose logits are cut down to the common classes, so :func:`accuracy` scores it exactly as
    :func:`recombination_matrix` scores a pair."""

    def __init__(self, model: nn.Module, columns: torch.Tensor):
        super().__init__()
        self.model = model
        self.register_buffer('columns', columns, persistent=False)

    @property
    def extractor(self):  # accuracy() normalises with the extractor's mean and std
        return self.model.extractor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)[:, self.columns]


def common_subset(data: ImageData, common: Sequence[str]) -> ImageData:
    """The test images of the common classes, labelled by their index in ``common``."""
    by_name = {canonical_class_name(c): c for c in data.class_names}
    return data.select_classes([by_name[c] for c in common])


def naive_matrix(models: Sequence, test_data: Sequence[ImageData], batch_size: int, bn: str) -> torch.Tensor:
    """The matrix the obvious way: recombine every pair and run it on the row's test images."""
    common = common_classes([d.class_names for d in test_data])
    device = next(models[0].parameters()).device
    matrix = torch.zeros(len(models), len(models))
    for i, data in enumerate(test_data):
        subset = common_subset(data, common)
        for j, head_model in enumerate(models):
            names = [canonical_class_name(c) for c in head_model.head.class_names]
            columns = torch.tensor([names.index(c) for c in common], device=device)
            pair = timm_compat.recombine(models[i].extractor, head_model.head, force=True)
            matrix[i, j] = accuracy(CommonColumns(pair, columns), subset, batch_size, bn)
    return matrix


def train_briefly(model: nn.Module, data: ImageData, steps: int, batch_size: int = 64) -> None:
    """A few plain SGD steps on the model's own task.

    Untrained networks tend to predict one class for every image, and two matrices of constant predictions agree
    whatever the evaluation does; a little training makes the predictions, and so the equality check, depend on
    the features.
    """
    device = next(model.parameters()).device
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    cfg = model.extractor.pretrained_cfg
    generator = torch.Generator().manual_seed(0)

    def batch_at(step: int):  # draws from the generator in step order, as fit calls it
        index = torch.randint(0, len(data), (batch_size,), generator=generator)
        return normalize(data.images[index].to(device), cfg['mean'], cfg['std']), data.labels[index].to(device)

    model.train()
    fit(ClassificationTask(model), batch_at, steps, optimizer, desc='train briefly')


def forward_flops(fn: Callable[[], torch.Tensor]) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        fn()
    return counter.get_total_flops()


def time_call(fn: Callable[[], torch.Tensor], device: torch.device) -> Tuple[float, torch.Tensor]:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()  # both functions end in a host read (.item() / .cpu()), so the device is drained here
    return time.perf_counter() - start, out


def trained_networks(args, device: torch.device) -> Tuple[List[nn.Module], List[ImageData], List[str]]:
    """The N networks, each trained briefly on its own synthetic task, their test sets and the common classes.

    Test sets of the two synthetic domains in turn, each network with its own seed: 10 classes per network, 9 in
    common, listed in different orders, so the column mapping by class name matters.
    """
    domains = ['AB'[i % 2] for i in range(args.networks)]
    test_data: List[ImageData] = []
    for i, domain in enumerate(domains):
        images, labels, names = make_synthetic(domain, 'test', 32, args.per_class, seed=i)
        test_data.append(ImageData(images, labels, names, f'synthetic:{domain} seed {i}'))
    common = common_classes([d.class_names for d in test_data])
    torch.manual_seed(0)
    interface = timm_compat.Interface(width=args.width, rp=True, dcc_classes=common)
    models = [timm_compat.make_compatible(args.backbone, split=args.split, interface=interface,
                                          num_classes=d.num_classes, class_names=d.class_names, init_seed=i).to(device)
              for i, d in enumerate(test_data)]
    for i, (model, domain) in enumerate(zip(models, domains)):
        images, labels, names = make_synthetic(domain, 'train', 32, args.per_class, seed=i)
        train_briefly(model, ImageData(images, labels, names), args.train_steps)
    return models, test_data, common


def main(argv=None) -> Dict[str, float]:
    args = parse_args(argv)
    _, device = setup(args)
    models, test_data, common = trained_networks(args, device)
    evaluated = args.networks * sum(len(common_subset(d, common)) for d in test_data)

    probe = torch.zeros(args.batch_size, 3, 32, 32, device=device)
    with timm_compat.eval_mode(models[0], args.bn):
        e_flops = forward_flops(lambda: models[0].extractor(probe)) / args.batch_size
        features = models[0].extractor(probe)
        h_flops = forward_flops(lambda: models[0].head(features)) / args.batch_size
    n = args.networks
    ideal = n * (e_flops + h_flops) / (e_flops + n * h_flops)

    print(f'{n} x {args.backbone} split {args.split}, width {args.width}; {len(common)} common classes; '
          f'{evaluated // n} common-class test images over all rows, {evaluated} image-head evaluations per matrix; '
          f'batch {args.batch_size}, BN={args.bn}')
    print(f'forward MFLOP/image: extractor E={e_flops / 1e6:.1f}, head H={h_flops / 1e6:.1f}; FLOP-ideal speed-up '
          f'N(E+H)/(E+NH) = {ideal:.2f}')

    ways = {'fast': lambda: recombination_matrix(models, test_data, args.batch_size, args.bn),
            'naive': lambda: naive_matrix(models, test_data, args.batch_size, args.bn)}
    results = {k: fn() for k, fn in ways.items()}  # warmup, and the matrices to compare
    times = {k: [] for k in ways}
    for r in range(args.repeats):
        # Alternate the order so neither way always runs right after the other.
        for name in (list(ways) if r % 2 == 0 else list(ways)[::-1]):
            seconds, matrix = time_call(ways[name], device)
            times[name].append(seconds)
            results[name] = matrix
    difference = (results['fast'] - results['naive']).abs().max().item()
    print(format_matrix(results['fast'], [f'net{i}' for i in range(n)], title='recombination matrix (fast)'))
    assert difference <= 1e-6, \
        f'the two ways disagree by {difference}: fast\n{results["fast"]}\nnaive\n{results["naive"]}'
    print(f'fast and naive matrices agree: max |difference| = {difference:.1e}')

    speedups = [naive / fast for fast, naive in zip(times['fast'], times['naive'])]
    row = {k: statistics.median(v) for k, v in times.items()}
    print('paired speed-ups: ' + ' '.join(f'{s:.2f}' for s in speedups))
    print(f'\n{time.strftime("%Y-%m-%d %H:%M")}, {load_average()} at the end')
    print('| N | way | s / matrix | image-head evaluations / s | speed-up (measured) | speed-up (FLOP-ideal) |')
    print('|---|---|---|---|---|---|')
    print(f'| {n} | naive: recombine + accuracy per pair | {row["naive"]:.2f} | {evaluated / row["naive"]:.0f} | '
          f'1.00 | 1.00 |')
    print(f'| {n} | recombination_matrix | {row["fast"]:.2f} | {evaluated / row["fast"]:.0f} | '
          f'{statistics.median(speedups):.2f} | {ideal:.2f} |')
    return {'speedup': statistics.median(speedups), 'ideal': ideal, 'difference': difference}


if __name__ == '__main__':
    main()
