"""Compatibility through self-supervision: rotation prediction (RP), Gygli et al. 2021, Sec. 3.1.

METHOD CARD
    What: every network's extractor also feeds ONE shared auxiliary head that predicts by how much its input was
        rotated. Because all networks must solve the same self-supervised task through the same head, their
        feature spaces are pulled towards each other; no common classes are needed.
    Equation (eq. 1): for each task t and example x_i, the task loss plus the mean rotation-prediction loss over
        S = {0, 90, 180, 270} degrees, through the shared head Theta_s:
        sum_t sum_i [ l_t(h(f(x_i; Phi_t); Theta_t), y_i) + 1/|S| sum_{s in S} l_s(h(f(g(x_i, s); Phi_t); Theta_s), s) ]
    Hyperparameters (config key: default): weight ``interface.rp_weight``: 1.0; head ``interface.rp_head`` /
        ``aux_head``: ``conv``; BatchNorm treatment ``interface.rp_norm``: ``separate`` (below). |S| is fixed at
        :data:`NUM_ROTATIONS` = 4.
    Paper's numbers (recombination accuracy, CIFAR-10 + STL-10, ResNet-56 split after stage 2, 10 runs, Fig. 2):
        RP 50.1 % from different random weights (independent: 10.6 %, upper bound 85.6 %); IIW+RP+DCC 76.7 %;
        incremental IIW+RP+DCC 72.7 % (Sec. 4). From different pre-trained weights RP drops to 19.7 % (Sec. 4).
        Feature cross-correlation RP 0.38 vs DCC 0.19 (Fig. 3). Adaptation through the frozen RP head: 82.6 %
        CIFAR-10 -> STL-10, 77.9 % on average (Table 2); transfer with RP: 40.0-66.4 % right after
        recombination (Fig. 5).
    Functional form: :func:`rotate_batch`, :func:`rotation_labels`, :func:`rotation_loss`.
    Class form: :class:`RotationPrediction`, for :func:`~timm_compat.methods.compatibility_loss`.

The extractor sees each image at 0, 90, 180 and 270 degrees in one concatenated batch; the shared RP head predicts
which rotation was applied. The 0-degree copy comes first and doubles as the task batch, except with
``norm='separate'``.

How BatchNorm in the extractor treats the four rotations (``norm``):

* ``'shared'``: the 4N-image batch is normalised as one. The task rows are normalised with statistics of all four
  rotations and the running statistics average rotated images, while evaluation (batch statistics of upright test
  images) normalises with upright statistics only: training and test see different normalisations.
* ``'per_rotation'``: each rotation is normalised with its own batch statistics, still in one pass; the task rows
  get exactly what an upright-only pass would give, and only the upright chunk updates running statistics.
* ``'separate'``: an extra upright pass for the task loss (eq. 1 has a separate task term); the rotated pass is
  normalised as one 4N batch, for the RP loss only, and leaves running statistics alone. About 5/4 the extractor
  compute of the others.

Only the extractor is concerned: the RP head normalises the 4N features as one batch in every mode, since no task
or recombination ever uses it on upright images alone.
"""
from contextlib import nullcontext
from typing import ContextManager

import torch
import torch.nn.functional as F
from torch import nn

from .base import CompatibilityMethod
from .chunked_norm import chunked_batch_norm

__all__ = ['NUM_ROTATIONS', 'RP_NORMS', 'rotate_batch', 'rotation_labels', 'rotation_loss', 'RotationPrediction']

NUM_ROTATIONS = 4  # |S| of eq. (1): 0, 90, 180 and 270 degrees; also the RP head's output size
RP_NORMS = ('shared', 'per_rotation', 'separate')


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
    """RP as a pluggable method: expands the batch with rotations, scores the interface's RP head.

    Args:
        weight: Factor of the RP loss.
        norm: How the extractor's BatchNorm treats the rotations: ``'shared'``, ``'per_rotation'`` or
            ``'separate'`` (see the module docstring).
    """
    name = 'rp'

    def __init__(self, weight: float = 1.0, norm: str = 'shared'):
        super().__init__(weight)
        if norm not in RP_NORMS:
            raise ValueError(f'Unknown rp_norm {norm!r}: use one of {RP_NORMS}.')
        self.norm = norm
        self.separate_task_pass = norm == 'separate'

    def expanded_pass(self, extractor: nn.Module) -> ContextManager:
        if self.norm == 'per_rotation':
            # Running statistics from the upright chunk only: that is the distribution evaluation normalises, and it
            # makes them equal to those of an upright-only pass (and of the 'separate' mode).
            return chunked_batch_norm(extractor, NUM_ROTATIONS, running_chunk=0)
        if self.norm == 'separate':
            return chunked_batch_norm(extractor, 1, running_chunk=None)  # the upright pass sets running statistics
        return nullcontext()

    def expand(self, images: torch.Tensor) -> torch.Tensor:
        return rotate_batch(images)

    def loss(self, features: torch.Tensor, labels: torch.Tensor, model) -> torch.Tensor:
        if model.interface is None or model.interface.rp is None:
            raise ValueError('RotationPrediction needs an interface with an RP head: Interface(..., rp=True).')
        return rotation_loss(model.interface.rp(features))

    def __repr__(self) -> str:
        return f'{type(self).__name__}(weight={self.weight}, norm={self.norm!r})'
