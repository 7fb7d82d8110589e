"""A run's patch-whitening convs (the airbench family's ``whiten`` layer): set from training images when the
networks are built, and their bias trained only for the first epochs, as airbench94 does (Jordan 2024).

Both are config keys (``whitening_init_examples``, ``whitening_bias_epochs``) and no-ops for backbones without a
whitening conv (:func:`~timm_compat.models.airbench.whitening_layers` finds none).

Under IIW every network must start from the same weights, and the whitening weight is part of them (it is frozen,
so it stays the initial weight for the whole run). Computed from each network's own images the networks would start
from different first layers; computed from one network's images it would whiten the other tasks' patches worse. So
under IIW it is computed once from the union of every trained network's sample and set in each of them; trained
incrementally against a loaded network, they take its whitening, as IIW takes its initial weights.
"""
import math
from typing import List, Mapping, Sequence, Tuple

import torch
from torch import nn

from .config import RunConfig
from .data import ImageData, random_subset
from .streaming import materialize
from .models.airbench import init_whitening, whitening_layers

__all__ = ['init_run_whitening', 'whitening_bias_steps', 'frozen_whitening_biases', 'drop_whitening_bias_grads']


def _sample(images, n: int, seed: int) -> torch.Tensor:
    return materialize(images[random_subset(len(images), min(n, len(images)), seed)])


def init_run_whitening(cfg: RunConfig, models: Mapping[str, nn.Module],
                       data: Mapping[str, Tuple[ImageData, ImageData]]) -> None:
    """Set the whitening convs of the run's trained networks from ``cfg.whitening_init_examples`` training images.

    Each network's sample is a seeded random subset of its training set (seed ``cfg.seed``), so a rebuilt run (a
    resume) gets the same weights. Networks with ``load:`` or ``init:`` keep the whitening they were trained
    with; under IIW the trained networks take a loaded network's (still its initial weight: it is frozen).

    Args:
        cfg: The phase's config; ``whitening_init_examples`` None turns this off, ``iiw`` shares the whitening.
        models: Every network of the phase by name.
        data: (train, test) data of every network by name.
    """
    if cfg.whitening_init_examples is None:
        return
    trained = [n.name for n in cfg.networks if not n.load and not n.init and whitening_layers(models[n.name])]
    loaded = [n.name for n in cfg.networks if n.load and whitening_layers(models[n.name])]
    if cfg.iiw and loaded:
        with torch.no_grad():
            for name in trained:
                for layer, source in zip(whitening_layers(models[name]), whitening_layers(models[loaded[0]])):
                    layer.weight.copy_(source.weight)
        return
    samples = {name: _sample(data[name][0].images, cfg.whitening_init_examples, cfg.seed) for name in trained}
    if cfg.iiw and samples:
        union = torch.cat(list(samples.values()))
        samples = {name: union for name in trained}
    for name in trained:
        init_whitening(models[name], samples[name].to(next(models[name].parameters()).device))


def whitening_bias_steps(cfg: RunConfig, steps_per_epoch: Sequence[int]) -> int:
    """The steps (0-based ``0 .. n - 1``) that train the whitening bias: ``cfg.whitening_bias_epochs`` epochs.

    Epochs count as ``epochs`` does: over the largest training set, and each network's own under the alternating
    schedule.

    Args:
        cfg: The phase's config; ``whitening_bias_epochs`` must be set.
        steps_per_epoch: Every trained network's steps per epoch.
    """
    turns = len(steps_per_epoch) if cfg.joint_schedule == 'alternate' else 1
    # Rounded before the ceil, as optim.phase_steps: float error must not add a step.
    return math.ceil(round(cfg.whitening_bias_epochs * max(steps_per_epoch) * turns, 9))


def drop_whitening_bias_grads(module: nn.Module, step: int, cfg: RunConfig, steps_per_epoch: Sequence[int]) -> None:
    """From step :func:`whitening_bias_steps` on, set the whitening biases' gradients to None; call before the
    optimiser step.

    Optimisers skip parameters without a gradient, so momentum and weight decay leave the bias as it was: it is
    frozen from then on, a function of the step alone (a resume freezes it at the same step). timm's lookahead syncs
    only parameters with a gradient, so it leaves the bias too.

    Args:
        module: The trained networks (a joint model); its loaded networks are not in it.
        step: The current (micro-batch) step, 0-based.
        cfg: The phase's config; a no-op when ``whitening_bias_epochs`` is None.
        steps_per_epoch: Every trained network's steps per epoch.
    """
    if cfg.whitening_bias_epochs is not None and step >= whitening_bias_steps(cfg, steps_per_epoch):
        for layer in whitening_layers(module):
            if layer.bias is not None:
                layer.bias.grad = None


def frozen_whitening_biases(module: nn.Module, cfg: RunConfig, total_steps: int,
                            steps_per_epoch: Sequence[int]) -> List[nn.Parameter]:
    """The whitening biases that :func:`drop_whitening_bias_grads` freezes during a run of ``total_steps``: none
    when ``whitening_bias_epochs`` is None or the run ends before their last step. A lookahead run ends on their
    weights, not their stale slow weights."""
    if cfg.whitening_bias_epochs is None or whitening_bias_steps(cfg, steps_per_epoch) >= total_steps:
        return []
    return [layer.bias for layer in whitening_layers(module) if layer.bias is not None]

