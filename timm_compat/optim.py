"""Optimisers and learning-rate schedules of every training loop, by timm name.

:func:`make_optimizer` is ``timm.optim.create_optimizer_v2`` (every name of ``timm.optim.list_optimizers()``);
:func:`make_scheduler` is ``timm.scheduler.create_scheduler_v2`` stepped once per optimiser update, behind the
``scheduler.step()`` interface of a torch schedule, so that the training loop and Accelerate's prepared scheduler
drive any timm schedule. Names are checked by :func:`check_optim` before anything runs.

:func:`param_groups` holds the optimisation half of the fast recipe (airbench94, Jordan 2024, arXiv:2404.00498),
for any backbone: learning rate and weight decay per ``lr_reference_batch`` examples, so that they do not depend on
the batch size or the momentum, and norm-layer biases at a multiple of the learning rate. Both are timm's per-group
``lr_scale`` (what its layer-wise lr decay uses): every timm schedule multiplies its curve by it, warm-up and
``min_lr`` included, so one schedule serves every group. Lookahead is timm's (``lookahead_<name>``), its ``alpha``
and ``k`` given as ``optimizer_args`` ``lookahead_alpha`` / ``lookahead_k``; ``lookahead_schedule='airbench'`` ramps
its ``alpha`` over the run and ends the run on the slow weights (:func:`airbench_lookahead_alpha`).
"""
import math
from typing import TYPE_CHECKING, Any, Dict, Iterable, List, Optional, Union

import torch
from timm.optim import Lookahead, create_optimizer_v2, list_optimizers
from timm.scheduler import create_scheduler_v2
from torch import nn

from ._optim_checks import base_optimizer, check_decay_given, check_schedule_fits, try_a_resumed_update

if TYPE_CHECKING:
    from .config import OptimConfig, RunConfig

__all__ = ['SCHEDULES', 'NORM_TYPES', 'LOOKAHEAD_ARGS', 'LOOKAHEAD_SCHEDULES', 'make_optimizer', 'make_scheduler',
           'optim_from_config', 'param_groups', 'step_gain', 'check_optim', 'optimizer_names',
           'airbench_lookahead_alpha', 'UpdateSchedule', 'phase_steps', 'check_config_optim', 'base_optimizer']

# Layers whose bias norm_bias_lr_scale speeds up: torch's norms, and so timm's, which subclass them (BatchNormAct2d,
# LayerNorm2d, GroupNorm1, ...).
NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
# optimizer_args of a lookahead_<name> optimiser, as timm's Lookahead keeps them in its parameter groups.
LOOKAHEAD_ARGS = {'lookahead_alpha': 'alpha', 'lookahead_k': 'k'}
# How a lookahead optimiser's alpha moves: 'constant' (timm's), or 'airbench' (airbench_lookahead_alpha).
LOOKAHEAD_SCHEDULES = ('constant', 'airbench')
# Optimisers whose step lr_reference_batch knows how to scale: Nesterov SGD, which airbench's rule is about.
_SGD_NAMES = ('sgd', 'nesterov')

# create_scheduler_v2's names that are stepped per update; 'plateau' needs a validation metric every epoch, which
# a run does not measure while training.
SCHEDULES = ('cosine', 'tanh', 'step', 'multistep', 'poly', 'wsd', 'rsqrt', 'constant')
# The updates a schedule is checked over while the run's length is not known (`epochs`: it waits for the datasets):
# so many that only lengths no run fits are refused; make_optim judges the real length when the run starts.
_UNKNOWN_UPDATES = 10 ** 9


def optimizer_names() -> List[str]:
    """Every optimiser name timm knows, as ``create_optimizer_v2`` takes it (``lookahead_<name>`` too)."""
    return list_optimizers()


def check_optim(optimizer: str, schedule: str, optimizer_args: Optional[Dict[str, Any]] = None,
                schedule_args: Optional[Dict[str, Any]] = None, *, lr_reference_batch: Optional[int] = None,
                warmup_steps: int = 1, warmup_fraction: float = 0.0, lookahead_schedule: str = 'constant',
                turns: int = 1, total_updates: Optional[int] = None) -> None:
    """Build the optimiser and schedule on a dummy parameter and step them through a checkpoint round trip, so
    that a bad name or argument, or an optimiser failing at its first update, fails before a run.

    Args:
        turns: Networks that take turns, one per update (the alternate joint schedule); a lookahead optimiser then
            needs a ``lookahead_k`` coprime with it, or some networks would never be synced.
        total_updates: The run's optimiser updates, which the schedule's lengths must fit; None: not known yet.

    Raises:
        ValueError: Naming the problem and, for an unknown name, every valid one.
    """
    name = base_optimizer(optimizer)
    if schedule not in SCHEDULES:
        raise ValueError(f'unknown schedule {schedule!r}; use one of: {", ".join(SCHEDULES)}')
    check_decay_given(schedule, schedule_args or {})
    if lr_reference_batch is not None and name not in _SGD_NAMES:
        raise ValueError(f'lr_reference_batch is airbench\'s rule for Nesterov SGD, but the optimizer is {optimizer!r}; '
                         f'use optimizer sgd or lookahead_sgd, or set lr_reference_batch=null')
    if lookahead_schedule not in LOOKAHEAD_SCHEDULES:
        raise ValueError(f'unknown lookahead_schedule {lookahead_schedule!r}; use one of: {", ".join(LOOKAHEAD_SCHEDULES)}')
    if lookahead_schedule != 'constant' and not optimizer.lower().startswith('lookahead_'):
        raise ValueError(f'lookahead_schedule {lookahead_schedule!r} ramps the pull of a lookahead optimiser, but the '
                         f'optimizer is {optimizer!r}; use lookahead_{optimizer}, or lookahead_schedule=constant')
    k = (optimizer_args or {}).get('lookahead_k', 6)  # timm's default
    if optimizer.lower().startswith('lookahead_') and isinstance(k, int) and math.gcd(k, turns) != 1:
        raise ValueError(f'lookahead_k {k} with {turns} networks taking turns: timm\'s lookahead syncs only the '
                         f'network whose turn it is, so some networks would never be synced; set optimizer_args '
                         f'lookahead_k to a number coprime with {turns} (airbench: 5)')

    def build():
        param = torch.nn.Parameter(torch.zeros(1))
        opt = make_optimizer([param], optimizer, 0.1, 0.9, 0.0, **(optimizer_args or {}))
        return param, opt, make_scheduler(opt, schedule, total_updates or _UNKNOWN_UPDATES, warmup_steps,
                                          warmup_fraction=warmup_fraction, lookahead_schedule=lookahead_schedule,
                                          **(schedule_args or {}))

    try:
        build()
    except (TypeError, ValueError, AssertionError, ImportError) as e:
        length = f' (the run has {total_updates} updates; *_epochs count updates)' if total_updates else ''
        raise ValueError(f'optimizer {optimizer!r} / schedule {schedule!r} refuse their arguments: '
                         f'{str(e).rstrip(".")}{length}') from None
    try_a_resumed_update(build, f'optimizer {optimizer!r} / schedule {schedule!r}')


def check_config_optim(cfg: 'RunConfig', total_updates: Optional[int] = None) -> None:
    """:func:`check_optim` of a run config's ``optim`` section, over ``total_updates`` or ``steps``'s updates.

    Raises:
        ValueError: As :func:`check_optim`.
    """
    o, steps = cfg.optim, cfg.steps and math.ceil(cfg.steps / cfg.gradient_accumulation_steps)
    check_optim(o.optimizer, o.schedule, o.optimizer_args, o.schedule_args,
                lr_reference_batch=o.lr_reference_batch, warmup_steps=o.warmup_steps,
                warmup_fraction=o.warmup_fraction, lookahead_schedule=o.lookahead_schedule,
                turns=sum(not n.load for n in cfg.networks) if cfg.joint_schedule == 'alternate' else 1,
                total_updates=total_updates or steps or None)


def step_gain(momentum: float) -> float:
    """airbench's size of an SGD-Nesterov step relative to a constant gradient, ``1 + 1 / (1 - momentum)``.

    Dividing the learning rate by it makes the step independent of the momentum (its "kilostep scale" is this
    gain times 1024 examples). airbench's own count, kept so that its published values mean what they meant.
    """
    return 1 + 1 / (1 - momentum)


def airbench_lookahead_alpha(update: int, total_updates: int, k: int) -> float:
    """airbench94's lookahead pull at optimiser update ``update`` (1-based) of ``total_updates``, as timm's ``alpha``.

    airbench keeps slow weights that every ``k`` updates move to ``decay * slow + (1 - decay) * fast``, with
    ``decay = 0.95**k * (update / total_updates)**3`` (an EMA of 0.95 per update whose weight grows as the cube of
    training progress), and resets the fast weights to them. That is timm's ``Lookahead`` with ``alpha = 1 - decay``:
    no pull for most of the run (alpha 0.9 at mid-run), 0.23 at the end, where it acts as weight averaging. Unlike
    airbench's, timm's slow weights do not include BN statistics.
    """
    return 1.0 - 0.95 ** k * (update / total_updates) ** 3


def param_groups(model: nn.Module, optim: 'OptimConfig', examples_per_update: int) -> List[Dict[str, Any]]:
    """The trainable parameters of ``model`` as parameter groups for :func:`make_optimizer`, by the fast-recipe keys.

    With the defaults (``lr_reference_batch`` None, ``norm_bias_lr_scale`` 1) this is one plain group. Otherwise
    each group carries timm's ``lr_scale``, which the schedule multiplies its curve by, and its own weight decay:

    * ``lr_reference_batch`` R (airbench's decoupled form): ``optim.lr`` and ``optim.weight_decay`` are given per R
      examples for a loss summed over the batch. The run's losses are batch means over B = ``examples_per_update``,
      so the step is ``lr * B / (R * step_gain(momentum))``; each update decays the weights by ``weight_decay * B /
      (R * step_gain(momentum))`` times the schedule, that is torch's (coupled) weight decay ``weight_decay / lr``.
    * ``norm_bias_lr_scale`` c: biases of :data:`NORM_TYPES` layers at c times the learning rate, their weight decay
      divided by c, so that they decay as fast as the rest (airbench's "bias_scaler").

    Args:
        model: The module whose parameters with ``requires_grad`` train (each once, shared ones too).
        optim: The run's ``optim`` config.
        examples_per_update: Examples of one optimiser update, over all processes and accumulation steps.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if optim.lr_reference_batch is None and optim.norm_bias_lr_scale == 1:
        return [{'params': params}]
    scale, decay = 1.0, optim.weight_decay
    if optim.lr_reference_batch is not None:
        scale = examples_per_update / (optim.lr_reference_batch * step_gain(optim.momentum))
        decay = optim.weight_decay / optim.lr
    norm_biases = {id(m.bias) for m in model.modules()
                   if isinstance(m, NORM_TYPES) and isinstance(getattr(m, 'bias', None), nn.Parameter)}
    # The other parameters come first: the schedule's first group is the learning rate that a run logs.
    groups = [{'params': [p for p in params if (id(p) in norm_biases) == is_bias],
               'lr_scale': scale * factor, 'weight_decay': decay / factor}
              for is_bias, factor in ((False, 1.0), (True, optim.norm_bias_lr_scale))]
    return [g for g in groups if g['params']]


def make_optimizer(params: Iterable[Union[torch.nn.Parameter, Dict[str, Any]]], name: str, lr: float,
                   momentum: float, weight_decay: float, **kwargs: Any) -> torch.optim.Optimizer:
    """``timm.optim.create_optimizer_v2`` over ``params`` (weight decay on every one of them, as given).

    Args:
        params: Parameters or parameter groups (a module's 1-d parameters are not exempted from weight decay), e.g.
            from :func:`param_groups`.
        name: A timm optimiser name, e.g. ``sgd`` (Nesterov momentum), ``momentum``, ``adamw``, ``lamb``, or
            ``lookahead_<name>`` (timm's ``Lookahead`` around it).
        lr: Learning rate.
        momentum: Momentum, for the optimisers that have one.
        weight_decay: Weight decay.
        **kwargs: Passed to the optimiser class, e.g. ``betas``, ``eps``; ``lookahead_alpha`` and ``lookahead_k``
            (:data:`LOOKAHEAD_ARGS`) to ``Lookahead``, for a ``lookahead_<name>`` optimiser only.

    Raises:
        ValueError: An unknown name (:func:`~timm_compat._optim_checks.base_optimizer`), or lookahead arguments
            for an optimiser without lookahead, or out of range.
    """
    base = base_optimizer(name)
    lookahead = {LOOKAHEAD_ARGS[k]: kwargs.pop(k) for k in list(kwargs) if k in LOOKAHEAD_ARGS}
    if lookahead:
        if base == name.lower():
            raise ValueError(f'{sorted(LOOKAHEAD_ARGS)} are arguments of lookahead; use optimizer '
                             f'lookahead_{name}, or leave them out')
        # create_optimizer_v2 wraps with Lookahead's defaults (alpha 0.5, k 6) and takes no arguments for it.
        return Lookahead(make_optimizer(params, base, lr, momentum, weight_decay, **kwargs), **lookahead)
    if base in _SGD_NAMES and momentum == 0:
        kwargs.setdefault('nesterov', False)  # torch's Nesterov SGD needs momentum; plain SGD is what 0 means
    return create_optimizer_v2(list(params), opt=name, lr=lr, weight_decay=weight_decay, momentum=momentum,
                               **kwargs)


def make_scheduler(optimizer: torch.optim.Optimizer, schedule: str, total_steps: int, warmup_steps: int = 0, *,
                   ticks_per_step: int = 1, warmup_fraction: float = 0.0, lookahead_schedule: str = 'constant',
                   lookahead_fixed: Iterable[torch.Tensor] = (), **kwargs: Any) -> 'UpdateSchedule':
    """A timm schedule over ``total_steps`` optimiser updates, ``warmup_steps`` of them linear warmup.

    Groups with an ``lr_scale`` (:func:`param_groups`) get the curve times their scale, from the first update on.

    Args:
        optimizer: The optimiser whose learning rate is scheduled.
        schedule: One of :data:`SCHEDULES`.
        total_steps: Optimiser updates of the whole run, warmup included.
        warmup_steps: Updates of linear warmup from ``warmup_lr`` (timm's default 1e-5), before the schedule.
        ticks_per_step: ``step()`` calls per update: Accelerate's prepared scheduler calls it once per process.
        warmup_fraction: Instead of ``warmup_steps``: ``int(warmup_fraction * total_steps)`` updates of warmup,
            so that a recipe's warmup follows the run's length (airbench's triangle peaks at 0.23).
        lookahead_schedule: ``'airbench'``: the alpha of a lookahead optimiser follows
            :func:`airbench_lookahead_alpha`, and the last update ends on the slow weights; ``'constant'`` leaves it.
        lookahead_fixed: Parameters frozen during the run (a whitening bias) that keep their weights at the end.
        **kwargs: Passed to ``create_scheduler_v2``, e.g. ``min_lr``, ``decay_rate``, ``decay_milestones``;
            its ``*_epochs`` durations count optimiser updates here. Not its cycles (``cycle_limit``,
            ``cycle_mul``, ``cycle_decay``) or ``cooldown_epochs``: the schedule is one cycle over the run.

    Raises:
        ValueError: An unknown schedule, both warmups, or lengths that do not fit the run (check_schedule_fits).
    """
    if schedule not in SCHEDULES:
        raise ValueError(f'unknown schedule {schedule!r}; use one of: {", ".join(SCHEDULES)}')
    if warmup_steps and warmup_fraction:
        raise ValueError(f'warmup_steps ({warmup_steps}) and warmup_fraction ({warmup_fraction}) both give the '
                         f'warmup; set one of them to 0')
    warmup_steps = warmup_steps or int(warmup_fraction * total_steps)
    check_schedule_fits(schedule, kwargs, total_steps, warmup_steps)
    warmup = dict(warmup_epochs=warmup_steps, warmup_prefix=True) if warmup_steps else {}
    timm_schedule, _ = create_scheduler_v2(optimizer, sched=schedule,
                                           num_epochs=max(1, total_steps - warmup_steps),
                                           **{'min_lr': 0.0, **warmup, **kwargs},
                                           step_on_epochs=False, updates_per_epoch=1)
    return UpdateSchedule(timm_schedule, ticks_per_step, total_steps if lookahead_schedule == 'airbench' else None,
                          lookahead_fixed)


def phase_steps(cfg: 'RunConfig', steps_per_epoch: int, networks: int) -> int:
    """A phase's micro-batch steps: ``steps`` (whole updates: RunConfig.validate), or ``epochs`` of the largest
    training set rounded up to whole optimiser updates (a last update short of micro-batches is never applied)."""
    # Alternating, each step trains one network: `epochs` stays each network's number of epochs.
    turns, accumulation = networks if cfg.joint_schedule == 'alternate' else 1, cfg.gradient_accumulation_steps
    # Rounded before the ceil: 1.1 epochs of 50 steps is 55.00000000000001 in floats, which made 56 steps.
    return cfg.steps or math.ceil(round(cfg.epochs * steps_per_epoch * turns / accumulation, 9)) * accumulation


def optim_from_config(model: nn.Module, optim: 'OptimConfig', examples_per_update: int, total_updates: int, *,
                      ticks_per_step: int = 1, lookahead_fixed: Iterable[torch.Tensor] = ()):
    """The optimiser of ``model``'s trainable parameters and its schedule, as an ``optim`` config section says.

    Args:
        model: The module whose parameters with ``requires_grad`` train (:func:`param_groups`).
        optim: An ``optim`` config section.
        examples_per_update: Examples of one optimiser update, over all processes and accumulation steps.
        total_updates: Optimiser updates of the whole run.
        ticks_per_step: ``step()`` calls per update (:func:`make_scheduler`).
        lookahead_fixed: Frozen parameters that keep their weights at the end of a lookahead run.
    """
    params = param_groups(model, optim, examples_per_update)
    optimizer = make_optimizer(params, optim.optimizer, optim.lr, optim.momentum, optim.weight_decay,
                               **optim.optimizer_args)
    scheduler = make_scheduler(optimizer, optim.schedule, total_updates, optim.warmup_steps,
                               ticks_per_step=ticks_per_step, warmup_fraction=optim.warmup_fraction,
                               lookahead_schedule=optim.lookahead_schedule, lookahead_fixed=lookahead_fixed,
                               **optim.schedule_args)
    return optimizer, scheduler


class UpdateSchedule(torch.optim.lr_scheduler.LRScheduler):
    """A timm schedule behind torch's ``step()`` / ``get_last_lr()`` / ``state_dict()``, stepped per update.

    It is a torch ``LRScheduler`` because ``accelerator.prepare`` wraps (steps with the optimiser, checkpoints)
    only those; torch's constructor is not run: the learning rates and the state are the timm schedule's.

    Args:
        schedule: A ``timm.scheduler.Scheduler`` built with ``step_on_epochs=False``.
        ticks_per_step: ``step()`` calls per optimiser update; the schedule advances once all of them are made.
        lookahead_updates: The run's optimiser updates, to ramp the alpha of a lookahead optimiser over them
            (:func:`airbench_lookahead_alpha`) and, after the last, set the weights to the slow weights; None leaves
            the optimiser's alpha as it is.
        lookahead_fixed: Parameters that keep their weights at the end: frozen ones, whose slow weights stopped
            following them when they lost their gradient.
    """

    def __init__(self, schedule, ticks_per_step: int = 1, lookahead_updates: Optional[int] = None,
                 lookahead_fixed: Iterable[torch.Tensor] = ()):
        self.schedule, self.ticks_per_step, self.ticks = schedule, ticks_per_step, 0
        self.optimizer = schedule.optimizer
        self.lookahead_updates = lookahead_updates
        self.lookahead_fixed = {id(p) for p in lookahead_fixed}
        # What param_groups derived from this run, not the checkpoint's: lr_scale follows the processes.
        self._group_settings = [{k: g[k] for k in ('lr_scale', 'weight_decay') if k in g}
                                for g in self.optimizer.param_groups]
        self._slow_hooks: List[Any] = []
        self._step_count = 1  # read and bumped by Accelerate while gradients accumulate
        if lookahead_updates is not None:
            self._start_slow_weights()
            self._ramp_lookahead()

    def _start_slow_weights(self) -> None:
        # airbench's slow weights start as the initial weights; timm's would start as the weights of the first sync.
        # They enter the base optimiser's state only after its own first step for that parameter: Adam-family
        # optimisers fill a parameter's state only while it is empty, so a slow buffer put there at build time
        # made them skip it (KeyError 'exp_avg'). A parameter without a slow buffer has not been stepped, so its
        # weights just before its first step are the initial ones, on a resume too.
        base = self.optimizer._base_optimizer
        self._first_weights: Dict[torch.Tensor, torch.Tensor] = {}
        self._slow_started = False
        self._slow_hooks = [base.register_step_pre_hook(self._keep_first_weights),
                            base.register_step_post_hook(self._store_first_weights)]

    @torch.no_grad()
    def _keep_first_weights(self, base: torch.optim.Optimizer, *_: Any) -> None:
        missing = [p for group in base.param_groups for p in group['params']
                   if 'lookahead_slow_buff' not in base.state.get(p, {})]
        # The grad test is the one the base step and timm's sync use to skip a parameter (alternate schedule).
        self._first_weights = {p: p.detach().clone() for p in missing if p.grad is not None}
        self._slow_started = len(self._first_weights) == len(missing)

    def _store_first_weights(self, base: torch.optim.Optimizer, *_: Any) -> None:
        for p, weights in self._first_weights.items():
            base.state[p].setdefault('lookahead_slow_buff', weights)
        self._first_weights = {}

    @property
    def updates(self) -> int:
        return self.ticks // self.ticks_per_step

    def step(self, epoch=None) -> None:
        if self._slow_hooks and self._slow_started:  # not from the hooks: torch is iterating over them there
            for hook in self._slow_hooks:
                hook.remove()
            self._slow_hooks = []
        self.ticks += 1
        if self.ticks % self.ticks_per_step == 0:
            self.schedule.step_update(self.updates)
            self._ramp_lookahead()

    def finish(self) -> None:
        """End the run on the slow weights, as the last update does: under fp16 a skipped update (inf gradients)
        is not ticked (Accelerate steps the schedule only with the optimiser), so the last update never came."""
        if self.lookahead_updates is not None:
            self._land_on_slow_weights()

    def _ramp_lookahead(self, land: bool = True) -> None:
        """Set the alpha of the next update; after the last one, move the weights to the slow weights."""
        if self.lookahead_updates is None:
            return
        done = self.updates >= self.lookahead_updates
        for group in self.optimizer.param_groups:
            group['lookahead_alpha'] = 0.0 if done else airbench_lookahead_alpha(
                self.updates + 1, self.lookahead_updates, group['lookahead_k'])
        if done and land:
            self._land_on_slow_weights()

    @torch.no_grad()
    def _land_on_slow_weights(self) -> None:
        # Every parameter, not only those with a gradient as timm's update_slow: under the alternate schedule the
        # network resting at the last update lands on its slow weights (from its last sync) too.
        state = self.optimizer._base_optimizer.state
        for group in self.optimizer.param_groups:
            for p in group['params']:
                if id(p) not in self.lookahead_fixed and 'lookahead_slow_buff' in state[p]:
                    p.copy_(state[p]['lookahead_slow_buff'])

    def get_last_lr(self) -> List[float]:
        return [group['lr'] for group in self.optimizer.param_groups]

    def state_dict(self) -> Dict[str, Any]:
        return {'ticks': self.ticks, 'ticks_per_step': self.ticks_per_step}  # the shape is the config's

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        # Only the position is restored: the schedule's shape comes from the config, as timm's train.py rebuilds
        # its scheduler and steps it to the resumed epoch, so a resume that changes `steps` follows the new length
        # (timm's own load_state_dict would bring back the old length and leave the added updates at min_lr).
        if 'last_epoch' in state:  # a checkpoint of the LambdaLR schedule before timm's: counted ticks the same way
            self.ticks = state['last_epoch']
        else:
            self.ticks = state['ticks'] * self.ticks_per_step // state.get('ticks_per_step', 1)
        # torch's optimizer load_state_dict brought back the checkpoint's groups, whose lr_scale is for its
        # examples per update: a resume on other processes would keep the old run's step size.
        for group, settings in zip(self.optimizer.param_groups, self._group_settings):
            group.update(settings)
        self.schedule.step_update(self.updates)
        # No checkpoint is taken after landing, so a resume at or past the run's (possibly shortened) length lands
        # here; landing weights that already are the slow ones would change nothing. Accelerate restores the
        # optimizer, and with it the slow weights, before the scheduler.
        self._ramp_lookahead()

