"""Measurement: does accuracy with batch-statistics BN depend on the order in which the test set is stored?

    python benchmarks/eval_order.py                    # ResNet-8 on synthetic:A, about a minute on one CPU thread
    python benchmarks/eval_order.py --steps 400 --batch-size 100
    python benchmarks/eval_order.py --per-class 4 --train-batch-size 32     # a smaller training set

Trains one independent ResNet-8 (split after layer2, width 16) on the synthetic domain A, then scores its test split
stored two ways: as generated (classes interleaved at random) and sorted by class, as ``imagefolder`` data loads.
Each is evaluated with BN batch statistics (the paper's test-time mode) in two batch orders:

* stored order: consecutive slices of the stored data, as evaluation did before; a class-sorted test set then
  gives class-homogeneous batches, whose statistics erase what tells the classes apart;
* seeded permutation: :func:`timm_compat.evaluation.accuracy`, batches drawn by
  :func:`timm_compat.data.evaluation_batches`; the stored order no longer matters.

Measured with the defaults (2-core Xeon shared with other jobs, one thread, torch 2.14.1, 78 s):

| test set stored | stored-order batches (%) | seeded permutation (%) |
|---|---|---|
| as generated | 78.4 | 78.7 |
| sorted by class | 43.7 | 77.5 |
"""
import argparse

import torch
import torch.nn.functional as F

import timm_compat as tc
from timm_compat.batchnorm import eval_mode
from timm_compat.data import EpochSampler, ImageData, normalize, training_batch
from timm_compat.evaluation import accuracy
from timm_compat.synthetic import SYNTHETIC_CLASSES, make_synthetic


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--steps', type=int, default=200, help='SGD steps of training')
    parser.add_argument('--per-class', type=int, default=100, help='synthetic images per class, train and test')
    parser.add_argument('--batch-size', type=int, default=250, help='evaluation batch size (train.py default)')
    parser.add_argument('--train-batch-size', type=int, default=64, help='training batch size')
    parser.add_argument('--threads', type=int, default=1)
    args = parser.parse_args(argv)
    if min(args.per_class, args.batch_size, args.train_batch_size, args.steps, args.threads) <= 0:
        parser.error('--per-class, --batch-size, --train-batch-size, --steps and --threads must be positive.')
    # Checked here, not by EpochSampler after the data is made: its "lower the batch size" names no flag.
    images = args.per_class * len(SYNTHETIC_CLASSES['A'])
    if args.train_batch_size > images:
        parser.error(f'--train-batch-size {args.train_batch_size} is more than the {images} training images of '
                     f'--per-class {args.per_class}: lower --train-batch-size or raise --per-class.')
    return args


def train(per_class: int, steps: int, batch_size: int = 64) -> torch.nn.Module:
    """ResNet-8 trained ``steps`` SGD steps of ``batch_size`` images, ``per_class`` per class of synthetic A."""
    images, labels, names = make_synthetic('A', 'train', 32, per_class, 0)
    data = ImageData(images, labels, names)
    model = tc.make_compatible('resnet8_cifar', split='layer2', interface=None, width=16, num_classes=len(names),
                               class_names=names, init_seed=0)
    cfg = model.extractor.pretrained_cfg
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    sampler = EpochSampler(len(data), batch_size, seed=0)
    model.train()
    for step in range(steps):
        x, y = training_batch(data, sampler.batch(step), cfg['mean'], cfg['std'])
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model


@torch.no_grad()
def stored_order_accuracy(model, data: ImageData, batch_size: int) -> float:
    """Accuracy over consecutive slices of the stored data: evaluation as it was before the seeded permutation."""
    cfg = model.extractor.pretrained_cfg
    with eval_mode(model, 'batch'):
        correct = sum((model(normalize(x, cfg['mean'], cfg['std'])).argmax(1) == y).sum().item()
                      for x, y in zip(data.images.split(batch_size), data.labels.split(batch_size)))
    return correct / len(data)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    model = train(args.per_class, args.steps, args.train_batch_size)
    images, labels, names = make_synthetic('A', 'test', 32, args.per_class, 0)
    by_class = labels.argsort(stable=True)
    stored = {'as generated': ImageData(images, labels, names),
              'sorted by class': ImageData(images[by_class], labels[by_class], names)}
    print(f'ResNet-8, {args.steps} steps on synthetic:A; {len(labels)} test images, evaluation batch '
          f'{args.batch_size}, BN batch statistics')
    print('| test set stored | stored-order batches (%) | seeded permutation (%) |')
    print('|---|---|---|')
    for name, data in stored.items():
        print(f'| {name} | {100 * stored_order_accuracy(model, data, args.batch_size):.1f} | '
              f'{100 * accuracy(model, data, args.batch_size):.1f} |')


if __name__ == '__main__':
    main()
