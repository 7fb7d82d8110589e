"""What a resumed run may change in its config (:func:`resume_conflicts`), and the key-by-key comparison under it.

A run's ``config.yaml`` is its config as resolved when it started. Keys that the schema gained since then take
their defaults on the old side: a config that did not have them meant what the defaults mean (every new key's
default keeps the old behaviour), so adding a key to the schema never strands a run that was started before.
"""
from typing import Any, Dict, List, Tuple

from ._config_errors import REMOVED_KEYS

__all__ = ['RESUME_MAY_CHANGE', 'RESUME_MAY_SWITCH_KERNELS', 'config_changes', 'resume_conflicts']

# Keys a resumed run may change: none changes what the results mean (the method, models, data, optimisation or
# evaluation). Some change the trained weights all the same: steps/epochs how long the run trains (recorded in
# run.json's resumes; a finished phase is never extended), cpu_threads how kernels round (as a resume on another
# machine does). The rest say where files go, what is logged, and how the same images are read.
RESUME_MAY_CHANGE = frozenset({'steps', 'epochs', 'log_every', 'checkpoint_every', 'keep_checkpoints',
                               'cpu_threads', 'save_components', 'push_to_hub', 'output_dir', 'data_dir',
                               'trackers', 'data_storage', 'data_memory_gb', 'loader_workers'})
# Keys that only choose kernels for the same arithmetic, in fp32 or the run's recorded precision: like cpu_threads
# they change rounding, not what is computed, and checkpoints of either choice load into the other (the state dict
# keys are the same). A resume may turn off a compile that crashes. Not `deterministic`: on CUDA it also switches
# TF32 matmuls, a precision change, and promises a rerun bit for bit, which a run trained partly without it is not.
RESUME_MAY_SWITCH_KERNELS = frozenset({'compile', 'channels_last'})
_ABSENT = object()


def config_changes(old: Dict[str, Any], new: Dict[str, Any]) -> List[str]:
    """Dotted keys whose values differ between two ``to_dict()`` configs, e.g. ``networks.1.dataset.train_limit``.

    Mappings are compared key by key (a key on one side only counts as changed), lists item by item (an item on
    one side only is reported as ``key.index``), anything else by value and type. Compare configs that were both
    loaded with :func:`~timm_compat.config.load_config`, so that defaults and ``{data_dir}`` are filled in on both
    sides.
    """
    return _changes(old, new, ())


def _changes(old: Any, new: Any, path: Tuple) -> List[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        keys = list(old) + [k for k in new if k not in old]
        return [c for k in keys for c in _changes(old.get(k, _ABSENT), new.get(k, _ABSENT), (*path, k))]
    if isinstance(old, list) and isinstance(new, list):
        pad = [_ABSENT] * abs(len(old) - len(new))
        pairs = zip(old + pad[:len(new) - len(old)], new + pad[:len(old) - len(new)])
        return [c for i, (a, b) in enumerate(pairs) for c in _changes(a, b, (*path, i))]
    same = old is not _ABSENT and new is not _ABSENT and type(old) is type(new) and old == new
    return [] if same else ['.'.join(map(str, path))]


def _with_added_keys(old: Any, default: Any) -> Any:
    """``old`` with every key it lacks, at any depth, taken from ``default`` (list items from its first item)."""
    if isinstance(old, dict) and isinstance(default, dict):
        return {**{k: v for k, v in default.items() if k not in old},
                **{k: _with_added_keys(v, default.get(k)) for k, v in old.items()}}
    if isinstance(old, list) and isinstance(default, list) and default and isinstance(default[0], dict):
        return [_with_added_keys(item, default[0]) for item in old]
    return old


def resume_conflicts(old: Dict[str, Any], new: Dict[str, Any], defaults: Dict[str, Any]) -> List[str]:
    """The changes of :func:`config_changes` that a resume may not make (not in :data:`RESUME_MAY_CHANGE` or
    :data:`RESUME_MAY_SWITCH_KERNELS`).

    A key that was removed from configs is no conflict: what it said lives on in keys that are compared.

    Args:
        old: The run's recorded config.
        new: The config of the resuming command.
        defaults: Every key at its default, with one default network (``networks``' items are filled from it).
    """
    old, new = _with_added_keys(old, defaults), _with_added_keys(new, defaults)
    # validation.every may change while validation stays on (it says when to measure); switching it on or off
    # changes the training sets (the holdout).
    on = [isinstance(c.get('validation'), dict) and c['validation'].get('every') is not None for c in (old, new)]
    # A list key changes item by item (trackers.0): what may change is the top-level key it belongs to.
    may = RESUME_MAY_CHANGE | RESUME_MAY_SWITCH_KERNELS
    return [key for key in config_changes(old, new) if key.split('.')[0] not in may
            and key not in REMOVED_KEYS and not (key == 'validation.every' and on[0] == on[1])]
