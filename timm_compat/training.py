"""Pieces of a compatibility training run that ``train.py`` and the recipes share."""
import ctypes
import os
import shutil
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .methods import CompatibilityMethod, compatibility_loss

__all__ = ['JointModel', 'TrainState', 'save_checkpoint', 'latest_checkpoint', 'make_optimizer', 'make_scheduler',
           'keep_freed_memory']

LATEST = 'latest'


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


class TrainState:
    """Step counter saved with ``Accelerator.save_state`` through ``register_for_checkpointing``."""

    def __init__(self):
        self.step = 0

    def state_dict(self) -> Dict[str, int]:
        return {'step': self.step}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        self.step = int(state['step'])


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f'.{path.name}.tmp')
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(accelerator, root: Path, step: int, keep: int = 2) -> Path:
    """``accelerator.save_state`` into ``root/step_XXXXXXXX``, atomically.

    The state is written to a hidden temporary folder, renamed into place, and only then does ``root/latest``
    point at it, so a crash at any moment leaves ``latest`` naming a complete checkpoint. Older checkpoints
    beyond ``keep`` are removed afterwards.
    """
    root = Path(root)
    final, tmp = root / f'step_{step:08d}', root / f'.tmp-step_{step:08d}'
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _atomic_write_text(root / LATEST, final.name)
        for old in sorted(root.glob('step_*'))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def latest_checkpoint(root: Path) -> Optional[Path]:
    """The checkpoint that ``root/latest`` names, or None."""
    pointer = Path(root) / LATEST
    if not pointer.is_file():
        return None
    path = Path(root) / pointer.read_text().strip()
    return path if path.is_dir() else None


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
