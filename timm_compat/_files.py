"""Where a component's files come from: a local folder, or a Hub repo through the Hugging Face cache.

:func:`resolve_file` turns the Hub's and the cache's failures into :class:`ComponentError` messages that say what to
do; :func:`pinned` fixes the commit of one load; :func:`read_config` checks a ``config.json`` is one this version
can load.
"""
import json
import os
import re
from pathlib import Path
from typing import Any, Dict, Optional

from huggingface_hub import constants, hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError, HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError)

from ._integrity import FORMAT_VERSION, ComponentError

__all__ = ['CONFIG_NAME', 'WEIGHTS_NAME', 'PICKLE_SUFFIXES', 'resolve_file', 'pinned', 'read_config']

CONFIG_NAME = 'config.json'
WEIGHTS_NAME = 'model.safetensors'
PICKLE_SUFFIXES = ('.bin', '.pt', '.pth', '.ckpt', '.pkl', '.pickle')


def _offline() -> bool:
    # huggingface_hub 0.30 (the floor) has only the constant that later versions' is_offline_mode() returns.
    is_offline_mode = getattr(constants, 'is_offline_mode', None)
    return is_offline_mode() if is_offline_mode else constants.HF_HUB_OFFLINE


def resolve_file(model_id: str, filename: str, *, revision: Optional[str] = None, cache_dir=None,
                 force_download: bool = False, local_files_only: bool = False, token=None,
                 hub_only: bool = False) -> Path:
    """Path of ``filename`` in a local folder, or in a Hub repo through ``hf_hub_download`` and its cache.

    Raises:
        ComponentError: The file is missing, only pickled weights are offered, or the repo cannot be found or
            reached; the message says which.
    """
    if not hub_only and os.path.isdir(model_id):
        if revision is not None:
            raise ComponentError(f'revision={revision!r}: {model_id} is a local folder, which has no revisions; '
                                 f'drop revision= or give a Hub repo id.')
        path = Path(model_id) / filename
        if not path.is_file():
            pickles = sorted(p.name for p in Path(model_id).iterdir() if p.suffix in PICKLE_SUFFIXES)
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
    except HFValidationError as e:
        raise ComponentError(f'{model_id!r} is neither a local folder nor a Hub repo id (ORG/NAME): '
                             f'check the path.') from e
    except RepositoryNotFoundError as e:
        raise ComponentError(f'Hub repo {model_id!r} not found (and no local folder of that name). If it is private '
                             f'or gated, log in with `hf auth login` or pass token=...') from e
    except RevisionNotFoundError as e:
        raise ComponentError(f'Hub repo {model_id!r} has no revision {revision!r}.') from e
    except LocalEntryNotFoundError as e:  # before EntryNotFoundError, its base: a cache miss, not a missing file
        if _offline():
            why = ('HF_HUB_OFFLINE is set, so the Hub was not asked (offline, a repo id that does not exist looks '
                   'the same). Unset HF_HUB_OFFLINE to download it, or check the repo id')
        elif local_files_only:
            why = 'local_files_only=True: pass local_files_only=False to download it'
        else:
            why = (f'the Hub ({constants.ENDPOINT}) could not be reached. Check the connection, or set '
                   f'HF_HUB_OFFLINE=1 to use cached components only')
        raise ComponentError(f'{filename} of Hub repo {model_id!r} is not in the local cache, and {why}. '
                             f'(There is no local folder {model_id!r} either.)') from e
    except EntryNotFoundError as e:
        raise ComponentError(f'Hub repo {model_id!r} has no {filename}: it is not a timm-compat component '
                             f'(pickled weights are never loaded).') from e


def read_config(model_id: str, **resolve: Any) -> Dict[str, Any]:
    """The ``config.json`` of a component folder or repo, checked to be one this version can load.

    Args:
        model_id: Local folder or Hub repo id.
        **resolve: ``revision``, ``cache_dir``, ``force_download``, ``local_files_only``, ``token``.
    """
    path = resolve_file(model_id, CONFIG_NAME, **resolve)
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ComponentError(f'{path} is not valid JSON ({e}). Save the component again.') from e
    if not isinstance(config, dict) or 'role' not in config:
        raise ComponentError(f'{model_id}: {CONFIG_NAME} has no "role": it is not a timm-compat component.')
    version = config.get('format_version', 0)
    if type(version) is not int:
        raise ComponentError(f'{model_id}: {CONFIG_NAME} format_version {version!r} is not an integer: the folder was '
                             f'not written by timm-compat, or was edited. Save the component again.')
    if version > FORMAT_VERSION:
        raise ComponentError(f'{model_id} was saved in component format {config["format_version"]}, newer than '
                             f'this timm-compat reads ({FORMAT_VERSION}): upgrade timm-compat.')
    return config


def pinned(model_id: str, resolve: Dict[str, Any]) -> Dict[str, Any]:
    """``resolve`` with ``revision`` fixed to the commit a Hub repo's ``config.json`` is downloaded from.

    ``hf_hub_download`` resolves a branch (``main`` by default) anew for every file, so a push between the
    downloads of one component's files would pair a config and weights of two commits, which the digest check would
    then report as tampering. Every later file of the load is read at this commit. Local folders are returned as
    they are.
    """
    if not resolve.get('hub_only') and os.path.isdir(model_id):
        return resolve
    commit = resolve_file(model_id, CONFIG_NAME, **resolve).parent.name
    # The cache keeps a downloaded file under snapshots/<commit sha>/; any other layout names no commit to pin.
    return {**resolve, 'revision': commit} if re.fullmatch('[0-9a-f]{40}', commit) else resolve
