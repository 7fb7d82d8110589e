"""Error messages for :mod:`timm_compat.config`: one line per bad key, naming it, its value and a valid example.

A key's example is its field's first ``examples`` entry, else its default. A field's ``json_schema_extra`` may
say what a valid value (``must``) and one of its items (``must_item``) is, where pydantic's words would be vague.
"""
import difflib
import json
from typing import Any, Dict, List, Optional, Tuple, Type

from pydantic import BaseModel

__all__ = ['ConfigError', 'REMOVED_KEYS', 'REMOVED_PRESETS', 'describe']


class ConfigError(ValueError):
    """A config that cannot run; the message lists every problem, one per line."""


# Keys that configs no longer have, each with what to write instead; run folders from before keep them in
# config.yaml, so they get this line rather than "unknown key".
REMOVED_KEYS = {
    'scheme': 'scheme is no longer a config key: a run trains incrementally, against a frozen interface, exactly '
              'when interface.load (or --interface) names one, and jointly otherwise. Delete the scheme line; an '
              'incremental config keeps its interface.load.',
}

# Data presets of configs/sec4/ that were removed, each with what to write instead; a config folder that still has
# a preset of that name uses it.
REMOVED_PRESETS = {
    'parquet': 'data=parquet is no longer a data preset: Hub datasets are read from local Parquet copies by '
               '--data-dir DATA (DATA/cifar10/ and DATA/stl10/, each {train,test}.parquet), so use '
               '--set data=cifar10_stl10 --data-dir DATA (cifar10_stl10 is the default).',
}

_PHRASES = {
    'bool_type': 'true or false', 'int_type': 'an integer', 'float_type': 'a number', 'string_type': 'a string',
    'list_type': 'a list', 'dict_type': 'a mapping', 'model_type': 'a mapping', 'finite_number': 'a finite number',
    'greater_than': 'greater than {gt}', 'greater_than_equal': 'at least {ge}', 'less_than': 'less than {lt}',
    'less_than_equal': 'at most {le}', 'literal_error': 'one of {expected}',
    'too_short': 'a list of at least {min_length} item(s)', 'too_long': 'a list of at most {max_length} item(s)',
    'string_too_short': 'at least {min_length} character(s) long',
    'string_pattern_mismatch': 'matching {pattern}', 'none_required': 'null'}
_TYPES = {bool: 'a boolean', int: 'an integer', float: 'a number', str: 'a string', list: 'a list', dict: 'a mapping',
          type(None): 'null'}
_WORDS = {'no': False, 'false': False, 'off': False, 'n': False, '0': False,
          'yes': True, 'true': True, 'on': True, 'y': True, '1': True}


def _model_in(annotation: Any) -> Optional[type]:
    """The config section a field holds (directly, in a list or Optional), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next(filter(None, map(_model_in, getattr(annotation, '__args__', ()))), None)


def _locate(loc: Tuple, data: Any, root: Type[BaseModel]) -> Tuple[List, Any, List, Any]:
    """Follow an error's ``loc`` through the input data, leaving out pydantic's union tags.

    Returns:
        The data path, the value there, the path of the innermost config field on it and that field's info.
    """
    path, node, field_path, field, section = [], data, [], None, root
    for part in loc:
        if not (isinstance(node, dict) and part in node
                or isinstance(node, list) and type(part) is int and part < len(node)):
            break
        node = node[part]
        path.append(part)
        if section is not None and isinstance(part, str):
            field = section.model_fields.get(part)
            field_path = list(path)
            section = _model_in(field.annotation) if field is not None else None
    return path, node, field_path, field


def _write(value: Any) -> str:
    """``value`` as it would be written after ``--set key=``."""
    return value if isinstance(value, str) else str(value).lower() if isinstance(value, bool) else json.dumps(value)


def _example(field: Any, value: Any) -> Any:
    """A valid value: for a boolean given as a word, the one the word means; else the field's example or default."""
    if field.annotation is bool and isinstance(value, str) and value.strip().lower() in _WORDS:
        return _WORDS[value.strip().lower()]
    return field.examples[0] if field.examples else field.get_default(call_default_factory=True)


def _line(path: List, value: Any, field_path: List, field: Any, musts: List[str]) -> str:
    """``key must be A or B, got VALUE (TYPE); write key=EXAMPLE``."""
    key = '.'.join(map(str, path)) or 'the config'
    shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + '...'
    line = f'{key} must be {" or ".join(musts)}, got {shown} ({_TYPES.get(type(value), type(value).__name__)})'
    if field is None:
        return line
    example = _write(_example(field, value))
    if field_path == path:
        return f'{line}; write {key}={example}'
    return f'{line}; e.g. {".".join(map(str, field_path))}={example}'


def _unknown(parent: Tuple, keys: List[str], root: Type[BaseModel]) -> str:
    """Unknown keys in one section, with the valid ones and the likely intended one."""
    section = root
    for part in parent:
        section = _model_in(section.model_fields[part].annotation) if isinstance(part, str) else section
    valid = sorted(section.model_fields)
    where = f'in {".".join(map(str, parent))}' if parent else 'at the top level'
    hints = [f'{k!r}: did you mean {m}?' for k in keys for m in (
        [repr(c) for c in difflib.get_close_matches(k, valid, 1)]
        or [f'{name}.{k}' for name, f in section.model_fields.items()
            if _model_in(f.annotation) and k in _model_in(f.annotation).model_fields][:1])]
    return f'Unknown config key(s) {sorted(keys)} {where}; valid keys: {valid}.' + ''.join(f' {h}' for h in hints)


def describe(errors: List[Dict[str, Any]], data: Dict[str, Any], root: Type[BaseModel]) -> List[str]:
    """One line per bad key: the key, what it must be, the value given, and an example of a valid one."""
    by_key, unknown, removed = {}, {}, []
    for er in errors:
        path, value, field_path, field = _locate(er['loc'], data, root)
        if er['type'] == 'extra_forbidden' and len(path) == 1 and path[0] in REMOVED_KEYS:
            removed.append(REMOVED_KEYS[path[0]])
            continue
        if er['type'] == 'extra_forbidden':
            unknown.setdefault(tuple(path[:-1]), []).append(str(path[-1]))
            continue
        own = ((field.json_schema_extra or {}) if field is not None else {}).get(
            'must' if path == field_path else 'must_item')  # what the field says beats pydantic's union wording
        if er['type'] == 'config':
            must = er['ctx']['must']
        elif own or er['type'] not in _PHRASES:
            must = own or er['msg']
        else:
            must = _PHRASES[er['type']].format(**er.get('ctx', {}))
        entry = by_key.setdefault(tuple(path), (path, value, field_path, field, []))
        if must not in entry[4]:
            entry[4].append(must)
    return ([_line(*entry) for entry in by_key.values()] + [_unknown(p, k, root) for p, k in unknown.items()]
            + removed)
