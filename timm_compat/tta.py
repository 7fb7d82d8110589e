"""Test-time augmentation (TTA): logits averaged over mirrored and shifted views of a batch (Jordan 2024, airbench94).

``'flip'`` averages the logits of the images and their mirror images; ``'flip_translate'`` (airbench94's translate
TTA) gives those two half the weight and spends the other half on both orientations shifted by one pixel up-left and
down-right (reflect-padded), ``1/8`` each. The paper's protocol (Gygli et al. 2021) uses none, the default.

Each view is a forward pass of its own, so with batch-statistics BN every view is normalised by its own statistics,
as a plain batch is.
"""
from typing import Callable, List, Tuple

import torch
import torch.nn.functional as F

__all__ = ['TTA_MODES', 'tta_views', 'tta_logits']

TTA_MODES = ('none', 'flip', 'flip_translate')


def _shifted(images: torch.Tensor, offset: int) -> torch.Tensor:
    # Crop at ``offset`` of the 1-pixel reflect-padded images: 0 shifts content down-right, 2 up-left.
    h, w = images.shape[-2:]
    return F.pad(images, (1, 1, 1, 1), mode='reflect')[..., offset:offset + h, offset:offset + w]


def tta_views(images: torch.Tensor, mode: str) -> List[Tuple[float, torch.Tensor]]:
    """The ``(weight, view)`` pairs of ``mode`` for a ``(N, C, H, W)`` batch; the weights sum to 1.

    Raises:
        ValueError: ``mode`` is not one of :data:`TTA_MODES`.
    """
    if mode not in TTA_MODES:
        raise ValueError(f'Unknown TTA mode {mode!r}: use one of {list(TTA_MODES)}.')
    if mode == 'none':
        return [(1.0, images)]
    views = [(0.5, images), (0.5, images.flip(-1))]
    if mode == 'flip_translate':
        shifted = [_shifted(images, offset) for offset in (0, 2)]
        views = [(w / 2, v) for w, v in views] + [(0.125, v) for s in shifted for v in (s, s.flip(-1))]
    return views


def tta_logits(model: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, mode: str) -> torch.Tensor:
    """``model``'s logits on ``images`` under TTA ``mode``: the weighted mean over :func:`tta_views`.

    Args:
        model: Any function of a batch to logits, e.g. a network or an extractor followed by a head.
        images: Normalised ``(N, C, H, W)`` inputs.
        mode: One of :data:`TTA_MODES`; ``'none'`` is exactly ``model(images)``.
    """
    views = tta_views(images, mode)
    if mode == 'none':
        return model(images)
    return sum(weight * model(view) for weight, view in views)
