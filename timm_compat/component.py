"""What a component is: :class:`Component`, its folder format, and :func:`load_component`.

A component is one trained part of a compatible network: an extractor or a head
(:mod:`timm_compat.components`), the interface they are trained against (:mod:`timm_compat.interface`), or a
stitch (:mod:`timm_compat.stitching`). Each is an ``nn.Module`` that saves to a folder, local or a Hub model repo::

    config.json        role, timm backbone + model_args, split, width, interface id, pretrained_cfg, weights_sha256,
                       and timm's architecture: timm.create_model('local-dir:DIR') reads it (_component_timm)
    model.safetensors  weights; __metadata__ carries role, interface id and the exact config saved with them
    README.md          model card: YAML front matter with compat-interface-<id> / compat-role-<role> tags

:class:`Component` gives each type ``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` in
``huggingface_hub.ModelHubMixin``'s idiom; :func:`load_component` loads any folder as the type its role names.
Loading reads safetensors only, builds only architectures that the config's allow-listed ``model_args`` describe,
and checks that config.json, the config recorded in the weights and the weights themselves (their digest and, for
an interface, its id) agree (see :mod:`timm_compat._integrity`). Where files come from (a folder, or a Hub repo at
one commit) is :mod:`timm_compat._files`; writing a folder, beside files it may already hold, is
:mod:`timm_compat._folder`; searching the Hub lives in :mod:`timm_compat.hub`.
"""
import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch import nn
from huggingface_hub import CommitInfo, ModelCard, ModelCardData, ModelHubMixin
from safetensors import SafetensorError, safe_open

from ._files import CONFIG_NAME, WEIGHTS_NAME, pinned, read_config, resolve_file
from ._folder import CARD_NAME, check_push_arguments, push_folder, write_folder  # noqa: F401 (CARD_NAME: where hub and tests find it)
from ._integrity import FORMAT_VERSION, ComponentError, recorded_config, weights_digest

__all__ = ['Component', 'ComponentError', 'CONFIG_NAME', 'WEIGHTS_NAME', 'FORMAT_VERSION', 'load_component',
           'pinned', 'read_config', 'resolve_file']

PAPER_URL = 'https://arxiv.org/abs/2004.03898'


def architecture_of(role: str) -> str:
    """The timm architecture a component of ``role`` names in its ``config.json`` (``timm_compat._component_timm``)."""
    return f'compatible_{role}'


def _interface_words(iid: Optional[str]) -> str:
    return f'interface {iid}' if iid else 'no interface'


def read_verified(model_id: str, resolve: Dict[str, Any]) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor]]:
    """The config saved with the weights, and the weights, once config.json, metadata and digest agree."""
    resolve = pinned(model_id, resolve)
    config = read_config(model_id, **resolve)
    tensors, metadata = _read_safetensors(resolve_file(model_id, WEIGHTS_NAME, **resolve))
    config = recorded_config(model_id, config, metadata)
    if metadata.get('role') != config['role'] or metadata.get('interface_id') != str(config.get('interface_id')):
        raise ComponentError(
            f'{model_id}: config.json says role={config["role"]!r}, interface={config.get("interface_id")!r} but '
            f'the weights say role={metadata.get("role")!r}, interface={metadata.get("interface_id")!r}. '
            f'The files do not belong together; download or save the component again.')
    if config.pop('weights_sha256', None) != weights_digest(tensors):
        raise ComponentError(
            f'{model_id}: the weights in {WEIGHTS_NAME} do not match the digest in {CONFIG_NAME} (weights_sha256). '
            f'They were changed or replaced after saving; do not use them. Download or save the component again.')
    return config, tensors


def _check_shapes(module: nn.Module, tensors: Dict[str, torch.Tensor], model_id: str) -> None:
    """Refuse weights of another shape than the architecture's (the digest covers bytes, not shapes)."""
    expected = module.state_dict()
    for name, tensor in tensors.items():
        if name in expected and tensor.shape != expected[name].shape:
            raise ComponentError(
                f'{model_id}: {name}: shape {tuple(tensor.shape)} in {WEIGHTS_NAME}, not the '
                f'{tuple(expected[name].shape)} of the architecture in {CONFIG_NAME}. The weights were changed '
                f'after saving; do not use them. Download or save the component again.')


def _cast_rebuilt_buffers(module: nn.Module, tensors: Dict[str, torch.Tensor]) -> None:
    """Give the floating buffers that the file does not hold the dtype of the floating tensors it does.

    Non-persistent buffers (timm's BlurPool2d filter) are rebuilt by the architecture in float32, while
    ``load_state_dict(assign=True)`` keeps the saved dtype of everything else: a component saved after
    ``.to(torch.bfloat16)``, which cast every floating buffer, could not run. Weights of several floating dtypes name
    no one dtype; such buffers are left as built.
    """
    dtypes = {t.dtype for t in tensors.values() if t.is_floating_point()}
    if len(dtypes) != 1:
        return
    dtype = dtypes.pop()
    for name, buffer in list(module.named_buffers()):
        if name not in tensors and buffer.is_floating_point() and buffer.dtype != dtype:
            parent, _, leaf = name.rpartition('.')
            module.get_submodule(parent).register_buffer(leaf, buffer.to(dtype), persistent=False)


def _read_safetensors(path: Path) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    try:
        with safe_open(str(path), framework='pt') as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise ComponentError(f'{path} is not a readable safetensors file ({e}); it may be truncated or corrupt. '
                             f'Download or save it again.') from e
    return tensors, metadata


class Component(
        nn.Module, ModelHubMixin,
        library_name='timm-compat',
        tags=['timm-compat'],
        license='apache-2.0',
        paper_url=PAPER_URL,
):
    """Base of :class:`Extractor`, :class:`Head`, :class:`Interface` and :class:`Stitch`: folder format, Hub methods.

    Subclasses set ``role`` and implement ``component_config()`` (a JSON-able dict that rebuilds the module
    through ``from_config``) and ``interface_id``. Defining one registers its role in ``Component.registry``, which
    :func:`load_component` reads.
    """
    role: str = ''
    registry: Dict[str, type] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.role:
            Component.registry[cls.role] = cls

    def component_config(self) -> Dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def from_config(cls, config: Dict[str, Any]) -> 'Component':
        raise NotImplementedError

    @property
    def interface_id(self) -> Optional[str]:
        raise NotImplementedError

    def full_config(self) -> Dict[str, Any]:
        # After component_config(): a loaded component's config still holds the keys it was loaded with.
        return {**self.component_config(), 'role': self.role, 'format_version': FORMAT_VERSION,
                'interface_id': self.interface_id, 'architecture': architecture_of(self.role)}

    def save_pretrained(self, save_directory: Union[str, Path], *, repo_id: Optional[str] = None,
                        push_to_hub: bool = False, **push_to_hub_kwargs: Any) -> Optional[CommitInfo]:
        """Write the component folder: ``config.json``, ``model.safetensors`` and ``README.md``; optionally push it.

        Unlike ``ModelHubMixin.save_pretrained``, which deletes ``config.json`` first, the folder stays loadable as
        the previous or the new component at every instant: everything is serialised before anything is written,
        each file is replaced atomically, and the weights, written first, carry the new config (see
        ``timm_compat._integrity``). Files get the mode a plain ``open()`` would give them under the umask. As
        ``ModelHubMixin``, a ``README.md`` that timm-compat did not write is kept (with a warning); a card it wrote is
        replaced.

        Args:
            save_directory: Folder to write, created if missing.
            repo_id: The Hub repo the folder is for, named in the model card's usage snippet; with ``push_to_hub``,
                the repo to push to (default: the folder's name, as ``ModelHubMixin``).
            push_to_hub: Also upload the component with :meth:`push_to_hub`.
            **push_to_hub_kwargs: :meth:`push_to_hub`'s other arguments (``private``, ``commit_message``, ...).

        Returns:
            The ``huggingface_hub.CommitInfo`` of the upload with ``push_to_hub``, else None.

        Raises:
            ComponentError: The component cannot be rebuilt from a config, its config holds a value that is not
                plain JSON, or the folder holds a ``config.json`` that timm-compat did not write; nothing is written.
            TypeError: An argument ``push_to_hub`` does not take, or one given without ``push_to_hub=True``.
        """
        check_push_arguments(self.push_to_hub, push_to_hub, push_to_hub_kwargs)
        config = self.full_config()
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        config['weights_sha256'] = weights_digest(state)
        write_folder(save_directory, state, config, lambda: str(self.generate_model_card(repo_id)))
        if push_to_hub:
            return self.push_to_hub(repo_id or Path(save_directory).name, **push_to_hub_kwargs)
        return None

    def push_to_hub(self, repo_id: str, *, commit_message: Optional[str] = None, private: Optional[bool] = None,
                    token: Optional[str] = None, branch: Optional[str] = None,
                    create_pr: Optional[bool] = None) -> CommitInfo:
        """Create the Hub model repo ``repo_id`` if needed and upload the component folder in one commit.

        Args:
            repo_id: ``ORG/NAME`` (or ``NAME`` under your user).
            commit_message: Defaults to naming the role and interface id.
            private: Visibility of a newly created repo; ``None`` follows the organisation's default.
            token: Hub token; defaults to the one saved by ``hf auth login``.
            branch: Branch to commit to; defaults to ``main``.
            create_pr: Open a pull request instead of committing to ``branch``.

        Returns:
            The ``huggingface_hub.CommitInfo`` of the upload.

        Raises:
            ComponentError: The component cannot be rebuilt from a config, or its config holds a value that is not
                plain JSON; no repo is created then.
        """
        config = self.full_config()  # fail before creating a repo for a component that cannot be saved
        message = commit_message or f'Upload timm-compat {self.role} ({_interface_words(config["interface_id"])})'
        return push_folder(lambda tmp, repo: self.save_pretrained(tmp, repo_id=repo), repo_id, message, config=config,
                           private=private, token=token, branch=branch, create_pr=create_pr)

    def generate_model_card(self, repo_id: Optional[str] = None) -> ModelCard:
        """Model card whose YAML tags make the component findable by interface and role on the Hub.

        Its ``license`` is that of the pretrained weights the component started from, as timm records it
        (``pretrained_cfg['license']``), else apache-2.0.
        """
        config = self.full_config()
        iid = config['interface_id']
        tags = ['timm-compat', f'compat-role-{self.role}']
        if self.role != 'interface':
            tags.append('image-classification')
        if iid:
            tags.insert(1, f'compat-interface-{iid}')
        if config.get('backbone'):
            tags.append(f'timm-backbone-{config["backbone"]}')
        card_data = ModelCardData(
            library_name='timm-compat', license=config.get('pretrained_cfg', {}).get('license') or 'apache-2.0',
            tags=tags,
            base_model=config.get('base_model') or None,
            pipeline_tag={'extractor': 'image-feature-extraction', 'head': 'image-classification'}.get(self.role),
        )
        body = [
            f'# timm-compat {self.role}', '', self._summary(iid), '',
            '| field | value |', '|---|---|',
            *[f'| {k} | `{json.dumps(v)}` |' for k, v in sorted(config.items())
              if k in ('backbone', 'split', 'width', 'num_classes', 'interface_id', 'dcc_classes', 'rp')],
            *([f'| input | `{json.dumps(config["pretrained_cfg"])}` |'] if config.get('pretrained_cfg') else []),
            '',
            '## Usage', '', '```python', 'import timm_compat', '',
            *self._usage(repo_id or 'ORG/NAME', iid),
            '```', '', *self._timm_usage(repo_id or 'ORG/NAME'),
            *([f'Find components of the same interface: `python -m timm_compat.hub list --interface {iid}`; check '
               f'that two fit: `python -m timm_compat.hub check EXTRACTOR HEAD`.'] if iid else []),
        ]
        return ModelCard(f'---\n{card_data.to_yaml()}\n---\n\n' + '\n'.join(body) + '\n')

    def _summary(self, iid: Optional[str]) -> str:
        paper = f'[Gygli et al., AAAI 2021]({PAPER_URL})'
        a_role = f'{"An" if self.role[0] in "aeiou" else "A"} **{self.role}**'
        if self.role == 'interface':
            return (f'The **interface** `{iid}` of compatible network components ({paper}): the feature width and '
                    f'auxiliary heads that compatible extractors and heads are trained against.')
        if not iid:
            return (f'{a_role} of an independent network, trained without an interface ({paper}): no other '
                    f'component is compatible with it.')
        partner = {'extractor': 'head', 'head': 'extractor'}.get(self.role, 'extractor or head')
        return (f'{a_role} trained to be compatible with interface `{iid}` ({paper}): recombine it with any '
                f'{partner} of the same interface, with no fine-tuning.')

    def _usage(self, repo_id: str, iid: Optional[str]) -> List[str]:
        if self.role == 'interface':
            return ['# a new network compatible with every component of this interface (loaded frozen, so its aux',
                    '# heads stay as published); train it with the interface\'s losses, then push its components',
                    f'model = timm_compat.make_compatible("mobilenetv2_100", interface="{repo_id}", num_classes=10)']
        if not iid:
            return [f'{self.role} = timm_compat.load_component("{repo_id}")',
                    '# trained without an interface: timm_compat.recombine refuses it with any other component']
        other = 'head' if self.role == 'extractor' else 'extractor'
        return [f'{self.role} = timm_compat.load_component("{repo_id}")',
                f'# any {other} of interface {iid}: python -m timm_compat.hub list --interface {iid} --role {other}',
                f'{other} = timm_compat.load_component("ORG/{other.upper()}")',
                'model = timm_compat.recombine(extractor, head)  # refuses components of two interfaces']

    def _timm_usage(self, repo_id: str) -> List[str]:
        what = {'extractor': 'a feature model: `forward_features` gives the interface features',
                'head': 'interface features in, logits out'}.get(self.role)
        return [f'As a timm model ({what}); `import timm_compat` registers its architecture, '
                f'`{architecture_of(self.role)}`, which plain timm does not know:', '', '```python',
                'import timm, timm_compat', '', f'model = timm.create_model("hf-hub:{repo_id}", pretrained=True)',
                '```', ''] if what else []

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Union[str, Path], *, revision: Optional[str] = None,
                        cache_dir: Union[str, Path, None] = None, force_download: bool = False,
                        local_files_only: bool = False, token: Union[str, bool, None] = None,
                        map_location: Union[str, torch.device] = 'cpu') -> 'Component':
        """Load and verify a component from a local folder or a Hub repo (through the Hugging Face cache).

        On a subclass it loads that role only; on ``Component`` itself, any role, as :func:`load_component`.

        ``ModelHubMixin.from_pretrained`` is not used: it feeds ``config.json`` to ``__init__`` (our modules are
        rebuilt by ``from_config``) and lets cache misses escape unexplained.

        Args:
            pretrained_model_name_or_path: Local folder or Hub repo id.
            revision: Branch, tag or commit of the Hub repo.
            cache_dir: Hugging Face cache to use instead of the default.
            force_download: Download again even if cached.
            local_files_only: Only use the cache; never ask the Hub.
            token: Hub token for private or gated repos.
            map_location: Device to put the weights on.

        Raises:
            ComponentError: The folder or repo is missing, incomplete, corrupt, of another role or an older format;
                config.json was changed after saving; its config, weights metadata and weights disagree; or its
                ``model_args`` hold a key outside :data:`~timm_compat.components.ARCHITECTURE_ARGS`.
        """
        model_id = str(pretrained_model_name_or_path)
        resolve = dict(revision=revision, cache_dir=cache_dir, force_download=force_download,
                       local_files_only=local_files_only, token=token)
        return cls.from_verified(model_id, *read_verified(model_id, resolve), map_location=map_location)

    @classmethod
    def from_verified(cls, model_id: str, config: Dict[str, Any], tensors: Dict[str, torch.Tensor], *,
                      map_location: Union[str, torch.device] = 'cpu') -> 'Component':
        """The component ``read_verified`` read, as the class its verified config names (``cls`` on a subclass).

        The weights keep their saved dtypes: a half-precision component loads, and hashes, as it was saved, and its
        rebuilt non-persistent buffers take the weights' dtype.
        """
        role = config['role']
        if cls.role and role != cls.role:
            raise ComponentError(
                f'{model_id} holds a component of role {role!r}, not {cls.role!r}: '
                f'use timm_compat.load_component() to load any role.')
        if role == 'recombined':
            raise ComponentError(f'{model_id} is a recombined model (an extractor and a head saved as one): load it '
                                 f'with timm_compat.load_recombined().')
        if role not in Component.registry:
            raise ComponentError(
                f'{model_id} holds a component of role {role!r}, which no imported module defines (known: '
                f'{sorted(Component.registry)}): import the module that defines it (e.g. timm_compat.stitching for '
                f'"stitch"), or upgrade timm-compat.')
        try:
            module = Component.registry[role].from_config(config)
        except ComponentError:
            raise
        except ValueError as e:  # timm or the split probe refusing the recorded architecture
            raise ComponentError(
                f'{model_id}: cannot rebuild the architecture in {CONFIG_NAME}: {e} The config does not describe a '
                f'model this timm builds (an older timm-compat did not record the img_size/in_chans a '
                f'pretrained_cfg_overlay input_size built it with): build the component again with make_compatible '
                f'and save it.') from e
        _check_shapes(module, tensors, model_id)
        missing, unexpected = module.load_state_dict(tensors, strict=False, assign=True)
        if missing or unexpected:
            raise ComponentError(
                f'{model_id}: weights do not fit the architecture in config.json '
                f'(missing {missing[:5]}, unexpected {unexpected[:5]}). Save the component again.')
        _cast_rebuilt_buffers(module, tensors)  # every buffer not in the file is a non-persistent one (none missing)
        module.verify_loaded(config, model_id)
        module.to(map_location)
        module.eval()
        return module

    def verify_loaded(self, config: Dict[str, Any], model_id: str) -> None:
        """Hook for checks that need the loaded weights (an interface recomputes its id)."""


def load_component(repo_id_or_dir, *, revision: Optional[str] = None, cache_dir=None, force_download: bool = False,
                   local_files_only: bool = False, token: Union[str, bool, None] = None,
                   map_location: Union[str, torch.device] = 'cpu') -> Component:
    """Load any component as the type its ``config.json`` names: :class:`Extractor`, :class:`Head`,
    :class:`Interface`, or any other registered :class:`Component` role.

    Args:
        repo_id_or_dir: Hub repo id (``ORG/NAME``) or local component folder.
        revision, cache_dir, force_download, local_files_only, token, map_location: As
            :meth:`Component.from_pretrained <timm_compat.Component.from_pretrained>`.

    Raises:
        ComponentError: As ``from_pretrained``, or a role this version does not know.

    Example:
        >>> extractor = timm_compat.load_component('org/cifar-resnet56-extractor')
        >>> head = timm_compat.load_component('org/stl-mobilenetv2-head')
        >>> model = timm_compat.recombine(extractor, head)
    """
    return Component.from_pretrained(repo_id_or_dir, revision=revision, cache_dir=cache_dir,
                                     force_download=force_download, local_files_only=local_files_only, token=token,
                                     map_location=map_location)
