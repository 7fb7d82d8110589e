"""Checks of an ``optim`` config section that :func:`timm_compat.optim.check_optim` runs before anything else."""
from typing import Any, Callable, Dict, Tuple

import torch
from timm.optim import list_optimizers

LOOKAHEAD_PREFIX = 'lookahead_'


def base_optimizer(name: str) -> str:
    """The timm optimiser that ``name``, ``<name>`` or ``lookahead_<name>``, wraps (lower case).

    Raises:
        ValueError: Any other name, listing the valid ones: timm's own parsing reads only the part after the last
            ``_``, so ``lookahaed_sgd`` would silently be plain SGD.
    """
    lowered = name.lower()
    base = lowered[len(LOOKAHEAD_PREFIX):] if lowered.startswith(LOOKAHEAD_PREFIX) else lowered
    if base not in list_optimizers():
        raise ValueError(f'unknown optimizer {name!r}; timm has: {", ".join(list_optimizers())} (each also as '
                         f'{LOOKAHEAD_PREFIX}<name>)')
    return base


def try_a_resumed_update(build: Callable[[], Tuple[torch.Tensor, Any, Any]], what: str) -> None:
    """An update, a checkpoint round trip and another update of ``build()``'s ``(param, optimizer, schedule)``,
    so that optimiser state that only breaks once stepped (or resumed) is refused before the run folder is claimed.

    Raises:
        ValueError: The step or the round trip failing on the state or the arguments.
    """
    try:
        param, opt, schedule = build()
        for _ in range(2):
            param.grad = torch.ones_like(param)
            opt.step()
            schedule.step()
            resumed_param, resumed_opt, resumed = build()
            resumed_opt.load_state_dict(opt.state_dict())
            resumed.load_state_dict(schedule.state_dict())
            param, opt, schedule = resumed_param, resumed_opt, resumed
    except (KeyError, IndexError, TypeError, ValueError) as e:
        raise ValueError(f'{what} fail at the first update or its resume ({type(e).__name__}: {e}); choose '
                         f'another optimizer or other optimizer_args') from None
    except Exception:
        # What a dummy CPU step cannot give, the run may have: a GPU (capturable), a second-order graph (adahessian).
        pass


# schedule_args of create_scheduler_v2 that act only after the first cycle of a schedule, with the value that does
# nothing: a run is one cycle over its updates (make_scheduler's num_epochs), so they would be silently ignored.
_AFTER_THE_RUN = {'cycle_limit': 1, 'cycle_mul': 1, 'cycle_decay': None, 'cooldown_epochs': 0}


def check_one_cycle(schedule_args: Dict[str, Any]) -> None:
    """Refuse ``schedule_args`` that would act only past the run's end (timm's cycles and cooldown).

    Raises:
        ValueError: Naming the key and the fix.
    """
    for key, no_op in _AFTER_THE_RUN.items():
        if key in schedule_args and schedule_args[key] != no_op:
            raise ValueError(f'schedule_args {key}={schedule_args[key]!r} would have no effect: the run is one '
                             f'cycle of its schedule, as long as steps or epochs say (timm\'s cycles and cooldown '
                             f'come after it); drop {key} and set the run\'s length with steps or epochs')


# The schedule_args key of a schedule's decay points, in updates after the warm-up (timm's warmup_prefix).
_DECAY_POINTS = {'step': 'decay_epochs', 'multistep': 'decay_milestones'}


def check_schedule_fits(schedule: str, schedule_args: Dict[str, Any], total_updates: int, warmup_steps: int) -> None:
    """Refuse a schedule that does not fit the run's ``total_updates``: cycles or a cooldown
    (:func:`check_one_cycle`), a warm-up as long as the run (it would never reach the learning rate), or a step or
    multistep decay point at or after the run's last update after warm-up (the learning rate would never decay
    there; a multistep milestone right at the end would decay the last update only).

    Raises:
        ValueError: Naming the key, the run's length and the fix.
    """
    check_one_cycle(schedule_args)
    lengthen = 'or lengthen the run (steps or epochs)'
    if warmup_steps >= total_updates:
        raise ValueError(f'warmup_steps {warmup_steps} do not fit the run\'s {total_updates} updates: the whole run '
                         f'would be warm-up, never at optim.lr; set optim.warmup_steps below {total_updates}, '
                         f'{lengthen}')
    key, after = _DECAY_POINTS.get(schedule), total_updates - warmup_steps
    points = schedule_args.get(key, [])
    points = points if isinstance(points, (list, tuple)) else [points]
    if late := [p for p in points if isinstance(p, (int, float)) and p >= after]:
        raise ValueError(f'{key} {late} fall at or after the end of the run\'s {total_updates} updates ({key} count '
                         f'the {after} updates after the {warmup_steps} of warm-up), so the learning rate would never '
                         f'decay there; set {key} below {after}, {lengthen}')


# schedule_args that a schedule has no sensible default for here: timm's are epochs, but a schedule is stepped per
# update, so it would decay after 90 updates.
_DECAY_NEEDS = {'step': ('decay_epochs', 'every 90', '{decay_epochs: 300, decay_rate: 0.1}'),
                'multistep': ('decay_milestones', 'at 90, 180 and 270',
                              '{decay_milestones: [300, 600], decay_rate: 0.1}')}


def check_decay_given(schedule: str, schedule_args: Dict[str, Any]) -> None:
    """Refuse a step or multistep schedule that leaves when to decay to timm's defaults, which count epochs.

    Raises:
        ValueError: Naming the key and an example.
    """
    key, default, example = _DECAY_NEEDS.get(schedule, (None, '', ''))
    if key is not None and key not in schedule_args:
        raise ValueError(f'schedule {schedule} needs schedule_args {key}, in optimiser updates (timm\'s default, '
                         f'in epochs, would decay {default} updates here); e.g. optim.schedule_args={example}')
