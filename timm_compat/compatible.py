"""Compatible networks: an extractor and a head bound to one interface, their recombination, and the fit check.

:func:`fit_problems` is the one answer to "do these components fit?": :func:`recombine`, :func:`make_compatible`,
``python -m timm_compat.hub check``, :func:`~timm_compat.transfer` and :class:`~timm_compat.stitching.StitchedModel`
all ask it, so a mismatch reads the same wherever it is refused.
"""
from typing import Any, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .batchnorm import eval_mode
from .component import Component
from .components import Extractor, Head, build_components
from .interface import Interface

__all__ = ['CompatibleModel', 'make_compatible', 'recombine', 'fit_problems', 'check_fit', 'link_problems',
           'mismatch_message']

RECOMBINE_REMEDY = ('Use components trained against the same interface, fit a stitching layer '
                    '(timm_compat.stitching.fit_stitch), or pass force=True to measure the mismatch.')


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


def _a(role: str) -> str:
    return f'{"an" if role[0] in "aeiou" else "a"} {role}'


def _features_of(iid: Optional[str]) -> str:
    return f'features of interface {iid}' if iid else 'features of no interface (an independent network)'


def link_problems(sender: str, emits: Tuple[int, Optional[str]], receiver: str,
                  takes: Tuple[int, Optional[str]]) -> List[str]:
    """What differs where features of ``(width, interface id)`` ``emits`` enter a module that ``takes`` others.

    Args:
        sender: Who emits the features, as the message names it (``"the extractor"``, ``"the stitch"``).
        emits: Width and interface id of the features.
        receiver: Who takes them (``"the head"``, ``"the stitch"``).
        takes: Width and interface id it takes.
    """
    (width, iid), (wanted_width, wanted_iid) = emits, takes
    problems = []
    if width != wanted_width:
        problems.append(f'{sender} emits width {width} but {receiver} takes width {wanted_width}')
    if iid != wanted_iid:
        problems.append(f'{sender} emits {_features_of(iid)} but {receiver} takes {_features_of(wanted_iid)}')
    return problems


def fit_problems(extractor: Component, head: Component, *, force: bool = False, probe: bool = True) -> List[str]:
    """Why ``head`` cannot run on ``extractor``'s features; empty when it can.

    Checked in turn, each only when the previous ones pass: the roles; the widths and the interface (both trained
    against one interface, which two independent networks never are); and, with ``probe``, the head run on the
    extractor's features of an image of the extractor's input size.

    Args:
        extractor: Should be an extractor.
        head: Should be a head.
        force: Do not compare interfaces: only widths and the probe decide.
        probe: Run the components (a batch of 2 zero images in eval mode, modes restored after).
    """
    problems = [f'the {place} component is {_a(c.role)}, not {_a(want)}: give the extractor first, then the head'
                for place, c, want in (('first', extractor, 'extractor'), ('second', head, 'head')) if c.role != want]
    if problems:
        return problems
    ids = extractor.interface_id, head.interface_id
    independent = not force and None in ids
    if independent:
        problems.append(f'the {"extractor" if ids[0] is None else "head"} was trained without an interface (an '
                        f'independent network), so nothing makes it compatible with another component')
    # Forced, or refused as independent already, the interface ids are not compared: only the widths.
    takes_id = ids[0] if force or independent else ids[1]
    problems += link_problems('the extractor', (extractor.width, ids[0]), 'the head', (head.width, takes_id))
    if probe and not problems:
        problems += _probe_problems(extractor, head)
    return problems


def mismatch_message(problems: Sequence[str], remedy: Optional[str] = RECOMBINE_REMEDY) -> str:
    """The one wording of a refused join: every problem, then what to do about them."""
    return f'The components do not fit: {"; ".join(problems)}.' + (f' {remedy}' if remedy else '')


def check_fit(extractor: Component, head: Component, *, force: bool = False,
              remedy: Optional[str] = RECOMBINE_REMEDY) -> None:
    """Raise ``ValueError`` with :func:`mismatch_message` when :func:`fit_problems` finds any."""
    if problems := fit_problems(extractor, head, force=force):
        raise ValueError(mismatch_message(problems, remedy))


def _probe_problems(extractor: Extractor, head: Head) -> List[str]:
    input_size = extractor.pretrained_cfg.get('input_size')
    param = next(iter(extractor.parameters()), None)
    if not input_size or param is None:  # a custom extractor: no input size to probe with
        return []
    with torch.no_grad(), eval_mode(extractor, bn='running'):
        features = extractor(torch.zeros(2, *input_size, device=param.device))
    problem = _head_problem(head, extractor.width, features.shape[-2:])
    return [problem] if problem else []


def _run_head(head: nn.Module, width: int, feature_hw: Sequence[int]) -> Union[torch.Tensor, Exception]:
    """``head``'s output on 2 zero feature maps of spatial size ``feature_hw`` (eval mode), or what it raised."""
    param = next(iter(head.parameters()), None)
    probe = torch.zeros(2, width, *feature_hw, device=param.device if param is not None else 'cpu')
    try:
        with torch.no_grad(), eval_mode(head, bn='running'):
            return head(probe)
    except Exception as e:  # timm tails fail with assertions, index and runtime errors alike
        return e


def _head_problem(head: Head, width: int, feature_hw: Sequence[int]) -> Optional[str]:
    """Why ``head`` cannot classify ``(N, width, *feature_hw)`` features, naming a size it does take; or None.

    Tails of some backbones take one feature size only (EfficientFormer's attention biases, Swin's windows with
    a fixed input size) or even sizes only (DLA); the probe tries square sizes nearest to ``feature_hw`` first.
    """
    out = _run_head(head, width, feature_hw)
    if isinstance(out, torch.Tensor):
        if tuple(out.shape) == (2, head.num_classes):
            return None
        return (f'the head gives outputs of shape {tuple(out.shape)} for 2 images, but the task has '
                f'{head.num_classes} classes: expected (2, {head.num_classes}). Give a head module with '
                f'{head.num_classes} outputs, or num_classes matching the module')
    h, w = feature_hw
    for size in sorted(range(1, max(2 * max(h, w), 32) + 1), key=lambda s: (abs(s - h), s)):
        if (size, size) != (h, w) and not isinstance(_run_head(head, width, (size, size)), Exception):
            return (f'the head does not accept interface features of spatial size {h}x{w} ({type(out).__name__}: '
                    f'{out}); it takes {size}x{size}. Give it features of that size: another input size '
                    f'(pretrained_cfg_overlay=dict(input_size=...)) or another split')
    return (f'the head does not accept interface features of shape (N, {width}, H, W): {out}. Give a module whose '
            f'input has {width} channels, or a timm model name')


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
        tail = isinstance(head, str) and head == 'tail'
        built = build_components(backbone, split, width, num_classes=num_classes, class_names=class_names,
                                 roles=('extractor', 'head') if tail else ('extractor',),
                                 pretrained=pretrained, model_args=model_args)
        extractor = built['extractor']
        if isinstance(head, nn.Module):
            head_module = Head(head, width, width, num_classes, class_names)
        elif tail:
            head_module = built['head']
        else:
            head_module = build_components(head, split if head_split is None else head_split, width,
                                           num_classes=num_classes, class_names=class_names, roles=('head',),
                                           pretrained=pretrained)['head']
    check_fit(extractor, head_module, force=True, remedy=None)
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
    check_fit(extractor, head, force=force)
    interface = extractor.interface if extractor.interface is head.interface else None
    return CompatibleModel(extractor, head, interface)
