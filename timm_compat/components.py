"""Extractor and head: the two halves of a timm backbone, fitted to an interface width, and their one builder.

Two pairs of words name the halves of a network. :func:`~timm_compat.split_model` cuts a timm backbone into a
**trunk** (the layers up to and including the split module) and a **tail** (the layers after it, classifier
included): plain ``fx.GraphModule``\\ s, with the backbone's own channel counts. The **components** are what an
interface joins: an :class:`Extractor` is the trunk followed by an adapter to the interface width, and a
:class:`Head` is an adapter from the interface width followed by a tail, of this backbone or of another one (or any
module taking interface features). An adapter is a 1x1 conv + BN, or the identity when the widths agree, so a
:class:`~timm_compat.CompatibleModel` computes ``tail(adapter(adapter(trunk(x))))`` and the interface features are
what flows between the two adapters. :func:`build_components` is the one place where components are made from a
backbone name: ``make_compatible``, ``from_config`` (on load) and timm aux heads all go through it.
"""
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import timm
import torch
from torch import nn

from timm.models._builder import _resolve_pretrained_source  # timm's own choice among file, Hub and URL

from ._split import create_backbone, default_split, output_shape, resolve_split, split_model
from .classes import canonical_class_name
from .component import Component, ComponentError

__all__ = ['ARCHITECTURE_ARGS', 'Adapter', 'Extractor', 'Head', 'build_components', 'check_model_args']

_CFG_KEYS = ('input_size', 'mean', 'std', 'interpolation', 'crop_pct', 'classifier')

_RATE = (float, 'a float in [0, 1)', lambda v: 0 <= v < 1)
_COUNT = (int, 'a positive integer', lambda v: v >= 1)
_NAME = (str, 'a name (string)', lambda v: True)
ARCHITECTURE_ARGS = {
    'in_chans': _COUNT, 'output_stride': _COUNT, 'img_size': _COUNT, 'stem_width': _COUNT, 'widen_factor': _COUNT,
    'channel_multiplier': (float, 'a positive float', lambda v: v > 0),
    'drop_rate': _RATE, 'drop_path_rate': _RATE, 'drop_block_rate': _RATE, 'attn_drop_rate': _RATE,
    'proj_drop_rate': _RATE, 'pos_drop_rate': _RATE,
    'global_pool': _NAME, 'act_layer': _NAME, 'stem_type': _NAME,
    'zero_init_last': (bool, 'true or false', lambda v: True),
}
"""``model_args`` a component may record, each ``(type, description, check)``: plain JSON scalars that shape an
architecture. Anything else (``checkpoint_path``, ``pretrained``, ``pretrained_cfg``, file paths, nested dicts)
would let a downloaded ``config.json`` make timm read or unpickle files, so it is refused by name."""


class Adapter(nn.Sequential):
    """1x1 conv + BN mapping ``in_chs`` feature channels to ``out_chs``."""

    def __init__(self, in_chs: int, out_chs: int):
        super().__init__(nn.Conv2d(in_chs, out_chs, 1, bias=False), nn.BatchNorm2d(out_chs))
        nn.init.kaiming_normal_(self[0].weight, mode='fan_out', nonlinearity='relu')


def _adapter(in_chs: int, out_chs: int) -> nn.Module:
    return nn.Identity() if in_chs == out_chs else Adapter(in_chs, out_chs)


def _check_width(width: int) -> int:
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f'Interface width must be a positive integer, got {width!r}: e.g. width=64.')
    return width


def check_model_args(model_args: Optional[Dict[str, Any]], *, allow_overlay: bool = False) -> Dict[str, Any]:
    """``model_args`` checked against :data:`ARCHITECTURE_ARGS`; a copy.

    Building a component from a config must read nothing but its own ``model.safetensors``.

    Args:
        model_args: Keyword arguments for ``timm.create_model``.
        allow_overlay: Also accept ``pretrained_cfg_overlay``, which ``make_compatible`` takes (a local pretrained
            file, an input size) and never records in a component (see :func:`_overlay_model_args`).

    Raises:
        ComponentError: A key is not allow-listed, or its value is not of the allowed type and range.
    """
    if not isinstance(model_args, (dict, type(None))):
        raise ComponentError(f'model_args must be a dict of keyword arguments, got {model_args!r}.')
    model_args = dict(model_args or {})
    for key, value in model_args.items():
        if key == 'pretrained_cfg_overlay' and allow_overlay:
            continue
        if key not in ARCHITECTURE_ARGS:
            raise ComponentError(
                f'model_args key {key!r} is not allowed: a component is built from its own model.safetensors only, '
                f'so model_args may only shape the architecture, with one of {sorted(ARCHITECTURE_ARGS)}. Drop '
                f'{key!r}' + (' (to start from a local weights file, use make_compatible(..., pretrained=True, '
                              'pretrained_cfg_overlay=dict(file=PATH))).' if 'pretrained' in key or 'checkpoint' in key
                              else '.'))
        kind, what, ok = ARCHITECTURE_ARGS[key]
        typed = type(value) is kind or (kind is float and type(value) is int)
        if not typed or not ok(value):
            raise ComponentError(f'model_args {key}={value!r} is invalid: it must be {what}.')
    return model_args


def _overlay_model_args(backbone: str, model_args: Dict[str, Any]) -> Dict[str, Any]:
    """``model_args`` plus the arguments timm's builder derives from ``pretrained_cfg_overlay``'s ``input_size``.

    timm builds a backbone with ``in_chans`` from a pretrained_cfg's ``input_size``, and a fixed-input-size one (ViT,
    MaxViT) with ``img_size`` too. The overlay is never recorded (it may name a local file), so these are passed, and
    recorded, as the allow-listed model_args that rebuild the same architecture on load; the caller's own win.

    Raises:
        ComponentError: A fixed-input-size backbone given a non-square size (``img_size`` is one integer).
    """
    overlay = model_args.get('pretrained_cfg_overlay') or {}
    if overlay.get('input_size') is None:
        return model_args
    chans, height, width = overlay['input_size']
    default = timm.models.get_pretrained_cfg(backbone)
    cfg = {**(default.to_dict() if default is not None else {}), **overlay}
    default_chans = default.input_size[0] if default is not None and default.input_size else 3
    derived = {'in_chans': chans} if chans != default_chans else {}
    if cfg.get('fixed_input_size') and 'img_size' not in model_args:
        if height != width:
            raise ComponentError(
                f'pretrained_cfg_overlay input_size={tuple(overlay["input_size"])}: {backbone} has a fixed input size, '
                f'recorded as model_args img_size, one integer for a square input. Give a square size, e.g. '
                f'input_size=({chans}, {height}, {height}).')
        derived['img_size'] = height
    return check_model_args({**derived, **model_args}, allow_overlay=True)


def _loaded_from(cfg: Dict[str, Any]) -> Optional[str]:
    """The Hub repo timm loaded pretrained weights from, by timm's own choice of source; None for a local file, a
    URL, or a model with no weights to load (such as the ``untrained`` CIFAR models)."""
    load_from, location = _resolve_pretrained_source(cfg)
    if load_from != 'hf-hub':
        return None
    return location[0] if isinstance(location, tuple) else location  # (repo, filename) with hf_hub_filename


def _recorded_cfg(cfg: Dict[str, Any], image_size: Optional[int], in_chans: Optional[int]) -> Dict[str, Any]:
    """The pretrained_cfg fields a component records; ``image_size`` replaces the backbone's input size.

    A component trained at ``image_size`` (train.py resizes whole images to ``image_size`` x ``image_size``) is
    preprocessed that way: the same size at test time, no crop (``crop_pct`` 1, ``crop_mode`` squash). A backbone
    built with ``in_chans`` takes that many channels, whatever its pretrained_cfg says (as timm resolves it).
    """
    recorded = {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items() if k in _CFG_KEYS}
    if in_chans is not None and len(recorded.get('input_size', [])) == 3:
        recorded['input_size'] = [in_chans, *recorded['input_size'][1:]]
    if image_size is not None:
        size = [recorded.get('input_size', [3])[0], image_size, image_size]
        recorded.update(input_size=size, test_input_size=size, crop_pct=1.0, crop_mode='squash')
    return recorded


def _backbone_parts(backbone: str, split: Union[str, int, None], *, num_classes: Optional[int] = None,
                    pretrained: bool = False, model_args: Optional[Dict[str, Any]] = None,
                    image_size: Optional[int] = None) -> Tuple[nn.Module, nn.Module, Dict[str, Any]]:
    """Create a timm backbone and split it (at :func:`~timm_compat._split.default_split` when ``split`` is None):
    ``(trunk, tail, info)``.

    ``info`` holds the resolved split, the trunk's output ``feature_shape`` ``[C, H, W]`` at the recorded input size,
    the head's ``num_classes``, the JSON-able ``model_args``, the ``pretrained_cfg`` fields a component records (with
    timm's ``license`` of the pretrained weights, when they are loaded) and ``base_model``, the Hub repo the
    pretrained weights came from (or None).

    Raises:
        ComponentError: ``model_args`` holds a key :func:`check_model_args` refuses, or an overlay input size
            that model_args cannot record (see :func:`_overlay_model_args`).
    """
    model_args = _overlay_model_args(backbone, check_model_args(model_args, allow_overlay=True))
    model = create_backbone(backbone, pretrained=pretrained, **model_args)
    if num_classes is not None and num_classes != model.num_classes:
        # Resized after creation and from a forked RNG, so the classifier's size cannot shift the stream that
        # initialises the trunk and the adapters: with IIW, tasks of 9 and 10 classes get identical extractors.
        with torch.random.fork_rng(devices=[]):
            model.reset_classifier(num_classes)
    split = resolve_split(model, default_split(model, backbone) if split is None else split)
    cfg = model.pretrained_cfg
    recorded = _recorded_cfg(cfg, image_size, model_args.get('in_chans'))
    if pretrained and cfg.get('license'):  # the weights' licence binds what is trained from them; the card says it
        recorded['license'] = cfg['license']
    # Probed at the size the components will see: cheaper than timm's 224 px, and a size the model cannot take
    # is refused here, not in training.
    input_size = tuple(recorded.get('input_size', (3, 224, 224)))
    trunk, tail = split_model(model, split, input_size=input_size)
    feat_shape = output_shape(trunk, input_size)
    if len(feat_shape) != 3:
        raise ValueError(
            f'{backbone} split at {split!r} gives features of shape {feat_shape}, not (C, H, W). Interfaces join '
            f'spatial feature maps with 1x1 convs; token features (vision transformers) are not supported. '
            f'Use a convolutional backbone, or split_model() directly for token features.')
    model_args.pop('pretrained_cfg_overlay', None)  # a local path is not part of the architecture
    info = dict(backbone=backbone, split=split, feature_shape=list(feat_shape), num_classes=model.num_classes,
                model_args=model_args, pretrained_cfg=recorded,
                base_model=_loaded_from(cfg) if pretrained else None)
    return trunk, tail, info


class Extractor(Component):
    """Trunk of a backbone plus an adapter to the interface width: images -> ``(N, width, H, W)``.

    Args:
        trunk: The backbone up to and including the split module.
        in_chs: Channels the trunk outputs.
        width: Interface width; a 1x1 conv + BN adapter is added when it differs from ``in_chs``.
        config: JSON-able description (backbone, split, model_args, ...) that rebuilds this extractor.
    """
    role = 'extractor'

    def __init__(self, trunk: nn.Module, in_chs: int, width: int, config: Optional[Dict[str, Any]] = None):
        super().__init__()
        self.trunk = trunk
        self.adapter = _adapter(in_chs, _check_width(width))
        self.width = width
        self.config = dict(config or {}, in_chs=in_chs, width=width)
        self.__dict__['interface'] = None  # a reference, not a submodule: its weights are not the extractor's

    @property
    def interface_id(self) -> Optional[str]:
        return self.interface.id if self.interface is not None else self.config.get('interface_id')

    @property
    def pretrained_cfg(self) -> Dict[str, Any]:
        """The input this component was trained on, with tuples where timm's own cfgs have them (``input_size``)."""
        return {k: tuple(v) if isinstance(v, list) else v for k, v in self.config.get('pretrained_cfg', {}).items()}

    def component_config(self) -> Dict[str, Any]:
        if not self.config.get('backbone'):
            raise ComponentError('This extractor wraps a custom module and cannot be rebuilt from a config; '
                                 'build it with make_compatible() from a timm backbone to save it.')
        check_model_args(self.config.get('model_args'))  # never save what could not be loaded back
        # num_classes is timm's field: loaded with timm.create_model, an extractor is a feature model.
        return {**{k: v for k, v in self.config.items() if k != 'interface_id'}, 'num_classes': 0}

    @classmethod
    def from_config(cls, config: Dict[str, Any]) -> 'Extractor':
        return build_components(config['backbone'], config['split'], config['width'], roles=('extractor',),
                                model_args=check_model_args(config.get('model_args')), config=config)['extractor']

    def extra_repr(self) -> str:
        return f'backbone={self.config.get("backbone")!r}, split={self.config.get("split")!r}, width={self.width}'

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter(self.trunk(x))


class Head(Component):
    """An adapter from the interface width plus the tail of a backbone: ``(N, width, H, W)`` -> logits.

    Args:
        tail: The backbone after the split module (its classifier sized to ``num_classes``), or any module taking
            ``(N, in_chs, H, W)``.
        in_chs: Channels the tail expects.
        width: Interface width; a 1x1 conv + BN adapter is added when it differs from ``in_chs``.
        num_classes: Classifier outputs.
        class_names: Names of the classes, in label order (used to map labels onto common classes).
        config: JSON-able description that rebuilds this head.
    """
    role = 'head'

    def __init__(self, tail: nn.Module, in_chs: int, width: int, num_classes: int,
                 class_names: Optional[Sequence[str]] = None, config: Optional[Dict[str, Any]] = None):
        super().__init__()
        self.adapter = _adapter(_check_width(width), in_chs)
        self.tail = tail
        self.width = width
        self.num_classes = num_classes
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f'{len(class_names)} class names for a {num_classes}-class head: give one per class.')
        self.class_names = list(class_names) if class_names is not None else None
        self.config = dict(config or {}, in_chs=in_chs, width=width, num_classes=num_classes,
                           class_names=self.class_names)
        self.__dict__['interface'] = None

    interface_id = Extractor.interface_id
    pretrained_cfg = Extractor.pretrained_cfg

    def component_config(self) -> Dict[str, Any]:
        if not self.config.get('backbone'):
            raise ComponentError('This head wraps a custom module and cannot be rebuilt from a config; '
                                 'build it from a timm backbone name (head="tail" or a model name) to save it.')
        check_model_args(self.config.get('model_args'))  # never save what could not be loaded back
        return {k: v for k, v in self.config.items() if k != 'interface_id'}

    @classmethod
    def from_config(cls, config: Dict[str, Any]) -> 'Head':
        return build_components(config['backbone'], config['split'], config['width'], roles=('head',),
                                num_classes=config['num_classes'], class_names=config.get('class_names'),
                                model_args=check_model_args(config.get('model_args')), config=config)['head']

    def extend_classes(self, class_names: Sequence[str]) -> 'Head':
        """Resize the classifier in place to ``class_names``, keeping the weights of classes it already knows (by
        name, up to synonyms: :func:`~timm_compat.classes.canonical_class_name`).

        The new classes' rows start from the classifier's own initialisation; used to grow a head to new classes
        (Gygli et al. 2021, Sec. 5.2) without retraining what it knows.
        """
        if self.class_names is None:
            raise ValueError('extend_classes matches classes by name: this head has no class_names.')
        path = self.config.get('pretrained_cfg', {}).get('classifier')
        old = self.tail.get_submodule(path) if path else None
        if not isinstance(old, nn.Linear):
            raise ValueError(f'Cannot find this head\'s linear classifier (pretrained_cfg classifier={path!r}).')
        new = nn.Linear(old.in_features, len(class_names), bias=old.bias is not None,
                        device=old.weight.device, dtype=old.weight.dtype)
        known = {canonical_class_name(c): j for j, c in enumerate(self.class_names)}
        with torch.no_grad():
            for i, name in enumerate(class_names):
                if (j := known.get(canonical_class_name(name))) is not None:
                    new.weight[i] = old.weight[j]
                    if old.bias is not None:
                        new.bias[i] = old.bias[j]
        parent, _, leaf = path.rpartition('.')
        setattr(self.tail.get_submodule(parent) if parent else self.tail, leaf, new)
        self.num_classes, self.class_names = len(class_names), list(class_names)
        self.config.update(num_classes=self.num_classes, class_names=self.class_names)
        return self

    def extra_repr(self) -> str:
        return f'{Extractor.extra_repr(self)}, num_classes={self.num_classes}'

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(self.adapter(x))


def build_components(backbone: str, split: Union[str, int, None], width: int, *, num_classes: Optional[int] = None,
                     class_names: Optional[Sequence[str]] = None, roles: Sequence[str] = ('extractor', 'head'),
                     pretrained: bool = False, model_args: Optional[Dict[str, Any]] = None,
                     config: Optional[Dict[str, Any]] = None, image_size: Optional[int] = None) -> Dict[str, Component]:
    """Split timm ``backbone`` after ``split`` and fit the halves asked for to interface ``width``.

    Only the components in ``roles`` are made, in that order: each adapter draws its initial weights from the
    global RNG, so what is built decides the random stream that follows (identical initial weights rely on it).

    Args:
        backbone: timm model name.
        split: Module path or ``feature_info`` index after which the trunk ends; None for the backbone's default
            (:func:`~timm_compat._split.default_split`).
        width: Interface width.
        num_classes: Classifier outputs of the head; None for the backbone's own. The extractor does not depend on it.
        class_names: Names of the head's classes, in label order.
        roles: ``"extractor"`` and/or ``"head"``.
        pretrained: Load timm's pretrained weights.
        model_args: Passed to ``timm.create_model`` (see :func:`check_model_args`).
        config: A saved component config; it wins over what a fresh build reports (it may carry an input-size
            overlay or a base_model).
        image_size: The square input size the components are trained at, recorded in their pretrained_cfg.

    Returns:
        ``{role: component}`` for each of ``roles``.
    """
    if set(roles) - {'extractor', 'head'}:
        raise ValueError(f'roles must be "extractor" and/or "head", got roles={list(roles)}.')
    if image_size is None and config and len(size := config.get('pretrained_cfg', {}).get('input_size', [])) == 3:
        image_size = size[-1] if size[-1] == size[-2] else None  # probe a loaded component at its own size
    trunk, tail, info = _backbone_parts(backbone, split, num_classes=num_classes, pretrained=pretrained,
                                        model_args=model_args, image_size=image_size)
    in_chs = info.pop('feature_shape')[0]
    num_classes = info.pop('num_classes')  # the head's classifier, resized to the classes asked for
    info.update(config or {})
    make = {'extractor': lambda: Extractor(trunk, in_chs, width, config=info),
            'head': lambda: Head(tail, in_chs, width, num_classes, class_names, config=info)}
    return {role: make[role]() for role in roles}
