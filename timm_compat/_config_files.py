"""Reading run configs from YAML files for :mod:`timm_compat.config`: ``base:`` chains, data presets, ``--set``.

A config file may name a ``base:`` file (relative to it) that it refines, recursively. Merging a file over its
base:

* mappings merge key by key;
* lists of named mappings (``networks``) merge by ``name``: an entry refines the base's entry of the same name, an
  entry with a new name is appended, entries the file does not name are kept as they are;
* a mapping of indices over a list patches it by position, as ``--set networks.0.key=...`` does: ``{0: {load:
  x}}`` refines the first item, ``{1: null}`` removes the second;
* anything else (other lists too) is replaced.

The preset, then the root of the chain, then each file down to the one loaded, is merged over what came before
it, so an edit by position applies to the list as the files above it left it.

A file may choose a data preset, ``data: NAME``: the file ``data/NAME.yaml`` next to the nearest file of the chain
that has one. The preset lies under the whole chain (it gives the networks, by name and dataset; the files refine them),
``--set data=NAME`` picks another one, and ``{data}`` in any string becomes NAME (output folders). In a network's
strings ``{name}`` becomes the network's name.
"""
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

from ._config_errors import ConfigError

__all__ = ['read_config_file', 'split_preset', 'set_dotted']

PRESET_KEY = 'data'
PRESET_DIR = 'data'


def set_dotted(data: Dict[str, Any], dotted: str) -> None:
    """Apply one ``key.path=value`` override (value parsed as YAML) to ``data`` in place."""
    if '=' not in dotted:
        raise ConfigError(f'Override {dotted!r} must look like key.path=value, e.g. interface.rp=false.')
    path, raw = dotted.split('=', 1)
    keys, node = path.split('.'), data
    try:
        for depth, key in enumerate(keys[:-1]):
            node = node[_index(key)] if isinstance(node, list) else node.setdefault(key, {})
            _must_be_section(node, '.'.join(keys[:depth + 1]), dotted)
        value = yaml.safe_load(raw)
        if isinstance(node, list):
            node[_index(keys[-1])] = value
        else:
            node[keys[-1]] = value
    except ConfigError:
        raise
    except (ValueError, IndexError, TypeError, AttributeError, yaml.YAMLError) as e:
        raise ConfigError(f'Override {dotted!r}: {path!r} names no config key that can be set to {raw!r} ({e}); '
                          f'e.g. networks.0.dataset.train_limit=1000.') from None


def _index(key: str) -> int:
    """A list position of an override, counted from the first item as a config file's ``{0: ...}`` patches are:
    Python's negative positions (networks.-1, the last) are refused, as positions past the end are."""
    if int(key) < 0:
        raise IndexError(f'list index {key}: indices count from 0')
    return int(key)


def _must_be_section(node: Any, section: str, dotted: str) -> None:
    # Without this a null or scalar value fails with Python's own TypeError, which names no way out.
    if node is None:
        raise ConfigError(f'Override {dotted!r}: {section!r} is null in this config, so it has no keys to set: set '
                          f'{section} itself (--set {section}=VALUE).')
    if not isinstance(node, (dict, list)):
        raise ConfigError(f'Override {dotted!r}: {section!r} is {node!r}, not a section: {dotted.split("=")[0]!r} '
                          f'names no config key; set {section} itself (--set {section}=VALUE).')


def split_preset(overrides: Sequence[str]) -> Tuple[Optional[str], List[str]]:
    """The data preset that ``data=NAME`` overrides choose (the last wins), and the other overrides."""
    chosen = [o.partition('=')[2].strip().strip('"\'') for o in overrides if o.split('=', 1)[0].strip() == PRESET_KEY]
    if not all(chosen):
        raise ConfigError(f'The override {PRESET_KEY!r} names no data preset: write {PRESET_KEY}=NAME (--set '
                          f'{PRESET_KEY}=NAME), NAME.yaml a file of the {PRESET_DIR}/ folder beside the config.')
    rest = [o for o in overrides if o.split('=', 1)[0].strip() != PRESET_KEY]
    return (chosen[-1] if chosen else None), rest


def _named(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, dict) and 'name' in v for v in value)


def _merge_named(base: List[Dict[str, Any]], update: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Entries of ``update`` over the entries of ``base`` with the same ``name``; new names go last."""
    out = list(base)
    for entry in update:
        at = next((i for i, old in enumerate(out) if old['name'] == entry['name']), None)
        if at is None:
            out.append(entry)
        else:
            out[at] = _merge(out[at], entry)
    return out


def _patch(base: List[Any], patches: Dict[Any, Any], key: str) -> List[Any]:
    """``{index: patch}`` over ``base``: a mapping refines the item, null removes it, anything else replaces it."""
    bad = [i for i in patches if type(i) is not int or not 0 <= i < len(base)]
    if bad:
        raise ConfigError(f'{key}: {bad} name no item of the {len(base)} in the base; patch a list by position as '
                          f'{{0: {{...}}}}, or by name as a list of entries with name: set.')
    out = [_merge(item, patches[i]) if isinstance(patches.get(i), dict) and isinstance(item, dict)
           else patches.get(i, item) for i, item in enumerate(base)]
    return [item for i, item in enumerate(out) if not (i in patches and patches[i] is None)]


def _merge(base: Dict[str, Any], update: Dict[str, Any]) -> Dict[str, Any]:
    """``update`` over ``base``, by the rules in the module docstring."""
    out = dict(base)
    for key, value in update.items():
        old = out.get(key)
        if isinstance(value, dict) and isinstance(old, dict):
            out[key] = _merge(old, value)
        elif isinstance(value, dict) and isinstance(old, list):
            out[key] = _patch(old, value, key)
        elif value and _named(value) and _named(old):
            out[key] = _merge_named(old, value)
        else:
            out[key] = value
    return out


def _read_chain(path: Path, seen: Sequence[Path] = ()) -> List[Tuple[Path, Dict[str, Any]]]:
    """A config file and the files its ``base:`` keys name (relative to each), root first: ``(path, keys)``."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f'Config files include each other in a loop: {[str(p) for p in seen]} -> {path}.')
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f'Cannot read config file {path}: {e}') from None
    if not isinstance(data, dict):
        raise ConfigError(f'{path} must hold a YAML mapping of config keys, e.g. "batch_size: 64".')
    base = data.pop('base', None)
    # Anything but a file name crashed (PosixPath / 5), and "" read as no base: the file would run unrefined.
    if base is not None and not (isinstance(base, str) and base):
        raise ConfigError(f'{path}: base must be the path of a config file (relative to this one), e.g. base: '
                          f'base.yaml; got {base!r}.')
    return (_read_chain(path.parent / base, [*seen, path]) if base is not None else []) + [(path, data)]


def _read_yaml(path: Path) -> Dict[str, Any]:
    """A config file merged over the files of its ``base:`` chain, each over the ones before it in turn (so that an
    edit by position applies to the list as its base left it)."""
    data = {}
    for _, layer in _read_chain(path):
        data = _merge(data, layer)
    return data


def _fill(value: Any, token: str, text: str) -> Any:
    """``value`` with ``token`` replaced by ``text`` in every string in it."""
    if isinstance(value, str):
        return value.replace(token, text)
    if isinstance(value, dict):
        return {k: _fill(v, token, text) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, token, text) for v in value]
    return value


def _preset(paths: Sequence[Path], name: str) -> Dict[str, Any]:
    """The data preset ``name``: ``data/NAME.yaml`` beside the nearest file of the chain ``paths`` (child first)
    that has one."""
    folders = [p.parent / PRESET_DIR for p in paths]
    found = next((f / f'{name}.yaml' for f in folders if (f / f'{name}.yaml').is_file()), None)
    if not re.fullmatch(r'[A-Za-z0-9][\w.-]*', name) or found is None:
        choices = sorted({p.stem for f in folders for p in f.glob('*.yaml')})
        where = f'choose one of {choices}' if choices else f'{paths[0]} has no data presets ({folders[0]}/NAME.yaml)'
        raise ConfigError(f'data: {name!r} is no data preset; {where}, e.g. --set data={(choices or ["NAME"])[0]}.')
    preset = _read_yaml(found)
    if PRESET_KEY in preset:
        raise ConfigError(f'The data preset {found} sets data: itself; a preset cannot choose another.')
    return preset


def read_config_file(path: Path, preset: Optional[str] = None) -> Dict[str, Any]:
    """The config at ``path`` (its ``base:`` chain merged) over its data preset, placeholders filled.

    Args:
        path: A YAML config file.
        preset: A data preset replacing the one the files choose (``--set data=NAME``).
    """
    chain = _read_chain(path)
    name = preset or next((layer[PRESET_KEY] for _, layer in reversed(chain) if PRESET_KEY in layer), None)
    data = _preset([p for p, _ in reversed(chain)], str(name)) if name is not None else {}
    for _, layer in chain:  # each file over the preset and the files before it, as the user reads the chain
        data = _merge(data, {k: v for k, v in layer.items() if k != PRESET_KEY})
    if name is not None:
        data = _fill(data, '{data}', str(name))
    elif '{data}' in yaml.safe_dump(data):
        raise ConfigError(f'{path} writes {{data}} but chooses no data preset: set data: NAME in it or pass '
                          f'--set data=NAME.')
    if _named(data.get('networks')):
        data['networks'] = [_fill(n, '{name}', str(n['name'])) for n in data['networks']]
    return data
