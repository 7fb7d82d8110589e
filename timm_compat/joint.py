"""JointModel (``CompatibilityTask``): every network of a run and their shared interface as one
``timm.task.TrainingTask``, one loss dict per step."""
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from timm.task import TrainingTask
from torch import nn

from .methods import CompatibilityMethod, compatibility_loss

__all__ = ['SCHEDULES', 'JointModel', 'CompatibilityTask']


SCHEDULES = ('sum', 'alternate')


class _Losses(nn.Module):
    """What DDP wraps in :meth:`JointModel.prepare_distributed`: the task's losses, its parameters as children."""

    def __init__(self, task: 'JointModel'):
        super().__init__()
        self.task = task

    def forward(self, batches):
        return self.task.losses(batches)


class JointModel(TrainingTask):
    """Every network of a run and their shared interface as one module: a ``timm.task.TrainingTask`` (also named
    ``CompatibilityTask``) that takes ``{name: (images, labels)}`` and returns a loss dict, so a timm training loop
    drives it as any task; train.py's engine does the same through Accelerate.

    DDP wraps this module once: the aux heads that all networks share are one set of parameters, reduced once per
    step, which is impossible when each network is wrapped on its own.

    Two schedules for the joint objective of eqs. (1) and (2):

    * ``'alternate'``, the paper's (Sec. 3.4): each step trains one network on one minibatch of its task, the
      networks taking turns (``networks_at(step)``).
    * ``'sum'``: each step takes a minibatch of every task and sums the networks' losses (a deviation: one update
      sees all tasks at once).

    Aux heads that no method trains get ``requires_grad_(False)`` (unless a network uses one as its own head), so
    that neither the optimiser nor DDP expects gradients for them.

    Args:
        networks: The trained networks, by name.
        interface: Their shared interface (its aux heads are registered here once), or None.
        methods: Compatibility methods applied to every network.
        schedule: ``'sum'`` or ``'alternate'``.
        label_smoothing: Of each network's task loss (``optim.label_smoothing``; see :func:`compatibility_loss`).
        task_weight: Of each network's task loss (``task_weight``); 0 trains the aux losses alone.
    """

    def __init__(self, networks: Dict[str, nn.Module], interface: Optional[nn.Module],
                 methods: Sequence[CompatibilityMethod] = (), schedule: str = 'sum',
                 label_smoothing: float = 0.0, task_weight: float = 1.0):
        super().__init__(verbose=False)
        if schedule not in SCHEDULES:
            raise ValueError(f'Unknown joint schedule {schedule!r}: use one of {SCHEDULES}.')
        if not networks:
            raise ValueError('JointModel needs at least one network to train.')
        self.networks = nn.ModuleDict(networks)
        self.interface = interface
        self.methods = list(methods)
        self.schedule, self.label_smoothing, self.task_weight = schedule, label_smoothing, task_weight
        self._disable_unused_aux_heads()

    def _disable_unused_aux_heads(self) -> None:
        # DDP raises "Expected to have finished reduction" for a trainable parameter that gets no gradient: an aux
        # head whose method has weight 0 (methods_for leaves it out) would be one.
        if self.interface is None:
            return
        trained = {key for method in self.methods for key in method.aux_heads}
        in_networks = {id(p) for network in self.networks.values() for p in network.parameters()}
        for key, head in self.interface.aux_heads.items():
            if key not in trained and not any(id(p) in in_networks for p in head.parameters()):
                head.requires_grad_(False)

    def networks_at(self, step: int) -> List[str]:
        """Names of the networks that train at ``step``: all of them (sum), or the one whose turn it is (alternate).

        ``step`` counts optimiser updates: with gradient accumulation, give every micro-batch of one update the same
        step, so that one update trains one network.
        """
        names = list(self.networks)
        return names if self.schedule == 'sum' else [names[step % len(names)]]

    def set_step(self, step: int) -> None:
        """Tell every method the step about to run (see ``CompatibilityMethod.set_step``); a timm loop calls it
        before each step, as train.py's engine does."""
        for method in self.methods:
            method.set_step(step)

    def prepare_distributed(self, device_ids: Optional[list] = None, **ddp_kwargs) -> 'JointModel':
        """timm's hook: wrap the whole task once in DDP (the shared aux heads are one parameter set, reduced once);
        later calls of the task go through it. Not needed under Accelerate, which wraps the task itself.

        Args:
            device_ids: DDP's ``device_ids`` (e.g. ``[local_rank]``; None on CPU).
            **ddp_kwargs: Passed to ``DistributedDataParallel``.
        """
        # Kept outside the module tree: DDP holds this task, so registering it here would make a cycle.
        object.__setattr__(self, '_ddp', nn.parallel.DistributedDataParallel(_Losses(self), device_ids=device_ids,
                                                                             **ddp_kwargs))
        return self

    def compile(self, backend: str = 'inductor', mode: Optional[str] = None, **compile_kwargs) -> None:
        """timm's hook: compile the modules that do the tensor work, each network's extractor and head, in place
        (state-dict keys unchanged), before DDP wraps the task; the task's Python loop over networks and methods
        stays eager, where it would break the graph. Evaluation calls the same modules, so it runs compiled too."""
        for network in self.networks.values():
            for module in (network.extractor, network.head):
                module.compile(backend=backend, mode=mode, **compile_kwargs)

    def forward(self, batches: Dict[str, Tuple[torch.Tensor, torch.Tensor]]) -> Dict[str, torch.Tensor]:
        """:meth:`losses`, through DDP after :meth:`prepare_distributed`."""
        ddp = self.__dict__.get('_ddp')
        return ddp(batches) if ddp is not None else self.losses(batches)

    def losses(self, batches: Dict[str, Tuple[torch.Tensor, torch.Tensor]]) -> Dict[str, torch.Tensor]:
        """Losses of the networks in ``batches``: ``{"<name>/task": ..., "<name>/<method>": ..., "loss": total}``.

        Args:
            batches: ``{name: (images, labels)}`` for exactly the networks of ``networks_at(step)``.

        Returns:
            Scalar tensors. Only the networks that trained have keys, so a running average per key (as train.py
            keeps) is each network's mean over the steps it trained; ``"loss"`` is what this step minimises, summed
            over the networks that trained.
        """
        self._check_batches(batches)
        out, total = {}, 0
        for name, (images, labels) in batches.items():
            losses = compatibility_loss(self.networks[name], images, labels, self.methods,
                                        label_smoothing=self.label_smoothing, task_weight=self.task_weight)
            out.update({f'{name}/{k}': v for k, v in losses.items() if k != 'loss'})
            total = total + losses['loss']
        out['loss'] = total + self._touch_inactive(batches)
        return out

    def _check_batches(self, batches) -> None:
        if not isinstance(batches, dict):
            raise TypeError(f'JointModel takes {{name: (images, labels)}} for the networks of networks_at(step), '
                            f'got {type(batches).__name__}.')
        names, given = list(self.networks), list(batches)
        unknown = [n for n in given if n not in self.networks]
        expected = 'one network a step, by networks_at(step)' if self.schedule == 'alternate' else f'all of {names}'
        if unknown or (sorted(given) != sorted(names) if self.schedule == 'sum' else len(given) != 1):
            raise ValueError(f'Schedule {self.schedule!r} trains {expected}, got batches for {given}'
                             f'{f" (not networks here: {unknown})" if unknown else ""}.')

    def _touch_inactive(self, batches) -> torch.Tensor:
        # A zero-weighted term gives every trainable parameter of the networks that sit this step out a (zero)
        # gradient, so DDP's reducer sees all its parameters used and needs no find_unused_parameters.
        touched = [p.reshape(-1)[:1] for name, network in self.networks.items() if name not in batches
                   for p in network.parameters() if p.requires_grad]
        return torch.cat(touched).sum() * 0.0 if touched else 0.0

    def drop_inactive_grads(self, step: int) -> None:
        """Set the (zero) gradients of the networks not in ``networks_at(step)`` to None; call before the optimiser.

        Optimisers skip parameters without a gradient, so a network leaves a step it sat out unchanged: no momentum
        step, no weight decay, as when each step minimises one task's loss (Sec. 3.4). Without it, SGD with momentum
        would keep moving the resting network. A no-op for the 'sum' schedule.
        """
        active = set(self.networks_at(step))
        # A resting network may share parameters with one that trained (head: dcc is the interface's DCC head), and
        # the aux heads the methods train are trained by the active network's loss. Anything else keeps no gradient:
        # an aux head that is only a resting network's head (dcc_weight 0) rests with it.
        keep = {id(p) for name in active for p in self.networks[name].parameters()}
        if self.interface is not None:
            trained = {key for method in self.methods for key in method.aux_heads}
            keep.update(id(p) for key, head in self.interface.aux_heads.items() if key in trained
                        for p in head.parameters())
        for name, network in self.networks.items():
            for p in network.parameters():
                if name not in active and id(p) not in keep:
                    p.grad = None


CompatibilityTask = JointModel  # the name a timm user looks for beside timm.task.ClassificationTask
