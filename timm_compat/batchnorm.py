"""BatchNorm at test time.

Compatibility is learnt under batch statistics, and the running statistics aggregated over one network's training
data do not describe another network's features, so recombined components are evaluated with the statistics of
each test batch (Gygli et al. 2021, Sec. 4). Three modes:

* ``'batch'``: every BN layer normalises with the current batch's statistics; running statistics stay untouched.
* ``'running'``: the usual eval mode.
* AdaBN (Li et al. 2016): :func:`recalibrate_bn` re-estimates the running statistics on a loader, then
  ``'running'``.
"""
from contextlib import contextmanager
from typing import Iterable, Iterator, Optional

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ['BN_MODES', 'set_batch_statistics', 'batch_statistics', 'eval_mode', 'recalibrate_bn', 'restored_modes']

BN_MODES = ('batch', 'running')


def _bn_layers(module: nn.Module) -> Iterator[_BatchNorm]:
    return (m for m in module.modules() if isinstance(m, _BatchNorm))


def set_batch_statistics(module: nn.Module) -> None:
    """Make every BN layer in ``module`` normalise with batch statistics without updating running ones.

    ``training=True`` with ``track_running_stats=False`` is the one BN state in which PyTorch uses batch statistics
    and passes no running buffers to ``F.batch_norm``, so the buffers (and ``num_batches_tracked``) never change.
    """
    for bn in _bn_layers(module):
        bn.training = True
        bn.track_running_stats = False


@contextmanager
def batch_statistics(module: nn.Module) -> Iterator[nn.Module]:
    """Context in which ``module``'s BN layers use batch statistics; their previous state is restored after.

    A ``SyncBatchNorm`` layer normalises with its own process's batch, not the global one: in training mode it would
    sync statistics across the ranks, which score different test batches (and would hang on uneven batch counts).
    Eval mode without running buffers is the one state in which it takes batch statistics and does not sync, so its
    buffers are set aside for the context.
    """
    saved = [(bn, bn.training, bn.track_running_stats) for bn in _bn_layers(module)]
    synced = [(bn, bn._buffers['running_mean'], bn._buffers['running_var'])
              for bn in _bn_layers(module) if isinstance(bn, nn.SyncBatchNorm)]
    set_batch_statistics(module)
    for bn, _, _ in synced:
        bn.training = False
        bn._buffers['running_mean'] = bn._buffers['running_var'] = None
    try:
        yield module
    finally:
        for bn, training, track in saved:
            bn.training, bn.track_running_stats = training, track
        for bn, mean, var in synced:
            bn._buffers['running_mean'], bn._buffers['running_var'] = mean, var


@contextmanager
def restored_modes(module: nn.Module) -> Iterator[nn.Module]:
    """Context after which every submodule of ``module`` has its training flag of before, whatever ran inside.

    Flags are restored one by one, not with ``module.train(mode)``: a model may mix modes (a frozen part in eval).
    """
    saved = [(m, m.training) for m in module.modules()]
    try:
        yield module
    finally:
        for m, training in saved:
            m.training = training


@contextmanager
def eval_mode(module: nn.Module, bn: str = 'batch') -> Iterator[nn.Module]:
    """Eval mode with the given BN mode (``'batch'`` or ``'running'``); the training flags are restored after."""
    if bn not in BN_MODES:
        raise ValueError(f'Unknown BN mode {bn!r}: use one of {BN_MODES} (or recalibrate_bn() then "running").')
    with restored_modes(module):
        module.eval()
        if bn == 'batch':
            with batch_statistics(module):
                yield module
        else:
            yield module


_NO_BATCHES = 'recalibrate_bn got no batches: pass a non-empty iterable of image tensors.'


@torch.no_grad()
def recalibrate_bn(module: nn.Module, images: Iterable[torch.Tensor], num_batches: Optional[int] = None) -> nn.Module:
    """AdaBN: replace running statistics with the average statistics of ``module`` over ``images``.

    Layers whose running statistics are switched off (:func:`set_batch_statistics`) are recalibrated too, and stay
    switched off; layers built without running buffers always use batch statistics and are left as they are. A
    module with no layer to recalibrate is returned as it is, once ``images`` is known to hold a batch.

    Args:
        module: Any module taking image batches (a network or an extractor).
        images: Iterable of input batches (tensors already on the module's device).
        num_batches: Stop after this many batches (at least 1).

    Returns:
        ``module``, with recalibrated running statistics, in the training mode it had before.

    Raises:
        ValueError: ``images`` has no batches, or ``num_batches`` is below 1. On any error the running statistics
            of before are kept.
    """
    if num_batches is not None and num_batches < 1:
        raise ValueError(f'recalibrate_bn got num_batches={num_batches}: it needs at least 1 batch (None: all).')
    layers = [bn for bn in _bn_layers(module) if bn.running_mean is not None]
    if not layers:  # nothing to recalibrate; no images is the caller's mistake all the same
        if next(iter(images), None) is None:
            raise ValueError(_NO_BATCHES)
        return module
    saved = [(bn.momentum, bn.track_running_stats, [b.clone() for b in _running(bn)]) for bn in layers]
    done = False
    with restored_modes(module):
        module.eval()
        for bn in layers:
            bn.track_running_stats = True  # else reset_running_stats() and the forward leave the buffers alone
            bn.reset_running_stats()
            bn.momentum = None  # cumulative moving average: every batch weighs the same
            bn.train()
        try:
            seen = 0
            for seen, x in enumerate(images, start=1):
                module(x)
                if num_batches is not None and seen >= num_batches:
                    break
            if seen == 0:
                raise ValueError(_NO_BATCHES)
            done = True
        finally:
            for bn, (momentum, track, buffers) in zip(layers, saved):
                bn.momentum, bn.track_running_stats = momentum, track
                if not done:
                    for buffer, old in zip(_running(bn), buffers):
                        buffer.copy_(old)
    return module


def _running(bn: _BatchNorm):
    return [b for b in (bn.running_mean, bn.running_var, bn.num_batches_tracked) if b is not None]
