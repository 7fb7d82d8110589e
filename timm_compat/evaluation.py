"""Own-task accuracy and the N x N recombination matrix (Gygli et al. 2021, Sec. 4).

Recombination accuracy of row ``i``, column ``j``: the extractor of network ``i`` with the head of network ``j``,
on network ``i``'s test images of the classes common to both, predicting among those common classes, with no
fine-tuning. BN uses batch statistics by default. Each extractor's features are computed once per batch and fed to
every head, so an N x N matrix costs N extractor passes, not N^2.
"""
from contextlib import ExitStack
from typing import List, Optional, Sequence

import torch

from .batchnorm import eval_mode
from .data import ImageData, iterate_batches, normalize
from .methods.common_classes import canonical_class_name, common_classes

__all__ = ['accuracy', 'per_class_accuracy', 'average_class_accuracy', 'recombination_matrix', 'format_matrix']


def _inputs(images: torch.Tensor, model, device) -> torch.Tensor:
    cfg = model.extractor.pretrained_cfg
    return normalize(images.to(device, non_blocking=True), cfg['mean'], cfg['std'])


@torch.no_grad()
def accuracy(model, data: ImageData, batch_size: int = 256, bn: str = 'batch') -> float:
    """Top-1 accuracy of ``model`` on all of ``data``."""
    device = next(model.parameters()).device
    correct = torch.zeros((), device=device, dtype=torch.long)
    with eval_mode(model, bn):
        for images, labels in iterate_batches(data, batch_size):
            logits = model(_inputs(images, model, device))
            correct += (logits.argmax(1) == labels.to(device)).sum()
    return correct.item() / len(data)


@torch.no_grad()
def per_class_accuracy(model, data: ImageData, batch_size: int = 250, bn: str = 'batch') -> torch.Tensor:
    """Top-1 accuracy of each class of ``data``, a ``(num_classes,)`` CPU tensor; NaN for classes with no images.

    Args:
        model: A :class:`~timm_compat.CompatibleModel` (or anything with ``extractor.pretrained_cfg``).
        data: Labelled test data whose labels index the model's outputs.
        batch_size: Evaluation batch size (it matters when ``bn='batch'``).
        bn: ``'batch'`` (test-time BN statistics) or ``'running'``.
    """
    device = next(model.parameters()).device
    num_classes = data.num_classes
    correct = torch.zeros(num_classes, device=device)
    total = torch.zeros(num_classes, device=device)
    with eval_mode(model, bn):
        for images, labels in iterate_batches(data, batch_size):
            labels = labels.to(device)
            predictions = model(_inputs(images, model, device)).argmax(1)
            total += torch.bincount(labels, minlength=num_classes)
            correct += torch.bincount(labels[predictions == labels], minlength=num_classes)
    return (correct / total).cpu()  # 0 / 0 is NaN: a class without test images


def average_class_accuracy(model, data: ImageData, batch_size: int = 250, bn: str = 'batch') -> float:
    """Mean over the classes present in ``data`` of each class's top-1 accuracy (the metric of Tab. 2 and Fig. 5).

    Arguments as :func:`per_class_accuracy`.
    """
    per_class = per_class_accuracy(model, data, batch_size, bn)
    return per_class[~per_class.isnan()].mean().item()


def _common_subset(data: ImageData, common: Sequence[str]) -> ImageData:
    by_name = {canonical_class_name(c): c for c in data.class_names}
    return data.select_classes([by_name[c] for c in common])


def _head_columns(head, common: Sequence[str]) -> List[int]:
    names = [canonical_class_name(c) for c in head.class_names]
    return [names.index(c) for c in common]


@torch.no_grad()
def recombination_matrix(models: Sequence, test_data: Sequence[ImageData], batch_size: int = 256,
                         bn: str = 'batch', common: Optional[Sequence[str]] = None) -> torch.Tensor:
    """Accuracy of every extractor with every head, on the classes common to all networks.

    Args:
        models: :class:`~timm_compat.CompatibleModel` s whose heads have ``class_names``.
        test_data: Test split of each model's own task.
        batch_size: Evaluation batch size (it matters: BN uses batch statistics).
        bn: ``'batch'`` or ``'running'``.
        common: Classes to evaluate on; default the classes (by name, up to synonyms) of every test set.

    Returns:
        ``(N, N)`` tensor; entry ``[i, j]`` is extractor ``i`` + head ``j`` on test set ``i``.
    """
    if any(m.head.class_names is None for m in models):
        raise ValueError('Recombination matches classes by name: every head needs class_names.')
    common = list(common) if common is not None else common_classes([d.class_names for d in test_data])
    if not common:
        raise ValueError('The networks share no class names, so recombination accuracy is undefined.')
    device = next(models[0].parameters()).device
    columns = [torch.tensor(_head_columns(m.head, common), device=device) for m in models]
    matrix = torch.zeros(len(models), len(models))
    for i, (row_model, data) in enumerate(zip(models, test_data)):
        subset = _common_subset(data, common)
        correct = torch.zeros(len(models), device=device, dtype=torch.long)
        with ExitStack() as stack:
            stack.enter_context(eval_mode(row_model.extractor, bn))
            for m in models:
                stack.enter_context(eval_mode(m.head, bn))
            for images, labels in iterate_batches(subset, batch_size):
                features = row_model.extractor(_inputs(images, row_model, device))
                labels = labels.to(device)
                for j, m in enumerate(models):
                    correct[j] += (m.head(features)[:, columns[j]].argmax(1) == labels).sum()
        matrix[i] = correct.cpu().double() / len(subset)
    return matrix


def format_matrix(matrix: torch.Tensor, names: Sequence[str], title: str = '') -> str:
    """Plain-text table: rows are extractors, columns heads, entries in percent."""
    width = max(8, *(len(n) + 2 for n in names))
    lines = [title] if title else []
    lines.append('extractor \\ head'.ljust(18) + ''.join(n.rjust(width) for n in names))
    for name, row in zip(names, matrix.tolist()):
        lines.append(name.ljust(18) + ''.join(f'{100 * v:.1f}'.rjust(width) for v in row))
    off = [matrix[i, j].item() for i in range(len(names)) for j in range(len(names)) if i != j]
    if off:
        lines.append(f'mean recombination (off-diagonal): {100 * sum(off) / len(off):.1f} %   '
                     f'mean own (diagonal): {100 * matrix.diagonal().mean().item():.1f} %')
    return '\n'.join(lines)
