"""Checkpoints of a training phase: ``Accelerator.save_state`` plus a JSON train state, written atomically.

A phase's checkpoints live in ``<phase>/checkpoints/step_XXXXXXXX``; ``checkpoints/latest`` names the newest
complete one. What a resume reads is constrained, because a run folder may come from someone else:

* the train state (step, training seconds) is JSON, never a pickle: Accelerate's ``register_for_checkpointing``
  would unpickle it with ``weights_only=False``;
* ``latest`` must name a ``step_\\d{8}`` folder directly inside the phase's own ``checkpoints/`` folder;
* model weights are safetensors (``save_state``'s default); the optimizer, scheduler and RNG files are read by
  Accelerate with ``weights_only=True``, which builds tensors and plain containers only;
* a module registered under two names (``head: dcc``: the shared DCC head is ``interface.aux_heads.dcc`` and
  ``networks.<name>.head``) is saved under one of them, so weights load non-strictly, after
  :func:`check_saved_keys` has refused any key that is neither in the file nor an alias of a tensor that is.
"""
import json
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, List, Optional

import torch
from safetensors import safe_open
from torch import nn

from ._integrity import atomic_write_text
from .metrics_log import MetricsLog

__all__ = ['TrainState', 'save_checkpoint', 'latest_checkpoint', 'load_train_state', 'resume_train_state',
           'check_finite', 'check_saved_keys', 'STATE_NAME']

LATEST = 'latest'
STATE_NAME = 'train_state.json'
_STEP_DIR = re.compile(r'step_\d{8}')


@dataclass
class TrainState:
    """What a resumed phase needs besides Accelerate's state: where it was and how long it has trained."""
    step: int = 0
    train_seconds: float = 0.0


def check_finite(modules: Iterable[nn.Module], what: str) -> None:
    """Raise ``FloatingPointError`` if any parameter or buffer (BN running statistics too) is NaN or inf.

    The loss alone is not enough: a step whose loss was finite can still leave inf running statistics, and a
    checkpoint holding them fails as soon as it is resumed.
    """
    for module in modules:
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise FloatingPointError(f'{what}: {name} holds NaN/inf values.')


def save_checkpoint(accelerator, root: Path, state: TrainState, keep: int = 2) -> Path:
    """``accelerator.save_state`` plus ``train_state.json`` into ``root/step_XXXXXXXX``, atomically.

    The state is written to a hidden temporary folder, renamed into place, and only then does ``root/latest``
    point at it, so a crash at any moment leaves ``latest`` naming a complete checkpoint. Afterwards only the newest
    ``keep`` up to this one are kept: one of a later step is left by a kill before ``latest`` moved on to it, and
    belongs to a timeline the resumed run abandoned.
    """
    root = Path(root)
    final, tmp = root / f'step_{state.step:08d}', root / f'.tmp-step_{state.step:08d}'
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        atomic_write_text(tmp / STATE_NAME, json.dumps(asdict(state)))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        atomic_write_text(root / LATEST, final.name)
        steps = sorted(root.glob('step_*'))
        earlier = [p for p in steps if p.name < final.name]
        for old in [p for p in steps if p.name > final.name] + earlier[:max(len(earlier) - keep + 1, 0)]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def latest_checkpoint(root: Path) -> Optional[Path]:
    """The checkpoint that ``root/latest`` names, or None when there is none.

    Raises:
        ValueError: ``latest`` names anything but a ``step_XXXXXXXX`` folder inside ``root``.
    """
    pointer = Path(root) / LATEST
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    if not _STEP_DIR.fullmatch(name):
        raise ValueError(f'{pointer} names {name!r}, not a checkpoint folder step_XXXXXXXX of this run. The run '
                         f'folder was edited; restore {pointer} or start the run again with --overwrite.')
    path = Path(root) / name
    if path.is_symlink() or not path.is_dir():
        raise ValueError(f'{pointer} names {name}, which is not a checkpoint folder in {root}. Restore it, or '
                         f'start the run again with --overwrite.')
    return path


def load_train_state(checkpoint: Path) -> TrainState:
    """The JSON train state saved in ``checkpoint``, type-checked."""
    path = Path(checkpoint) / STATE_NAME
    try:
        data = json.loads(path.read_text())
        state = TrainState(step=int(data['step']), train_seconds=float(data['train_seconds']))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f'{path} is missing or not a valid train state ({e}). The checkpoint is incomplete or '
                         f'from an older timm-compat; start the run again with --overwrite.') from e
    if state.step < 1 or f'step_{state.step:08d}' != Path(checkpoint).name:
        raise ValueError(f'{path} says step {state.step}, but the folder is {Path(checkpoint).name}.')
    return state


def resume_train_state(tag: str, accelerator, out: Path, resume: bool, total_steps: int) -> TrainState:
    """The train state a phase starts from: its newest checkpoint's (Accelerate state loaded) or a fresh one.

    ``metrics.csv`` is rewound to the checkpoint: rows logged after it are logged again.

    Args:
        tag: The phase's name, for the message.
        accelerator: The run's Accelerator, with the phase's objects prepared.
        out: The phase's folder: ``checkpoints/`` and ``metrics.csv``.
        resume: Continue from the newest checkpoint, if there is one.
        total_steps: The phase's length now; a checkpoint past it is refused.

    Raises:
        ValueError: The newest checkpoint is past ``total_steps`` (``steps``/``epochs`` lowered on resume): the run
            would train nothing and report weights of a later step as those of ``total_steps``.
    """
    state = TrainState()
    if resume and (last := latest_checkpoint(out / 'checkpoints')) is not None:
        state = load_train_state(last)
        if state.step > total_steps:
            raise ValueError(f'[{tag}] the newest checkpoint, {last}, is at step {state.step}, past the {total_steps} '
                             f'steps the config now asks for: set steps (or epochs) to at least {state.step} to resume '
                             f'it, or start a new run.')
        # Strict loading fails on the names Accelerate dropped as duplicates; check_saved_keys makes up for it.
        check = accelerator.register_load_state_pre_hook(check_saved_keys)
        try:
            accelerator.load_state(str(last), strict=False)
        finally:
            check.remove()
        accelerator.print(f'[{tag}] resumed from {last} at step {state.step}')
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        MetricsLog(out / 'metrics.csv').rewind(state.step)
    accelerator.wait_for_everyone()
    return state


def _tensor_identity(tensor: torch.Tensor):
    # One tensor seen under two names: the same view of the same memory.
    return (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tuple(tensor.stride()),
            tensor.dtype, tensor.device)


def check_saved_keys(models: List[nn.Module], checkpoint: str) -> None:
    """``Accelerator.load_state`` pre-hook: refuse, before anything is loaded, a checkpoint whose weights do not
    fill every model exactly. A key the file lacks must be an alias (same tensor) of one it holds; Accelerate's
    safetensors save keeps one name per shared tensor, and loading that name fills every alias.

    Raises:
        ValueError: The weights file is missing, holds a key the model lacks, or lacks one that is no alias.
    """
    for i, model in enumerate(models):
        path = Path(checkpoint) / f'model{f"_{i}" if i else ""}.safetensors'  # Accelerate's names
        if not path.is_file():
            raise ValueError(f'{path} is missing: {checkpoint} is incomplete. Resume from another checkpoint (edit '
                             f'its latest file) or start the run again with --overwrite.')
        with safe_open(str(path), 'pt') as f:
            saved = set(f.keys())
        state = model.state_dict()
        loaded = {_tensor_identity(state[k]) for k in saved if k in state}
        missing = [k for k in state if k not in saved and _tensor_identity(state[k]) not in loaded]
        unexpected = sorted(saved - state.keys())
        if missing or unexpected:
            raise ValueError(f'{path} does not fit the model being resumed (missing: {", ".join(missing) or "none"}; '
                             f'unexpected: {", ".join(unexpected) or "none"}): it holds weights of another model. '
                             f'Resume with the config that wrote it, or start a new run (--overwrite).')
