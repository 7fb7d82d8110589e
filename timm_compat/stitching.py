"""Stitching: a learnt 1x1 conv between an extractor and a head that share no interface.

Components trained against one interface recombine directly. For components that do not, the fallback is a
stitching layer (Lenc & Vedaldi, CVPR 2015; Csiszárik et al., NeurIPS 2021; Bansal et al., NeurIPS 2021): a 1x1
conv fitted on a small labelled set with both components frozen. Measuring it next to direct recombination shows
what compatibility training saves: compatible components need no stitch and no labelled data.

A fitted :class:`Stitch` is a component like any other (``save_pretrained`` / ``from_pretrained``, role
``"stitch"``). It records the interface ids of both sides: other extractors of the first interface and heads of
the second are compatible with the pair it was fitted on, so it may serve them too. A side without an interface
(an independent component) fits no other, so the stitch records the digest of that component's parameters and
serves it alone.
"""
from itertools import chain
from typing import Any, Dict, Mapping, Optional

import torch
import torch.nn.functional as F
from huggingface_hub import ModelCard
from torch import nn

from .batchnorm import eval_mode
from .compatible import CompatibleModel, link_problems, mismatch_message
from .component import PAPER_URL, Component
from .components import Extractor, Head
from .data import EpochSampler, ImageData, augment as augment_batch, normalize
from .classes import same_classes
from ._integrity import weights_digest
from .fit import call_frozen, check_mixed_precision, fit
from .optim import make_optimizer
from .streaming import StreamedImages, materialize

__all__ = ['Stitch', 'StitchTask', 'StitchedModel', 'fit_stitch', 'parameters_digest', 'check_float32']


def parameters_digest(module: nn.Module) -> str:
    """SHA-256 of a component's parameters as float32: which weights it has, on any device and in any dtype that
    holds them exactly (float64 of float32 weights keeps the digest; a lossy cast to bf16 or fp16 changes it)."""
    return weights_digest({name: p.detach().float() for name, p in module.named_parameters()})


class Stitch(Component):
    """1x1 conv (optionally followed by BN) from an extractor's width to a head's width.

    With equal widths and no BN it starts as the identity, so an unfitted stitch is direct recombination.

    Args:
        in_width: Channels of the extractor's features.
        out_width: Channels the head takes.
        batchnorm: Add BN after the conv (then the conv has no bias, and the identity start is lost).
        extractor_interface_id: Interface of the extractor side (``None`` for an independent extractor).
        head_interface_id: Interface of the head side; the stitch emits features of this interface, so it is the
            stitch's ``interface_id``.
        fitted_on: ``{'extractor': digest, 'head': digest}`` (:func:`parameters_digest`) of the independent
            components it was fitted on, which it serves alone; :func:`fit_stitch` fills it.
    """
    role = 'stitch'

    def __init__(self, in_width: int, out_width: int, batchnorm: bool = False,
                 extractor_interface_id: Optional[str] = None, head_interface_id: Optional[str] = None,
                 fitted_on: Optional[Dict[str, str]] = None):
        super().__init__()
        self.in_width, self.out_width, self.batchnorm = in_width, out_width, batchnorm
        self.extractor_interface_id, self.head_interface_id = extractor_interface_id, head_interface_id
        self.fitted_on = dict(fitted_on or {})
        self.conv = nn.Conv2d(in_width, out_width, 1, bias=not batchnorm)
        self.bn = nn.BatchNorm2d(out_width) if batchnorm else nn.Identity()
        if in_width == out_width:
            with torch.no_grad():
                self.conv.weight.copy_(torch.eye(in_width)[:, :, None, None])
                if self.conv.bias is not None:
                    self.conv.bias.zero_()

    @property
    def interface_id(self) -> Optional[str]:
        return self.head_interface_id

    def component_config(self) -> Dict[str, Any]:
        return {'in_width': self.in_width, 'out_width': self.out_width, 'batchnorm': self.batchnorm,
                'extractor_interface_id': self.extractor_interface_id, 'fitted_on': self.fitted_on}

    @classmethod
    def from_config(cls, config: Dict[str, Any]) -> 'Stitch':
        return cls(config['in_width'], config['out_width'], config['batchnorm'],
                   config.get('extractor_interface_id'), config.get('interface_id'), config.get('fitted_on'))

    def generate_model_card(self, repo_id: Optional[str] = None) -> ModelCard:
        """The base card's metadata, tagged with the extractor side's interface too, and a stitch's own text."""
        card = super().generate_model_card(repo_id)
        if self.extractor_interface_id:
            card.data.tags.append(f'compat-stitch-from-{self.extractor_interface_id}')
        card.text = '\n'.join([
            '', '# timm-compat stitch', '',
            f'A 1x1-conv stitching layer ({self.in_width} -> {self.out_width} channels'
            f'{", then BN" if self.batchnorm else ""}) from the features of interface `{self.extractor_interface_id}` '
            f'to the heads of interface `{self.head_interface_id}`, fitted with both components frozen '
            f'([Gygli et al., AAAI 2021]({PAPER_URL}) make components compatible so that no stitch is needed).',
            '', '## Usage', '', '```python', 'from timm_compat.stitching import Stitch, StitchedModel', '',
            f'stitch = Stitch.from_pretrained("{repo_id or "ORG/NAME"}")',
            f'# an extractor of interface {self.extractor_interface_id}, a head of interface {self.head_interface_id}',
            'model = StitchedModel(extractor, stitch, head)', '```', ''])
        return card

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))

    def extra_repr(self) -> str:
        return f'{self.extractor_interface_id} -> {self.head_interface_id}'


class StitchedModel(CompatibleModel):
    """``head(stitch(extractor(x)))``: a :class:`CompatibleModel` whose features pass through a stitch.

    Args:
        extractor: An extractor of the interface the stitch takes (or, independent, the one it was fitted on).
        stitch: The fitted stitch.
        head: A head of the interface the stitch emits (or, independent, the one it was fitted on).
        force: Join an independent component other than the one the stitch was fitted on (its widths must still
            match), e.g. the extractor after :func:`~timm_compat.adaptation.adapt` fine-tuned it.

    Raises:
        ValueError: The stitch's widths or interface ids do not match the components, or, unless ``force``, an
            independent component is not the one the stitch was fitted on.
    """

    def __init__(self, extractor: Extractor, stitch: Stitch, head: Head, force: bool = False):
        # The stitch joins components of two interfaces, so each side must match the one it was fitted for.
        problems = (link_problems('the extractor', (extractor.width, extractor.interface_id), 'the stitch',
                                  (stitch.in_width, stitch.extractor_interface_id))
                    + link_problems('the stitch', (stitch.out_width, stitch.head_interface_id), 'the head',
                                    (head.width, head.interface_id)))
        if not force:
            problems += [f'the stitch was fitted for another independent {role} (its parameters differ)'
                         for role, component in (('extractor', extractor), ('head', head))
                         if role in stitch.fitted_on and parameters_digest(component) != stitch.fitted_on[role]]
        if problems:
            raise ValueError(mismatch_message(problems, 'Use fit_stitch() to fit a stitch for these components.'))
        super().__init__(extractor, head, interface=None)
        self.stitch = stitch

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stitch(self.extractor(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def save_pretrained(self, save_directory, *, repo_id=None) -> str:
        """Refused: the saved pair format holds an extractor and a head, and a stitch between them would not load
        back. Save the parts, and rebuild with ``StitchedModel(extractor, Stitch.from_pretrained(DIR), head)``."""
        raise TypeError('A StitchedModel is saved as its parts: model.stitch.save_pretrained(DIR) (the extractor and '
                        'head as the components they are); load with StitchedModel(extractor, '
                        'Stitch.from_pretrained(DIR), head).')

    def push_to_hub(self, repo_id: str, **kwargs: Any):
        """Refused, as :meth:`save_pretrained`: push ``model.stitch`` (and the components) instead."""
        self.save_pretrained(None)


class StitchTask(nn.Module):
    """The stitch's objective: the head's task loss on stitched features of normalised ``(images, labels)``.

    The extractor runs without autograd and the head with detached parameters, so gradients reach the stitch alone
    and neither component's ``.grad`` is touched, even when their parameters require grad.
    """

    def __init__(self, extractor: Extractor, stitch: Stitch, head: Head):
        super().__init__()
        self.extractor, self.stitch, self.head = extractor, stitch, head

    def forward(self, batch) -> Dict[str, torch.Tensor]:
        images, labels = batch
        with torch.no_grad():
            features = self.extractor(images)
        return {'loss': F.cross_entropy(call_frozen(self.head, self.stitch(features)), labels)}


def check_task_data(data: ImageData, head: Head, what: str) -> None:
    """Refuse labelled data whose classes are not the head's (up to synonyms, as evaluation matches them), in the
    head's order."""
    if data.num_classes != head.num_classes:
        raise ValueError(f'{what} has {data.num_classes} classes {data.class_names}, but the head has '
                         f'{head.num_classes}: pass data of the head\'s task.')
    if head.class_names is not None and not same_classes(data.class_names, head.class_names):
        raise ValueError(f'{what} lists its classes as {data.class_names}, the head as {head.class_names}: '
                         f'reorder the data with data.select_classes(head.class_names).')


def check_float32(components: Mapping[str, nn.Module], what: str) -> None:
    """Refuse components whose weights or buffers are not float32, before ``what`` does any work.

    Training normalises its inputs in float32 and keeps float32 master weights (``mixed_precision`` autocasts the
    steps): bf16 or fp16 components crashed on the first batch with a raw dtype error, and SGD updates of bf16
    weights round away whatever is below their 8-bit precision.

    Raises:
        ValueError: Naming each component and its dtype, and ``.float()``.
    """
    other = {name: dtype for name, c in components.items()
             if (dtype := next((t.dtype for t in chain(c.parameters(), c.buffers())
                                if t.is_floating_point() and t.dtype != torch.float32), None))}
    if other:
        held = ', '.join(f'the {name} holds {dtype}' for name, dtype in other.items())
        raise ValueError(f'{what} trains float32 components, but {held}: pass float32 copies (component.float()); '
                         f'mixed_precision="bf16" autocasts the training steps.')


def _check_fit(extractor: Extractor, head: Head, train_data: ImageData, steps: int, mixed_precision: str) -> None:
    """:func:`fit_stitch`'s refusals, before any work."""
    check_mixed_precision(mixed_precision)
    check_task_data(train_data, head, 'The stitch\'s training data')
    check_float32({'extractor': extractor, 'head': head}, 'fit_stitch')
    if steps < 1:
        raise ValueError(f'steps must be at least 1, got {steps}: an unfitted stitch is direct recombination.')


def fit_stitch(extractor: Extractor, head: Head, train_data: ImageData, steps: int = 500, *,
               batchnorm: bool = False, batch_size: int = 64, optimizer: str = 'adamw', lr: float = 1e-3,
               weight_decay: float = 0.0, augment: bool = True, seed: int = 0,
               mixed_precision: str = 'no') -> StitchedModel:
    """Fit a :class:`Stitch` from ``extractor`` to ``head`` on labelled data, with both components frozen.

    The components are run as at evaluation time with test-time BN: no gradient reaches their weights and none of
    their buffers change, so they stay bit-identical. Only the stitch's parameters are optimised, on the head's
    task loss.

    Args:
        extractor: Any extractor.
        head: Any head; ``train_data`` is its task.
        train_data: A small labelled set of the head's task, classes in the head's order.
        steps: Optimiser steps.
        batchnorm: Give the stitch a BN layer (see :class:`Stitch`).
        batch_size: Images per step.
        optimizer: ``"adamw"`` or ``"sgd"`` (with Nesterov momentum 0.9).
        lr: Learning rate (constant).
        weight_decay: Weight decay of the stitch.
        augment: Augment the training images as the paper did (zero-pad 4 px, random crop, fair-coin flip per image),
            whatever the components trained with.
        seed: Seed of the order in which images are drawn; augmentation uses the global RNG.
        mixed_precision: ``"no"``, ``"bf16"`` or ``"fp16"``: autocast of the training steps (the stitch's weights
            and optimiser state stay fp32).

    Returns:
        The :class:`StitchedModel` of the given components and the fitted stitch (in eval mode).

    Raises:
        ValueError: Data of another task, ``steps`` below 1, an unknown ``mixed_precision``, or components that are
            not float32 (:func:`check_float32`).
    """
    _check_fit(extractor, head, train_data, steps, mixed_precision)
    device = next(extractor.parameters()).device
    fitted_on = {role: parameters_digest(c) for role, c in (('extractor', extractor), ('head', head))
                 if c.interface_id is None}
    stitch = Stitch(extractor.width, head.width, batchnorm, extractor.interface_id, head.interface_id,
                    fitted_on).to(device)
    model = StitchedModel(extractor, stitch, head, force=True)  # fitted on these very components: no digest again
    opt = make_optimizer(list(stitch.parameters()), optimizer, lr, 0.9, weight_decay)
    images, labels = train_data.images, train_data.labels.to(device)
    images = images if isinstance(images, StreamedImages) else images.to(device)  # streamed rows decode per batch
    sampler = EpochSampler(len(train_data), batch_size, seed)
    cfg = extractor.pretrained_cfg

    def batch_at(step: int):
        index = sampler.batch(step).to(device)
        batch = materialize(images[index.to(images.device)], device)  # decodes a streamed split's rows
        batch = augment_batch(batch) if augment else batch
        return normalize(batch, cfg['mean'], cfg['std']), labels[index]

    stitch.train()
    with eval_mode(extractor, bn='batch'), eval_mode(head, bn='batch'):
        fit(StitchTask(extractor, stitch, head), batch_at, steps, opt, mixed_precision=mixed_precision,
            desc='fit_stitch')
    stitch.eval()
    return model
