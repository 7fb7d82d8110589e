"""Optimisers and learning-rate schedules of every training loop."""
import math
from typing import List

import torch
from torch import nn

__all__ = ['make_optimizer', 'make_scheduler']


def make_optimizer(params: List[nn.Parameter], name: str, lr: float, momentum: float,
                   weight_decay: float) -> torch.optim.Optimizer:
    if name == 'sgd':
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=momentum > 0)
    if name == 'adamw':
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f'Unknown optimizer {name!r}: use sgd or adamw.')


def make_scheduler(optimizer: torch.optim.Optimizer, schedule: str, total_steps: int,
                   warmup_steps: int = 0) -> torch.optim.lr_scheduler.LRScheduler:
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
