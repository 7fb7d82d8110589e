"""Own-task accuracy and the N x N recombination matrix (Gygli et al. 2021, Sec. 4).

Recombination accuracy of row ``i``, column ``j``: the extractor of network ``i`` with the head of network ``j``,
on network ``i``'s test images of the classes common to all networks (or those given as ``common``), predicting
among those classes, with no fine-tuning. BN uses batch statistics by default. Each extractor's features are computed once per batch and fed to
every head, so an N x N matrix costs N extractor passes, not N^2.

With batch statistics a prediction depends on the rest of its batch, so every function here batches the test set in
a fixed seeded permutation (:func:`~timm_compat.data.evaluation_batches`): a test set stored sorted by class scores
as a shuffled copy does, and every model evaluated on the same data sees the same batches.

Under ``shard=(rank, processes)`` each process of a multi-process run scores its share of the same batches and the
counts are summed over the processes (``torch.distributed.all_reduce``), so every process gets the numbers of a
single-process pass, batch statistics included.

A recombination matrix shows a progress bar (``tqdm.auto``, on stderr) counting its evaluation batches, on the local
main process only; it clears itself when done, since it usually runs inside a longer job's bar.
"""
import os
from contextlib import ExitStack
from itertools import chain
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from tqdm.auto import tqdm

from .batchnorm import eval_mode
from .data import ImageData, evaluation_batches, iterate_batches, normalize
from .classes import canonical_class_name, check_distinct, common_classes, same_classes
from .tta import tta_logits, tta_views

__all__ = ['accuracy', 'per_class_accuracy', 'average_class_accuracy', 'recombination_matrix', 'format_matrix',
           'evaluate_networks']


def _device(module: nn.Module) -> torch.device:
    tensor = next(chain(module.parameters(), module.buffers()), None)
    return tensor.device if tensor is not None else torch.device('cpu')


def _check_loaded(models: Sequence[nn.Module]) -> None:
    on_meta = [i for i, m in enumerate(models) if any(t.is_meta for t in chain(m.parameters(), m.buffers()))]
    if on_meta:
        raise ValueError(f'Models {on_meta} have tensors on the meta device, so they hold no weights to evaluate: '
                         f'load them first (load_component, or to_empty() then load_state_dict()).')


def _check_classes(model: nn.Module, data: ImageData) -> None:
    """Labels index the head's outputs: refuse data whose classes the head names otherwise (or in another order)."""
    names = getattr(getattr(model, 'head', None), 'class_names', None)
    if names is not None and not same_classes(data.class_names, names):
        raise ValueError(f'The data lists its classes as {list(data.class_names)}, the head as {list(names)}: its '
                         f'labels would be scored against other classes. Reorder the data with '
                         f'data.select_classes(head.class_names), or score the head on its own task.')


def input_dtype(module: nn.Module) -> torch.dtype:
    """The dtype ``module`` takes its inputs in: that of its floating parameters (float32 if it has none)."""
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)


def _inputs(images: torch.Tensor, extractor: nn.Module, device) -> torch.Tensor:
    # normalize gives float32, which a bf16 or fp16 extractor refuses: inputs take the weights' dtype.
    cfg = extractor.pretrained_cfg
    return normalize(images.to(device, non_blocking=True), cfg['mean'], cfg['std']).to(input_dtype(extractor))


@torch.no_grad()
def accuracy(model, data: ImageData, batch_size: int = 256, bn: str = 'batch', seed: int = 0,
             tta: str = 'none', shard: Tuple[int, int] = (0, 1)) -> float:
    """Top-1 accuracy of ``model`` on all of ``data``, over all of the model's classes.

    Args:
        model: A :class:`~timm_compat.CompatibleModel` (or anything with ``extractor.pretrained_cfg``).
        data: Labelled test data whose labels index the model's outputs.
        batch_size: Evaluation batch size (it matters when ``bn='batch'``).
        bn: ``'batch'`` (test-time BN statistics) or ``'running'``.
        seed: Seed of the order in which the images are batched (see :func:`~timm_compat.data.iterate_batches`).
        tta: Test-time augmentation (:mod:`timm_compat.tta`): ``'none'`` (the paper's), ``'flip'`` or
            ``'flip_translate'``.
        shard: ``(rank, processes)`` of a multi-process run: see the module's docstring; every process calls it.

    Raises:
        ValueError: The head's ``class_names`` are not ``data``'s, in its order (up to synonyms).
    """
    _check_loaded([model])
    _check_classes(model, data)
    if not len(data):
        raise ValueError('The test data has no images, so accuracy is undefined: pass a non-empty split.')
    device = _device(model.extractor)
    # On the head's device, where the logits are (a model without a head attribute: its own), no host sync per batch.
    correct = torch.zeros((), dtype=torch.long, device=_device(getattr(model, 'head', model)))
    with eval_mode(model, bn):
        for images, labels in iterate_batches(data, batch_size, seed, shard):
            logits = tta_logits(model, _inputs(images, model.extractor, device), tta)
            correct += (logits.argmax(1) == labels.to(logits.device)).sum()
    return int(_summed(correct, shard)) / len(data)


def _summed(count: torch.Tensor, shard: Tuple[int, int]) -> torch.Tensor:
    if shard[1] > 1:
        torch.distributed.all_reduce(count)
    return count


@torch.no_grad()
def per_class_accuracy(model, data: ImageData, batch_size: int = 250, bn: str = 'batch',
                       seed: int = 0, tta: str = 'none') -> torch.Tensor:
    """Top-1 accuracy of each class of ``data``, a ``(num_classes,)`` CPU tensor; NaN for classes with no images.

    Arguments and errors as :func:`accuracy`.
    """
    _check_loaded([model])
    _check_classes(model, data)
    device = _device(model.extractor)
    num_classes = data.num_classes
    correct = torch.zeros(num_classes, device=device)
    total = torch.zeros(num_classes, device=device)
    with eval_mode(model, bn):
        for images, labels in iterate_batches(data, batch_size, seed):
            labels = labels.to(device)
            predictions = tta_logits(model, _inputs(images, model.extractor, device), tta).argmax(1).to(device)
            total += torch.bincount(labels, minlength=num_classes)
            correct += torch.bincount(labels[predictions == labels], minlength=num_classes)
    return (correct / total).cpu()  # 0 / 0 is NaN: a class without test images


def average_class_accuracy(model, data: ImageData, batch_size: int = 250, bn: str = 'batch', seed: int = 0,
                           tta: str = 'none') -> float:
    """Mean over the classes present in ``data`` of each class's top-1 accuracy (the metric of Tab. 2 and Fig. 5).

    Arguments as :func:`accuracy`.
    """
    per_class = per_class_accuracy(model, data, batch_size, bn, seed, tta)
    return per_class[~per_class.isnan()].mean().item()


def _common_subset(data: ImageData, common: Sequence[str]) -> ImageData:
    by_name = {canonical_class_name(c): c for c in data.class_names}
    return data.select_classes([by_name[c] for c in common])


def _check_common(common: Sequence[str], test_data: Sequence[ImageData], heads: Sequence[nn.Module]) -> None:
    """Every test set and every head must have every common class; the error names those that lack some."""
    named = ([(f'test set {i}', d.class_names) for i, d in enumerate(test_data) if d is not None]
             + [(f'head {i}', h.class_names) for i, h in enumerate(heads)])
    lacking = [f'{what} lacks {missing}' for what, names in named
               if (missing := sorted(set(common) - {canonical_class_name(c) for c in names}))]
    if lacking:
        raise ValueError(f'Recombination scores the common classes with every head on every test set, but '
                         f'{"; ".join(lacking)}: pass common= classes that all of them have.')


def _check_recombinable(models: Sequence, test_data: Sequence[Optional[ImageData]]) -> None:
    if len(test_data) != len(models):
        raise ValueError(f'{len(models)} models but {len(test_data)} test sets: give one test set (or None, to '
                         f'leave its row unscored) per model, in the order of the models.')
    if any(m.head.class_names is None for m in models):
        raise ValueError('Recombination matches classes by name: every head needs class_names.')
    if stitched := [i for i, m in enumerate(models) if getattr(m, 'stitch', None) is not None]:
        raise ValueError(f'Models {stitched} pass features through a stitch, which recombination would leave out '
                         f'(it pairs bare extractors and heads): score a stitched model with accuracy().')
    _check_loaded(models)


def _head_columns(head, common: Sequence[str]) -> List[int]:
    names = [canonical_class_name(c) for c in head.class_names]
    return [names.index(c) for c in common]


def _row_correct(row_model, heads: Sequence[nn.Module], columns: Sequence[List[int]], data: ImageData,
                 batch_size: int, bn: str, seed: int, progress: tqdm, tta: str = 'none',
                 shard: Tuple[int, int] = (0, 1)) -> List[torch.Tensor]:
    """Correct predictions of ``row_model``'s extractor with each head (argmax over its ``columns``) on ``data``.

    Under TTA each view's features are computed once and fed to every head, and each head's logits are averaged.

    Inputs go to the extractor's device and features to each head's, and each count stays on its head's device:
    components loaded on the CPU can be scored with ones on an accelerator.
    """
    extractor = row_model.extractor
    device = _device(extractor)
    head_devices = [_device(h) for h in heads]
    columns = [torch.tensor(c, device=d) for c, d in zip(columns, head_devices)]
    correct = [torch.zeros((), dtype=torch.long, device=d) for d in head_devices]
    with ExitStack() as stack:
        stack.enter_context(eval_mode(extractor, bn))
        for head in heads:
            stack.enter_context(eval_mode(head, bn))
        for images, labels in iterate_batches(data, batch_size, seed, shard):
            logits = [0.0] * len(heads)
            for weight, view in tta_views(_inputs(images, extractor, device), tta):
                features = extractor(view)
                for j, (head, head_device) in enumerate(zip(heads, head_devices)):
                    logits[j] = logits[j] + weight * head(features.to(head_device, non_blocking=True))[:, columns[j]]
            for j, head_device in enumerate(head_devices):
                correct[j] += (logits[j].argmax(1) == labels.to(head_device)).sum()
            progress.update(1)
    return [_summed(c, shard) for c in correct]


@torch.no_grad()
def recombination_matrix(models: Sequence, test_data: Sequence[ImageData], batch_size: int = 256,
                         bn: str = 'batch', common: Optional[Sequence[str]] = None, seed: int = 0,
                         tta: str = 'none', shard: Tuple[int, int] = (0, 1)) -> torch.Tensor:
    """Accuracy of every extractor with every head, on the classes common to all networks.

    Every entry, the diagonal included, predicts among the common classes only (the argmax runs over the head's
    common-class outputs), so the diagonal is not the all-class own accuracy the paper quotes for the original
    tasks: that is :func:`accuracy`, which :func:`format_matrix` shows next to the matrix when given ``own``.

    Args:
        models: :class:`~timm_compat.CompatibleModel` s whose heads have ``class_names``. Each component may be on
            its own device.
        test_data: Test split of each model's own task; ``None`` leaves that row unscored (NaN), the model's head
            still scored in the other rows.
        batch_size: Evaluation batch size (it matters: BN uses batch statistics).
        bn: ``'batch'`` or ``'running'``.
        common: Classes to evaluate on (by name, up to synonyms); default the classes of every test set.
        seed: Seed of the order in which the images are batched (see :func:`~timm_compat.data.iterate_batches`).
        tta: Test-time augmentation, as in :func:`accuracy`.
        shard: As in :func:`accuracy`.

    Returns:
        ``(N, N)`` tensor; entry ``[i, j]`` is extractor ``i`` + head ``j`` on test set ``i``.

    Raises:
        ValueError: A head without ``class_names``, a model with a stitch (one pair: score it with
            :func:`accuracy`), no weights, no common class, a test set count other than the model count, or a test
            set with no images of the common classes.
    """
    _check_recombinable(models, test_data)
    heads = [m.head for m in models]
    if common is not None:
        check_distinct(common, 'common')
    common = ([canonical_class_name(c) for c in common] if common is not None else common_classes(
        [h.class_names if d is None else d.class_names for d, h in zip(test_data, heads)]))
    if not common:
        raise ValueError('The networks share no class names, so recombination accuracy is undefined.')
    _check_common(common, test_data, heads)
    columns = [_head_columns(h, common) for h in heads]
    subsets = [None if data is None else _common_subset(data, common) for data in test_data]
    if empty := [i for i, s in enumerate(subsets) if s is not None and not len(s)]:
        raise ValueError(f'test set {", ".join(map(str, empty))} has no images of the common classes {common}: '
                         f'pass None for it to leave its row unscored, or a test set that has them.')
    matrix = torch.full((len(models), len(models)), float('nan'))
    # Local rank as Accelerate sets it: in a multi-process run only one process draws the bar.
    with tqdm(total=sum(len(evaluation_batches(len(s), batch_size, seed)[shard[0]::shard[1]])
                        for s in subsets if s is not None),
              leave=False,
              desc=f'recombination matrix (BN={bn})', unit='batch',
              disable=int(os.environ.get('LOCAL_RANK', 0)) != 0) as progress:
        for i, (row_model, subset) in enumerate(zip(models, subsets)):
            if subset is None:
                continue
            correct = _row_correct(row_model, heads, columns, subset, batch_size, bn, seed, progress, tta, shard)
            matrix[i] = torch.tensor([int(c) for c in correct], dtype=torch.float64) / len(subset)
    return matrix


def format_matrix(matrix: torch.Tensor, names: Sequence[str], title: str = '',
                  own: Optional[Sequence[float]] = None) -> str:
    """Plain-text table: rows are extractors, columns heads, entries in percent.

    Args:
        matrix: ``(N, N)`` accuracies in ``[0, 1]`` from :func:`recombination_matrix` (common classes).
        names: Network names, in the matrix's order.
        title: Optional first line.
        own: Each network's all-class own accuracy (:func:`accuracy`), shown as a last column and averaged next
            to the common-class diagonal, so that own accuracy compares to the paper's.
    """
    if tuple(matrix.shape) != (len(names), len(names)):
        raise ValueError(f'{" x ".join(map(str, matrix.shape))} matrix for {len(names)} names: give one name per '
                         f'row (extractor) and column (head), in the matrix\'s order.')
    if own is not None and len(own) != len(names):
        raise ValueError(f'own has {len(own)} accuracies for {len(names)} networks: give one per network, '
                         f'in the order of names.')
    width = max(8, *(len(n) + 2 for n in names))
    label = max(18, *(len(n) + 2 for n in names))
    own_header = 'own, all classes'.rjust(20) if own is not None else ''
    lines = [title] if title else []
    lines.append('extractor \\ head'.ljust(label) + ''.join(n.rjust(width) for n in names) + own_header)
    for i, (name, row) in enumerate(zip(names, matrix.tolist())):
        own_cell = f'{100 * own[i]:.1f}'.rjust(20) if own is not None else ''
        lines.append(name.ljust(label) + ''.join(f'{100 * v:.1f}'.rjust(width) for v in row) + own_cell)
    off = [matrix[i, j].item() for i in range(len(names)) for j in range(len(names)) if i != j]
    summary = []
    if off:
        summary.append(f'mean recombination (off-diagonal): {100 * sum(off) / len(off):.1f} %')
    summary.append(f'mean own, common classes (diagonal): {100 * matrix.diagonal().mean().item():.1f} %')
    if own is not None:
        summary.append(f'mean own, all classes: {100 * sum(own) / len(own):.1f} %')
    lines.append('   '.join(summary))
    return '\n'.join(lines)


def evaluate_networks(models: Dict[str, nn.Module], tests: Dict[str, ImageData], batch_size: int = 256,
                      bn: str = 'batch', title: str = '', tta: str = 'none', shard: Tuple[int, int] = (0, 1)
                      ) -> Dict[str, Any]:
    """Own accuracy and the recombination matrix under ``bn``, and both again under the other BN mode.

    Batch statistics are the paper's protocol; running statistics are what a deployed model (plain ``eval()``, one
    image at a time) gets, so both are reported side by side (:func:`timm_compat.deploy` recalibrates the latter).

    Args:
        models: Networks by name, in the table's order.
        tests: Each network's test data, by the same names.
        batch_size: Evaluation batch size.
        bn: The main BN mode (``'batch'`` or ``'running'``); its numbers keep the plain keys.
        title: First words of each table's title.
        tta: Test-time augmentation of every number, as in :func:`accuracy`.
        shard: As in :func:`accuracy`.

    Returns:
        ``own_accuracy`` and ``recombination_matrix`` under ``bn``; ``own_accuracy_<other>`` and
        ``recombination_matrix_<other>`` under the other mode; ``table``: both tables, ``bn``'s first.
    """
    other = 'running' if bn == 'batch' else 'batch'
    names = list(models)
    result, tables = {}, []
    for mode, suffix in ((bn, ''), (other, f'_{other}')):
        own = {n: accuracy(models[n], tests[n], batch_size, mode, tta=tta, shard=shard) for n in names}
        matrix = recombination_matrix([models[n] for n in names], [tests[n] for n in names], batch_size, mode,
                                      tta=tta, shard=shard)
        tables.append(format_matrix(matrix, names, title=f'{title}recombination accuracy (%), common classes, '
                                                        f'BN={mode}' + (f', TTA={tta}' if tta != 'none' else ''),
                                 own=[own[n] for n in names]))
        result.update({f'own_accuracy{suffix}': own, f'recombination_matrix{suffix}': matrix.tolist()})
    return dict(result, table='\n'.join(tables))
