"""Checks of an ``optim`` config section that :func:`timm_compat.optim.check_optim` runs before anything else."""
from typing import Any, Callable, Tuple

import torch


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
