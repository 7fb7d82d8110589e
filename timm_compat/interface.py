"""The interface: the width and the shared auxiliary heads that make components compatible."""
import json
import os
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
from torch import nn

from ._integrity import weights_digest
from .batchnorm import set_batch_statistics
from .classes import check_distinct
from .component import Component, ComponentError
from .components import _check_width, build_components, check_model_args
from .methods.rp import NUM_ROTATIONS

__all__ = ['Interface', 'build_aux_head', 'normalise_spec', 'DEFAULT_AUX_HEAD', 'DEFAULT_WIDTH']

DEFAULT_AUX_HEAD = {'type': 'conv', 'hidden': None}  # hidden=None: the interface width
DEFAULT_WIDTH = 64
"""Interface width when none is given (``make_compatible``'s fresh interface, an independent network): the 64
channels of Gygli et al.'s interface. The offline demo config asks for 32 explicitly (a CIFAR ResNet's middle stage,
so its extractors need no adapter)."""
NONCE_BYTES = 8
_SPEC_KEYS = {'conv': {'type', 'hidden', 'logit_scale'}, 'timm': {'type', 'backbone', 'split', 'model_args'}}


def normalise_spec(spec: Union[str, Dict[str, Any], None]) -> Dict[str, Any]:
    """The full aux head spec, checked: it is saved with the interface and rebuilds the head on load.

    Raises:
        ValueError: An unknown type or key, or a value of the wrong type.
        ComponentError: A timm spec's ``model_args`` that :func:`~timm_compat.components.check_model_args` refuses.
    """
    if spec is None or spec == 'conv':
        return dict(DEFAULT_AUX_HEAD)
    if isinstance(spec, str):  # a timm model name: its tail, split after its second-to-last feature level
        return {'type': 'timm', 'backbone': spec, 'split': -2, 'model_args': {}}
    if not isinstance(spec, dict) or spec.get('type') not in _SPEC_KEYS:
        raise ValueError(f'Unknown aux head spec {spec!r}: use "conv", {{"type": "conv", "hidden": 128}} or '
                         f'{{"type": "timm", "backbone": "mobilenetv2_100", "split": "blocks.4.0"}}.')
    if unknown := sorted(set(spec) - _SPEC_KEYS[spec['type']]):
        raise ValueError(f'Aux head spec {spec!r} has unknown keys {unknown}: a {spec["type"]!r} head takes '
                         f'{sorted(_SPEC_KEYS[spec["type"]])}.')
    if spec['type'] == 'conv':
        hidden = spec.get('hidden')
        if hidden is not None and (type(hidden) is not int or hidden < 1):
            raise ValueError(f'Aux head "hidden" must be a positive integer or null, got {hidden!r}.')
        scale = spec.get('logit_scale')
        if scale is not None and (type(scale) not in (int, float) or not 0 < scale < float('inf')):
            raise ValueError(f'Aux head "logit_scale" must be a positive number or null, got {scale!r}.')
        # Unscaled heads keep the spec (and so the interface id) they had before logit_scale existed.
        return {**DEFAULT_AUX_HEAD, **{k: v for k, v in spec.items() if k != 'logit_scale' or v not in (None, 1)}}
    if not isinstance(spec.get('backbone'), str) or type(spec.get('split')) not in (str, int):
        raise ValueError(f'A timm aux head needs "backbone" (a timm model name) and "split" (a module path or '
                         f'feature_info index), got {spec!r}.')
    return {**spec, 'model_args': check_model_args(spec.get('model_args'))}


def build_aux_head(spec: Dict[str, Any], width: int, num_outputs: int,
                   class_names: Optional[Sequence[str]] = None) -> nn.Module:
    """Build an aux head from its spec.

    ``{"type": "conv", "hidden": H}``: 3x3 conv + BN + ReLU, global average pool, linear (the default; ``H``
    defaults to ``width``, which keeps the aux heads cheap next to the extractor). ``"logit_scale": s`` multiplies
    the logits by ``s``, as airbench's classifier does (1/9): its recipe's learning rate is set for such heads, and
    an unscaled aux head diverged under it.
    ``{"type": "timm", "backbone": B, "split": S}``: the tail of timm model ``B`` after ``S`` with a 1x1 conv from
    ``width`` (the MobileNetV2 DCC head of Gygli et al., Sec. 5.2).
    """
    if spec['type'] == 'conv':
        hidden = spec['hidden'] or width
        layers = [nn.Conv2d(width, hidden, 3, padding=1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(hidden, num_outputs)]
        if 'logit_scale' in spec:
            layers.append(LogitScale(spec['logit_scale']))
        return nn.Sequential(*layers)
    return build_components(spec['backbone'], spec['split'], width, num_classes=num_outputs, class_names=class_names,
                            roles=('head',), model_args=spec.get('model_args'))['head']


class LogitScale(nn.Module):
    """Multiplies its input by a fixed factor (a softmax temperature of ``1 / scale``); no parameters."""

    def __init__(self, scale: float):
        super().__init__()
        self.scale = float(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale

    def extra_repr(self) -> str:
        return f'scale={self.scale}'


class Interface(Component):
    """Width plus shared aux heads (RP and/or DCC) that every compatible extractor is trained against.

    All models built on one ``Interface`` object share its aux heads by reference. Its :attr:`id` names this one
    interface: a random nonce drawn at creation (a buffer, so it is saved and restored with the weights) keeps two
    interfaces apart even when they have no aux heads, or were created with one seed.

    Args:
        width: Channels of the feature maps that extractors emit and heads take.
        rp: Add a rotation-prediction head (4 classes: 0, 90, 180, 270 degrees).
        dcc_classes: Add a head discriminating these common classes (names, in order).
        aux_head: Architecture of both aux heads: ``"conv"`` (default), a timm model name, or a spec dict
            (see :func:`build_aux_head`).
        rp_head: Architecture of the RP head, overriding ``aux_head``.
        dcc_head: Architecture of the DCC head, overriding ``aux_head``.

    Example:
        >>> interface = Interface(width=64, rp=True, dcc_classes=['airplane', 'bird', 'cat'])
        >>> interface.id  # short hash of the spec, a random nonce and the aux weights
    """
    role = 'interface'

    def __init__(self, width: int, rp: bool = False, dcc_classes: Optional[Sequence[str]] = None,
                 aux_head: Union[str, Dict[str, Any]] = 'conv', rp_head: Union[str, Dict[str, Any], None] = None,
                 dcc_head: Union[str, Dict[str, Any], None] = None):
        super().__init__()
        self.width = _check_width(width)
        if dcc_classes is not None:
            dcc_classes = list(dcc_classes)
            if not dcc_classes:
                raise ValueError('A DCC head needs common classes, got an empty list: name the classes the tasks '
                                 'share (dcc_classes=[...]) or drop DCC (dcc_classes=None).')
            check_distinct(dcc_classes, 'dcc_classes')  # 'car' and 'automobile' would leave one output untrained
        self.dcc_classes: Optional[List[str]] = dcc_classes
        self.head_specs: Dict[str, Dict[str, Any]] = {}
        self.aux_heads = nn.ModuleDict()
        if rp:
            self.head_specs['rp'] = normalise_spec(rp_head or aux_head)
            self.aux_heads['rp'] = build_aux_head(self.head_specs['rp'], width, NUM_ROTATIONS)
        if dcc_classes is not None:
            self.head_specs['dcc'] = normalise_spec(dcc_head or aux_head)
            self.aux_heads['dcc'] = build_aux_head(self.head_specs['dcc'], width, len(dcc_classes), dcc_classes)
        # From the OS, not torch's RNG: a seed must not reproduce another user's id. DDP broadcasts rank 0's buffer.
        self.register_buffer('nonce', torch.frombuffer(bytearray(os.urandom(NONCE_BYTES)), dtype=torch.uint8))
        self.frozen = False

    @property
    def rp(self) -> Optional[nn.Module]:
        return self.aux_heads['rp'] if 'rp' in self.aux_heads else None

    @property
    def dcc(self) -> Optional[nn.Module]:
        return self.aux_heads['dcc'] if 'dcc' in self.aux_heads else None

    @property
    def spec(self) -> Dict[str, Any]:
        """What a compatible component must agree on, besides the aux weights."""
        return {'width': self.width, 'rp': 'rp' in self.aux_heads, 'dcc_classes': self.dcc_classes,
                'rp_head': self.head_specs.get('rp'), 'dcc_head': self.head_specs.get('dcc')}

    @property
    def id(self) -> str:
        """Short hash of the spec, the nonce and every aux-head tensor (weights and BN buffers)."""
        return weights_digest(self.state_dict(), prefix=json.dumps(self.spec, sort_keys=True).encode())[:12]

    interface_id = id

    def freeze(self) -> 'Interface':
        """Fix the aux heads for incremental training: no gradients, no BN running-statistic updates.

        A frozen interface normalises with batch statistics, as during the joint training that produced it, and
        stays bit-identical however it is used.
        """
        self.requires_grad_(False)
        self.frozen = True
        self.train(self.training)
        return self

    def train(self, mode: bool = True) -> 'Interface':
        super().train(mode and not self.frozen)
        if self.frozen:
            set_batch_statistics(self)
        return self

    def component_config(self) -> Dict[str, Any]:
        return self.spec

    @classmethod
    def from_config(cls, config: Dict[str, Any]) -> 'Interface':
        return cls(width=config['width'], rp=config['rp'], dcc_classes=config.get('dcc_classes'),
                   rp_head=config.get('rp_head'), dcc_head=config.get('dcc_head'))

    def verify_loaded(self, config: Dict[str, Any], model_id: str) -> None:
        if self.id != config.get('interface_id'):
            raise ComponentError(
                f'{model_id}: the interface weights hash to {self.id}, but config.json says '
                f'{config.get("interface_id")}. The weights were changed after saving; do not use them.')

    def extra_repr(self) -> str:
        return f'width={self.width}, rp={self.rp is not None}, dcc_classes={self.dcc_classes}, frozen={self.frozen}'
