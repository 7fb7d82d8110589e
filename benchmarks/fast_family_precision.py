"""Benchmark: training-step throughput of the fast family in fp32 vs bf16 autocast, contiguous vs channels_last.

    python benchmarks/fast_family_precision.py                      # CPU, batch 256, 2 threads
    python benchmarks/fast_family_precision.py --backbones airbench94_cifar --batch-size 512

One plain classification step (forward, cross-entropy, backward, Nesterov SGD) of each backbone, four ways. After a
warmup step of each, blocks of ``--steps`` steps of the four modes alternate (forward order, then reversed, ...) and
each mode's median block time over ``--repeats`` gives its images per second; the line ends with the bf16/fp32
step-time ratio, measured in the same run. bf16 pays off only where the CPU multiplies bf16 in hardware (AMX); with
avx512_bf16 alone it may cost more than fp32.
"""
import argparse
import statistics
import time

import torch
import timm

import timm_compat  # noqa: F401  (registers the fast family)
from timm_compat._hardware import hardware

MODES = (('fp32', False, False), ('bf16', True, False), ('fp32_cl', False, True), ('bf16_cl', True, True))


def measure(name: str, batch_size: int, steps: int, repeats: int) -> dict:
    """Median seconds per step of ``name`` in each of :data:`MODES`."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10).train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9, nesterov=True)
    x, y = torch.randn(batch_size, 3, 32, 32), torch.randint(0, 10, (batch_size,))

    def step(bf16: bool, channels_last: bool) -> None:
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=bf16):
            loss = torch.nn.functional.cross_entropy(model(x.contiguous(memory_format=fmt)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    for _, bf16, cl in MODES:
        model.to(memory_format=torch.channels_last if cl else torch.contiguous_format)
        step(bf16, cl)
    times = {k: [] for k, _, _ in MODES}
    for r in range(repeats):
        for k, bf16, cl in (MODES if r % 2 == 0 else MODES[::-1]):
            model.to(memory_format=torch.channels_last if cl else torch.contiguous_format)  # outside the clock
            start = time.perf_counter()
            for _ in range(steps):
                step(bf16, cl)
            times[k].append((time.perf_counter() - start) / steps)
    return {k: statistics.median(v) for k, v in times.items()}  # an even count: the mean of the middle two


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--backbones', nargs='+', default=['airbench94_cifar', 'airbench_desktop_cifar',
                                                            'airbench_mobile_cifar'])
    parser.add_argument('--batch-size', type=int, default=256)
    parser.add_argument('--steps', type=int, default=2)
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--threads', type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f'{hardware()}; {torch.get_num_threads()} threads; batch {args.batch_size}')
    for name in args.backbones:
        med = measure(name, args.batch_size, args.steps, args.repeats)
        rates = ', '.join(f'{k} {args.batch_size / v:.0f} img/s' for k, v in med.items())
        print(f'{name}: {rates}; bf16/fp32 step time {med["bf16"] / med["fp32"]:.2f}x')


if __name__ == '__main__':
    main()
