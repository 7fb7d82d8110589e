"""How compatibility methods plug into a training step.

A method may ``expand`` the input batch (keeping the original images as its first rows) and adds a ``loss`` computed
from the extractor features of the expanded batch. :func:`compatibility_loss` runs the extractor once on the
expanded batch and reuses the first rows for the task loss, so the loop never needs to know what a method does.
"""
from typing import Dict, Sequence

import torch
import torch.nn.functional as F


class CompatibilityMethod:
    """Base class: override ``loss`` and, if the method needs extra inputs, ``expand``."""
    name: str = ''

    def __init__(self, weight: float = 1.0):
        self.weight = weight

    def expand(self, images: torch.Tensor) -> torch.Tensor:
        return images

    def loss(self, features: torch.Tensor, labels: torch.Tensor, model) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f'{type(self).__name__}(weight={self.weight})'


def compatibility_loss(model, images: torch.Tensor, labels: torch.Tensor,
                       methods: Sequence[CompatibilityMethod] = ()) -> Dict[str, torch.Tensor]:
    """Task loss plus each method's weighted loss, from one extractor pass.

    Args:
        model: A :class:`~timm_compat.CompatibleModel`.
        images: Input batch ``(N, C, H, W)``.
        labels: Task labels ``(N,)``.
        methods: Compatibility methods; at most one may expand the batch.

    Returns:
        ``{"task": ..., <method name>: ..., "loss": total}``, each a scalar tensor.
    """
    # Checking labels costs a device sync, so it is done where it is free; train.py validates whole datasets once.
    if labels.device.type == 'cpu' and labels.numel():
        low, high = labels.aminmax()
        if low < 0 or high >= model.head.num_classes:
            raise ValueError(f'Labels must lie in [0, {model.head.num_classes}) for this head, '
                             f'got values in [{int(low)}, {int(high)}]. Check the dataset and num_classes.')
    inputs = images
    for method in methods:
        inputs = method.expand(inputs)
    features = model.extractor(inputs)
    losses = {'task': F.cross_entropy(model.head(features[:images.shape[0]]), labels)}
    for method in methods:
        losses[method.name] = method.weight * method.loss(features, labels, model)
    losses['loss'] = torch.stack(list(losses.values())).sum()
    return losses
