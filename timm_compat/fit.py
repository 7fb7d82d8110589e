"""One training loop for every trainer: train.py's phases and the applications (adapt, transfer, stitching).

A *task* is a callable (usually a module) that takes a batch and returns a dict of scalar tensors with a ``'loss'``
key, as timm's ``timm.task.TrainingTask`` does; the other entries are logged. ``batch_at(step)`` returns the batch
of global step ``step``, so a run resumed at ``start_step`` sees the batches an uninterrupted run would have seen.
:func:`fit` runs the steps: forward under autocast, backward, clipping, optimiser and scheduler steps, loss means
per log interval and a progress bar. Loss sums stay on the device; reading them (one sync) happens at log steps.

With an ``accelerator`` the caller has prepared task, optimiser and scheduler, and the accelerator decides mixed
precision and gradient accumulation. Without one, :func:`fit` runs on the optimiser's device, with
``mixed_precision`` through ``torch.autocast`` (and a gradient scaler for fp16). Applications use the latter:
Accelerate's state is one per process, and an application is called many times in one process at any precision.
"""
import contextlib
import os
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

__all__ = ['MIXED_PRECISION', 'ClassificationTask', 'autocast', 'call_frozen', 'fit']

MIXED_PRECISION = {'no': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}

Losses = Dict[str, torch.Tensor]


def check_mixed_precision(mixed_precision: str) -> None:
    """Refuses an unknown ``mixed_precision``: applications call it first, before any work that it would waste."""
    if mixed_precision not in MIXED_PRECISION:
        raise ValueError(f'Unknown mixed_precision {mixed_precision!r}: use one of {list(MIXED_PRECISION)}.')


def autocast(device: torch.device, mixed_precision: str = 'no') -> contextlib.AbstractContextManager:
    """``torch.autocast`` on ``device`` for ``mixed_precision`` (``'no'``, ``'bf16'`` or ``'fp16'``).

    Raises:
        ValueError: An unknown ``mixed_precision``.
    """
    check_mixed_precision(mixed_precision)
    dtype = MIXED_PRECISION[mixed_precision]
    return torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not None)


def call_frozen(module: nn.Module, *args, **kwargs):
    """``module(*args, **kwargs)`` with its parameters detached: gradients reach the inputs, never the parameters.

    A frozen component between the trained one and the loss (the RP head in adaptation, the head behind a stitch)
    stays bit-identical and its ``.grad`` untouched even when its parameters require grad, which the caller's
    components usually do. Buffers are the module's own.
    """
    detached = {name: p.detach() for name, p in module.named_parameters()}
    return torch.func.functional_call(module, detached, args, kwargs)


class ClassificationTask(nn.Module):
    """Cross-entropy of ``model`` on ``(images, labels)`` batches, optionally on the output of a frozen module.

    Args:
        model: The module that trains.
        frozen: Runs first, without autograd (``torch.no_grad``), so no gradient reaches it: e.g. a frozen extractor
            under a trained head.
        label_smoothing: torch's ``label_smoothing`` of the cross-entropy (the fast recipe's 0.2).
    """

    def __init__(self, model: nn.Module, frozen: Optional[nn.Module] = None, label_smoothing: float = 0.0):
        super().__init__()
        self.model, self.frozen, self.label_smoothing = model, frozen, label_smoothing

    def forward(self, batch) -> Losses:
        images, labels = batch
        if self.frozen is not None:
            with torch.no_grad():
                images = self.frozen(images)
        return {'loss': F.cross_entropy(self.model(images), labels, label_smoothing=self.label_smoothing)}


class _Meter:
    """Per-key sums of the losses of one log interval, kept on the device until read."""

    def __init__(self):
        self.sums: Losses = {}
        self.counts: Dict[str, int] = {}

    def add(self, losses: Losses) -> None:
        for k, v in losses.items():
            if v.dim() == 0:  # timm's tasks also return e.g. 'output', which is not a loss to average
                v = v.float()
                self.sums[k] = self.sums[k] + v if k in self.sums else v
                self.counts[k] = self.counts.get(k, 0) + 1

    def pop(self) -> Dict[str, float]:
        """The means since the last pop, read in one sync, and a fresh interval."""
        keys = list(self.sums)
        means = torch.stack([self.sums[k] / self.counts[k] for k in keys]).tolist() if keys else []
        self.sums, self.counts = {}, {}
        return dict(zip(keys, means))


class _Stepper:
    """One training step: forward under autocast, backward, the hook, clipping, optimiser and scheduler steps."""
    sync_gradients = True

    def __init__(self, optimizer, scheduler, clip_grad_norm: Optional[float],
                 before_optimizer_step: Optional[Callable[[int], None]]):
        self.optimizer, self.scheduler = optimizer, scheduler
        self.params = [p for group in optimizer.param_groups for p in group['params']]
        self.clip_grad_norm, self.before_optimizer_step = clip_grad_norm, before_optimizer_step

    def step(self, task, batch, step: int) -> Losses:
        with self.accumulate():
            with self.autocast():
                losses = task(batch)
            self.backward(losses['loss'])
            if self.before_optimizer_step is not None:  # before clipping: a gradient it drops is not applied
                self.before_optimizer_step(step)
            if self.clip_grad_norm and self.sync_gradients:
                self.clip()
            self.optimizer_step()
            if self.scheduler is not None:
                self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        return {k: v.detach() for k, v in losses.items()}


class _Plain(_Stepper):
    """On the optimiser's device, with autocast and, for fp16, a gradient scaler."""

    def __init__(self, mixed_precision: str, *args):
        super().__init__(*args)
        device = self.params[0].device
        autocast(device, mixed_precision)  # refuses an unknown precision before any step
        self.autocast = lambda: autocast(device, mixed_precision)
        self.scaler = torch.amp.GradScaler(device.type) if mixed_precision == 'fp16' else None
        self.is_local_main_process = int(os.environ.get('LOCAL_RANK', 0)) == 0

    def accumulate(self):
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def clip(self) -> None:
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.params, self.clip_grad_norm)

    def optimizer_step(self) -> None:
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()


class _Accelerated(_Stepper):
    """Through a prepared Accelerate setup, which owns precision, scaling and gradient accumulation."""

    def __init__(self, accelerator, task, *args):
        super().__init__(*args)
        self.accelerator, self.task = accelerator, task
        self.autocast = accelerator.autocast
        self.is_local_main_process = accelerator.is_local_main_process

    @property
    def sync_gradients(self) -> bool:
        return self.accelerator.sync_gradients

    def accumulate(self):
        return self.accelerator.accumulate(self.task)

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def clip(self) -> None:
        self.accelerator.clip_grad_norm_(self.params, self.clip_grad_norm)

    def optimizer_step(self) -> None:
        self.optimizer.step()  # a prepared optimiser skips the steps that only accumulate


def _stepper(task, accelerator, mixed_precision: str, *args) -> _Stepper:
    if accelerator is None:
        return _Plain(mixed_precision, *args)
    if mixed_precision != 'no':
        raise ValueError(f'mixed_precision={mixed_precision!r} with an accelerator: the accelerator decides the '
                         f'precision (Accelerator(mixed_precision=...)); leave mixed_precision="no" here.')
    return _Accelerated(accelerator, task, *args)


def _finish(scheduler) -> None:
    scheduler = getattr(scheduler, 'scheduler', scheduler)  # inside Accelerate's AcceleratedScheduler
    if hasattr(scheduler, 'finish'):
        scheduler.finish()


def fit(task: Callable[[object], Losses], batch_at: Callable[[int], object], steps: int,
        optimizer: torch.optim.Optimizer, scheduler=None, *, accelerator=None, mixed_precision: str = 'no',
        start_step: int = 0, clip_grad_norm: Optional[float] = None,
        before_optimizer_step: Optional[Callable[[int], None]] = None,
        on_step: Optional[Callable[[int, Losses], None]] = None,
        on_log: Optional[Callable[[int, Dict[str, float]], None]] = None,
        log_every: int = 0, desc: Optional[str] = None) -> List[Dict[str, float]]:
    """Train ``task`` for steps ``start_step .. steps - 1`` and return the logged loss means.

    Each step: ``batch_at(step)``, ``task(batch)`` under autocast, backward of ``'loss'``,
    ``before_optimizer_step(step)``, gradient clipping over the optimiser's parameters (on the steps that update, with
    accumulation), optimiser and scheduler steps, ``zero_grad(set_to_none=True)``. After the last step the
    scheduler's ``finish()`` runs, if it has one (:class:`~timm_compat.optim.UpdateSchedule`: a lookahead run ends
    on its slow weights even when an fp16 update was skipped). Train/eval modes are the caller's: :func:`fit` sets
    none.

    Callbacks before the update receive the index of the step being taken, ``step``; those after it receive the
    number of steps done, ``step + 1``.

    Args:
        task: Batch -> dict of scalar tensors with a ``'loss'`` key (non-scalar entries are not logged).
        batch_at: Global step -> batch; called once per step, in order.
        steps: Total steps of the run; the loop ends when ``steps`` are done.
        optimizer: Optimiser of the trained parameters.
        scheduler: Stepped after every optimiser step, if given.
        accelerator: A prepared ``accelerate.Accelerator``, or ``None`` to run on the optimiser's device.
        mixed_precision: ``'no'``, ``'bf16'`` or ``'fp16'`` autocast without an accelerator (with one: ``'no'``).
        start_step: Steps already done (a resume).
        clip_grad_norm: Clip the gradients' total norm to this value.
        before_optimizer_step: Called with ``step`` after backward, before clipping and the optimiser step: a
            gradient it sets to None counts in neither.
        on_step: Called with ``step + 1`` and the step's detached losses after each step.
        on_log: Called with ``step + 1`` and the per-key loss means since the last log, every ``log_every`` steps
            and after the last step.
        log_every: Steps per log interval; ``0`` logs after the last step only.
        desc: Label of the progress bar.

    Returns:
        One row per log, ``{'step': steps done, key: mean, ...}``.
    """
    stepper = _stepper(task, accelerator, mixed_precision, optimizer, scheduler, clip_grad_norm, before_optimizer_step)
    progress = tqdm(total=steps, initial=start_step, desc=desc, disable=not stepper.is_local_main_process)
    meter, rows = _Meter(), []
    for step in range(start_step, steps):
        losses = stepper.step(task, batch_at(step), step)
        if step + 1 == steps:
            _finish(scheduler)
        meter.add(losses)
        progress.update(1)
        if on_step is not None:
            on_step(step + 1, losses)
        if step + 1 == steps or (log_every and (step + 1) % log_every == 0):
            means = meter.pop()
            rows.append({'step': step + 1, **means})
            progress.set_postfix(loss=f'{means["loss"]:.3f}')
            if on_log is not None:
                on_log(step + 1, means)
    progress.close()
    return rows
