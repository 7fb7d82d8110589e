"""What keeps a component folder whole: atomic writes, the weights digest, and the config recorded in the weights.

A save writes ``model.safetensors`` first, with the exact config in its ``__metadata__``, then ``config.json``.
Loading accepts ``config.json`` only when it equals that recorded config, or when it is the config an interrupted save
was replacing (recorded as ``replaces_config_sha256``): then the weights' own copy is used. So a folder loads as the
old or the new component at every instant of a save, and an edit of ``config.json`` that keeps tensor shapes (class
names in another order, another mean/std) is caught instead of silently changing predictions.
"""
import contextlib
import hashlib
import json
import math
import os
import secrets
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import safetensors.torch
import torch

__all__ = ['FORMAT_VERSION', 'ComponentError', 'atomic_write_bytes', 'atomic_write_text', 'atomic_save_safetensors',
           'config_text', 'config_metadata', 'recorded_config', 'weights_digest']

FORMAT_VERSION = 2


class ComponentError(ValueError):
    """A component folder or repo that cannot be loaded as asked, with what to do about it."""


def _create_temp(path: Path) -> Tuple[int, Path]:
    """Create a new, empty temporary file beside ``path``; return its descriptor and path.

    The file gets the mode a plain ``open()`` would give it (``0o666`` less the umask, and any default ACL):
    ``tempfile.mkstemp`` makes it 0600 whatever the umask, so a team sharing a folder could not read the result.
    """
    tmp = path.with_name(f'.{path.name}.{secrets.token_hex(8)}.tmp')
    return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, 'O_BINARY', 0), 0o666), tmp


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` in one rename, after the data is on disk."""
    fd, tmp = _create_temp(path)
    try:
        with os.fdopen(fd, 'wb') as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` (UTF-8) in one rename, after the data is on disk."""
    atomic_write_bytes(Path(path), text.encode())


def atomic_save_safetensors(tensors: Dict[str, torch.Tensor], path: Path, metadata: Dict[str, str]) -> None:
    """Write ``tensors`` as safetensors to ``path`` in one rename, after the data is on disk."""
    # Serialised in memory: safetensors' save_file writes through a file of its own, 0600 whatever the umask.
    atomic_write_bytes(path, safetensors.torch.save(tensors, metadata=metadata))


def weights_digest(tensors: Dict[str, torch.Tensor], prefix: bytes = b'') -> str:
    """SHA-256 over ``prefix``, then every tensor's name, dtype, element count and bytes, in name order.

    An interface's id is this digest over its spec and weights; a component's ``weights_sha256``, over its weights.
    Shapes are not covered (each tensor is hashed flat, and ids of saved components depend on it): loading checks
    them against the architecture the config rebuilds.
    """
    h = hashlib.sha256(prefix)
    for name, tensor in sorted(tensors.items()):
        t = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(f'{name}:{t.dtype}:{tuple(t.shape)}'.encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b'')
    return h.hexdigest()


def _non_json(value: Any, where: str) -> Optional[Tuple[str, Any]]:
    """``(path, value)`` of the first value that plain JSON cannot hold exactly, or None."""
    if isinstance(value, dict):
        for key, item in value.items():
            found = (f'{where} key', key) if not isinstance(key, str) else _non_json(item, f'{where}.{key}')
            if found:
                return found
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            if found := _non_json(item, f'{where}[{i}]'):
                return found
    elif isinstance(value, float) and not math.isfinite(value):
        return where, value
    elif isinstance(value, str):  # a str subclass (np.str_ from np.unique) is written as the plain string it holds
        return None
    elif value is not None and type(value) not in (int, float, bool):
        return where, value
    return None


def config_text(config: Dict[str, Any]) -> str:
    """The text of ``config.json``.

    Raises:
        ComponentError: A value is not plain JSON (a tensor, a NumPy number, NaN), named with its path.
    """
    if bad := _non_json(config, 'config'):
        where, value = bad
        raise ComponentError(
            f'Cannot save the component: {where} = {value!r} ({type(value).__name__}) is not plain JSON. Convert it '
            f'first (a tensor with .tolist(), a NumPy number with int() or float(); no NaN or inf).')
    return json.dumps(config, indent=2, sort_keys=True)


def _canonical(config: Dict[str, Any]) -> str:
    return json.dumps(config, sort_keys=True, separators=(',', ':'))


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def config_metadata(text: str, previous: Path) -> Dict[str, str]:
    """Weights metadata that records the config saved as ``text`` and the ``previous`` config.json it replaces."""
    metadata = {'config': _canonical(json.loads(text))}
    with contextlib.suppress(OSError, ValueError):
        metadata['replaces_config_sha256'] = _sha256(_canonical(json.loads(previous.read_text())))
    return metadata


def recorded_config(model_id: str, config: Dict[str, Any], metadata: Dict[str, str]) -> Dict[str, Any]:
    """The config the weights were saved with, once ``config.json``'s ``config`` is checked against it.

    Raises:
        ComponentError: An older format, or a ``config.json`` changed after saving.
    """
    if config.get('format_version', 0) < FORMAT_VERSION:
        raise ComponentError(
            f'{model_id} was saved in component format {config.get("format_version", 0)} by an older timm-compat, '
            f'before config.json was protected by the weights and before interface ids were unique (an id then did '
            f'not tell unrelated interfaces apart). Train it again with this version.')
    try:
        saved = json.loads(metadata['config'])
    except (KeyError, ValueError):
        saved = None
    if not isinstance(saved, dict):
        raise ComponentError(f'{model_id}: model.safetensors holds no readable record of its config, so it was not '
                             f'saved with this config.json. Download or save the component again.')
    if _canonical(config) == _canonical(saved) or _sha256(_canonical(config)) == metadata.get('replaces_config_sha256'):
        return saved  # the second case: a save stopped between the weights and config.json; the weights are new
    changed = sorted(k for k in set(config) | set(saved) if config.get(k) != saved.get(k))
    raise ComponentError(
        f'{model_id}: config.json was changed after saving ({", ".join(changed)}): it differs from the config '
        f'recorded in model.safetensors. Edits that keep tensor shapes (class_names, pretrained_cfg mean/std) would '
        f'silently change predictions, so the component is refused. Restore config.json (download or save the '
        f'component again); to change a component, load it, change it in Python and save_pretrained() it.')
