"""Pieces of a compatibility training run that ``train.py`` and the recipes share."""
import ctypes
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .methods import CompatibilityMethod, compatibility_loss

__all__ = ['JointModel', 'make_optimizer', 'make_scheduler', 'keep_freed_memory']


class JointModel(nn.Module):
    """Every network of a run and their shared interface as one module.

    DDP wraps this module once: the aux heads that all networks share are one set of parameters, reduced once per
    step, which is impossible when each network is wrapped on its own. One forward takes a batch for every
    network and sums their losses, the joint objective of eqs. (1) and (2).
    """

    def __init__(self, networks: Dict[str, nn.Module], interface: Optional[nn.Module],
                 methods: Sequence[CompatibilityMethod] = ()):
        super().__init__()
        self.networks = nn.ModuleDict(networks)
        self.interface = interface
        self.methods = list(methods)

    def forward(self, batches: Sequence[Tuple[torch.Tensor, torch.Tensor]]) -> Dict[str, torch.Tensor]:
        out, total = {}, 0
        for (name, network), (images, labels) in zip(self.networks.items(), batches):
            losses = compatibility_loss(network, images, labels, self.methods)
            out.update({f'{name}/{k}': v for k, v in losses.items() if k != 'loss'})
            total = total + losses['loss']
        out['loss'] = total
        return out


def make_optimizer(params: List[nn.Parameter], name: str, lr: float, momentum: float,
                   weight_decay: float) -> torch.optim.Optimizer:
    if name == 'sgd':
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=momentum > 0)
    if name == 'adamw':
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f'Unknown optimizer {name!r}: use sgd or adamw.')


def make_scheduler(optimizer: torch.optim.Optimizer, schedule: str, total_steps: int,
                   warmup_steps: int = 0) -> torch.optim.lr_scheduler.LRScheduler:
    import math

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == 'constant':
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    if schedule not in ('cosine', 'constant'):
        raise ValueError(f'Unknown schedule {schedule!r}: use cosine or constant.')
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory in the heap instead of returning it to the OS (CPU training).

    At batch 128 an RP batch holds 512 images, and each 16-channel 32x32 activation is 32 MiB: above glibc's
    largest mmap threshold, so every such buffer is a fresh mmap, unmapped when freed and faulted in again, zeroed,
    on the next step. That made resnet56_cifar's compatibility step 1.46x its FLOP ideal instead of 1.17x
    (docs/performance.md). Returns False, changing nothing, where the C library is not glibc.
    """
    try:
        mallopt = ctypes.CDLL('libc.so.6').mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2 ** 31 - 1))
