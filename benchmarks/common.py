"""What every benchmark shares: the device setup train.py uses, interleaved timing, and the machine's state.

Every benchmark prints ratios against a baseline measured in the same run, interleaved with it, because the machine
may be shared with other jobs: absolute times move with the load, the ratios much less.
"""
import time
from typing import Callable, Dict, List, Tuple

import torch
from accelerate import Accelerator

from timm_compat._cpu import keep_freed_memory
from timm_compat._hardware import cpu_cores, hardware


def load_average() -> str:
    """The 1-minute load average: above the core count, other jobs are competing with this one for the CPU."""
    try:
        with open('/proc/loadavg') as f:
            return f'load average {f.read().split()[0]}'
    except OSError:
        return 'load average unknown'


def oversubscribed(threads: int, cores: int) -> bool:
    """Whether other jobs leave fewer free cores than ``threads``.

    Every parallel region of an OpenMP op may then wait at its barrier for a descheduled thread, so a step costs
    about (parallel regions x scheduler time slice) rather than its arithmetic, and the ratio measures op counts,
    not work. On this project's shared 2-core machine that made steps 10-25x slower than with one thread.
    """
    try:
        with open('/proc/loadavg') as f:
            load = float(f.read().split()[0])
    except OSError:
        return False
    return threads > 1 and load + threads > cores + 0.5


def require_device(device: str) -> None:
    """Refuse ``--device cuda`` where no GPU is visible, before anything is built or printed.

    Raises:
        SystemExit: ``device`` is ``'cuda'`` and torch sees no CUDA device (torch's own error would come later, as a
            raw RuntimeError from wherever the GPU is first touched).
    """
    if device == 'cuda' and not torch.cuda.is_available():
        raise SystemExit('--device cuda: no CUDA device is visible on this machine; use --device cpu, or run on a '
                         'machine with a GPU.')


def setup(args) -> Tuple[Accelerator, torch.device]:
    """The Accelerator and device of a benchmark run; on CPU, threads and allocator set as train.py sets them."""
    require_device(args.device)
    accelerator = Accelerator(cpu=args.device == 'cpu', mixed_precision='bf16' if getattr(args, 'bf16', False) else 'no')
    device = accelerator.device
    cores = cpu_cores()
    if device.type == 'cpu':
        torch.set_num_threads(args.threads or cores)
        if not args.default_malloc:
            keep_freed_memory()
    print(f'{hardware(device)}; {load_average()}')
    if device.type == 'cpu' and oversubscribed(torch.get_num_threads(), cores):
        print(f'WARNING: the load average says other jobs may hold the cores that {torch.get_num_threads()} threads '
              f'need; multi-threaded CPU timings can then be set by the scheduler, not the work (check GFLOP/s, or '
              f'use --threads 1).')
    return accelerator, device


def interleaved(fns: Dict[str, Callable[[], None]], repeats: int, steps: int, device: torch.device
                ) -> Tuple[Dict[str, List[float]], Dict[str, List[float]]]:
    """Per-step (wall, CPU) seconds of each function, ``repeats`` times, the order reversed on every other repeat."""
    wall, cpu = {k: [] for k in fns}, {k: [] for k in fns}
    for r in range(repeats):
        # Alternating the order means no function always runs on a cache warmed (or a core freed) by another.
        for name in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            w, c = time_block(fns[name], steps, device)
            wall[name].append(w)
            cpu[name].append(c)
    return wall, cpu


def time_block(step: Callable[[], None], steps: int, device: torch.device) -> Tuple[float, float]:
    """(wall, process CPU) seconds per step over ``steps`` back-to-back steps; the device queue is drained first."""
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    return (time.perf_counter() - wall) / steps, (time.process_time() - cpu) / steps
