"""Validation during training, and the best step's components kept (as timm's ``train.py`` keeps ``model_best``).

With ``validation.every`` set, :func:`split_holdout` holds ``validation.examples`` examples out of every trained
network's training set (seeded, never trained on; never the test set, whose numbers would then be biased by the
selection). A loaded network (incremental training) has none: the run that made it trained on all of its set.
Every ``every`` steps and at the last one, :class:`Validator` measures the networks on them (own accuracy and the
recombination matrix's rows of the trained networks, each extractor with every head, under the run's ``eval_bn``
and ``eval_tta``), logs ``<phase>/val/<metric>`` to the trackers
and ``<phase>/validation.csv`` (with the training seconds so far), and on a new best of ``validation.metric``
writes the phase's components and ``best.json`` to ``<phase>/best/``.

With ``validation.data='test'`` the networks are measured on their test sets instead, for a learning curve and
the time to an accuracy (DAWNBench's measure; ``benchmarks/time_to_accuracy.py``): nothing is held out, and no
best step is kept, since a step chosen on the test set would bias the test numbers.

Validation leaves training as it was: the networks are measured without gradients, with BN batch statistics that
update no running statistics (or the running ones, read only), on a fixed batch order that draws nothing from the
global RNG, and their training flags are restored after. A run that validates every step ends with the weights of
one that does not.
"""
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, Optional, Tuple

import torch
from torch import nn

from ._integrity import atomic_write_text
from .data import ImageData, random_subset
from .evaluation import accuracy, recombination_matrix
from .metrics_log import MetricsLog

if TYPE_CHECKING:
    from .build import Phase

__all__ = ['METRICS', 'BEST_DIR', 'BEST_JSON', 'holdout_seed', 'split_holdout', 'measure', 'read_best',
           'Validator']

METRICS = ('mean', 'own', 'recombination')
BEST_DIR = 'best'
BEST_JSON = 'best.json'
_TMP, _OLD = '.best-tmp', '.best-old'  # the new best while it is written; the previous one while it is replaced

Data = Dict[str, Tuple[ImageData, ImageData]]


def holdout_seed(seed: int) -> int:
    """The holdout's seed: fixed by the run's ``seed``, but not equal to it, so that the holdout is drawn
    independently of the ``train_limit`` subset that ``seed`` itself draws."""
    return int.from_bytes(hashlib.sha256(f'timm-compat validation {seed}'.encode()).digest()[:7], 'little')


def split_holdout(data: Data, examples: int, seed: int) -> Tuple[Data, Dict[str, ImageData]]:
    """Hold ``examples`` random examples out of every network's training set.

    Args:
        data: (train, test) data of every network, by name.
        examples: Examples to hold out per network.
        seed: The run's seed (see :func:`holdout_seed`).

    Returns:
        The same data with each training set less its held-out examples (in stored order), and the held-out
        examples of every network, by name.

    Raises:
        ValueError: A training set has no more than ``examples`` examples.
    """
    kept, holdout = {}, {}
    for name, (train, test) in data.items():
        if examples >= len(train):
            raise ValueError(f'validation.examples={examples} would hold out all of network {name!r}\'s '
                             f'{len(train)} training examples: set validation.examples below {len(train)}.')
        held = torch.zeros(len(train), dtype=torch.bool)
        held[random_subset(len(train), examples, holdout_seed(seed))] = True
        held = held.to(train.labels.device)
        kept[name] = (ImageData(train.images[~held], train.labels[~held], train.class_names, train.name), test)
        holdout[name] = ImageData(train.images[held], train.labels[held], train.class_names,
                                  f'{train.name} (validation)')
    return kept, holdout


def measure(models: Dict[str, nn.Module], holdout: Dict[str, ImageData], batch_size: int, bn: str,
            tta: str = 'none') -> Dict[str, float]:
    """The validation metrics of ``models`` on their held-out examples, under BN mode ``bn``.

    Args:
        models: Networks by name, loaded ones included.
        holdout: Held-out examples of the networks to score, by the same names: the trained ones (or, with
            ``validation.data='test'``, every network's test set). A network without any is scored only through
            its head, in the other networks' rows.
        batch_size: Evaluation batch size (it matters when ``bn='batch'``).
        bn: ``'batch'`` or ``'running'``.
        tta: Test-time augmentation (:mod:`timm_compat.tta`).

    Returns:
        ``own``: mean own accuracy (all classes); ``mean``: mean of the scored rows of the recombination matrix
        (common classes); ``recombination``: mean of their off-diagonal entries (with two networks or more);
        ``<name>/own`` per scored network.
    """
    names = list(models)
    own = {n: accuracy(models[n], holdout[n], batch_size, bn, tta=tta) for n in names if n in holdout}
    matrix = recombination_matrix([models[n] for n in names], [holdout.get(n) for n in names], batch_size, bn,
                                  tta=tta)
    scored = torch.tensor([n in holdout for n in names])
    values = {'mean': matrix[scored].mean().item(), 'own': sum(own.values()) / len(own)}
    if len(names) > 1:
        values['recombination'] = matrix[scored[:, None] & ~torch.eye(len(names), dtype=torch.bool)].mean().item()
    return {**values, **{f'{n}/own': v for n, v in own.items()}}


def read_best(folder: Path) -> Optional[Dict[str, Any]]:
    """``best.json`` of the best components in ``folder`` (``<phase>/best``), or None when there are none yet.

    A replacement that a crash interrupted is completed first: the previous best is kept unless the new one was
    fully in place.

    Raises:
        ValueError: ``best.json`` is not a record of a best step.
    """
    folder, old = Path(folder), Path(folder).parent / _OLD
    if old.is_dir():
        if folder.is_dir():
            shutil.rmtree(old)
        else:
            os.replace(old, folder)
    path = folder / BEST_JSON
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        record.update(step=int(record['step']), value=float(record['value']), metric=str(record['metric']))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f'{path} is not a valid record of the best step ({e}). Restore it, or delete {folder} '
                         f'to let the run keep a new best.') from None
    return record


class Validator:
    """Measures a phase's networks on their held-out examples and keeps the components of the best step.

    Only the main process measures and writes; the others wait (a DDP run's networks are the same on every rank).

    Args:
        phase: The built phase, with its ``holdout``.
        accelerator: The run's Accelerator.
        out: The phase's folder: ``validation.csv`` and ``best/`` go there.
        step: The step training starts from; ``validation.csv`` is rewound to it (a resume logs the rest again).
        save: Writes the phase's components to a folder (:func:`timm_compat.engine.save_components`).
    """

    def __init__(self, phase: 'Phase', accelerator, out: Path, step: int, save: Callable[['Phase', Path], None]):
        self.phase, self.accelerator, self.save = phase, accelerator, save
        self.cfg = phase.cfg.validation
        self.folder, self.log = Path(out) / BEST_DIR, MetricsLog(Path(out) / 'validation.csv')
        self.best: Optional[Dict[str, Any]] = None
        self.holdout = {n: d.to(accelerator.device) for n, d in phase.holdout.items()}
        if accelerator.is_main_process:
            # A resumed run keeps a better best of before the crash, even one after its checkpoint.
            self.best = read_best(self.folder)
            self.log.rewind(step)

    def due(self, step: int, total_steps: int) -> bool:
        """Whether to validate after ``step`` steps: every ``validation.every`` and after the last."""
        return step % self.cfg.every == 0 or step == total_steps

    def __call__(self, step: int, seconds: float) -> None:
        """Measure after ``step`` steps and ``seconds`` of training, log, and keep the components if the metric
        reached a new best (of held-out examples only)."""
        if self.accelerator.is_main_process:
            cfg = self.phase.cfg
            models = {n.name: self.phase.models[n.name] for n in cfg.networks}
            values = measure(models, self.holdout, cfg.eval_batch_size, cfg.eval_bn, cfg.eval_tta)
            self.accelerator.log({f'{self.phase.tag}/val/{k}': v for k, v in values.items()}, step=step)
            self.log.append({'step': step, 'time': round(seconds, 2), **values})
            value = values[self.cfg.metric]
            if self.cfg.data == 'holdout' and (self.best is None or value > self.best['value']):
                self._keep(step, value)
        self.accelerator.wait_for_everyone()

    def _keep(self, step: int, value: float) -> None:
        """Write the components and ``best.json`` beside the previous best, then swap them in: a crash at any
        moment leaves a complete best (the previous one until the new one is in place; see :func:`read_best`)."""
        record = {'step': step, 'metric': self.cfg.metric, 'value': value, 'eval_bn': self.phase.cfg.eval_bn,
                  'path': str(self.folder)}
        tmp, old = self.folder.parent / _TMP, self.folder.parent / _OLD
        shutil.rmtree(tmp, ignore_errors=True)
        self.save(self.phase, tmp)
        atomic_write_text(tmp / BEST_JSON, json.dumps(record, indent=2))
        if self.folder.exists():
            os.replace(self.folder, old)
        os.replace(tmp, self.folder)
        shutil.rmtree(old, ignore_errors=True)
        self.best = record
