"""One line naming the machine a result was measured on, for recipe reports and benchmark output."""
import os
from typing import Optional

import timm
import torch

__all__ = ['hardware', 'cpu_cores']


def cpu_cores() -> int:
    """The cores this process may run on (its affinity mask where the OS has one, else every core)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()


def hardware(device: Optional[torch.device] = None) -> str:
    """The device (the GPU's name on CUDA), the CPU model and cores, torch threads and the torch and timm versions.

    Args:
        device: The device that ran; default: the first GPU if there is one, else the CPU.
    """
    if device is None:
        device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    name = 'unknown CPU'
    try:
        with open('/proc/cpuinfo') as f:
            name = next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
    except (OSError, StopIteration):
        pass
    gpu = f'{torch.cuda.get_device_name(device)}; ' if device.type == 'cuda' else ''
    return (f'device {device.type}: {gpu}{name} x {cpu_cores()} cores, {torch.get_num_threads()} torch threads; '
            f'torch {torch.__version__}, timm {timm.__version__}')
