"""The field types of the run config: numbers as YAML writes them, counts, seeds, model arguments, split points,
aux head specs, shards and shifts, each with the words a bad value's error uses (``_config_errors.describe``)."""
import re
from typing import Any, Dict, List, Literal, Optional, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, TypeAdapter, ValidationError
from pydantic_core import PydanticCustomError
from typing_extensions import Annotated, TypeAliasType

from .shifts import CORRUPTIONS, parse_shift


def _number(value: Any) -> Any:
    """YAML 1.1 (PyYAML) reads ``1e-3`` (no dot) as a string; take it as the number it was clearly meant to be."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value  # not a number: the type check names it
    return value


_EXPONENT = re.compile(r'[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+')


def _exponents(value: Any) -> Any:
    """``value`` with every string that YAML 1.1 left an exponent number (``1e-5``) as that float, in mappings and
    lists too: argument mappings take any value, so no type check would convert it."""
    if isinstance(value, str) and _EXPONENT.fullmatch(value):
        return float(value)
    if isinstance(value, dict):
        return {k: _exponents(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_exponents(v) for v in value]
    return value


def _must(text: str, item: Optional[str] = None) -> Dict[str, Any]:
    """Field metadata: what a valid value (and one of its items) is, where pydantic's words would be vague."""
    return {'must': text, 'must_item': item}


def _class_list(null: str) -> Dict[str, Any]:
    """Field metadata of an optional list of class names whose null means ``null`` (e.g. all of the dataset's
    classes). The list must not be empty: [] would keep no class, and the loader refuses it."""
    return _must(f'a list of at least one class name (null: {null})')


Float = Annotated[float, BeforeValidator(_number), Field(allow_inf_nan=False)]
Seed = Annotated[int, Field(ge=0, le=2 ** 32 - 1)]  # numpy's seed range, which accelerate's set_seed uses
Count = Annotated[int, Field(ge=1)]
_Leaf = Union[bool, int, float, str, None]
ModelArg = TypeAliasType('ModelArg', Union[_Leaf, List['ModelArg']])
ModelArgs = Annotated[Dict[str, ModelArg], BeforeValidator(_exponents), Field(
    examples=[{'drop_rate': 0.1}], json_schema_extra=_must(
        'a mapping of names to JSON values', 'a JSON scalar (string, number, true/false or null) or a list of them'))]
Split = Annotated[Union[str, int], Field(json_schema_extra=_must('a module name (string) or a feature index'))]


class _Section(BaseModel):
    # strict: a YAML string such as "false" is never taken for a boolean, nor "3" for an integer.
    model_config = ConfigDict(extra='forbid', strict=True, validate_assignment=True, protected_namespaces=())

    def to_dict(self) -> Dict[str, Any]:
        """Plain data (YAML- and JSON-safe) that :func:`load_config` reads back into an equal config."""
        return self.model_dump()


class _ConvHead(_Section):
    """An aux head spec ``{type: conv, hidden: H}`` (see :func:`timm_compat.interface.build_aux_head`)."""
    type: Literal['conv']
    hidden: Optional[Count] = None
    logit_scale: Optional[Float] = Field(None, gt=0)  # e.g. 0.1111 (1/9) under the fast recipe; None: unscaled


class _TimmHead(_Section):
    """An aux head spec ``{type: timm, backbone: B, split: S}``: the tail of a timm model."""
    type: Literal['timm']
    backbone: str
    split: Split
    model_args: ModelArgs = Field(default_factory=dict)


_HEAD_SPEC = TypeAdapter(Annotated[Union[_ConvHead, _TimmHead], Field(discriminator='type')])
_HEAD_MUST = ('"conv", a timm model name, {type: conv, hidden: 128} or '
              '{type: timm, backbone: mobilenetv2_100, split: blocks.4.0}')


def _head_spec(value: Any) -> Any:
    """Check an aux head spec mapping, but keep it the plain dict that :class:`Interface` takes."""
    value = _exponents(value)
    if isinstance(value, dict):
        try:
            _HEAD_SPEC.validate_python(value)
        except ValidationError as e:
            detail = '; '.join(f"{'.'.join(map(str, er['loc']))}: {er['msg']}" for er in e.errors())
            raise PydanticCustomError('config', '{must}', {'must': f'{_HEAD_MUST} ({detail})'})
    return value


HeadSpec = Annotated[Union[str, Dict[str, Any]], BeforeValidator(_head_spec),
                     Field(json_schema_extra=_must(_HEAD_MUST))]


def _shard(value: Any) -> Any:
    """Check that a well-formed ``[index, count]`` names one of ``count`` parts (the shape is the type's job)."""
    if isinstance(value, list) and len(value) == 2 and all(type(v) is int for v in value):
        if not 0 <= value[0] < value[1]:
            raise PydanticCustomError('config', '{must}', {'must': '[index, count] with 0 <= index < count'})
    return value


_SHIFT_MUST = (f'a list of "corruption:severity" with severity 1 to 5 and corruption one of '
               f'{", ".join(sorted(CORRUPTIONS))}')


def _shift(value: Any) -> Any:
    """Check each shift as apply_shift will, so that a bad one is refused at load, not after its split is decoded
    (a value that is no list of strings is the type's to name)."""
    if isinstance(value, list):
        bad = []
        for item in value:
            try:
                parse_shift(item) if isinstance(item, str) else None
            except ValueError:
                bad.append(item)
        if bad:
            raise PydanticCustomError('config', '{must}', {'must': f'{_SHIFT_MUST} ({", ".join(map(repr, bad))} '
                                                                   f'{"is" if len(bad) == 1 else "are"} not)'})
    return value


Shift = Annotated[List[str], BeforeValidator(_shift), Field(json_schema_extra=_must(_SHIFT_MUST))]
