"""BatchNorm over equal chunks of a batch, each with its own statistics, in one forward pass.

A method that expands the batch (rotation prediction: the images at 0, 90, 180 and 270 degrees, concatenated) makes
every BN layer normalise the task images together with the added ones. :func:`chunked_batch_norm` makes each chunk
normalise on its own, as if it had been a forward pass of its own, while the extractor still runs once.
"""
from contextlib import contextmanager
from typing import Iterator, Optional

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ['chunked_batch_norm']


def _uses_batch_statistics(bn: _BatchNorm) -> bool:
    # The condition of _BatchNorm.forward; also true for a frozen interface's set_batch_statistics() state.
    return bn.training or (bn.running_mean is None and bn.running_var is None)


def _chunked_forward(bn: _BatchNorm, forward, chunks: int, running_chunk: Optional[int], x: torch.Tensor):
    if not _uses_batch_statistics(bn):
        return forward(x)  # running statistics normalise every row alike: chunking would change nothing
    if x.shape[0] % chunks:
        raise ValueError(f'chunked_batch_norm: a batch of {x.shape[0]} does not split into {chunks} equal chunks.')
    outputs = []
    for i, part in enumerate(x.chunk(chunks)):
        track = bn.track_running_stats
        # training=True with track_running_stats=False: batch statistics, running buffers and counter untouched.
        bn.track_running_stats = track and i == running_chunk
        try:
            outputs.append(forward(part))
        finally:
            bn.track_running_stats = track
    return torch.cat(outputs)


@contextmanager
def chunked_batch_norm(module: nn.Module, chunks: int, running_chunk: Optional[int] = 0) -> Iterator[nn.Module]:
    """Context in which every BN layer of ``module`` normalises ``chunks`` equal slices of its batch separately.

    Each chunk gets the output that a forward pass on that chunk alone would give, so gradients are those of
    separate passes too. Layers in eval mode with running statistics are left alone (there, rows do not interact),
    and so are other norms (GroupNorm, LayerNorm: per-example already). Works for any ``_BatchNorm`` subclass,
    timm's ``BatchNormAct2d`` included, and keeps channels_last outputs channels_last.

    Args:
        module: The module whose BN layers to change, e.g. an extractor.
        chunks: Number of equal chunks along the batch dimension.
        running_chunk: The one chunk whose statistics update the running statistics (and ``num_batches_tracked``),
            exactly as a training-mode pass on that chunk alone would; ``None``: no chunk updates them.

    Example:
        >>> with chunked_batch_norm(extractor, 4):  # rows [0:N] see the statistics of [0:N] only
        ...     features = extractor(rotate_batch(images))
    """
    if chunks < 1:
        raise ValueError(f'chunks must be at least 1, got {chunks}.')
    # An instance attribute shadows the class's forward for this one module. What was there before (nothing, or an
    # enclosing context's forward) is put back after.
    saved = [(m, m.__dict__.get('forward')) for m in module.modules() if isinstance(m, _BatchNorm)]
    for bn, _ in saved:
        bn.forward = lambda x, bn=bn, forward=bn.forward: _chunked_forward(bn, forward, chunks, running_chunk, x)
    try:
        yield module
    finally:
        for bn, previous in saved:
            if previous is None:
                del bn.forward
            else:
                bn.forward = previous
