"""The component folder format and its Hub round trip.

Every component (extractor, head, interface) is a folder, local or a Hub model repo::

    config.json        role, timm backbone + model_args, split, width, interface id, pretrained_cfg, ...
    model.safetensors  weights; __metadata__ carries role and interface id
    README.md          model card: YAML front matter with compat-interface-<id> / compat-role-<role> tags

:class:`Component` gives each type ``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` through
``huggingface_hub.ModelHubMixin``. Loading reads safetensors only, and checks that config, metadata and (for an
interface) the weights themselves agree on the interface id.
"""
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import torch
from torch import nn
from huggingface_hub import ModelCard, ModelCardData, ModelHubMixin, hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError, LocalEntryNotFoundError, OfflineModeIsEnabled, RepositoryNotFoundError, RevisionNotFoundError)
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

__all__ = ['Component', 'ComponentError', 'CONFIG_NAME', 'WEIGHTS_NAME', 'FORMAT_VERSION']

CONFIG_NAME = 'config.json'
WEIGHTS_NAME = 'model.safetensors'
FORMAT_VERSION = 1
PICKLE_NAMES = ('pytorch_model.bin', 'model.bin', 'model.pt', 'model.pth', 'model.ckpt')
PAPER_URL = 'https://arxiv.org/abs/2004.03898'


class ComponentError(ValueError):
    """A component folder or repo that cannot be loaded as asked, with what to do about it."""


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.tmp')
    try:
        with os.fdopen(fd, 'wb') as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _atomic_save_safetensors(tensors: Dict[str, torch.Tensor], path: Path, metadata: Dict[str, str]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.tmp')
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _resolve_file(model_id: str, filename: str, *, revision: Optional[str], cache_dir, force_download: bool,
                  local_files_only: bool, token) -> Path:
    """Path of ``filename`` in a local folder or a Hub repo, with errors that say what went wrong."""
    if os.path.isdir(model_id):
        path = Path(model_id) / filename
        if not path.is_file():
            pickles = [p for p in PICKLE_NAMES if (Path(model_id) / p).exists()]
            if filename == WEIGHTS_NAME and pickles:
                raise ComponentError(
                    f'{model_id} holds {pickles[0]} but no {WEIGHTS_NAME}. Pickled weights are never loaded; '
                    f'convert them to safetensors where you trust the file (safetensors.torch.save_file).')
            raise ComponentError(f'{model_id} is not a timm-compat component: {filename} is missing. '
                                 f'Save components with .save_pretrained(dir).')
        return path
    try:
        return Path(hf_hub_download(model_id, filename, revision=revision, cache_dir=cache_dir,
                                    force_download=force_download, local_files_only=local_files_only, token=token))
    except RepositoryNotFoundError as e:
        raise ComponentError(f'Hub repo {model_id!r} not found (or private: pass token=...).') from e
    except RevisionNotFoundError as e:
        raise ComponentError(f'Hub repo {model_id!r} has no revision {revision!r}.') from e
    except EntryNotFoundError as e:
        raise ComponentError(f'Hub repo {model_id!r} has no {filename}: it is not a timm-compat component.') from e
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as e:
        offline = os.environ.get('HF_HUB_OFFLINE', '') not in ('', '0', 'false', 'False')
        why = ('HF_HUB_OFFLINE is set, and the file is not in the local cache: unset HF_HUB_OFFLINE or '
               'download it first') if offline else 'the Hub cannot be reached and the file is not cached'
        raise ComponentError(f'Cannot fetch {filename} of {model_id!r}: {why}. Not a local folder either.') from e


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
    """Base of :class:`Extractor`, :class:`Head` and :class:`Interface`: the folder format and Hub methods.

    Subclasses set ``role`` and implement ``component_config()`` (a JSON-able dict that rebuilds the module
    through ``from_config``) and ``interface_id``.
    """
    role: str = ''

    def component_config(self) -> Dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def from_config(cls, config: Dict[str, Any]) -> 'Component':
        raise NotImplementedError

    @property
    def interface_id(self) -> Optional[str]:
        raise NotImplementedError

    def full_config(self) -> Dict[str, Any]:
        return {'role': self.role, 'format_version': FORMAT_VERSION, **self.component_config(),
                'interface_id': self.interface_id}

    # ModelHubMixin hooks ------------------------------------------------------------------------------------
    def _save_pretrained(self, save_directory: Path) -> None:
        config = self.full_config()
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        metadata = {'format': 'pt', 'role': self.role, 'interface_id': str(config['interface_id'])}
        # Weights first, config last: a folder with a config always has the weights that config describes.
        _atomic_save_safetensors(state, save_directory / WEIGHTS_NAME, metadata)
        _atomic_write_bytes(save_directory / CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True).encode())
        _atomic_write_bytes(save_directory / 'README.md', str(self.generate_model_card()).encode())

    def generate_model_card(self, *args, **kwargs) -> ModelCard:
        config = self.full_config()
        iid = config['interface_id']
        tags = ['timm-compat', f'compat-role-{self.role}', 'image-classification']
        if iid:
            tags.insert(1, f'compat-interface-{iid}')
        if config.get('backbone'):
            tags.append(f'timm-backbone-{config["backbone"]}')
        card_data = ModelCardData(
            library_name='timm-compat', license='apache-2.0', tags=tags,
            base_model=config.get('base_model') or None,
        )
        cls_name = type(self).__name__
        body = [
            f'# timm-compat {self.role}',
            '',
            f'{"An" if self.role[0] in "aeiou" else "A"} **{self.role}** trained to be compatible with interface `{iid}` '
            f'([Gygli et al., AAAI 2021]({PAPER_URL})): recombine it with any extractor or head of the same '
            f'interface, with no fine-tuning.',
            '',
            '| field | value |', '|---|---|',
            *[f'| {k} | `{json.dumps(v)}` |' for k, v in sorted(config.items())
              if k in ('backbone', 'split', 'width', 'num_classes', 'interface_id', 'dcc_classes', 'rp')],
            '',
            '## Usage', '', '```python', 'import timm_compat', '',
            f'{self.role} = timm_compat.{cls_name}.from_pretrained("REPO_ID")',
            'model = timm_compat.recombine(extractor, head)  # refuses components of two interfaces',
            '```', '',
            f'Find components of the same interface: `python -m timm_compat.hub list --interface {iid}`.',
        ]
        return ModelCard(f'---\n{card_data.to_yaml()}\n---\n\n' + '\n'.join(body) + '\n')

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision: Optional[str], cache_dir, force_download: bool,
                         local_files_only: bool, token, map_location: Union[str, torch.device] = 'cpu',
                         **unused) -> 'Component':
        resolve = dict(revision=revision, cache_dir=cache_dir, force_download=force_download,
                       local_files_only=local_files_only, token=token)
        config_path = _resolve_file(model_id, CONFIG_NAME, **resolve)
        try:
            config = json.loads(config_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ComponentError(f'{config_path} is not valid JSON ({e}). Save the component again.') from e
        if cls.role and config.get('role') != cls.role:
            raise ComponentError(
                f'{model_id} is a {config.get("role")!r} component, not a {cls.role!r}: '
                f'use timm_compat.load_component() to load any role.')
        tensors, metadata = _read_safetensors(_resolve_file(model_id, WEIGHTS_NAME, **resolve))
        if metadata.get('role') != config['role'] or metadata.get('interface_id') != str(config.get('interface_id')):
            raise ComponentError(
                f'{model_id}: config.json says role={config["role"]!r}, interface={config.get("interface_id")!r} but '
                f'the weights say role={metadata.get("role")!r}, interface={metadata.get("interface_id")!r}. '
                f'The files do not belong together; download or save the component again.')
        module = cls.from_config(config)
        missing, unexpected = module.load_state_dict(tensors, strict=False)
        if missing or unexpected:
            raise ComponentError(
                f'{model_id}: weights do not fit the architecture in config.json '
                f'(missing {missing[:5]}, unexpected {unexpected[:5]}). Save the component again.')
        module.verify_loaded(config, model_id)
        module.to(map_location)
        module.eval()
        return module

    def verify_loaded(self, config: Dict[str, Any], model_id: str) -> None:
        """Hook for checks that need the loaded weights (an interface recomputes its id)."""
