"""Keys of the run config that only a method uses, refused while it is off.

A key such as ``interface.dcc_head`` describes a method (DCC); with the method switched off nothing reads it, so a
run that sets it would silently not be the run its config describes. As ``head_split`` with ``head: tail``
(:meth:`timm_compat.config.RunConfig.validate`), such a key is refused when set to anything but its default; at its
default it asks for nothing, so shipped files that leave it alone, or spell out the default, still load.
"""
from typing import Any, List

__all__ = ['unused_key_problems']

# (section, switch, its value that turns the method off, what that means, a value that turns it on, the keys that
# only the method reads)
_SWITCHED = (
    # Not interface.dcc_reduction: configs/sec4/base.yaml sets it for every Sec. 4 method, DCC on or off.
    ('interface', 'dcc', False, 'false (no DCC)', 'true', ('dcc_weight', 'dcc_classes', 'dcc_head')),
    ('interface', 'rp', False, 'false (no RP)', 'true', ('rp_weight', 'rp_head', 'rp_rotations', 'rp_norm')),
    ('validation', 'every', None, 'null (no validation)', '500', ('metric', 'examples', 'data')),
    # The test set is measured whole: nothing is held out (the metric is still logged with each measurement).
    ('validation', 'data', 'test', 'test (nothing is held out)', 'holdout', ('examples',)),
)


def unused_key_problems(cfg: Any) -> List[str]:
    """One line per key of ``cfg`` (a :class:`~timm_compat.config.RunConfig`) that is set to anything but its
    default while the method that reads it is off, naming the key, the switch and both ways out."""
    problems, named = [], set()
    for section, switch, off, meaning, on, keys in _SWITCHED:
        values = getattr(cfg, section)
        if getattr(values, switch) != off:
            continue
        for key in keys:
            value, field = getattr(values, key), type(values).model_fields[key]
            if value != field.get_default(call_default_factory=True) and key not in named:
                named.add(key)  # validation.examples is unused for two reasons: one line is enough
                problems.append(f'{section}.{key} is {value!r}, but {section}.{switch} is {meaning}, so it would '
                                f'be ignored: drop {section}.{key}, or set {section}.{switch}={on}.')
    return problems
