"""Optimisers and learning-rate schedules of every training loop, by timm name.

:func:`make_optimizer` is ``timm.optim.create_optimizer_v2`` (every name of ``timm.optim.list_optimizers()``);
:func:`make_scheduler` is ``timm.scheduler.create_scheduler_v2`` stepped once per optimiser update, behind the
``scheduler.step()`` interface of a torch schedule, so that the training loop and Accelerate's prepared scheduler
drive any timm schedule. Names are checked by :func:`check_optim` before anything runs.
"""
from typing import Any, Dict, Iterable, List, Optional

import torch
from timm.optim import create_optimizer_v2, list_optimizers
from timm.scheduler import create_scheduler_v2

__all__ = ['SCHEDULES', 'make_optimizer', 'make_scheduler', 'check_optim', 'optimizer_names', 'UpdateSchedule']

# create_scheduler_v2's names that are stepped per update; 'plateau' needs a validation metric every epoch, which
# a run does not measure while training.
SCHEDULES = ('cosine', 'tanh', 'step', 'multistep', 'poly', 'wsd', 'rsqrt', 'constant')


def optimizer_names() -> List[str]:
    """Every optimiser name timm knows, as ``create_optimizer_v2`` takes it (``lookahead_<name>`` too)."""
    return list_optimizers()


def check_optim(optimizer: str, schedule: str, optimizer_args: Optional[Dict[str, Any]] = None,
                schedule_args: Optional[Dict[str, Any]] = None) -> None:
    """Build the optimiser and schedule once on a dummy parameter, so a bad name or argument fails before a run.

    Raises:
        ValueError: Naming the problem and, for an unknown name, every valid one.
    """
    name = optimizer.lower().split('_')[-1]
    if name not in optimizer_names():
        raise ValueError(f'unknown optimizer {optimizer!r}; timm has: {", ".join(optimizer_names())} '
                         f'(each also as lookahead_<name>)')
    if schedule not in SCHEDULES:
        raise ValueError(f'unknown schedule {schedule!r}; use one of: {", ".join(SCHEDULES)}')
    param = torch.nn.Parameter(torch.zeros(1))
    try:
        opt = make_optimizer([param], optimizer, 0.1, 0.9, 0.0, **(optimizer_args or {}))
        make_scheduler(opt, schedule, 10, 1, **(schedule_args or {}))
    except (TypeError, ValueError, AssertionError, ImportError) as e:
        raise ValueError(f'optimizer {optimizer!r} / schedule {schedule!r} refuse their arguments: {e}') from None


def make_optimizer(params: Iterable[torch.nn.Parameter], name: str, lr: float, momentum: float,
                   weight_decay: float, **kwargs: Any) -> torch.optim.Optimizer:
    """``timm.optim.create_optimizer_v2`` over ``params`` (weight decay on every one of them, as given).

    Args:
        params: Parameters or parameter groups (a module's 1-d parameters are not exempted from weight decay).
        name: A timm optimiser name, e.g. ``sgd`` (Nesterov momentum), ``momentum``, ``adamw``, ``lamb``.
        lr: Learning rate.
        momentum: Momentum, for the optimisers that have one.
        weight_decay: Weight decay.
        **kwargs: Passed to the optimiser class, e.g. ``betas``, ``eps``.
    """
    if name.lower().split('_')[-1] in ('sgd', 'nesterov') and momentum == 0:
        kwargs.setdefault('nesterov', False)  # torch's Nesterov SGD needs momentum; plain SGD is what 0 means
    return create_optimizer_v2(list(params), opt=name, lr=lr, weight_decay=weight_decay, momentum=momentum,
                               **kwargs)


def make_scheduler(optimizer: torch.optim.Optimizer, schedule: str, total_steps: int, warmup_steps: int = 0, *,
                   ticks_per_step: int = 1, **kwargs: Any) -> 'UpdateSchedule':
    """A timm schedule over ``total_steps`` optimiser updates, ``warmup_steps`` of them linear warmup.

    Args:
        optimizer: The optimiser whose learning rate is scheduled.
        schedule: One of :data:`SCHEDULES`.
        total_steps: Optimiser updates of the whole run, warmup included.
        warmup_steps: Updates of linear warmup from ``warmup_lr`` (timm's default 1e-5), before the schedule.
        ticks_per_step: ``step()`` calls per update: Accelerate's prepared scheduler calls it once per process.
        **kwargs: Passed to ``create_scheduler_v2``, e.g. ``min_lr``, ``decay_rate``, ``decay_milestones``;
            its ``*_epochs`` durations count optimiser updates here.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f'unknown schedule {schedule!r}; use one of: {", ".join(SCHEDULES)}')
    warmup = dict(warmup_epochs=warmup_steps, warmup_prefix=True) if warmup_steps else {}
    timm_schedule, _ = create_scheduler_v2(optimizer, sched=schedule,
                                           num_epochs=max(1, total_steps - warmup_steps),
                                           **{'min_lr': 0.0, **warmup, **kwargs},
                                           step_on_epochs=False, updates_per_epoch=1)
    return UpdateSchedule(timm_schedule, ticks_per_step)


class UpdateSchedule(torch.optim.lr_scheduler.LRScheduler):
    """A timm schedule behind torch's ``step()`` / ``get_last_lr()`` / ``state_dict()``, stepped per update.

    It is a torch ``LRScheduler`` because ``accelerator.prepare`` wraps (steps with the optimiser, checkpoints)
    only those; torch's constructor is not run: the learning rates and the state are the timm schedule's.

    Args:
        schedule: A ``timm.scheduler.Scheduler`` built with ``step_on_epochs=False``.
        ticks_per_step: ``step()`` calls per optimiser update; the schedule advances once all of them are made.
    """

    def __init__(self, schedule, ticks_per_step: int = 1):
        self.schedule, self.ticks_per_step, self.ticks = schedule, ticks_per_step, 0
        self.optimizer = schedule.optimizer
        self._step_count = 1  # read and bumped by Accelerate while gradients accumulate

    @property
    def updates(self) -> int:
        return self.ticks // self.ticks_per_step

    def step(self, epoch=None) -> None:
        self.ticks += 1
        if self.ticks % self.ticks_per_step == 0:
            self.schedule.step_update(self.updates)

    def get_last_lr(self) -> List[float]:
        return [group['lr'] for group in self.optimizer.param_groups]

    def state_dict(self) -> Dict[str, Any]:
        return {'ticks': self.ticks, 'ticks_per_step': self.ticks_per_step, 'schedule': self.schedule.state_dict()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if 'last_epoch' in state:  # a checkpoint of the LambdaLR schedule before timm's: counted ticks the same way
            self.ticks = state['last_epoch']
        else:
            self.ticks = state['ticks'] * self.ticks_per_step // state.get('ticks_per_step', 1)
            self.schedule.load_state_dict(state['schedule'])
        self.schedule.step_update(self.updates)

