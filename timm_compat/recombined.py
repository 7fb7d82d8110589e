"""A recombined model (an extractor and a head of different networks) as one folder that timm loads.

The folder is timm's own export format (``config.json`` with ``architecture``, ``num_classes``,
``pretrained_cfg`` and ``model_args``; ``model.safetensors``; ``README.md``), so ``timm.create_model('local-dir:DIR',
pretrained=True)`` and ``'hf-hub:ORG/NAME'`` build it. Which architecture it names is decided at save time:

* **The backbone itself** when the pair is one: extractor and head cut from the same timm backbone at the same
  split, with the same ``model_args`` and identity adapters (interface width = the backbone's channels there).
  Saved under the backbone's parameter names, it loads with plain timm, no timm-compat installed, unless the
  backbone is one timm-compat registers (``resnet56_cifar``...). Chosen only when a probe confirms it: the plain
  timm model, given these weights, reproduces the recombined model's logits bit for bit.
* **compatible_model** otherwise (adapters, two backbones): an architecture that ``import timm_compat`` registers
  with timm, its ``model_args`` the two component configs. Adapters are 1x1 conv + BN pairs with no timm slot to
  fold into, so no plain timm architecture holds them.

:func:`load_recombined` loads either format. It and the ``compatible_model`` entry point verify what they load
like a component (:mod:`timm_compat._integrity`): the config recorded in the weights, the weights digest,
safetensors only. Plain timm loading a backbone-format folder does not verify the digest.
"""
import copy
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import torch
import timm
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from huggingface_hub import CommitInfo

from ._component_timm import timm_source
from ._folder import push_folder, write_folder
from ._integrity import ComponentError, weights_digest
from ._recombined_card import model_card
from .batchnorm import eval_mode
from .compatible import CompatibleModel, shared_interfaces
from .component import FORMAT_VERSION, read_verified
from .components import Extractor, Head

__all__ = ['ARCHITECTURE', 'RecombinedModel', 'recombined_config', 'save_recombined', 'push_recombined',
           'load_recombined']

ARCHITECTURE = 'compatible_model'
ROLE = 'recombined'
# pretrained_cfg fields that locate a weight source: never exported, timm sets them from where it loads.
# pool_size is the source's at its own input size, which the recorded input size may change.
_SOURCE_KEYS = ('url', 'hf_hub_id', 'hf_hub_filename', 'file', 'state_dict', 'source', 'tag', 'architecture',
                'custom_load', 'hf_hub_revision', 'pool_size')


class RecombinedModel(CompatibleModel):
    """A :class:`~timm_compat.CompatibleModel` as timm builds it: with ``pretrained_cfg`` and ``num_classes``.

    What :func:`load_recombined` and ``timm.create_model('local-dir:...')`` return for a ``compatible_model``
    folder.
    """
    pretrained_cfg = None  # shadows CompatibleModel's read-only property: timm's builder assigns it

    def __init__(self, extractor: Extractor, head: Head, bn_calibration: Optional[Dict[str, Any]] = None):
        super().__init__(extractor, head, None)
        self.pretrained_cfg = _with_classifier(extractor.pretrained_cfg, head.pretrained_cfg)
        self.bn_calibration = bn_calibration

    @property
    def num_classes(self) -> int:
        return self.head.num_classes


def _with_classifier(cfg: Dict[str, Any], head_cfg: Dict[str, Any]) -> Dict[str, Any]:
    """``cfg`` with timm's ``classifier`` path pointing at the head's classifier inside the pair (or none)."""
    cfg = {k: v for k, v in cfg.items() if k != 'classifier'}
    return {**cfg, 'classifier': f'head.tail.{head_cfg["classifier"]}'} if head_cfg.get('classifier') else cfg


def _pair_configs(model: CompatibleModel) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    try:
        return model.extractor.full_config(), model.head.full_config()
    except (ComponentError, AttributeError) as e:
        raise ComponentError(f'Cannot save this recombined model: {e}') from e


def _as_backbone(model: CompatibleModel, configs) -> Optional[Tuple[torch.nn.Module, Dict[str, torch.Tensor]]]:
    """The plain timm backbone this pair is, with its state dict, or None when no plain timm model is.

    Confirmed by a probe: the backbone, loaded strictly with the renamed weights, must give the pair's logits bit
    for bit in both BN modes, so a backbone whose ``num_classes`` constructor differs from ``reset_classifier``
    (or any other surprise) falls back to ``compatible_model``.
    """
    ecfg, hcfg = configs
    same = all(ecfg.get(k) == hcfg.get(k) for k in ('backbone', 'split', 'model_args'))
    identity = all(isinstance(c.adapter, torch.nn.Identity) for c in (model.extractor, model.head))
    if not (same and identity):
        return None
    input_size = ecfg.get('pretrained_cfg', {}).get('input_size')
    state = {}
    for key, value in model.state_dict().items():
        prefix = next((p for p in ('extractor.trunk.', 'head.tail.') if key.startswith(p)), None)
        if prefix is None or input_size is None:
            return None
        state[key[len(prefix):]] = value.detach().cpu().contiguous()
    try:  # any failure to rebuild the backbone plainly means only that the pair is saved as compatible_model
        with torch.random.fork_rng(devices=[]):
            backbone = timm.create_model(ecfg['backbone'], num_classes=hcfg['num_classes'],
                                         **ecfg.get('model_args', {}))
        backbone.load_state_dict(state, strict=True, assign=True)  # in the pair's dtype, as the probe runs it
    except (RuntimeError, ValueError, TypeError):
        return None
    return (backbone, state) if _same_logits(model, backbone, input_size) else None


@torch.no_grad()
def _same_logits(model: torch.nn.Module, other: torch.nn.Module, input_size) -> bool:
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    x = torch.randn(4, *input_size, generator=torch.Generator().manual_seed(0)).to(dtype)
    # The probe must not move or touch the caller's model; interfaces are not part of the forward pass.
    model_copy = copy.deepcopy(model, shared_interfaces(model)).cpu()
    for bn in ('running', 'batch'):
        with eval_mode(model_copy, bn), eval_mode(other, bn):
            if not torch.equal(model_copy(x), other(x)):
                return False
    return True


def _timm_pretrained_cfg(source: Dict[str, Any], recorded: Dict[str, Any], num_classes: int) -> Dict[str, Any]:
    """timm's pretrained_cfg fields for the export: ``source``'s, less weight locations, with what was recorded."""
    cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in source.items()
           if k not in _SOURCE_KEYS and v is not None}
    cfg.update(recorded, num_classes=num_classes)
    return {k: v for k, v in cfg.items() if isinstance(v, (str, int, float, bool, list))}


def _loads_with(architecture: str) -> str:
    """``"timm"`` when timm itself defines ``architecture``; ``"timm_compat"`` when ``import timm_compat`` does."""
    defined_in = timm.models.model_entrypoint(architecture).__module__
    return 'timm_compat' if defined_in.split('.')[0] == 'timm_compat' else 'timm'


def recombined_config(model: CompatibleModel) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor]]:
    """The ``config.json`` of ``model``'s folder and the weights to save with it.

    Returns:
        ``(config, tensors)``: ``config['architecture']`` is the backbone's or ``compatible_model``;
        ``config['loads_with']`` is ``"timm"`` when timm alone defines that architecture, else ``"timm_compat"``.

    Raises:
        ComponentError: A component wraps a custom module, so nothing could rebuild it from a config.
    """
    if parts := sorted({key.split('.')[0] for key in model.state_dict()} - {'extractor', 'head'}):
        raise ComponentError(f'The model holds {", ".join(parts)} besides its extractor and head, which the pair '
                             f'format has no place for: save it as its parts (a stitch: model.stitch.save_pretrained).')
    ecfg, hcfg = _pair_configs(model)
    plain = _as_backbone(model, (ecfg, hcfg))
    if plain is not None:
        backbone, tensors = plain
        architecture, model_args = ecfg['backbone'], dict(ecfg.get('model_args', {}))
        source_cfg = backbone.pretrained_cfg
    else:
        tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        architecture, model_args, source_cfg = ARCHITECTURE, {'extractor': ecfg, 'head': hcfg}, {}
    iids = {ecfg.get('interface_id'), hcfg.get('interface_id')}
    config = {
        'architecture': architecture, 'num_classes': hcfg['num_classes'],
        'pretrained_cfg': _timm_pretrained_cfg(source_cfg, ecfg.get('pretrained_cfg', {}), hcfg['num_classes']),
        'model_args': model_args,
        'role': ROLE, 'format_version': FORMAT_VERSION, 'loads_with': _loads_with(architecture),
        'extractor': ecfg, 'head': hcfg, 'interface_id': iids.pop() if len(iids) == 1 else None,
        'bn_calibration': getattr(model, 'bn_calibration', None),
        'weights_sha256': weights_digest(tensors),
    }
    if plain is None:  # the recorded classifier is the backbone's path; here it is inside the head
        config['pretrained_cfg'] = _with_classifier(config['pretrained_cfg'], hcfg.get('pretrained_cfg', {}))
    if hcfg.get('class_names'):
        config['label_names'] = list(hcfg['class_names'])
    return config, tensors


def save_recombined(model: CompatibleModel, save_directory: Union[str, Path], *,
                    repo_id: Optional[str] = None) -> str:
    """Write ``model`` as one folder: ``config.json``, ``model.safetensors``, ``README.md``.

    Each file is replaced atomically, weights first, carrying the config (as a component save does), so the folder
    loads as the old or the new model at every instant.

    Args:
        model: Any :class:`~timm_compat.CompatibleModel` whose components were built from timm backbones.
        save_directory: Folder to write, created if missing.
        repo_id: The Hub repo the folder is for, named in the model card.

    Returns:
        ``"timm"`` (plain ``timm.create_model`` loads it) or ``"timm_compat"`` (it does after ``import timm_compat``).
    """
    config, tensors = recombined_config(model)
    write_folder(save_directory, tensors, config, lambda: model_card(config, repo_id or 'ORG/NAME'))
    return config['loads_with']


def push_recombined(model: CompatibleModel, repo_id: str, *, commit_message: Optional[str] = None,
                    private: Optional[bool] = None, token: Optional[str] = None,
                    branch: Optional[str] = None, create_pr: Optional[bool] = None) -> CommitInfo:
    """Create the Hub model repo ``repo_id`` if needed and upload :func:`save_recombined`'s folder in one commit."""
    _pair_configs(model)  # fail before creating a repo for a model that cannot be saved
    return push_folder(lambda tmp, repo: save_recombined(model, tmp, repo_id=repo), repo_id,
                       commit_message or (lambda loads_with: f'Upload timm-compat recombined model '
                                                             f'(loads with {loads_with})'),
                       config=recombined_config(model)[0], private=private, token=token, branch=branch,
                       create_pr=create_pr)


def _check_pair(config: Dict[str, Any], model_id: str) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    ecfg, hcfg = config.get('extractor'), config.get('head')
    if not (isinstance(ecfg, dict) and ecfg.get('role') == 'extractor'
            and isinstance(hcfg, dict) and hcfg.get('role') == 'head'):
        raise ComponentError(f'{model_id}: config.json does not describe an extractor and a head '
                             f'("extractor" and "head" entries); save the recombined model again.')
    return ecfg, hcfg


def _build_pair(ecfg: Dict[str, Any], hcfg: Dict[str, Any], bn_calibration=None) -> RecombinedModel:
    # Weights are loaded next: the random initialisation must not advance the caller's RNG.
    with torch.random.fork_rng(devices=[]):
        return RecombinedModel(Extractor.from_config(ecfg), Head.from_config(hcfg), bn_calibration)


def _to_pair_names(config: Dict[str, Any], tensors: Dict[str, torch.Tensor], model: RecombinedModel):
    """Weights saved under the backbone's names renamed to the pair's (trunk keys first, the rest the tail's)."""
    if config['architecture'] == ARCHITECTURE:
        return tensors
    trunk = set(model.extractor.trunk.state_dict())
    return {(f'extractor.trunk.{k}' if k in trunk else f'head.tail.{k}'): v for k, v in tensors.items()}


def _load_weights(model: RecombinedModel, tensors: Dict[str, torch.Tensor], model_id: str) -> RecombinedModel:
    missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)  # in the saved dtype
    if missing or unexpected:
        raise ComponentError(f'{model_id}: weights do not fit the architecture in config.json (missing '
                             f'{missing[:5]}, unexpected {unexpected[:5]}). Save the recombined model again.')
    return model.eval()


def load_recombined(model_id: Union[str, Path], *, revision: Optional[str] = None, cache_dir=None,
                    force_download: bool = False, local_files_only: bool = False,
                    token: Union[str, bool, None] = None,
                    map_location: Union[str, torch.device] = 'cpu') -> RecombinedModel:
    """Load and verify a recombined model from a local folder or a Hub repo, whichever format it was saved in.

    Args:
        model_id: Folder written by :func:`save_recombined` (``model.save_pretrained``) or Hub repo id.
        revision, cache_dir, force_download, local_files_only, token, map_location: As
            :meth:`Component.from_pretrained <timm_compat.Component.from_pretrained>`.

    Returns:
        A :class:`RecombinedModel` in eval mode.

    Raises:
        ComponentError: Missing, truncated or changed files, pickled weights only, another role (a single component:
            use :func:`~timm_compat.load_component`), or weights that do not fit the config.
    """
    model_id = str(model_id)
    resolve = dict(revision=revision, cache_dir=cache_dir, force_download=force_download,
                   local_files_only=local_files_only, token=token)
    config, tensors = _verified(model_id, resolve)
    ecfg, hcfg = _check_pair(config, model_id)
    model = _build_pair(ecfg, hcfg, config.get('bn_calibration'))
    return _load_weights(model, _to_pair_names(config, tensors, model), model_id).to(map_location)


def _verified(model_id: str, resolve: Dict[str, Any]) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor]]:
    config, tensors = read_verified(model_id, resolve)
    if config['role'] != ROLE:
        raise ComponentError(f'{model_id} holds a single {config["role"]!r} component, not a recombined model: '
                             f'load it with timm_compat.load_component().')
    return config, tensors


def _timm_build(extractor: Dict[str, Any], head: Dict[str, Any], num_classes: Optional[int] = None,
                **ignored: Any) -> RecombinedModel:
    """Model class for timm's builder. ``in_chans``/``global_pool`` defaults it passes are the components' own."""
    if num_classes is not None and num_classes != head.get('num_classes'):
        raise ValueError(f'compatible_model: num_classes={num_classes} differs from the head\'s '
                         f'{head.get("num_classes")}. Load the model as saved, then resize the head '
                         f'(model.head.extend_classes(names)).')
    return _build_pair(_check_pair({'extractor': extractor, 'head': head}, ARCHITECTURE)[0], head)


def _own_pretrained_cfg(extractor: Dict[str, Any], head: Dict[str, Any]) -> Dict[str, Any]:
    """The pretrained_cfg a saved folder would record for this pair: the extractor's preprocessing (timm's data
    config reads it) and the head's classifier (timm's ``reset_classifier`` and weight loading find it by path)."""
    cfg = _timm_pretrained_cfg({}, extractor.get('pretrained_cfg', {}), head.get('num_classes'))
    return _with_classifier(cfg, head.get('pretrained_cfg', {}))


# The registry's config: no weights of its own (a saved folder's config.json gives them, and its pretrained_cfg).
default_cfgs = generate_default_cfgs({f'{ARCHITECTURE}.untrained': {'url': '', 'num_classes': 0}})


@register_model
def compatible_model(pretrained: bool = False, *, extractor: Optional[Dict[str, Any]] = None,
                     head: Optional[Dict[str, Any]] = None, **kwargs: Any) -> RecombinedModel:
    """timm entry point of a recombined model: an extractor and a head given by their component configs.

    Reached through ``timm.create_model('local-dir:DIR' or 'hf-hub:ORG/NAME', pretrained=True)`` on a folder
    saved by :func:`save_recombined`; with ``pretrained=True`` the weights are read and verified by
    :func:`load_recombined`'s checks, and must be the folder's own (model_args overriding the architecture are
    refused). Built by name (``timm.create_model('compatible_model', extractor=..., head=...)``), its
    ``pretrained_cfg`` is what a saved folder would record: the extractor's preprocessing and the head's classifier.
    """
    if extractor is None or head is None:
        raise ValueError('compatible_model is the architecture of a saved recombined model: load one with '
                         'timm.create_model("local-dir:DIR", pretrained=True), or give extractor= and head= configs.')
    # Only what names the saved model may come through: anything else (drop_rate=...) would be silently dropped.
    if unknown := sorted(set(kwargs) - {'pretrained_cfg', 'pretrained_cfg_overlay', 'pretrained_model_args',
                                        'cache_dir', 'num_classes'}):
        raise ValueError(f'compatible_model takes no argument {", ".join(unknown)}: a recombined model is built as its '
                         f'extractor and head were saved. Load it as saved, then change it in Python.')
    cache_dir = kwargs.pop('cache_dir', None)
    kwargs.pop('pretrained_model_args', None)
    kwargs.setdefault('num_classes', head.get('num_classes'))  # not the registry's default of 0
    if kwargs.get('pretrained_cfg') is None:  # built by name, no folder: the registry's cfg is a placeholder
        kwargs['pretrained_cfg_overlay'] = {**_own_pretrained_cfg(extractor, head),
                                            **(kwargs.get('pretrained_cfg_overlay') or {})}
    model = build_model_with_cfg(_timm_build, ARCHITECTURE, pretrained=False, extractor=extractor, head=head,
                                 feature_cfg=None, **kwargs)
    if not pretrained:
        return model
    model_id, revision = timm_source(model.pretrained_cfg, ARCHITECTURE)
    config, tensors = _verified(model_id, dict(revision=revision, cache_dir=cache_dir,
                                               hub_only=model.pretrained_cfg.get('source') == 'hf-hub'))
    if (config.get('extractor'), config.get('head')) != (extractor, head):
        raise ComponentError(f'{model_id}: the extractor/head configs timm passed differ from the verified ones '
                             f'saved with the weights; load the folder as saved.')
    model.bn_calibration = config.get('bn_calibration')
    return _load_weights(model, tensors, model_id)

