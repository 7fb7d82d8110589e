"""Writing a component-format folder (``model.safetensors``, ``config.json``, ``README.md``), locally or to the Hub.

Shared by components (:mod:`timm_compat.component`) and recombined models (:mod:`timm_compat.recombined`). A save
writes into a folder that may hold files of its own: a ``config.json`` that timm-compat did not write is refused
before anything is written, and a ``README.md`` it did not write is kept, as ``huggingface_hub.ModelHubMixin``
keeps any existing one; a card timm-compat wrote is replaced, so that its tags name the component saved now.
"""
import inspect
import json
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Union

import torch
from huggingface_hub import CommitInfo, HfApi, ModelCard
from huggingface_hub.utils import SoftTemporaryDirectory

from ._files import CONFIG_NAME, WEIGHTS_NAME
from ._integrity import (
    ComponentError, atomic_save_safetensors, atomic_write_bytes, config_metadata, config_text)

__all__ = ['CARD_NAME', 'check_push_arguments', 'push_folder', 'write_folder']

CARD_NAME = 'README.md'


def check_push_arguments(push_to_hub_method: Callable, push_to_hub: bool, kwargs: Dict[str, Any]) -> None:
    """Refuse, before a save writes anything, ``save_pretrained`` arguments meant for ``push_to_hub`` that it does not
    take, or that come without ``push_to_hub=True``: a typo must not leave a saved but unpushed folder."""
    if kwargs:
        inspect.signature(push_to_hub_method).bind('repo', **kwargs)
        if not push_to_hub:
            raise TypeError(f'{sorted(kwargs)} are push_to_hub arguments: pass push_to_hub=True to push, or drop them.')


def _check_own_config(directory: Path) -> None:
    """Refuse a folder whose ``config.json`` timm-compat did not write (another library's model), which a save would
    silently replace."""
    path = directory / CONFIG_NAME
    if not path.is_file():
        return
    try:
        config = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        config = None
    if not isinstance(config, dict) or 'role' not in config:
        raise ComponentError(
            f'{directory} holds a {CONFIG_NAME} that timm-compat did not write (it has no "role"): saving here would '
            f'replace another model\'s config. Save to another folder, or delete {path} first if it is not needed.')


def _own_card(path: Path) -> bool:
    """Whether the ``README.md`` at ``path`` is missing or a card timm-compat generated (tagged ``timm-compat``)."""
    if not path.is_file():
        return True
    try:
        tags = ModelCard(path.read_text(), ignore_metadata_errors=True).data.tags or []
    except (ValueError, UnicodeDecodeError):
        return False
    return 'timm-compat' in tags


def write_folder(directory: Union[str, Path], tensors: Dict[str, torch.Tensor], config: Dict[str, Any],
                 card: Callable[[], str]) -> None:
    """Write a component-format folder: ``model.safetensors``, ``config.json``, ``README.md``.

    Everything is serialised and checked before anything is written, each file is replaced atomically, and the
    weights, written first, carry the new config (``timm_compat._integrity``), so the folder loads as the old or the
    new content at every instant. ``card`` is called once the config is known to be plain JSON, which
    ``config_text`` checks with an error naming the bad key.

    Raises:
        ComponentError: The config is not plain JSON, or the folder holds another library's ``config.json``.
    """
    text = config_text(config)
    card_text = card()
    directory = Path(directory)
    _check_own_config(directory)
    write_card = _own_card(directory / CARD_NAME)
    directory.mkdir(parents=True, exist_ok=True)
    metadata = {'format': 'pt', 'role': config['role'], 'interface_id': str(config['interface_id']),
                **config_metadata(text, previous=directory / CONFIG_NAME)}
    atomic_save_safetensors(tensors, directory / WEIGHTS_NAME, metadata)
    atomic_write_bytes(directory / CONFIG_NAME, text.encode())
    if write_card:
        atomic_write_bytes(directory / CARD_NAME, card_text.encode())
    else:
        warnings.warn(f'{directory / CARD_NAME} was not written by timm-compat, so it is kept: it lacks the tags '
                      f'(compat-interface-..., compat-role-...) that make the component findable on the Hub. '
                      f'push_to_hub uploads a generated card; delete the file to have save_pretrained write one.',
                      stacklevel=3)


def push_folder(save, repo_id: str, commit_message, *, config: Dict[str, Any], private: Optional[bool] = None,
                token: Optional[str] = None, branch: Optional[str] = None,
                create_pr: Optional[bool] = None) -> CommitInfo:
    """Create the Hub model repo if needed, ``save(tmp, repo_id)`` a folder and upload it in one commit.

    ``config`` (what ``save`` will write as ``config.json``) is checked to be plain JSON first: a component that cannot
    be saved must not leave an empty repo behind. ``commit_message`` is a string, or a function of what ``save``
    returned.
    """
    config_text(config)  # raises ComponentError naming the bad key, before anything is created
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    with SoftTemporaryDirectory() as tmp:
        saved = save(tmp, repo_id)
        message = commit_message(saved) if callable(commit_message) else commit_message
        return api.upload_folder(repo_id=repo_id, repo_type='model', folder_path=tmp, revision=branch,
                                 create_pr=create_pr, commit_message=message)
