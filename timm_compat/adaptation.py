"""Unsupervised domain adaptation through the frozen RP head (Gygli et al. 2021, Sec. 5.1).

A source model was trained with rotation prediction (RP) against an interface. To adapt it to a target domain of
which only images are known, fine-tune its extractor alone to minimise the rotation loss of the *unchanged* RP head
on the target images, then put the source head back on the adapted extractor. The RP head ties the adapted features
to the interface the head was trained on, so no target label is needed and the head never changes.

The baselines of the paper's Tab. 2 are the source model as is (running BN statistics) and with test-time BN
(batch statistics); :func:`evaluate_adaptation` measures all of them on one test set.

The extractor normalises all four rotations of a batch as one, as training's RP did under ``rp_norm`` ``separate``
(the default) or ``shared`` with ``rp_rotations: all``. A source trained with ``per_rotation`` or ``rp_rotations:
one`` fitted its RP head to features normalised per chunk, so its adaptation objective differs from the one it was
trained on (not measured).
"""
import copy
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
from torch import nn

from .batchnorm import eval_mode
from .compatible import CompatibleModel
from .data import EpochSampler, ImageData, augment as augment_batch, normalize
from .deployment import bn_accuracy_report
from .evaluation import average_class_accuracy
from .fit import call_frozen, check_mixed_precision, fit
from .interface import Interface
from .methods.rp import rotate_batch, rotation_labels, rotation_loss
from .optim import make_optimizer, make_scheduler
from .stitching import StitchedModel

__all__ = ['AdaptationResult', 'RotationTask', 'adapt', 'evaluate_adaptation']


@dataclass
class AdaptationResult:
    """What :func:`adapt` returns.

    Attributes:
        model: The adapted extractor (a copy) recombined with the source head (the caller's own, unchanged).
        history: ``step``, ``rp_loss`` and ``rp_accuracy`` on the target images, averaged over each log interval.
        seconds: Wall time of the adaptation.
    """
    model: CompatibleModel
    history: Dict[str, List[float]] = field(default_factory=dict)
    seconds: float = 0.0


class RotationTask(nn.Module):
    """The adaptation objective: rotation loss of a frozen RP head on the extractor's features of rotated images.

    Takes ``uint8`` image batches; returns ``loss`` and ``rp_accuracy`` (of the rotation classes). The RP head is
    called with detached parameters, so gradients reach the extractor alone and the head's ``.grad`` stays untouched
    even when its parameters require grad.
    """

    def __init__(self, extractor: nn.Module, rp_head: nn.Module):
        super().__init__()
        self.extractor, self.rp_head = extractor, rp_head
        self.mean, self.std = extractor.pretrained_cfg['mean'], extractor.pretrained_cfg['std']

    def forward(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        logits = call_frozen(self.rp_head, self.extractor(rotate_batch(normalize(images, self.mean, self.std))))
        hits = (logits.detach().argmax(1) == rotation_labels(images.shape[0], images.device)).float().mean()
        return {'loss': rotation_loss(logits), 'rp_accuracy': hits}


def _check_images(unlabeled_target, batch_size: int) -> torch.Tensor:
    # isinstance, not hasattr: looking for a labels attribute would read it.
    if isinstance(unlabeled_target, ImageData):
        raise ValueError(
            'adapt() is unsupervised and takes the target images only, but got labelled ImageData '
            f'({unlabeled_target.name or "unnamed"}). Pass data.images, and keep the labels for evaluation.')
    if not isinstance(unlabeled_target, torch.Tensor):
        raise TypeError(f'adapt() takes the target images as a uint8 tensor (N, 3, H, W), got '
                        f'{type(unlabeled_target).__name__}.')
    if unlabeled_target.dtype != torch.uint8 or unlabeled_target.dim() != 4:
        raise ValueError(f'adapt() takes uint8 images (N, 3, H, W) as load_image_data gives them, got '
                         f'{unlabeled_target.dtype} of shape {tuple(unlabeled_target.shape)}.')
    if unlabeled_target.shape[-1] != unlabeled_target.shape[-2]:
        raise ValueError(f'Rotation prediction needs square images, got {tuple(unlabeled_target.shape[-2:])}: '
                         f'load the target with image_size=... to make them square.')
    if unlabeled_target.shape[0] < batch_size:
        raise ValueError(f'{unlabeled_target.shape[0]} target images are fewer than one batch of {batch_size}: '
                         f'lower batch_size.')
    return unlabeled_target


def _rp_interface(model: CompatibleModel, interface: Optional[Interface]) -> Interface:
    interface = interface if interface is not None else model.interface
    if interface is None:
        raise ValueError(
            'adapt() minimises the rotation loss through the RP head of the interface the model was trained '
            'against, but the model carries no interface (components loaded from disk do not). Pass '
            'interface=Interface.from_pretrained(DIR_OR_REPO).')
    if model.extractor.interface_id != interface.id:
        raise ValueError(
            f'The extractor was trained against interface {model.extractor.interface_id}, not {interface.id}: '
            f'adapting it through another interface\'s RP head would break its compatibility with the head. '
            f'Pass the interface it was trained with.')
    if interface.rp is None:
        raise ValueError(
            f'Interface {interface.id} has no RP head, and adapt() adapts through one. Train the source with '
            f'rotation prediction (Interface(..., rp=True); config interface.rp=true), or fall back to test-time '
            f'BN: evaluate the source model with bn="batch".')
    device, rp_device = next(model.parameters()).device, next(interface.rp.parameters()).device
    if rp_device != device:
        raise ValueError(f'The model is on {device} but the interface on {rp_device}: '
                         f'move the interface with interface.to({str(device)!r}).')
    return interface


def _batches(images: torch.Tensor, batch_size: int, seed: int, augment: bool):
    """``batch_at(step)`` for :func:`~timm_compat.fit.fit`: the target images of one step, augmented if asked."""
    sampler = EpochSampler(images.shape[0], batch_size, seed)

    def batch_at(step: int) -> torch.Tensor:
        batch = images[sampler.batch(step).to(images.device)]
        return augment_batch(batch) if augment else batch
    return batch_at


def adapt(model: CompatibleModel, unlabeled_target: torch.Tensor, steps: int = 1000, *,
          interface: Optional[Interface] = None, batch_size: int = 64, lr: float = 0.01, momentum: float = 0.9,
          weight_decay: float = 5e-4, augment: bool = True, seed: int = 0, log_every: int = 50,
          mixed_precision: str = 'no') -> AdaptationResult:
    """Adapt ``model`` to unlabeled target images by minimising the rotation loss through the frozen RP head.

    Only a copy of the extractor is trained: the caller's model, its head and the interface's RP head stay
    bit-identical. The RP head normalises with batch statistics and updates none of its buffers, as a frozen
    interface does during incremental training. The extractor copy trains in train mode, so its BN running
    statistics move to the rotated target images. The steps run through :func:`~timm_compat.fit.fit` on the
    model's device.

    Args:
        model: Source model whose extractor was trained against an interface with an RP head.
        unlabeled_target: Target-domain images, ``uint8`` ``(N, 3, S, S)``. Labelled :class:`ImageData` is refused
            (without reading its labels): pass ``data.images``.
        steps: Optimiser steps (the paper: 1000).
        interface: The interface the model was trained against; default ``model.interface``. Components loaded
            from disk carry none: pass ``Interface.from_pretrained(...)``.
        batch_size: Target images per step; the extractor sees each at four rotations.
        lr: Peak learning rate of SGD with Nesterov momentum and a cosine schedule.
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
        augment: Augment the target images as the paper did (zero-pad 4 px, random crop, fair-coin flip per image),
            also for a source trained otherwise (the fast configs: reflect-pad 2 px, alternating flips).
        seed: Seed of the order in which target images are drawn. Augmentation draws from the global RNG
            (``torch.manual_seed`` for a reproducible run).
        log_every: Steps per entry of the history.
        mixed_precision: ``"no"``, ``"bf16"`` or ``"fp16"``: autocast of the training steps (weights and optimiser
            stay fp32). Evaluation is the caller's and runs in fp32.

    Returns:
        An :class:`AdaptationResult` with the adapted model and the rotation loss and accuracy along the way.

    Raises:
        ValueError: Labelled target data, images that are not square ``uint8``, a model without an interface or
            whose interface has no RP head, an interface the extractor was not trained against, or an unknown
            ``mixed_precision``.
    """
    check_mixed_precision(mixed_precision)
    images = _check_images(unlabeled_target, batch_size)
    interface = _rp_interface(model, interface)
    if steps < 1:
        raise ValueError(f'steps must be at least 1, got {steps}: adaptation with no step is the source model.')
    start = time.time()
    device = next(model.parameters()).device
    # The memo keeps the interface a shared reference rather than copying it into the new extractor.
    extractor = copy.deepcopy(model.extractor, memo={id(interface): interface}).train().requires_grad_(True)
    optimizer = make_optimizer(list(extractor.parameters()), 'sgd', lr, momentum, weight_decay)
    batch_at = _batches(images.to(device), batch_size, seed, augment)
    with eval_mode(interface.rp, bn='batch'):
        rows = fit(RotationTask(extractor, interface.rp), batch_at, steps, optimizer,
                   make_scheduler(optimizer, 'cosine', steps), mixed_precision=mixed_precision, log_every=log_every,
                   desc='adapt')
    extractor.eval()
    history = {'step': [r['step'] for r in rows], 'rp_loss': [r['loss'] for r in rows],
               'rp_accuracy': [r['rp_accuracy'] for r in rows]}
    adapted = (StitchedModel(extractor, model.stitch, model.head, force=True) if isinstance(model, StitchedModel)
               else CompatibleModel(extractor, model.head, interface))
    return AdaptationResult(adapted, history, time.time() - start)


def evaluate_adaptation(source: CompatibleModel, adapted: CompatibleModel, target_test: ImageData,
                        batch_size: int = 250) -> Dict[str, float]:
    """Average class accuracy on the target test set of the source model, as is and with test-time BN, and of
    the adapted model (test-time BN, as the source baseline it must beat, and with its adapted running statistics).

    Returns:
        ``{"source": ..., "source_test_bn": ..., "adapted": ..., "adapted_running_bn": ...}`` in ``[0, 1]``.
    """
    source_bn, adapted_bn = (bn_accuracy_report(model, target_test, batch_size=batch_size,
                                                metric=average_class_accuracy) for model in (source, adapted))
    return {'source': source_bn['running'], 'source_test_bn': source_bn['batch'], 'adapted': adapted_bn['batch'],
            'adapted_running_bn': adapted_bn['running']}
