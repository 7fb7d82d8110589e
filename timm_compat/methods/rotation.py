"""Compatibility through self-supervision: rotation prediction (RP), Gygli et al. 2021, Sec. 3.1, eq. (1).

The extractor sees each image at 0, 90, 180 and 270 degrees in one concatenated batch; the shared RP head predicts
which rotation was applied. The 0-degree copy comes first and doubles as the task batch.
"""
import torch
import torch.nn.functional as F

from .base import CompatibilityMethod

__all__ = ['rotate_batch', 'rotation_labels', 'rotation_loss', 'RotationPrediction']

NUM_ROTATIONS = 4


def rotate_batch(images: torch.Tensor) -> torch.Tensor:
    """``(N, C, H, W)`` -> ``(4N, C, H, W)``: the batch at 0, 90, 180, 270 degrees, in that order.

    A channels_last batch stays channels_last: ``rot90`` and ``cat`` would otherwise hand the extractor NCHW.
    """
    if images.shape[-1] != images.shape[-2]:
        raise ValueError(f'Rotation prediction needs square images, got {tuple(images.shape[-2:])}: '
                         f'resize or crop to a square input size.')
    rotated = torch.cat([torch.rot90(images, k, dims=(-2, -1)) for k in range(NUM_ROTATIONS)])
    if images.dim() == 4 and images.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous():
        rotated = rotated.contiguous(memory_format=torch.channels_last)
    return rotated


def rotation_labels(batch_size: int, device=None) -> torch.Tensor:
    """Rotation classes matching :func:`rotate_batch`: ``[0]*N + [1]*N + [2]*N + [3]*N``."""
    return torch.arange(NUM_ROTATIONS, device=device).repeat_interleave(batch_size)


def rotation_loss(logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of RP logits ``(4N, 4)`` for a batch laid out by :func:`rotate_batch`."""
    return F.cross_entropy(logits, rotation_labels(logits.shape[0] // NUM_ROTATIONS, logits.device))


class RotationPrediction(CompatibilityMethod):
    """RP as a pluggable method: expands the batch with rotations, scores the interface's RP head."""
    name = 'rp'

    def expand(self, images: torch.Tensor) -> torch.Tensor:
        return rotate_batch(images)

    def loss(self, features: torch.Tensor, labels: torch.Tensor, model) -> torch.Tensor:
        if model.interface is None or model.interface.rp is None:
            raise ValueError('RotationPrediction needs an interface with an RP head: Interface(..., rp=True).')
        return rotation_loss(model.interface.rp(features))
