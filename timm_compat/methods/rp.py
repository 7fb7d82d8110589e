"""Compatibility through self-supervision: rotation prediction (RP), Gygli et al. 2021, Sec. 3.1.

METHOD CARD
    What: every network's extractor also feeds ONE shared auxiliary head that predicts by how much its input was
        rotated. Because all networks must solve the same self-supervised task through the same head, their
        feature spaces are pulled towards each other; no common classes are needed.
    Equation (eq. 1): for each task t and example x_i, the task loss plus the mean rotation-prediction loss over
        S = {0, 90, 180, 270} degrees, through the shared head Theta_s:
        sum_t sum_i [ l_t(h(f(x_i; Phi_t); Theta_t), y_i) + 1/|S| sum_{s in S} l_s(h(f(g(x_i, s); Phi_t); Theta_s), s) ]
    Hyperparameters (config key: default): weight ``interface.rp_weight``: 1.0; head ``interface.rp_head`` /
        ``aux_head``: ``conv``; BatchNorm treatment ``interface.rp_norm``: ``separate`` (below); rotations per
        image ``interface.rp_rotations``: ``all``, the paper's (``one``: the cheap form below). |S| is fixed at
        :data:`NUM_ROTATIONS` = 4.
    Paper's numbers (recombination accuracy, CIFAR-10 + STL-10, ResNet-56 split after stage 2, 10 runs, Fig. 2):
        RP 50.1 % from different random weights (independent: 10.6 %, upper bound 85.6 %); IIW+RP+DCC 76.7 %;
        incremental IIW+RP+DCC 72.7 % (Sec. 4). From different pre-trained weights RP drops to 19.7 % (Sec. 4).
        Feature cross-correlation RP 0.38 vs DCC 0.19 (Fig. 3). Adaptation through the frozen RP head: 82.6 %
        CIFAR-10 -> STL-10, 77.9 % on average (Table 2); transfer with RP: 40.0-66.4 % right after
        recombination (Fig. 5).
    Functional form: :func:`rotate_batch`, :func:`rotation_labels`, :func:`rotation_loss`; the cheap form's
        :func:`rotation_generator`, :func:`draw_rotations`, :func:`rotate_one_batch`, :func:`one_rotation_loss`.
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
  compute of the others. The default, here as in ``interface.rp_norm``.

Only the extractor is concerned: the RP head normalises the 4N features as one batch in every mode, since no task
or recombination ever uses it on upright images alone.

Cheap form (``rotations='one'``, a deviation from the paper):

* Cost: 2 extractor images per image instead of 4 (5 with ``norm='separate'``): the upright image, and the image
  once more at ONE rotation drawn uniformly from 90, 180, 270 degrees. The upright rows serve the task loss in
  every ``norm``, so there is no extra task pass.
* Loss: with ``k`` the drawn rotation, ``1/4 l_s(upright, 0) + 3/4 l_s(rotated, k)``, each term a batch mean.
  Since ``E[l_s(rotated, k)] = 1/3 sum_{s != 0} l_s(g(x, s), s)``, its expectation over the draw is eq. (1)'s
  ``1/|S| sum_{s in S} l_s``: the same objective, estimated with more variance.
* BatchNorm: ``'per_rotation'`` and ``'separate'`` both normalise the upright half and the rotated half each with
  its own statistics, in one 2N pass: the task rows get exactly an upright-only pass, whose statistics alone update
  the running ones (what ``'separate'``'s extra pass is for). The rotated half pools the three rotations it mixes
  (one chunk per rotation would have a random size); ``'separate'``'s RP rows are so no longer normalised over all
  rotations at once. ``'shared'`` normalises the 2N batch as one.
* Randomness: the draw of step ``t`` comes from :func:`rotation_generator` ``(seed, t)`` alone, so it is the same
  on a resume and leaves torch's global RNG (augmentation) alone; whatever runs the steps calls
  :meth:`RotationPrediction.set_step` before each one (``expand`` refuses to guess). Every DDP rank draws the same
  rotations for its own images.
* Measured: one fast-budget pair with it (docs/results.md, "Fast family": recombination 0.980 x own accuracy,
  seed 0); not yet against the four-rotation form (issue 16 asks for 3 seeds of each).
"""
from contextlib import nullcontext
from typing import ContextManager, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .base import CompatibilityMethod
from .chunked_norm import chunked_batch_norm

__all__ = ['NUM_ROTATIONS', 'RP_NORMS', 'RP_ROTATIONS', 'rotate_batch', 'rotation_labels', 'rotation_loss',
           'rotation_generator', 'draw_rotations', 'rotate_one_batch', 'one_rotation_labels', 'one_rotation_loss',
           'RotationPrediction']

NUM_ROTATIONS = 4  # |S| of eq. (1): 0, 90, 180 and 270 degrees; also the RP head's output size
RP_NORMS = ('shared', 'per_rotation', 'separate')
RP_ROTATIONS = ('all', 'one')
# Spawn key of RP's draws: streams seeded with the run seed elsewhere (data order) must not repeat them.
_RP_STREAM = 0x5250


def _check_square(images: torch.Tensor) -> None:
    if images.shape[-1] != images.shape[-2]:
        raise ValueError(f'Rotation prediction needs square images, got {tuple(images.shape[-2:])}: '
                         f'resize or crop to a square input size.')


def _like(rotated: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    # A channels_last batch stays channels_last: rot90, cat and indexing would otherwise hand the extractor NCHW.
    if images.dim() == 4 and images.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous():
        rotated = rotated.contiguous(memory_format=torch.channels_last)
    return rotated


def rotate_batch(images: torch.Tensor) -> torch.Tensor:
    """``(N, C, H, W)`` -> ``(4N, C, H, W)``: the batch at 0, 90, 180, 270 degrees, in that order.

    A channels_last batch stays channels_last.
    """
    _check_square(images)
    return _like(torch.cat([torch.rot90(images, k, dims=(-2, -1)) for k in range(NUM_ROTATIONS)]), images)


def rotation_labels(batch_size: int, device=None) -> torch.Tensor:
    """Rotation classes matching :func:`rotate_batch`: ``[0]*N + [1]*N + [2]*N + [3]*N``."""
    return torch.arange(NUM_ROTATIONS, device=device).repeat_interleave(batch_size)


def rotation_loss(logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of RP logits ``(4N, 4)`` for a batch laid out by :func:`rotate_batch`."""
    return F.cross_entropy(logits, rotation_labels(logits.shape[0] // NUM_ROTATIONS, logits.device))


def rotation_generator(seed: int, step: int) -> torch.Generator:
    """The CPU generator of training step ``step``'s rotation draws, seeded by ``(seed, step)`` alone.

    Like the data order (:class:`~timm_compat.data.EpochSampler`), the draw is a function of the step, so a resumed
    run draws what an uninterrupted one would have; torch's global RNG is not touched.
    """
    state = np.random.SeedSequence(seed, spawn_key=(_RP_STREAM, step)).generate_state(1, np.uint64)
    return torch.Generator().manual_seed(int(state[0]))


def draw_rotations(batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """One rotation class per image, uniform over 1, 2, 3 (90, 180, 270 degrees), drawn on the CPU."""
    return torch.randint(1, NUM_ROTATIONS, (batch_size,), generator=generator)


def rotate_one_batch(images: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """``(N, C, H, W)`` -> ``(2N, C, H, W)``: the batch upright, then image ``i`` rotated by ``rotations[i]`` x 90
    degrees (as ``torch.rot90``). A channels_last batch stays channels_last.
    """
    _check_square(images)
    every = torch.stack([torch.rot90(images, k, dims=(-2, -1)) for k in range(NUM_ROTATIONS)])
    rotated = every[rotations.to(images.device), torch.arange(images.shape[0], device=images.device)]
    return _like(torch.cat([images, rotated]), images)


def one_rotation_labels(rotations: torch.Tensor) -> torch.Tensor:
    """Rotation classes matching :func:`rotate_one_batch`: ``[0]*N + rotations``."""
    return torch.cat([torch.zeros_like(rotations), rotations])


def one_rotation_loss(logits: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """RP loss of logits ``(2N, 4)`` for a batch laid out by :func:`rotate_one_batch` with ``rotations``.

    ``1/4`` the upright rows' cross-entropy plus ``3/4`` the rotated rows': in expectation over rotations uniform
    on 1..3, :func:`rotation_loss` of the four-rotation batch (eq. 1's mean over ``S``).
    """
    n = rotations.shape[0]
    if logits.shape[0] != 2 * n:
        raise ValueError(f'one_rotation_loss: {logits.shape[0]} logits for {n} drawn rotations; expected {2 * n} '
                         f'rows laid out by rotate_one_batch.')
    labels = one_rotation_labels(rotations.to(logits.device))
    upright = F.cross_entropy(logits[:n], labels[:n])
    rotated = F.cross_entropy(logits[n:], labels[n:])
    return (upright + (NUM_ROTATIONS - 1) * rotated) / NUM_ROTATIONS


class RotationPrediction(CompatibilityMethod):
    """RP as a pluggable method: expands the batch with rotations, scores the interface's RP head.

    Args:
        weight: Factor of the RP loss.
        norm: How the extractor's BatchNorm treats the rotations: ``'shared'``, ``'per_rotation'`` or
            ``'separate'`` (see the module docstring).
        rotations: ``'all'``: the four rotations of eq. (1); ``'one'``: the upright image and one random rotation
            (the cheap form, module docstring). ``'one'`` needs :meth:`set_step` before each step.
        seed: Seed of the ``'one'`` draws (with the step).
    """
    name = 'rp'

    def __init__(self, weight: float = 1.0, norm: str = 'separate', rotations: str = 'all', seed: int = 0):
        super().__init__(weight)
        if norm not in RP_NORMS:
            raise ValueError(f'Unknown rp_norm {norm!r}: use one of {RP_NORMS}.')
        if rotations not in RP_ROTATIONS:
            raise ValueError(f'Unknown rp_rotations {rotations!r}: use one of {RP_ROTATIONS}.')
        self.norm, self.rotations, self.seed = norm, rotations, seed
        # The cheap form's upright chunk is already normalised as an upright-only pass: no extra task pass.
        self.separate_task_pass = norm == 'separate' and rotations == 'all'
        self._generator: Optional[torch.Generator] = None
        self._drawn: Optional[torch.Tensor] = None

    def set_step(self, step: int) -> None:
        """Seed the rotation draws of training step ``step`` (``rotations='one'``; harmless otherwise).

        Call it before every step, with the global step that also picks the batch. Within a step, the networks
        trained (``'sum'`` schedule) draw one after the other from the step's generator.
        """
        self._generator = rotation_generator(self.seed, step)

    def expanded_pass(self, extractor: nn.Module) -> ContextManager:
        if self.norm == 'shared':
            return nullcontext()
        if self.rotations == 'one':  # upright chunk, rotated chunk; running statistics from the upright one
            return chunked_batch_norm(extractor, 2, running_chunk=0)
        if self.norm == 'per_rotation':
            # Running statistics from the upright chunk only: that is the distribution evaluation normalises, and it
            # makes them equal to those of an upright-only pass (and of the 'separate' mode).
            return chunked_batch_norm(extractor, NUM_ROTATIONS, running_chunk=0)
        return chunked_batch_norm(extractor, 1, running_chunk=None)  # the upright pass sets running statistics

    def expand(self, images: torch.Tensor) -> torch.Tensor:
        if self.rotations == 'all':
            return rotate_batch(images)
        if self._generator is None:
            raise RuntimeError("RotationPrediction(rotations='one') draws its rotations from the training step: call "
                               "set_step(step) before each step, or use rotations='all'.")
        self._drawn = draw_rotations(images.shape[0], self._generator).to(images.device)
        return rotate_one_batch(images, self._drawn)

    def loss(self, features: torch.Tensor, labels: torch.Tensor, model) -> torch.Tensor:
        if model.interface is None or model.interface.rp is None:
            raise ValueError('RotationPrediction needs an interface with an RP head: Interface(..., rp=True).')
        logits = model.interface.rp(features)
        return rotation_loss(logits) if self.rotations == 'all' else one_rotation_loss(logits, self._drawn)

    def __repr__(self) -> str:
        return (f'{type(self).__name__}(weight={self.weight}, norm={self.norm!r}, rotations={self.rotations!r}, '
                f'seed={self.seed})')
