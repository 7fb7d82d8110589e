"""A single saved extractor or head as a timm model: the ``compatible_extractor`` and ``compatible_head`` architectures.

A component folder's ``config.json`` names the timm architecture of its role (``architecture``), beside timm's
``num_classes`` and ``pretrained_cfg`` (the input the component was trained on), so once ``import timm_compat`` has
registered these architectures, ``timm.create_model('local-dir:DIR' or 'hf-hub:ORG/NAME', pretrained=True)`` loads
it. What is built is read from the folder itself, verified as :func:`~timm_compat.load_component` verifies it
(the config recorded in the weights, the weights digest, safetensors only): ``model_args`` holds only the backbone's
own ``timm.create_model`` arguments, as in every component, so timm passes them back and they must be the saved ones.

* ``compatible_extractor``: :class:`ExtractorModel`, a timm feature model (``num_classes`` 0):
  ``forward_features`` is the extractor's feature map at the interface width, ``forward`` its global pool (average,
  or timm's ``global_pool`` argument: ``''`` for the feature map itself).
* ``compatible_head``: :class:`HeadModel`, interface-width feature maps to logits.
* ``compatible_interface``, ``compatible_stitch``: not models; timm is refused with a message saying what to load.

The timm models hold the component's own modules under the component's parameter names, so their outputs are the
component's bit for bit and ``model.safetensors`` is their state dict.
"""
import copy
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn
from timm.layers import SelectAdaptivePool2d
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._hub import _parse_model_cfg  # timm's own reading of a config.json, for the config verified here

from .component import Component, ComponentError, architecture_of, pinned, read_config, read_verified
from .components import Extractor, Head

__all__ = ['ExtractorModel', 'HeadModel', 'timm_source']


def _global_pool(pool_type: str) -> SelectAdaptivePool2d:
    # As timm's own classifiers: no pooling ('') leaves the (N, C, H, W) map unflattened.
    return SelectAdaptivePool2d(pool_type=pool_type, flatten=bool(pool_type))


class ExtractorModel(nn.Module):
    """An :class:`~timm_compat.Extractor` as a timm feature model: images -> pooled ``(N, width)`` features.

    ``forward_features`` gives the extractor's ``(N, width, H, W)`` interface features; ``global_pool`` (timm's pool
    types, ``''`` for none) how ``forward`` pools them. To recombine, load the component itself
    (:func:`~timm_compat.load_component`): a head takes feature maps, not pooled features.
    """
    num_classes = 0
    pretrained_cfg = None  # set by timm's builder

    def __init__(self, extractor: Extractor, global_pool: str = 'avg'):
        super().__init__()
        self.trunk, self.adapter = extractor.trunk, extractor.adapter
        self.num_features = self.head_hidden_size = extractor.width
        self.global_pool = _global_pool(global_pool)

    def get_classifier(self) -> nn.Module:
        return nn.Identity()

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Change the pooling; an extractor has no classifier, so ``num_classes`` must stay 0."""
        if num_classes:
            raise ValueError('A compatible extractor has no classifier (num_classes=0): recombine it with a head '
                             '(timm_compat.recombine), or put a classifier on its pooled features.')
        if global_pool is not None:
            self.global_pool = _global_pool(global_pool)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter(self.trunk(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.global_pool(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class HeadModel(nn.Module):
    """A :class:`~timm_compat.Head` as a timm model: ``(N, width, H, W)`` interface features -> logits."""
    pretrained_cfg = None  # set by timm's builder

    def __init__(self, head: Head):
        super().__init__()
        self.adapter, self.tail = head.adapter, head.tail
        self.num_classes, self.width = head.num_classes, head.width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(self.adapter(x))


def timm_source(pretrained_cfg: Dict[str, Any], architecture: str) -> Tuple[str, Optional[str]]:
    """``(model id, revision)`` timm read a saved folder's config from: a ``local-dir:`` folder or an ``hf-hub:`` repo.

    Raises:
        ComponentError: ``architecture`` was asked for by name, with no saved folder to build it from.
    """
    if pretrained_cfg.get('source') == 'local-dir' and pretrained_cfg.get('file'):
        return str(pretrained_cfg['file']), None
    if pretrained_cfg.get('source') == 'hf-hub' and pretrained_cfg.get('hf_hub_id'):
        repo, _, revision = str(pretrained_cfg['hf_hub_id']).partition('@')
        return repo, revision or None
    raise ComponentError(f'{architecture} is the architecture of a saved timm-compat folder and has no weights of '
                         f'its own: load one with timm.create_model("local-dir:DIR" or "hf-hub:ORG/NAME", '
                         f'pretrained=True).')


def _cfg_dict(cfg: Any) -> Dict[str, Any]:
    return cfg.to_dict() if hasattr(cfg, 'to_dict') else dict(cfg) if isinstance(cfg, dict) else {}


def _timm_pretrained_cfg(config: Dict[str, Any], read_by_timm: Dict[str, Any]) -> Dict[str, Any]:
    """timm's ``pretrained_cfg`` of ``config``, parsed as timm parses a ``config.json``, with the source timm named.

    timm downloads ``config.json`` itself before this load pins a commit: a push in between would give the new
    weights the old preprocessing, so the cfg timm read is replaced by the one of the config actually loaded.
    """
    source = {k: read_by_timm[k] for k in ('source', 'hf_hub_id', 'file') if k in read_by_timm}
    return _parse_model_cfg(copy.deepcopy(config), source)[0]


def _check_arguments(config: Dict[str, Any], model_id: str, kwargs: Dict[str, Any]) -> None:
    """Refuse arguments that would build something else than the saved component.

    timm passes back the ``model_args`` of the ``config.json`` it read (``pretrained_model_args``); those are not the
    caller's, and after a push they may be another commit's, so only the caller's own arguments are checked. An
    extractor's ``global_pool`` is the timm model's pooling (:class:`ExtractorModel`), not part of the component.
    """
    saved = {**config.get('model_args', {}), 'num_classes': config.get('num_classes', 0)}
    passed_back = kwargs.get('pretrained_model_args') or {}
    for key, value in kwargs.items():
        if key in ('pretrained_cfg', 'pretrained_cfg_overlay', 'pretrained_model_args', 'cache_dir'):
            continue
        if key == 'global_pool' and config['role'] == 'extractor':
            continue
        if key in passed_back and passed_back[key] == value:
            continue
        if key not in saved or saved[key] != value:
            what = f'was saved with {key}={saved[key]!r}' if key in saved else f'takes no argument {key!r}'
            raise ValueError(f'{model_id}: the {config["role"]} {what}, so {key}={value!r} cannot be applied on '
                             f'load. Load it as saved, then change it in Python'
                             + (' (head.extend_classes(names) for other classes).' if key == 'num_classes' else '.'))


def _verified(cls, model_id: str, config: Dict[str, Any], resolve: Dict[str, Any]) -> Component:
    """The saved component, once its weights are known to be those of the ``config.json`` timm read its
    ``pretrained_cfg`` from."""
    verified, tensors = read_verified(model_id, resolve)
    if {k: v for k, v in config.items() if k != 'weights_sha256'} != verified:
        # load_component takes such a folder as the new component; timm would pair it with the old preprocessing.
        raise ComponentError(
            f'{model_id}: config.json is older than its weights (a save stopped between writing the two, or the '
            f'repo changed while loading), so timm would preprocess for the old component. Save the component '
            f'again, or load it with timm_compat.load_component().')
    return cls.from_verified(model_id, config=verified, tensors=tensors)


def _create(role: str, pretrained: bool, kwargs: Dict[str, Any]) -> nn.Module:
    """The timm model of the saved ``role`` component timm was asked for, built and (if pretrained) loaded."""
    architecture = architecture_of(role)
    model_id, revision = timm_source(_cfg_dict(kwargs.get('pretrained_cfg')), architecture)
    hub_only = _cfg_dict(kwargs.get('pretrained_cfg')).get('source') == 'hf-hub'  # hf-hub: never a local folder
    resolve = pinned(model_id, dict(revision=revision, cache_dir=kwargs.get('cache_dir'), hub_only=hub_only))
    config = read_config(model_id, **resolve)
    if config['role'] != role:
        raise ComponentError(f'{model_id} holds a component of role {config["role"]!r}, not {role!r}: its '
                             f'config.json names the wrong architecture. Save the component again.')
    _check_arguments(config, model_id, kwargs)
    cls = Component.registry[role]
    # Weights come verified from the folder; without pretrained=True the architecture is freshly initialised.
    component = _verified(cls, model_id, config, resolve) if pretrained else cls.from_config(config)
    pool = kwargs.get('global_pool', 'avg')
    wrap = (lambda: ExtractorModel(component, pool)) if role == 'extractor' else (lambda: HeadModel(component))
    model = build_model_with_cfg(lambda **ignored: wrap(), architecture, pretrained=False,
                                 pretrained_cfg=_timm_pretrained_cfg(config, _cfg_dict(kwargs.get('pretrained_cfg'))),
                                 pretrained_cfg_overlay=kwargs.get('pretrained_cfg_overlay'),
                                 pretrained_model_args=kwargs.get('pretrained_model_args'), feature_cfg=None)
    # The recorded classifier is the backbone's path: inside the tail for a head; an extractor has none.
    if role == 'head' and model.pretrained_cfg.get('classifier'):
        model.pretrained_cfg['classifier'] = f'tail.{model.pretrained_cfg["classifier"]}'
    elif role == 'extractor':
        model.pretrained_cfg.pop('classifier', None)
    return model.eval() if pretrained else model


def _not_a_model(role: str, what: str, kwargs: Dict[str, Any]) -> ComponentError:
    try:
        where = repr(timm_source(_cfg_dict(kwargs.get('pretrained_cfg')), architecture_of(role))[0])
    except ComponentError:
        where = 'This folder'
    return ComponentError(f'{where} holds a timm-compat {role} ({what}), not a model: timm cannot build it. '
                          f'Load it with timm_compat.load_component(...); timm.create_model loads saved extractors, '
                          f'heads and recombined models.')


# The registry's configs: no weights of their own (a saved folder's config.json gives them and its pretrained_cfg).
default_cfgs = generate_default_cfgs({f'{architecture_of(role)}.untrained': {'url': '', 'num_classes': n}
                                      for role, n in (('extractor', 0), ('head', 0))})


@register_model
def compatible_extractor(pretrained: bool = False, **kwargs: Any) -> ExtractorModel:
    """timm entry point of a saved extractor: ``timm.create_model('local-dir:DIR', pretrained=True)``."""
    return _create('extractor', pretrained, kwargs)


@register_model
def compatible_head(pretrained: bool = False, **kwargs: Any) -> HeadModel:
    """timm entry point of a saved head: ``timm.create_model('local-dir:DIR', pretrained=True)``."""
    return _create('head', pretrained, kwargs)


@register_model
def compatible_interface(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Refuses: an interface folder holds auxiliary heads, not a model."""
    raise _not_a_model('interface', 'the width and auxiliary heads that components are trained against', kwargs)


@register_model
def compatible_stitch(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Refuses: a stitch maps one interface's features to another's; it is not a model."""
    raise _not_a_model('stitch', "a map from one interface's features to another's", kwargs)
