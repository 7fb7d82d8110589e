"""The step loop of one training phase: batches, backward, clipping, NaN checks, logging and checkpoints."""
import time
from pathlib import Path
from typing import Dict

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from .checkpoint import TrainState, check_finite, latest_checkpoint, save_checkpoint
from .data import training_batch
from .metrics_log import MetricsLog

__all__ = ['TrainLoop']


class TrainLoop:
    """The step loop of one phase: batches, backward, clipping, NaN checks, logging and checkpoints.

    ``phase`` is train.py's ``Phase``: its ``cfg``, ``models``, ``joint`` (the unwrapped
    :class:`~timm_compat.joint.JointModel`), ``trained`` names and ``tag``. Loss sums and the first non-finite step stay on the device; reading them costs a sync, done only at log and
    checkpoint steps.
    """

    def __init__(self, phase, accelerator: Accelerator, joint, optimizer, scheduler, params, state: TrainState,
                 metrics: MetricsLog, ckpt_root: Path):
        self.phase, self.cfg, self.accelerator = phase, phase.cfg, accelerator
        self.joint, self.optimizer, self.scheduler, self.params = joint, optimizer, scheduler, params
        self.state, self.metrics, self.ckpt_root = state, metrics, ckpt_root
        device = accelerator.device
        self.stats = {name: [torch.tensor(phase.models[name].pretrained_cfg[k], device=device)
                             for k in ('mean', 'std')] for name in phase.trained}
        self.memory_format = torch.channels_last if self.cfg.channels_last else torch.contiguous_format
        self.first_bad = torch.tensor(-1, device=device)
        self.sums: Dict[str, torch.Tensor] = {}
        self.counts: Dict[str, int] = {}

    def step(self, data) -> None:
        # With gradient accumulation every micro-batch of one optimiser update trains the same networks.
        update = self.state.step // self.cfg.gradient_accumulation_steps
        batches = {}
        for name in self.phase.joint.networks_at(update):
            train_set, sampler = data[name]
            batches[name] = training_batch(train_set, sampler.batch(self.state.step), *self.stats[name],
                                           self.cfg.augment, self.memory_format)
        with self.accelerator.accumulate(self.joint):
            losses = self.joint(batches)
            self.accelerator.backward(losses['loss'])
            if self.cfg.optim.clip_grad_norm and self.accelerator.sync_gradients:
                self.accelerator.clip_grad_norm_(self.params, self.cfg.optim.clip_grad_norm)
            self.phase.joint.drop_inactive_grads(update)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        for k, v in losses.items():
            v = v.detach().float()
            self.sums[k] = self.sums[k] + v if k in self.sums else v
            self.counts[k] = self.counts.get(k, 0) + 1
        bad = ~torch.isfinite(losses['loss'].detach())
        self.first_bad = torch.where((self.first_bad < 0) & bad, self.state.step, self.first_bad)

    def run(self, total_steps: int, data) -> None:
        cfg, tag = self.cfg, self.phase.tag
        start, before = time.time(), self.state.train_seconds
        progress = tqdm(total=total_steps, initial=self.state.step, desc=tag,
                        disable=not self.accelerator.is_local_main_process)
        self.joint.train()
        while self.state.step < total_steps:
            self.step(data)
            self.state.train_seconds = before + time.time() - start
            progress.update(1)
            step = self.state.step
            log_now = step % cfg.log_every == 0 or step == total_steps
            ckpt_now = step % cfg.checkpoint_every == 0 and step < total_steps
            if log_now or ckpt_now:
                self.check_finite()
            if log_now:
                progress.set_postfix(loss=f'{self.log():.3f}')
            if ckpt_now:
                save_checkpoint(self.accelerator, self.ckpt_root, self.state, cfg.keep_checkpoints)
        progress.close()

    def check_finite(self) -> None:
        """Stop on a NaN/inf loss, or on weights or BN statistics that would make the next checkpoint unusable."""
        last = latest_checkpoint(self.ckpt_root)
        advice = (f'Last good checkpoint: {last or "none yet"}. Lower optim.lr or set optim.clip_grad_norm, or use '
                  f'mixed_precision=bf16 instead of fp16, in a new run (--output-dir).')
        if (bad := int(self.first_bad)) >= 0:
            raise FloatingPointError(f'[{self.phase.tag}] the loss became NaN/inf at step {bad}; training stopped. '
                                     f'{advice}')
        try:
            check_finite([self.phase.joint], f'[{self.phase.tag}] at step {self.state.step}')
        except FloatingPointError as e:
            raise FloatingPointError(f'{e} Training stopped before saving it. {advice}') from None

    def log(self) -> float:
        means = {k: v / self.counts[k] for k, v in self.sums.items()}
        row = {'step': self.state.step, 'lr': self.scheduler.get_last_lr()[0],
               'time': round(self.state.train_seconds, 2), **{k: v.item() for k, v in means.items()}}
        self.accelerator.log({k: v for k, v in row.items() if k != 'step'}, step=self.state.step)
        if self.accelerator.is_main_process:
            self.metrics.append(row)
        self.sums, self.counts = {}, {}
        return row['loss']
