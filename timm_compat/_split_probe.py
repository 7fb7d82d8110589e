"""Probes that check a split of a model: feature layout, and equality of the halves with the model in both modes."""
from typing import List, Optional, Sequence

import torch
from torch import nn


def model_name(model: nn.Module) -> str:
    """The timm architecture name of ``model``, or its class name."""
    return getattr(model, 'pretrained_cfg', {}).get('architecture', type(model).__name__)


def channels_last(model: nn.Module, at: str, shape: Sequence[int], input_hw: Sequence[int]) -> bool:
    """Whether the split module's output ``(N, A, B, C)`` is NHWC.

    timm's ``feature_info`` gives the channels of a feature level; otherwise the two dimensions that scale with
    the probe image are the spatial ones, and the model's ``output_fmt`` decides when both readings fit.
    """
    if len(shape) != 4:
        return False
    a, b, c = shape[1:]
    channels = {i['module']: i.get('num_chs') for i in getattr(model, 'feature_info', [])}.get(at)
    if channels is not None and (a == channels) != (c == channels):
        return c == channels
    height, width = input_hw

    def spatial(h: int, w: int) -> bool:
        return abs(h * width - w * height) < max(height, width)

    if spatial(b, c) != spatial(a, b):
        return spatial(a, b)
    return getattr(model, 'output_fmt', 'NCHW') == 'NHWC'


def probe(model: nn.Module, at: str, input_size: Optional[Sequence[int]]):
    """Run ``model`` in eval mode on two images: ``(x, output of module at, model output)``.

    The images have ``input_size``; by default at most 64 pixels a side where the model runs on that (the traced
    graph does not depend on the size, so a small probe checks it as well), else the size in ``pretrained_cfg``,
    else the patch embedding's.
    """
    cfg_size = tuple(getattr(model, 'pretrained_cfg', {}).get('input_size', (3, 224, 224)))
    sizes = [tuple(input_size)] if input_size else [(cfg_size[0], *(min(s, 64) for s in cfg_size[1:])), cfg_size]
    img_size = getattr(getattr(model, 'patch_embed', None), 'img_size', None)
    if not input_size and isinstance(img_size, (tuple, list)) and len(img_size) == 2:
        sizes.append((cfg_size[0], *img_size))
    sizes = list(dict.fromkeys(sizes))
    param = next(model.parameters(), None)
    device, dtype = (param.device, param.dtype) if param is not None else ('cpu', torch.float32)
    error, cut = None, []
    handle = model.get_submodule(at).register_forward_hook(lambda m, i, o: cut.append(o))
    try:
        for size in sizes:
            x = torch.randn(2, *size, generator=torch.Generator().manual_seed(0)).to(device, dtype)
            try:
                output = _run([model], x, False)
            except Exception as e:  # any failure means this size does not fit the model
                error = e
                continue
            if not cut:
                raise ValueError(f'Module {at!r} of {model_name(model)} is not called in forward(); split at a '
                                 f'module that runs (see split_points).')
            return x, cut[-1], output
    finally:
        handle.remove()
    raise ValueError(
        f'Cannot run {model_name(model)} on a probe input of size {sizes[-1]} to check the split: {error}. Pass '
        f'input_size=(C, H, W) to split_model, or create the model with pretrained_cfg_overlay=dict('
        f'input_size=(C, H, W)).') from error


def _run(modules: Sequence[nn.Module], x: torch.Tensor, training: bool):
    """``x`` through ``modules`` in turn, in one mode, with dropout drawn from one fixed seed for all of them."""
    devices = [x.device] if x.device.type == 'cuda' else []
    with torch.no_grad(), torch.random.fork_rng(devices=devices):
        torch.manual_seed(0)
        for module in modules:
            x = module.train(training)(x)
        return x


def writes_input(trunk: nn.Module, tail: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``tail`` changes the features it is given (an in-place op right after the split), which would
    rewrite the extractor's output before the compatibility methods score it. Both modes: an in-place dropout
    writes only in training."""
    buffers = [b for m in (trunk, tail) for b in m.buffers()]
    kept = [b.clone() for b in buffers]  # the training pass moves BN statistics, which check_split then uses
    try:
        for training in (False, True):
            features = _run([trunk], x, training)
            before = features.clone()
            _run([tail], features, training)
            if not torch.equal(features, before):
                return True
        return False
    finally:
        with torch.no_grad():
            for b, k in zip(buffers, kept):
                b.copy_(k)


def _flatten(out) -> Optional[List[torch.Tensor]]:
    """The tensors of a model output (a tensor, or tuples and lists of them); None for anything else."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        parts = [_flatten(o) for o in out]
        return None if None in parts else [t for p in parts for t in p]
    return None


def check_split(model: nn.Module, trunk: nn.Module, tail: nn.Module, x: torch.Tensor, at: str,
                 eval_output) -> None:
    """Refuse a split that does not run, or does not reproduce ``model`` in train or in eval mode."""
    for training in (False, True):
        mode = 'train' if training else 'eval'
        expected = _flatten(_run([model], x, training) if training else eval_output)
        try:
            got = _flatten(_run([trunk, tail], x, training))
        except Exception as e:  # the halves are generated code: any error means the split cannot be used
            raise ValueError(f'Splitting {model_name(model)} at {at!r} gives halves that fail in {mode} mode: '
                             f'{type(e).__name__}: {e}. Split at another module (see split_points).') from e
        same = (expected is not None and got is not None and len(got) == len(expected)
                and all(g.shape == e.shape and torch.allclose(g, e, rtol=1e-5, atol=1e-5)
                        for g, e in zip(got, expected)))
        if not same:
            raise ValueError(f'Splitting {model_name(model)} at {at!r} does not reproduce the model in {mode} '
                             f'mode. Split at another module (see split_points).')
