"""Benchmark: the data loader's share of a compatibility training step.

    python benchmarks/loader_share.py                      # CPU, all three backbones
    python benchmarks/loader_share.py --threads 1          # a CPU shared with other jobs
    python benchmarks/loader_share.py --device cuda --batch-size 128 --channels-last --bf16

``train.py`` holds each training set on the device as one ``uint8`` tensor (CIFAR-10: 150 MiB) and builds every
batch there with :func:`timm_compat.data.training_batch`: index gather, pad + random crop, flip, normalise. There is
no worker process and no host-to-device copy per step, so the device can only wait for data if building a batch
takes a noticeable part of the step. This script measures that part.

For each backbone, two networks train jointly with RP + DCC (the ``build_compat`` model of ``train_step.py``) on
two CIFAR-10-sized sets of random ``uint8`` images, sampled as train.py samples them (:class:`EpochSampler` on the
device). Two functions are timed, interleaved:

* ``load``: the batches of one step, for both networks, as train.py builds them;
* ``step``: ``load`` followed by the model step (forward, backward, optimizer step, zero_grad).

The loader's share is ``load / step``. On CUDA both are timed with the queue drained at the block ends, so ``load``
is the GPU time of the batch kernels plus their launches; a share of a few percent means the GPU spends that few
percent building batches and the rest training, never waiting on a host loader.
"""
import argparse
import statistics
import time

import torch

from timm_compat.data import EpochSampler, ImageData, training_batch
from common import interleaved, setup  # benchmarks/ is on sys.path
from train_step import BACKBONES, CLASS_NAMES, IMAGE_SIZE, build_compat, make_step

CIFAR10_TRAIN = 50000


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--backbones', nargs='+', default=list(BACKBONES), choices=list(BACKBONES))
    parser.add_argument('--batch-size', type=int, default=64, help='images per network per step')
    parser.add_argument('--width', type=int, default=64, help='interface width')
    parser.add_argument('--images', type=int, default=CIFAR10_TRAIN, help='training images per network')
    parser.add_argument('--repeats', type=int, default=5, help='timed (load, step) block pairs per backbone')
    parser.add_argument('--steps', type=int, default=3, help='steps per timed block')
    parser.add_argument('--device', default='auto', choices=['auto', 'cpu', 'cuda'])
    parser.add_argument('--channels-last', action='store_true')
    parser.add_argument('--bf16', action='store_true', help="Accelerator(mixed_precision='bf16')")
    parser.add_argument('--threads', type=int, default=None, help='torch CPU threads (default: the cores we may use)')
    parser.add_argument('--default-malloc', action='store_true',
                        help="on CPU, skip train.py's keep_freed_memory() and use glibc's defaults")
    return parser.parse_args(argv)


def main(argv=None) -> list:
    args = parse_args(argv)
    accelerator, device = setup(args)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    print(f'batch {args.batch_size} per network x 2 networks from {args.images} uint8 images each, mixed_precision='
          f'{accelerator.mixed_precision}, channels_last={args.channels_last}; {args.repeats} x {args.steps} '
          f'timed steps of each kind, interleaved')

    generator = torch.Generator().manual_seed(0)
    sets = [ImageData(torch.randint(0, 256, (args.images, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=torch.uint8,
                                    generator=generator),
                      torch.randint(0, len(names), (args.images,), generator=generator), names).to(device)
            for names in CLASS_NAMES]
    rows = []
    for backbone in args.backbones:
        model = build_compat(backbone, args.width).to(device=device, memory_format=memory_format)
        cfg = next(iter(model.networks.values())).pretrained_cfg
        stats = [torch.tensor(cfg[k], device=device) for k in ('mean', 'std')]
        samplers = [EpochSampler(args.images, args.batch_size, seed, device=device) for seed in range(len(sets))]
        counter = iter(range(10 ** 9))

        def load():
            step = next(counter)
            return {name: training_batch(data, sampler.batch(step), *stats, True, memory_format)
                    for name, data, sampler in zip(model.networks, sets, samplers)}

        batches = load()  # make_step's closure reads this dict; each timed step refills it in place
        model_step, _ = make_step(accelerator, model, batches)

        def step():
            batches.update(load())
            model_step()

        step()  # warmup
        wall, _ = interleaved({'load': load, 'step': step}, args.repeats, args.steps, device)
        shares = [a / b for a, b in zip(wall['load'], wall['step'])]
        row = dict(backbone=backbone, load_ms=1e3 * statistics.median(wall['load']),
                   step_ms=1e3 * statistics.median(wall['step']), share=statistics.median(shares))
        rows.append(row)
        print(f'{backbone}: paired load/step shares ' + ' '.join(f'{x:.4f}' for x in shares))
        accelerator.free_memory()

    print(f'\n{time.strftime("%Y-%m-%d %H:%M")}')
    print('| backbone | batch | load ms (both networks) | full step ms | loader share of the step | '
          'images/s the loader alone could feed |')
    print('|---|---|---|---|---|---|')
    for r in rows:
        print(f"| {r['backbone']} | {args.batch_size} | {r['load_ms']:.2f} | {r['step_ms']:.0f} | "
              f"{100 * r['share']:.2f} % | {2 * args.batch_size / r['load_ms'] * 1e3:.0f} |")
    return rows


if __name__ == '__main__':
    main()
