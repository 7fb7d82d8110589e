"""The training engine of a run: the Accelerator, one phase's fit (resume, step loop, checkpoints), its evaluation
and its components.

A phase (:class:`~timm_compat.build.Phase`) is fitted by :func:`fit_phase` to its last step: ``accelerator.prepare``,
optional ``torch.compile``, a resume from the newest checkpoint, then :class:`TrainLoop`, which runs the generic
step loop :func:`~timm_compat.fit.fit` with the phase's batches, NaN checks, logs and checkpoints. :func:`evaluate_phase`
checks that every DDP rank ended with the same interface and measures the networks; :func:`save_components` and
:func:`push_components` write what was trained.
"""
import contextlib
import importlib.util
import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Tuple

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object, set_seed

from ._cpu import keep_freed_memory
from ._hardware import cpu_cores
from ._integrity import atomic_write_text
from .build import Phase
from .checkpoint import TrainState, check_finite, latest_checkpoint, load_train_state, save_checkpoint
from .config import RunConfig
from .data import EpochSampler, ImageData, training_batch
from .evaluation import accuracy, format_matrix, recombination_matrix
from .fit import fit
from .metrics_log import MetricsLog
from .optim import make_optimizer, make_scheduler
from .rundir import RunDir, RunDirError

__all__ = ['make_accelerator', 'claim_run_dir', 'fit_phase', 'TrainLoop', 'evaluate_phase', 'save_components',
           'push_components', 'write_summary']


def make_accelerator(cfg: RunConfig) -> Accelerator:
    """The run's Accelerator (mixed precision, gradient accumulation, TensorBoard when installed); on CPU, every
    core of this process and glibc told to keep freed activation memory."""
    log_with = 'tensorboard' if importlib.util.find_spec('tensorboard') is not None else None
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision,
                              gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                              log_with=log_with, project_dir=cfg.output_dir)
    if accelerator.device.type == 'cpu':
        # accelerate launch leaves OMP_NUM_THREADS=1 unless told otherwise; a CPU run should use its cores.
        torch.set_num_threads(cfg.cpu_threads or max(1, cpu_cores() // accelerator.num_processes))
        keep_freed_memory()
    return accelerator


@contextlib.contextmanager
def claim_run_dir(accelerator: Accelerator, cfg: RunConfig, finished: List[str], resume: bool,
                  overwrite: bool) -> Iterator[RunDir]:
    """Hold ``cfg.output_dir`` while the body runs: locked, started, resumed or overwritten as asked, its config
    recorded and the trackers started.

    Args:
        accelerator: The run's Accelerator; only its main process touches the folder.
        cfg: The run's config.
        finished: Phases whose summary already exists (a resume may not extend them).
        resume: Continue the run in the folder.
        overwrite: Delete the run in the folder first.

    Raises:
        RunDirError: On every process, when the folder cannot be used as asked.
    """
    run_dir = RunDir(Path(cfg.output_dir))
    try:
        _on_main_process(accelerator, lambda: run_dir.acquire().prepare(cfg.to_dict(), resume, overwrite, finished))
        if accelerator.log_with:
            accelerator.init_trackers('tensorboard', config=_scalars(cfg.to_dict()))
        yield run_dir
    finally:
        run_dir.release()


def _on_main_process(accelerator: Accelerator, fn: Callable[[], Any]) -> None:
    """Run ``fn`` on the main process; if it refuses, every process raises the same error instead of hanging."""
    error = None
    if accelerator.is_main_process:
        try:
            fn()
        except RunDirError as e:
            error = str(e)
    error = broadcast_object_list([error])[0]
    if error is not None:
        raise RunDirError(error)


def _scalars(tree, prefix: str = '') -> Dict[str, Any]:
    """Flatten a config into the scalar hparams TensorBoard accepts."""
    flat = {}
    items = tree.items() if isinstance(tree, dict) else enumerate(tree)
    for k, v in items:
        key = f'{prefix}{k}'
        if isinstance(v, (dict, list)):
            flat.update(_scalars(v, key + '.'))
        elif isinstance(v, (int, float, str, bool)):
            flat[key] = v
    return flat


def fit_phase(phase: Phase, accelerator: Accelerator, out: Path, resume: bool) -> Dict[str, Any]:
    """Train ``phase`` to its last step, resuming from its newest checkpoint in ``out/checkpoints`` when asked.

    Args:
        phase: The built phase; its ``joint`` model is prepared here.
        accelerator: The run's Accelerator.
        out: The phase's folder (``checkpoints/``, ``metrics.csv``).
        resume: Continue from the newest checkpoint, if there is one.

    Returns:
        ``train_seconds`` (all training time, earlier runs of a resumed phase included) and ``steps``.
    """
    cfg, device = phase.cfg, accelerator.device
    set_seed(cfg.seed)
    data = {name: (phase.data[name][0].to(device),
                   EpochSampler(len(phase.data[name][0]), cfg.batch_size, cfg.seed + i, accelerator.process_index,
                                accelerator.num_processes, device)) for i, name in enumerate(phase.trained)}
    # Alternating, each step trains one network: `epochs` stays each network's number of epochs.
    turns = len(phase.trained) if cfg.joint_schedule == 'alternate' else 1
    total_steps = cfg.steps or math.ceil(cfg.epochs * max(s.steps_per_epoch for _, s in data.values()) * turns)
    params = [p for p in phase.joint.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, cfg.optim.optimizer, cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay)
    # Counted as accelerate's prepared scheduler steps: once per process for every optimizer step.
    per_step = accelerator.num_processes
    scheduler = make_scheduler(optimizer, cfg.optim.schedule,
                               math.ceil(total_steps / cfg.gradient_accumulation_steps) * per_step,
                               cfg.optim.warmup_steps * per_step)
    joint, optimizer, scheduler = accelerator.prepare(phase.joint, optimizer, scheduler)
    if cfg.compile:
        joint = torch.compile(joint)
    state = _resume(phase.tag, accelerator, out, resume)
    TrainLoop(phase, accelerator, joint, optimizer, scheduler, state, out, data).run(total_steps)
    return {'train_seconds': round(state.train_seconds, 1), 'steps': total_steps}


def _resume(tag: str, accelerator: Accelerator, out: Path, resume: bool) -> TrainState:
    """The train state to start from: the newest checkpoint's (its Accelerate state loaded) or a fresh one.

    ``metrics.csv`` is rewound to the checkpoint: rows logged after it are logged again.
    """
    state = TrainState()
    if resume and (last := latest_checkpoint(out / 'checkpoints')) is not None:
        accelerator.load_state(str(last))
        state = load_train_state(last)
        accelerator.print(f'[{tag}] resumed from {last} at step {state.step}')
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        MetricsLog(out / 'metrics.csv').rewind(state.step)
    accelerator.wait_for_everyone()
    return state


class TrainLoop:
    """What one phase adds to :func:`~timm_compat.fit.fit`: its batches, NaN checks, logging and checkpoints.

    The first non-finite step stays on the device; reading it costs a sync, done only at log and checkpoint steps.
    A checkpoint is written after the log of its step, so that a resume never drops a logged row.

    Args:
        phase: The phase; ``phase.joint`` is the unwrapped :class:`~timm_compat.joint.JointModel`.
        accelerator: The run's Accelerator.
        joint: ``phase.joint`` as prepared (and compiled) for training.
        optimizer: The prepared optimiser.
        scheduler: The prepared learning-rate schedule.
        state: Step and training time, advanced in place.
        out: The phase's folder: ``metrics.csv`` and ``checkpoints/``.
        data: Training set (on the device) and sampler of every trained network, by name.
    """

    def __init__(self, phase: Phase, accelerator: Accelerator, joint, optimizer, scheduler, state: TrainState,
                 out: Path, data: Dict[str, Tuple[ImageData, EpochSampler]]):
        self.phase, self.cfg, self.accelerator = phase, phase.cfg, accelerator
        self.joint, self.optimizer, self.scheduler = joint, optimizer, scheduler
        self.state, self.metrics, self.ckpt_root = state, MetricsLog(out / 'metrics.csv'), out / 'checkpoints'
        device = accelerator.device
        self.stats = {name: [torch.tensor(phase.models[name].pretrained_cfg[k], device=device)
                             for k in ('mean', 'std')] for name in phase.trained}
        self.memory_format = torch.channels_last if self.cfg.channels_last else torch.contiguous_format
        self.first_bad = torch.tensor(-1, device=device)
        self.data, self.total_steps = data, 0
        self._clock = (0.0, 0.0)  # (wall time, state.train_seconds) when this process started training

    def run(self, total_steps: int) -> None:
        """Step from ``state.step`` to ``total_steps``, logging every ``log_every`` and checkpointing every
        ``checkpoint_every`` steps (not at the last one: the phase's components are saved then)."""
        self.total_steps = total_steps
        self._clock = (time.time(), self.state.train_seconds)
        self.joint.train()
        fit(self.joint, self.batch_at, total_steps, self.optimizer, self.scheduler, accelerator=self.accelerator,
            start_step=self.state.step, clip_grad_norm=self.cfg.optim.clip_grad_norm,
            before_optimizer_step=self.before_optimizer_step, on_step=self.on_step, on_log=self.log,
            log_every=self.cfg.log_every, desc=self.phase.tag)

    def _update(self, step: int) -> int:
        # With gradient accumulation every micro-batch of one optimiser update trains the same networks.
        return step // self.cfg.gradient_accumulation_steps

    def batch_at(self, step: int) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
        """The (augmented, normalised) batch of every network whose turn it is at ``step``."""
        batches = {}
        for name in self.phase.joint.networks_at(self._update(step)):
            train_set, sampler = self.data[name]
            batches[name] = training_batch(train_set, sampler.batch(step), *self.stats[name], self.cfg.augment,
                                           self.memory_format)
        return batches

    def before_optimizer_step(self, step: int) -> None:
        # Resting networks (alternate schedule) lose their zero gradients: momentum and weight decay skip them.
        self.phase.joint.drop_inactive_grads(self._update(step))

    def on_step(self, step: int, losses: Dict[str, torch.Tensor]) -> None:
        """After step ``step``: count it, then check for NaN/inf and checkpoint where due."""
        self.state.step = step
        start, before = self._clock
        self.state.train_seconds = before + time.time() - start
        bad = ~torch.isfinite(losses['loss'])
        self.first_bad = torch.where((self.first_bad < 0) & bad, step, self.first_bad)
        log_now = step % self.cfg.log_every == 0 or step == self.total_steps
        if log_now or self._checkpoint_due(step):
            self.check_finite()
        if not log_now and self._checkpoint_due(step):
            self.checkpoint()  # at a log step, log() checkpoints once the row is written

    def _checkpoint_due(self, step: int) -> bool:
        return step % self.cfg.checkpoint_every == 0 and step < self.total_steps

    def checkpoint(self) -> None:
        """Save the Accelerate state and the train state of the current step."""
        save_checkpoint(self.accelerator, self.ckpt_root, self.state, self.cfg.keep_checkpoints)

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

    def log(self, step: int, means: Dict[str, float]) -> None:
        """Write the mean losses since the last log (TensorBoard, ``metrics.csv``), then checkpoint if due."""
        row = {'step': step, 'lr': self.scheduler.get_last_lr()[0], 'time': round(self.state.train_seconds, 2),
               **means}
        self.accelerator.log({k: v for k, v in row.items() if k != 'step'}, step=step)
        if self.accelerator.is_main_process:
            self.metrics.append(row)
        if self._checkpoint_due(step):
            self.checkpoint()


def evaluate_phase(phase: Phase, accelerator: Accelerator) -> Dict[str, Any]:
    """Check that every rank ended with the same interface; on the main process, measure the networks.

    Returns:
        On every process ``interface_id_per_rank`` and ``processes``; on the main process also the ``phase``,
        ``networks``, each network's ``own_accuracy``, the ``recombination_matrix`` (extractor i + head j on
        task i), the ``interface_id`` and the printed ``table``.

    Raises:
        RuntimeError: The ranks ended with different interfaces (a broken DDP setup).
    """
    if accelerator.num_processes > 1:
        # DDP syncs BN buffers from rank 0 before each forward, so after the last one they differ by one update.
        for buffer in phase.joint.buffers():
            torch.distributed.broadcast(buffer, src=0)
    ids = gather_object([phase.interface.id if phase.interface is not None else None])
    if len(set(ids)) > 1:
        raise RuntimeError(f'[{phase.tag}] processes ended with different interfaces {ids}: the DDP setup is broken.')
    summary = {'interface_id_per_rank': ids, 'processes': accelerator.num_processes}
    if not accelerator.is_main_process:
        return summary
    cfg, names = phase.cfg, [n.name for n in phase.cfg.networks]
    tests = [phase.data[n][1] for n in names]
    own = {n: accuracy(phase.models[n], phase.data[n][1], cfg.eval_batch_size, cfg.eval_bn) for n in names}
    matrix = recombination_matrix([phase.models[n] for n in names], tests, cfg.eval_batch_size, cfg.eval_bn)
    table = format_matrix(matrix, names, title=f'[{phase.tag}] recombination accuracy (%), common classes, '
                                                f'BN={cfg.eval_bn}', own=[own[n] for n in names])
    print(table)
    summary.update(phase=phase.tag, networks=names, own_accuracy=own, recombination_matrix=matrix.tolist(),
                   interface_id=phase.interface.id if phase.interface is not None else None, table=table)
    return summary


def save_components(phase: Phase, folder: Path) -> None:
    """Write what ``phase`` trained to ``folder``: ``interface/`` (unless it was loaded, frozen) and
    ``<network>/extractor``, ``<network>/head`` (a shared DCC head is saved with the interface)."""
    if phase.interface is not None and not phase.cfg.interface.load:
        phase.interface.save_pretrained(folder / 'interface')
    for n in phase.cfg.networks:
        if not n.load:
            phase.models[n.name].extractor.save_pretrained(folder / n.name / 'extractor')
            if n.head != 'dcc':
                phase.models[n.name].head.save_pretrained(folder / n.name / 'head')


def push_components(phase: Phase, prefix: str) -> None:
    """Push what ``phase`` trained to the Hub as ``<prefix>-interface`` and ``<prefix>-<network>-extractor|head``."""
    interface = phase.interface
    message = f'timm-compat {phase.tag} run: interface {interface.id if interface is not None else "none"}'
    if interface is not None and not phase.cfg.interface.load:
        interface.push_to_hub(f'{prefix}-interface', commit_message=message)
    for n in phase.cfg.networks:
        if not n.load:
            phase.models[n.name].extractor.push_to_hub(f'{prefix}-{n.name}-extractor', commit_message=message)
            if n.head != 'dcc':
                phase.models[n.name].head.push_to_hub(f'{prefix}-{n.name}-head', commit_message=message)


def write_summary(path: Path, summary: Dict[str, Any]) -> None:
    """Write ``summary`` as JSON, atomically: a resume takes a phase whose summary exists as finished."""
    atomic_write_text(path, json.dumps(summary, indent=2))
