"""Compatible networks: an extractor and a head bound to one interface, and their recombination."""
from typing import Any, Optional, Sequence, Union

import torch
from torch import nn

from .components import Extractor, Head, build_backbone_parts, build_head
from .interface import Interface

__all__ = ['CompatibleModel', 'make_compatible', 'recombine']


class CompatibleModel(nn.Module):
    """An extractor and a head, with the interface they were trained against.

    ``model(x)`` gives logits; ``model.features(x)`` the interface features ``(N, width, H, W)``. The interface is
    held by reference, not as a submodule: models built on one interface share its aux heads, and a model's
    ``state_dict`` and ``parameters()`` are its own. Train the aux heads by giving ``interface.parameters()`` to the
    optimiser too, or through :class:`~timm_compat.joint.JointModel`, which registers the interface once.
    """

    def __init__(self, extractor: Extractor, head: Head, interface: Optional[Interface] = None):
        super().__init__()
        self.extractor = extractor
        self.head = head
        self.__dict__['interface'] = interface

    @property
    def pretrained_cfg(self):
        return self.extractor.pretrained_cfg

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.extractor(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.extractor(x))


def _head_error(head: nn.Module, width: int, feature_hw: Sequence[int]) -> Optional[Exception]:
    """What ``head`` raises on interface features of spatial size ``feature_hw`` (eval mode), or None."""
    param = next(iter(head.parameters()), None)
    probe = torch.zeros(2, width, *feature_hw, device=param.device if param is not None else 'cpu')
    was_training = [(m, m.training) for m in head.modules()]
    try:
        with torch.no_grad():
            head.eval()(probe)
    except Exception as e:  # timm tails fail with assertions, index and runtime errors alike
        return e
    finally:
        for m, training in was_training:
            m.training = training
    return None


def _check_head_accepts(head: nn.Module, width: int, feature_hw: Sequence[int]) -> None:
    """Refuse a head that cannot run on ``(N, width, *feature_hw)`` features, naming a size it does take.

    Tails of some backbones take one feature size only (EfficientFormer's attention biases, Swin's windows with
    a fixed input size) or even sizes only (DLA); the probe tries square sizes nearest to ``feature_hw`` first.
    """
    error = _head_error(head, width, feature_hw)
    if error is None:
        return
    h, w = feature_hw
    for size in sorted(range(1, max(2 * max(h, w), 32) + 1), key=lambda s: (abs(s - h), s)):
        if (size, size) != (h, w) and _head_error(head, width, (size, size)) is None:
            raise ValueError(
                f'The head does not accept interface features of spatial size {h}x{w} '
                f'({type(error).__name__}: {error}); it takes {size}x{size}. Give it features of that size: '
                f'another input size (pretrained_cfg_overlay=dict(input_size=...)) or another split.') from error
    raise ValueError(
        f'The head module does not accept interface features of shape (N, {width}, H, W): {error}. '
        f'Give a module whose input has {width} channels, or a timm model name.') from error


def _check_head_outputs(head: 'Head', width: int, feature_hw: Sequence[int]) -> None:
    """Refuse a head whose logits are not ``(N, head.num_classes)``: its scores would index the wrong classes."""
    param = next(iter(head.parameters()), None)
    probe = torch.zeros(2, width, *feature_hw, device=param.device if param is not None else 'cpu')
    was_training = [(m, m.training) for m in head.modules()]
    try:
        with torch.no_grad():
            shape = tuple(head.eval()(probe).shape)
    finally:
        for m, training in was_training:
            m.training = training
    if shape != (2, head.num_classes):
        raise ValueError(f'The head gives outputs of shape {shape} for 2 images, but the task has '
                         f'{head.num_classes} classes: expected (2, {head.num_classes}). Give a head module with '
                         f'{head.num_classes} outputs, or num_classes matching the module.')


def _check_fits(extractor: Extractor, head: Head) -> None:
    """Refuse a head that cannot take the extractor's features at the extractor's input size."""
    input_size = extractor.pretrained_cfg.get('input_size')
    param = next(iter(extractor.parameters()), None)
    if not input_size or param is None:  # a custom extractor: no input size to probe with
        return
    was_training = [(m, m.training) for m in extractor.modules()]
    try:
        with torch.no_grad():
            features = extractor.eval()(torch.zeros(2, *input_size, device=param.device))
    finally:
        for m, training in was_training:
            m.training = training
    _check_head_accepts(head, extractor.width, features.shape[-2:])


def make_compatible(
        backbone: str,
        *,
        split: Union[str, int],
        interface: Optional[Interface],
        num_classes: int,
        head: Union[str, nn.Module] = 'tail',
        head_split: Union[str, int, None] = None,
        class_names: Optional[Sequence[str]] = None,
        pretrained: bool = False,
        init_seed: Optional[int] = None,
        width: Optional[int] = None,
        **model_args: Any,
) -> CompatibleModel:
    """Split a timm backbone into an extractor and a head that fit ``interface``.

    Args:
        backbone: timm model name.
        split: Module path or ``feature_info`` index after which the extractor ends.
        interface: The interface to fit; ``None`` for an independent network of width ``width``.
        num_classes: Classes of the head.
        head: ``"tail"`` (the rest of ``backbone``), another timm model name (its tail after ``head_split``), or a
            module taking ``(N, width, H, W)``.
        head_split: Split point of the head model; defaults to ``split``.
        class_names: Names of the classes, in label order (DCC maps labels to common classes by name).
        pretrained: Load timm's pretrained weights (``pretrained_cfg_overlay=dict(file=...)`` for a local file).
        init_seed: Identical initial weights (IIW): the same backbone and seed give the same initial parameters.
        width: Feature width when ``interface`` is None.
        **model_args: Passed to ``timm.create_model``.

    Returns:
        A :class:`CompatibleModel`.
    """
    if interface is None and width is None:
        raise ValueError('Give an interface, or width=... for an independent network.')
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f'num_classes must be a positive integer, got {num_classes!r}: e.g. num_classes=10.')
    width = interface.width if interface is not None else width
    with torch.random.fork_rng(devices=[], enabled=init_seed is not None):
        if init_seed is not None:
            torch.manual_seed(init_seed)
        trunk, tail, info = build_backbone_parts(
            backbone, split, num_classes=num_classes, pretrained=pretrained, model_args=model_args)
        feature_shape = info.pop('feature_shape')
        in_chs = feature_shape[0]
        extractor = Extractor(trunk, in_chs, width, config=info)
        if isinstance(head, nn.Module):
            head_module = Head(head, width, width, num_classes, class_names)
        elif head == 'tail':
            head_module = Head(tail, in_chs, width, num_classes, class_names, config=info)
        else:
            head_module = build_head(head, split if head_split is None else head_split, width, num_classes,
                                     class_names=class_names, pretrained=pretrained)
    # The adapter is a 1x1 conv: the extractor's features have the trunk's spatial size.
    _check_head_accepts(head_module, width, feature_shape[1:])
    _check_head_outputs(head_module, width, feature_shape[1:])
    for component in (extractor, head_module):
        component.__dict__['interface'] = interface
    return CompatibleModel(extractor, head_module, interface)


def recombine(extractor: Extractor, head: Head, force: bool = False) -> CompatibleModel:
    """Join an extractor and a head, refusing components of different interfaces.

    Args:
        extractor: Any extractor.
        head: Any head.
        force: Join components whose interface ids differ, or that have none (e.g. to measure how incompatible
            they are).

    Returns:
        A :class:`CompatibleModel` on the extractor's interface when it has one.

    Raises:
        ValueError: Widths differ (the module could not run), or, unless ``force``, either component was trained
            without an interface or the interface ids differ; the head cannot run on the extractor's features
            (the feature size it takes is named).
    """
    if extractor.width != head.width:
        raise ValueError(
            f'Cannot recombine: the extractor emits width {extractor.width} (interface '
            f'{extractor.interface_id}) but the head takes width {head.width} (interface {head.interface_id}). '
            f'Components must come from one interface.')
    if None in (extractor.interface_id, head.interface_id) and not force:
        # Two independent networks share no interface even when both ids are None.
        which = 'extractor' if extractor.interface_id is None else 'head'
        raise ValueError(
            f'Cannot recombine: the {which} was trained without an interface (an independent network), so nothing '
            f'makes it compatible with another component. Train both against one Interface, fit a stitching '
            f'layer, or pass force=True to measure the mismatch.')
    if extractor.interface_id != head.interface_id and not force:
        raise ValueError(
            f'Cannot recombine: the extractor fits interface {extractor.interface_id} and the head fits interface '
            f'{head.interface_id}. Use components trained against the same interface, fit a stitching layer, '
            f'or pass force=True to measure the mismatch.')
    _check_fits(extractor, head)
    interface = extractor.interface if extractor.interface is head.interface else None
    return CompatibleModel(extractor, head, interface)
