"""The training engine of a run: the Accelerator, one phase's fit (resume, step loop, checkpoints), its evaluation
and its components.

A phase (:class:`~timm_compat.build.Phase`) is fitted by :func:`fit_phase` to its last step: optional SyncBatchNorm
and ``torch.compile``, ``accelerator.prepare``, a resume from the newest checkpoint, then :class:`TrainLoop` (the
step loop :func:`~timm_compat.fit.fit` with the phase's batches, NaN checks, logs and checkpoints).
:func:`evaluate_phase` measures the networks on every rank's shard; :func:`save_components` and
:func:`push_components` write them.
"""
import contextlib
import importlib.util
import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from accelerate import Accelerator, PartialState
from accelerate.tracking import get_available_trackers
from accelerate.utils import broadcast_object_list, gather_object, set_seed

from ._hardware import (check_launch, check_sync_batchnorm, compile_backend, configure_device, resolve_precision,
                        sync_batchnorm)
from ._integrity import atomic_write_text
from .build import Phase
from .checkpoint import TrainState, check_finite, latest_checkpoint, resume_train_state, save_checkpoint
from .config import RunConfig
from .data import EpochSampler, ImageData, training_batch
from .streaming import StreamedImages, stream_batches
from .evaluation import evaluate_networks
from .fit import fit
from .metrics_log import MetricsLog, tracker_hparams
from .optim import optim_from_config
from .rundir import RunDir, RunDirError
from .validation import Validator
from .whitening import drop_whitening_bias_grads, frozen_whitening_biases

__all__ = ['make_accelerator', 'check_hub_credentials', 'claim_run_dir', 'fit_phase', 'TrainLoop', 'evaluate_phase',
           'save_components', 'push_components', 'write_summary', 'PUSHED_NAME']

PUSHED_NAME = 'pushed.json'  # in a phase's folder once its components are on the Hub
TRACKERS_DIR = 'trackers'  # the trackers' project name: their logs go to OUT/trackers/


def make_accelerator(cfg: RunConfig) -> Accelerator:
    """The run's Accelerator (mixed precision, gradient accumulation, TensorBoard when installed), its device set up
    by :func:`~timm_compat._hardware.configure_device`."""
    log_with = cfg.trackers
    if log_with is None:
        log_with = ['tensorboard'] if importlib.util.find_spec('tensorboard') is not None else []
    available = [str(t) for t in get_available_trackers()]
    if missing := [t for t in log_with if t != 'all' and t not in available]:
        raise ValueError(f'trackers {missing} are not installed (pip install {" ".join(missing)}); installed: '
                         f'{available or "none"}.')
    precision = cfg.mixed_precision
    if precision == 'auto':  # on Accelerate's device: the Accelerator shares this PartialState
        precision = resolve_precision(precision, PartialState().device.type)
    accelerator = Accelerator(mixed_precision=precision,
                              gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                              log_with=log_with or None, project_dir=cfg.output_dir)
    # Refused here, before any data is read: a launch, SyncBN or compile backend that cannot work.
    check_launch(accelerator.device, accelerator.num_processes)
    if cfg.sync_batchnorm:
        check_sync_batchnorm(accelerator.device, accelerator.num_processes)
    compile_backend(cfg.compile)
    configure_device(accelerator.device, cfg.deterministic, accelerator.num_processes, cfg.cpu_threads)
    return accelerator


@contextlib.contextmanager
def claim_run_dir(accelerator: Accelerator, cfg: RunConfig, finished: List[str], resume: bool,
                  overwrite: bool, lengths: Optional[Dict[str, int]] = None) -> Iterator[RunDir]:
    """Hold ``cfg.output_dir`` while the body runs: locked, started, resumed or overwritten as asked, its config
    recorded and the trackers started.

    Args:
        accelerator: The run's Accelerator; only its main process touches the folder.
        cfg: The run's config.
        finished: Phases whose summary already exists (a resume may not extend them).
        resume: Continue the run in the folder.
        overwrite: Delete the run in the folder first.
        lengths: Each phase's steps now: a resume from a later checkpoint is refused before anything is written.

    Raises:
        RunDirError: On every process, when the folder cannot be used as asked.
    """
    run_dir, claimed = RunDir(Path(cfg.output_dir)), False
    try:
        _on_main_process(accelerator, lambda: run_dir.acquire().prepare(cfg.to_dict(), resume, overwrite, finished,
                                                                        lengths, accelerator.mixed_precision))
        claimed = True
        if accelerator.log_with:
            accelerator.init_trackers(TRACKERS_DIR, config=tracker_hparams(cfg.to_dict()))
        yield run_dir
    except BaseException:
        # A new run that failed before its first step leaves no run behind: the same command may run again.
        if claimed and not resume and accelerator.is_main_process and run_dir.abandon_untrained(TRACKERS_DIR):
            accelerator.print(f'{run_dir.path}: the run failed before its first step; nothing of it was kept.')
        raise
    finally:
        run_dir.release()


def _on_main_process(accelerator: Accelerator, fn: Callable[[], Any]) -> None:
    """Run ``fn`` on the main process; if it refuses, every process raises the same error instead of hanging."""
    error = None
    if accelerator.is_main_process:
        try:
            fn()
        except ValueError as e:  # RunDirError, or a refusal such as check_hub_credentials'
            error = (type(e) is RunDirError, str(e))
    error = broadcast_object_list([error])[0]
    if error is not None:
        raise (RunDirError if error[0] else ValueError)(error[1])


def check_hub_credentials(accelerator: Accelerator, repo_prefix: str) -> None:
    """Refuse ``--push-to-hub`` before training, on every process, when no Hub login is usable.

    Raises:
        ValueError: No token, or the Hub does not accept it (or cannot be reached).
    """
    def check():
        import huggingface_hub
        if huggingface_hub.get_token() is None:
            raise ValueError(f'--push-to-hub {repo_prefix}: no Hugging Face token. Run `hf auth login` or set '
                             f'HF_TOKEN first, or drop --push-to-hub (components are saved locally anyway).')
        try:
            user = huggingface_hub.whoami()
        except Exception as e:  # offline, revoked token, ...: every one of them would fail the push after training
            raise ValueError(f'--push-to-hub {repo_prefix}: the Hub refuses the token ({e}). Fix the login, or '
                             f'drop --push-to-hub.') from None
        accelerator.print(f'--push-to-hub: logged in to the Hub as {user.get("name", "?")}')
    _on_main_process(accelerator, check)


def fit_phase(phase: Phase, accelerator: Accelerator, out: Path, resume: bool) -> Dict[str, Any]:
    """Train ``phase`` to its last step, resuming from its newest checkpoint in ``out/checkpoints`` when asked.

    Args:
        phase: The built phase; its ``joint`` model is prepared here.
        accelerator: The run's Accelerator.
        out: The phase's folder (``checkpoints/``, ``metrics.csv``).
        resume: Continue from the newest checkpoint, if there is one.

    Returns:
        ``train_seconds`` (all training time, earlier runs of a resumed phase included) and ``steps``; with
        validation on, ``best`` too (``best.json``, on the main process; see :mod:`timm_compat.validation`).
    """
    cfg, device = phase.cfg, accelerator.device
    set_seed(cfg.seed, device_specific=True)  # augmentation draws: one stream per rank, not one shared by all
    data = {name: (phase.data[name][0].to(device),
                   EpochSampler(len(phase.data[name][0]), cfg.batch_size, cfg.seed + i, accelerator.process_index,
                                accelerator.num_processes, device)) for i, name in enumerate(phase.trained)}
    steps_per_epoch = [s.steps_per_epoch for _, s in data.values()]
    total_steps = phase.steps  # counted, for these processes, by build_phase before anything was written
    if cfg.sync_batchnorm:
        sync_batchnorm(phase.joint, device, accelerator.num_processes)
    optimizer, scheduler = make_optim(phase, total_steps, steps_per_epoch, accelerator.num_processes)
    if backend := compile_backend(cfg.compile):
        phase.joint.compile(backend=backend)
    joint, optimizer, scheduler = accelerator.prepare(phase.joint, optimizer, scheduler)
    state = resume_train_state(phase.tag, accelerator, out, resume, total_steps)
    loop = TrainLoop(phase, accelerator, joint, optimizer, scheduler, state, out, data)
    loop.run(total_steps)
    fitted = {'train_seconds': round(state.train_seconds, 2), 'steps': total_steps}
    return fitted if loop.validator is None else {**fitted, 'best': loop.validator.best}


def make_optim(phase: Phase, total_steps: int, steps_per_epoch: Sequence[int], num_processes: int = 1):
    """The optimiser of the phase's trainable parameters and its schedule, from ``phase.cfg.optim``, for
    ``total_steps`` micro-batch steps (accumulation makes fewer updates) of networks of ``steps_per_epoch``; the
    scheduler Accelerate prepares steps once per process (``num_processes``) for every optimiser update."""
    accumulation = phase.cfg.gradient_accumulation_steps
    return optim_from_config(phase.joint, phase.cfg.optim, phase.cfg.batch_size * accumulation * num_processes,
                             math.ceil(total_steps / accumulation), ticks_per_step=num_processes,
                             lookahead_fixed=frozen_whitening_biases(phase.joint, phase.cfg, total_steps,
                                                                     steps_per_epoch))


class TrainLoop:
    """What one phase adds to :func:`~timm_compat.fit.fit`: its batches, NaN checks, logging, checkpoints and
    validation (:class:`~timm_compat.validation.Validator`, when ``validation.every`` is set).

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
        self.data, self.total_steps, self.streams, self.lr = data, 0, {}, None  # lr: of the last update
        self._clock = (0.0, 0.0)  # (wall time, state.train_seconds) when this process started training
        self.validator = (Validator(phase, accelerator, out, state.step, save_components)
                          if self.cfg.validation.every is not None else None)

    def run(self, total_steps: int) -> None:
        """Step from ``state.step`` to ``total_steps``, logging every ``log_every`` and checkpointing every
        ``checkpoint_every`` steps (not at the last one: the phase's components are saved then)."""
        self.total_steps = total_steps
        self.streams = {name: stream_batches(data.images, self._indices(name, sampler))
                        for name, (data, sampler) in self.data.items() if isinstance(data.images, StreamedImages)}
        self._clock = (time.time(), self.state.train_seconds)
        self.joint.train()
        try:
            fit(self.joint, self.batch_at, total_steps, self.optimizer, self.scheduler, accelerator=self.accelerator,
                start_step=self.state.step, clip_grad_norm=self.cfg.optim.clip_grad_norm,
                before_optimizer_step=self.before_optimizer_step, on_step=self.on_step, on_log=self.log,
                log_every=self.cfg.log_every, desc=self.phase.tag)
        finally:  # a streamed split's workers stop with the loop, also when it stops early
            for stream in self.streams.values():
                stream.close()

    def _update(self, step: int) -> int:
        # With gradient accumulation every micro-batch of one optimiser update trains the same networks.
        return step // self.cfg.gradient_accumulation_steps

    def _own_step(self, step: int) -> int:
        # The steps the network training at `step` has trained before: under the alternate schedule each network
        # walks its own data order one batch per turn, so its epochs are whole permutations, as when trained alone
        # (indexed by the run's step, it took every other batch of twice as many permutations).
        turns = len(self.phase.joint.networks) if self.phase.joint.schedule == 'alternate' else 1
        accumulation = self.cfg.gradient_accumulation_steps
        return self._update(step) // turns * accumulation + step % accumulation

    def _indices(self, name: str, sampler: EpochSampler) -> Iterator[torch.Tensor]:
        # The index batches batch_at will ask for, in order: what a streamed split's workers decode ahead.
        for step in range(self.state.step, self.total_steps):
            if name in self.phase.joint.networks_at(self._update(step)):
                yield sampler.batch(self._own_step(step))

    def batch_at(self, step: int) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
        """The (augmented, normalised) batch of every network whose turn it is at ``step``."""
        batches = {}
        self.phase.joint.set_step(step)
        for name in self.phase.joint.networks_at(self._update(step)):
            train_set, sampler = self.data[name]
            own = self._own_step(step)
            index, images = next(self.streams[name]) if name in self.streams else (sampler.batch(own), None)
            flips = sampler.alternating_flips(own) if self.cfg.augment_flip == 'alternating' else None
            batches[name] = training_batch(train_set, index, *self.stats[name], self.cfg.augment, self.memory_format,
                                           images, pad=self.cfg.augment_translate,
                                           pad_mode=self.cfg.augment_pad_mode, flips=flips)
        return batches

    def before_optimizer_step(self, step: int) -> None:
        self.lr = self.optimizer.param_groups[0]['lr']  # this update's: the scheduler steps after it
        # Resting networks (alternate schedule) lose their zero gradients: momentum and weight decay skip them.
        self.phase.joint.drop_inactive_grads(self._update(step))
        drop_whitening_bias_grads(self.phase.joint, step, self.cfg, [s.steps_per_epoch for _, s in self.data.values()])

    def on_step(self, step: int, losses: Dict[str, torch.Tensor]) -> None:
        """After step ``step``: count it, then check for NaN/inf, validate and checkpoint where due."""
        self.state.step = step
        start, before = self._clock
        self.state.train_seconds = before + time.time() - start
        bad = ~torch.isfinite(losses['loss'])
        self.first_bad = torch.where((self.first_bad < 0) & bad, step, self.first_bad)
        log_now = step % self.cfg.log_every == 0 or step == self.total_steps
        validate = self.validator is not None and self.validator.due(step, self.total_steps)
        if log_now or self._checkpoint_due(step) or validate:
            self.check_finite()
        if validate:  # before the step's checkpoint: a resume from it never skips a validation
            begun = time.time()
            self.validator(step, self.state.train_seconds)
            self._clock = (start + time.time() - begun, before)  # validation time is not training time
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
        row = {'step': step, 'lr': self.lr, 'time': round(self.state.train_seconds, 2), **means}
        # Each phase under its own prefix: main/loss and independent/loss are two curves, not one.
        self.accelerator.log({f'{self.phase.tag}/{k}': v for k, v in row.items() if k != 'step'}, step=step)
        if self.accelerator.is_main_process:
            self.metrics.append(row)
        if self._checkpoint_due(step):
            self.checkpoint()


def evaluate_phase(phase: Phase, accelerator: Accelerator) -> Dict[str, Any]:
    """Check that every rank ended with the same interface; measure the networks, each process on its shard of the
    test batches (the numbers of a single-process pass: :mod:`timm_compat.evaluation`).

    Returns:
        On every process ``interface_id_per_rank`` and ``processes``; on the main process also the ``phase``,
        ``networks``, each network's ``own_accuracy``, the ``recombination_matrix`` (extractor i + head j on task i),
        both again under the other BN mode (:func:`~timm_compat.evaluation.evaluate_networks`), the ``interface_id``
        and the printed ``table``.

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
    cfg, names = phase.cfg, [n.name for n in phase.cfg.networks]
    # Both BN modes: batch statistics are the paper's numbers, running statistics what a deployed model gets. The
    # test sets go to the device once, as the training sets do; each process scores its shard of the batches.
    tests = {n: phase.data[n][1].to(accelerator.device) for n in names}
    measured = evaluate_networks({n: phase.models[n] for n in names}, tests, cfg.eval_batch_size, cfg.eval_bn,
                                 title=f'[{phase.tag}] ', tta=cfg.eval_tta, shard=(accelerator.process_index, len(ids)))
    if not accelerator.is_main_process:
        return summary
    print(measured['table'])
    summary.update(phase=phase.tag, networks=names, **measured,
                   interface_id=phase.interface.id if phase.interface is not None else None)
    return summary


def _trained_components(phase: Phase) -> List[Tuple[Any, str]]:
    """``(component, name)`` of what ``phase`` trained: ``interface`` (unless it was loaded, frozen),
    ``<network>/extractor`` and ``<network>/head`` (a shared DCC head is the interface's)."""
    interface = phase.interface
    parts = [(interface, 'interface')] if interface is not None and not phase.cfg.interface.load else []
    for n in phase.cfg.networks:
        if not n.load:
            parts.append((phase.models[n.name].extractor, f'{n.name}/extractor'))
            if n.head != 'dcc':
                parts.append((phase.models[n.name].head, f'{n.name}/head'))
    return parts


def save_components(phase: Phase, folder: Path) -> None:
    """Write what ``phase`` trained to ``folder``, each component in its folder (:func:`_trained_components`)."""
    for component, name in _trained_components(phase):
        component.save_pretrained(folder / name)


def push_components(phase: Phase, saved: Path, marker: Path) -> None:
    """Push the components ``phase`` saved in ``saved`` to the Hub as ``<prefix>-interface`` and
    ``<prefix>-<network>-extractor|head`` (``prefix`` is ``phase.cfg.push_to_hub``), then write ``marker``.

    Each is read back, verified, from its folder: a phase finished by an earlier invocation (a resume after a later
    phase crashed) holds no trained modules in memory, only its folders. Main process only, after the run's last
    collective: no other process waits in one (and may time out) during a slow upload.

    Raises:
        ValueError: A push failed; it names ``saved``, where the components are kept.
    """
    from .component import load_component
    repos = []
    for _, name in _trained_components(phase):
        component, repo = load_component(saved / name), f'{phase.cfg.push_to_hub}-{name.replace("/", "-")}'
        try:
            component.push_to_hub(repo, commit_message=f'timm-compat {phase.tag} run: interface '
                                                       f'{component.interface_id or "none"}')
        except Exception as e:  # the network, the Hub or the login: the results are safe either way
            raise ValueError(f'[{phase.tag}] pushing {repo} failed ({e}). Nothing is lost: the components '
                             f'are in {saved} and the summary is written; push them from there.') from None
        repos.append(repo)
    atomic_write_text(marker, json.dumps({'repos': repos}, indent=2))  # a later --resume does not push again


def write_summary(path: Path, summary: Dict[str, Any]) -> None:
    """Write ``summary`` as JSON, atomically: a resume takes a phase whose summary exists as finished."""
    atomic_write_text(path, json.dumps(summary, indent=2))
