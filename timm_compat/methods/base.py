"""How compatibility methods plug into a training step.

A method may ``expand`` the input batch (keeping the original images as its first rows) and adds a ``loss`` computed
from the extractor features of its batch. :func:`compatibility_loss` runs the extractor once on the expanded batch
and reuses the first rows for the task loss, unless the expanding method asks for a separate task pass; the
expanding method also decides how BatchNorm treats the expanded batch (``expanded_pass``). The loop never needs to
know what a method does.
"""
from contextlib import nullcontext
from typing import ContextManager, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn


class CompatibilityMethod:
    """Base class: override ``loss`` and, if the method needs extra inputs, ``expand`` and ``expanded_pass``.

    Attributes:
        name: Key of the method's loss, and by default of the interface aux head it trains.
        separate_task_pass: An expanding method sets this to have the task loss (and the methods that do not expand)
            use an extractor pass on the original images, instead of the first rows of the expanded pass.
    """
    name: str = ''
    separate_task_pass: bool = False

    def __init__(self, weight: float = 1.0):
        self.weight = weight

    @property
    def aux_heads(self) -> Tuple[str, ...]:
        """Keys of ``interface.aux_heads`` whose parameters this method's loss trains."""
        return (self.name,)

    def set_step(self, step: int) -> None:
        """Told the training step before it runs; a method whose randomness is a function of the step (RP's
        one-rotation form) draws from it, so a resumed run draws the same. A no-op by default."""

    def expand(self, images: torch.Tensor) -> torch.Tensor:
        return images

    def expanded_pass(self, extractor: nn.Module) -> ContextManager:
        """Context for the extractor's pass on the expanded batch (e.g. how its BatchNorm layers normalise)."""
        return nullcontext()

    def loss(self, features: torch.Tensor, labels: torch.Tensor, model) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f'{type(self).__name__}(weight={self.weight})'


def _check_labels(model, labels: torch.Tensor) -> None:
    # Checking labels costs a device sync, so it is done where it is free; train.py validates whole datasets once.
    if labels.device.type == 'cpu' and labels.numel():
        low, high = labels.aminmax()
        if low < 0 or high >= model.head.num_classes:
            raise ValueError(f'Labels must lie in [0, {model.head.num_classes}) for this head, '
                             f'got values in [{int(low)}, {int(high)}]. Check the dataset and num_classes.')


def _expanding_method(methods: Sequence[CompatibilityMethod], images: torch.Tensor
                      ) -> Tuple[Optional[CompatibilityMethod], torch.Tensor]:
    expanded = [(m, x) for m in methods for x in [m.expand(images)] if x is not images]
    if len(expanded) > 1:
        raise ValueError(f'At most one method may expand the batch, got {[m for m, _ in expanded]}: their expanded '
                         f'batches would not line up with each other.')
    return expanded[0] if expanded else (None, images)


def compatibility_loss(model, images: torch.Tensor, labels: torch.Tensor,
                       methods: Sequence[CompatibilityMethod] = (), *,
                       label_smoothing: float = 0.0, task_weight: float = 1.0) -> Dict[str, torch.Tensor]:
    """Task loss plus each method's weighted loss, from one extractor pass (two if a method asks for it).

    Args:
        model: A :class:`~timm_compat.CompatibleModel`.
        images: Input batch ``(N, C, H, W)``.
        labels: Task labels ``(N,)``.
        methods: Compatibility methods; at most one may expand the batch.
        label_smoothing: Of the task cross-entropy only (torch's ``label_smoothing``; ``optim.label_smoothing``).
        task_weight: Of the task cross-entropy; 0 (RP pre-training) gives the head and the extractor no gradient
            from the labels, but the cross-entropy is still computed (the labels must be valid) and logged, and
            weight decay still shrinks the head.

    Returns:
        ``{"task": ..., <method name>: ..., "loss": total}``, each a scalar tensor: the task cross-entropy
        unweighted, each method's loss weighted, as the total counts them.
    """
    _check_labels(model, labels)
    expander, inputs = _expanding_method(methods, images)
    expanded_features = None
    if expander is not None:
        with expander.expanded_pass(model.extractor):
            expanded_features = model.extractor(inputs)
    if expander is None or expander.separate_task_pass:
        task_features = model.extractor(images)
    else:
        task_features = expanded_features[:images.shape[0]]
    # Only the task loss is smoothed: the aux losses train the interface's shared heads, which every network and
    # later incremental ones must fit as published, and the paper's eqs. (1)-(2) are plain cross-entropies.
    task = F.cross_entropy(model.head(task_features), labels, label_smoothing=label_smoothing)
    losses = {'task': task_weight * task}
    for method in methods:
        features = expanded_features if method is expander else task_features
        losses[method.name] = method.weight * method.loss(features, labels, model)
    losses['loss'] = torch.stack(list(losses.values())).sum()
    losses['task'] = task  # logged unweighted: under task_weight 0 (RP pre-training) it still says how the head does
    return losses
