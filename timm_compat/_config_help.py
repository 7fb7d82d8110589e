"""``train.py --help``'s list of config keys, generated from the schema of :mod:`timm_compat.config`."""
import json
import typing
from typing import Any, Dict, List, Optional, Tuple, Type

from pydantic import BaseModel

from ._config_errors import _model_in

__all__ = ['config_keys', 'keys_help']


def _type(annotation: Any) -> str:
    """A short, readable type: ``int``, ``'sum' | 'alternate'``, ``list[str] | null``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _type(args[0])
    if annotation is type(None):
        return 'null'
    if origin is typing.Literal:
        return ' | '.join(repr(a) for a in args)
    if origin is typing.Union:
        return ' | '.join(dict.fromkeys(_type(a) for a in args))
    if origin in (list, List):
        return f'list[{_type(args[0])}]' if args else 'list'
    if origin is dict:
        return 'mapping'
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return 'section'
    return getattr(annotation, '__name__', None) or str(annotation).replace('typing.', '')


def config_keys(model: Type[BaseModel], prefix: str = '', defaults: Optional[Dict[str, Any]] = None
                ) -> List[Tuple[str, str, str]]:
    """Every leaf key of ``model`` as ``(dotted key, type, default)``; list items are ``networks.N.key``.

    Defaults are those of a default ``model()``, so a section's default (the demo's interface width) shows.
    """
    defaults = model().model_dump() if defaults is None else defaults
    rows = []
    for name, field in model.model_fields.items():
        key, section = f'{prefix}{name}', _model_in(field.annotation)
        if section is None:
            rows.append((key, _type(field.annotation), json.dumps(defaults.get(name))))
        elif typing.get_origin(field.annotation) in (list, List):  # list items: a fresh item's defaults
            rows.extend(config_keys(section, f'{key}.N.'))
        else:
            rows.extend(config_keys(section, f'{key}.', defaults.get(name) or section().model_dump()))
    return rows


def keys_help(model: Type[BaseModel]) -> str:
    """``--help``'s epilog: one line per config key with its type and default, settable with ``--set KEY=VALUE``."""
    rows = config_keys(model)
    width = max(len(k) for k, _, _ in rows)
    lines = [f'  {k:<{width}}  {t}  (default: {d})' for k, t, d in rows]
    return ('config keys (YAML file with -c, or --set KEY=VALUE; N is a network\'s index):\n'
            + '\n'.join(lines))
