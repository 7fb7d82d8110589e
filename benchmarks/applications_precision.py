"""Benchmark: an application's training steps in fp32 and under bf16 autocast, interleaved in one run.

    python benchmarks/applications_precision.py                        # adapt(), ResNet-20, one thread, CPU
    python benchmarks/applications_precision.py --application fit_stitch --steps 20 --repeats 7
    python benchmarks/applications_precision.py --device cuda --batch-size 128

Every application trains through :func:`timm_compat.fit.fit`, so ``mixed_precision="bf16"`` autocasts its steps
(weights and optimiser state stay fp32). ``adapt`` runs the extractor on four rotations of each target image and
back-propagates through all of it; ``fit_stitch`` runs the extractor without gradient and trains only a 1x1 conv,
so most of its time is the extractor's forward pass.

Each timed call is one whole application call of ``--steps`` steps (setup included, as a user pays it). Calls
alternate fp32, bf16, bf16, fp32, ... after one warm-up call of each, and the speed-up is the median over repeats of
fp32 seconds / bf16 seconds of adjacent calls: a machine shared with other jobs slows both calls of a pair alike.
On CPU, bf16 pays off only where the CPU has bf16 matrix instructions (AVX512-BF16, AMX); without them it can be
slower than fp32.
"""
import argparse
import statistics
import time

import torch

import timm_compat
from timm_compat._hardware import hardware
from timm_compat.adaptation import adapt
from timm_compat.data import ImageData
from timm_compat.stitching import fit_stitch
from timm_compat.synthetic import make_synthetic
from common import interleaved, load_average, require_device  # benchmarks/ is on sys.path


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--application', default='adapt', choices=['adapt', 'fit_stitch'])
    parser.add_argument('--backbone', default='resnet20_cifar')
    parser.add_argument('--split', default='layer2')
    parser.add_argument('--width', type=int, default=64, help='interface width')
    parser.add_argument('--batch-size', type=int, default=64)
    parser.add_argument('--steps', type=int, default=10, help='steps per timed application call')
    parser.add_argument('--repeats', type=int, default=5, help='timed (fp32, bf16) pairs')
    parser.add_argument('--device', default='cpu', choices=['cpu', 'cuda'])
    parser.add_argument('--threads', type=int, default=1, help='torch CPU threads (1 on a shared machine)')
    return parser.parse_args(argv)


def application(args, device: torch.device):
    """``run(mixed_precision) -> final training loss or None`` of the application on synthetic 32 px images."""
    images, labels, names = make_synthetic('A', 'train', 32, max(8, args.batch_size // 10 + 1), seed=0)
    data = ImageData(images, labels, names)
    interface = timm_compat.Interface(width=args.width, rp=True).to(device)

    def network(seed, interface=None, width=None):
        return timm_compat.make_compatible(args.backbone, split=args.split, interface=interface, width=width,
                                           num_classes=len(names), class_names=names, init_seed=seed).to(device)

    if args.application == 'adapt':
        source = network(0, interface)

        def run(mixed_precision: str) -> float:
            result = adapt(source, data.images, args.steps, batch_size=args.batch_size, log_every=args.steps,
                           mixed_precision=mixed_precision)
            return result.history['rp_loss'][-1]
    else:
        extractor, head = network(1, width=args.width // 2).extractor, network(0, interface).head

        def run(mixed_precision: str) -> float:
            fit_stitch(extractor, head, data, args.steps, batch_size=args.batch_size, mixed_precision=mixed_precision)
            return None  # fit_stitch returns the stitched model, not its losses
    return run


def main(argv=None):
    args = parse_args(argv)
    require_device(args.device)
    device = torch.device(args.device)
    if device.type == 'cpu':
        torch.set_num_threads(args.threads)
    print(f'{hardware(device)}; {load_average()}')
    run = application(args, device)
    losses = {'fp32': run('no'), 'bf16': run('bf16')}  # warm-up: first-call kernel selection is not timed
    calls = {'fp32': lambda: losses.__setitem__('fp32', run('no')),
             'bf16': lambda: losses.__setitem__('bf16', run('bf16'))}
    wall, cpu = interleaved(calls, args.repeats, 1, device)
    speedups = [fp32 / bf16 for fp32, bf16 in zip(wall['fp32'], wall['bf16'])]
    cpu_speedups = [fp32 / bf16 for fp32, bf16 in zip(cpu['fp32'], cpu['bf16'])]
    print(f'{args.application}: {args.backbone} split {args.split}, width {args.width}, batch {args.batch_size}, '
          f'{args.steps} steps per call, {args.repeats} interleaved pairs')
    print('paired fp32/bf16 wall-time ratios: ' + ' '.join(f'{s:.2f}' for s in speedups))
    print(f'\n{time.strftime("%Y-%m-%d %H:%M")}, {load_average()} at the end')
    print('| precision | s / call (median) | s / step | final training loss | speed-up over fp32 (wall) | (CPU time) |')
    print('|---|---|---|---|---|---|')
    for name, ratio, cpu_ratio in (('fp32', 1.0, 1.0), ('bf16', statistics.median(speedups),
                                                         statistics.median(cpu_speedups))):
        seconds, loss = statistics.median(wall[name]), losses[name]
        print(f'| {name} | {seconds:.2f} | {seconds / args.steps:.3f} | {"–" if loss is None else f"{loss:.3f}"} | '
              f'{ratio:.2f} | {cpu_ratio:.2f} |')
    return {'speedup': statistics.median(speedups), 'cpu_speedup': statistics.median(cpu_speedups)}


if __name__ == '__main__':
    main()
