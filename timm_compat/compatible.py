"""Compatible networks: an extractor and a head bound to one interface, their recombination, and the fit check.

:func:`fit_problems` is the one answer to "do these components fit?": :func:`recombine`, :func:`make_compatible`,
``python -m timm_compat.hub check``, :func:`~timm_compat.transfer` and :class:`~timm_compat.stitching.StitchedModel`
all ask it, so a mismatch reads the same wherever it is refused.
"""
import functools
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ._folder import check_push_arguments
from ._references import FRESH_INTERFACE, as_component, as_head, as_interface
from ._split import default_num_classes
from .batchnorm import eval_mode
from .classes import same_classes
from .component import Component
from .components import Extractor, Head, build_components
from .interface import DEFAULT_WIDTH, Interface

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

    # Saving lives in timm_compat.recombined, which imports this module: imported on call to avoid the cycle.
    def save_pretrained(self, save_directory, *, repo_id: Optional[str] = None, push_to_hub: bool = False,
                        **push_to_hub_kwargs: Any):
        """Save as one folder timm loads (see :func:`timm_compat.recombined.save_recombined`).

        Args:
            save_directory: Folder to write, created if missing.
            repo_id: The Hub repo named in the model card; with ``push_to_hub``, the repo to push to (default: the
                folder's name, as ``huggingface_hub.ModelHubMixin``).
            push_to_hub: Also upload the folder with :meth:`push_to_hub`.
            **push_to_hub_kwargs: :meth:`push_to_hub`'s other arguments (``private``, ``commit_message``, ...).

        Returns:
            With ``push_to_hub``, the upload's ``huggingface_hub.CommitInfo``; else ``"timm"`` or ``"timm_compat"``:
            what ``timm.create_model('local-dir:DIR', pretrained=True)`` needs.
        """
        from .recombined import push_recombined, save_recombined
        check_push_arguments(functools.partial(push_recombined, self), push_to_hub, push_to_hub_kwargs)
        loads_with = save_recombined(self, save_directory, repo_id=repo_id)
        if push_to_hub:
            return self.push_to_hub(repo_id or Path(save_directory).name, **push_to_hub_kwargs)
        return loads_with

    def push_to_hub(self, repo_id: str, **kwargs: Any):
        """Upload :meth:`save_pretrained`'s folder (see :func:`timm_compat.recombined.push_recombined`)."""
        from .recombined import push_recombined
        return push_recombined(self, repo_id, **kwargs)

    @classmethod
    def from_pretrained(cls, model_id, **kwargs: Any) -> 'CompatibleModel':
        """Load a saved recombined model (see :func:`timm_compat.recombined.load_recombined`)."""
        from .recombined import load_recombined
        return load_recombined(model_id, **kwargs)


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
    head_param = next((p for p in head.parameters() if p.is_floating_point()), None)
    if head_param is not None and head_param.dtype != param.dtype:
        return [f'the extractor computes in {param.dtype} but the head in {head_param.dtype}: convert one to the '
                f'other\'s dtype (e.g. head.to({param.dtype}))']
    with torch.no_grad(), eval_mode(extractor, bn='running'):
        features = extractor(torch.zeros(2, *input_size, device=param.device, dtype=param.dtype))
    problem = _head_problem(head, extractor.width, features.shape[-2:])
    return [problem] if problem else []


def _run_head(head: nn.Module, width: int, feature_hw: Sequence[int]) -> Union[torch.Tensor, Exception]:
    """``head``'s output on 2 zero feature maps of spatial size ``feature_hw`` (eval mode), or what it raised."""
    param = next((p for p in head.parameters() if p.is_floating_point()), None)
    probe = torch.zeros(2, width, *feature_hw, **(dict(device=param.device, dtype=param.dtype) if param is not None
                                                  else {}))
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


def make_compatible(backbone: str, *, head: Union[str, Path, nn.Module] = 'tail', split: Union[str, int, None] = None,
                    interface: Union[Interface, str, Path, None] = FRESH_INTERFACE, num_classes: Optional[int] = None,
                    head_split: Union[str, int, None] = None, class_names: Optional[Sequence[str]] = None,
                    pretrained: bool = False, init_seed: Optional[int] = None, width: Optional[int] = None,
                    image_size: Optional[int] = None, **model_args: Any) -> CompatibleModel:
    """Split a timm backbone into an extractor and a head that fit ``interface``, defaulting as timm.create_model.

    Args:
        backbone: timm model name.
        head: ``"tail"`` (the rest of ``backbone``), another timm model name (its tail after ``head_split``), a
            module taking ``(N, width, H, W)``, a trained :class:`Head`, or the folder or Hub id of a published head.
        split: Module path or ``feature_info`` index after which the extractor ends. Default: the paper's split
            where it names one (CIFAR ResNets after ``layer2``, MobileNetV2 after its 11th inverted residual block,
            ``blocks.4.0``; see :data:`timm_compat._split.DEFAULT_SPLITS`), otherwise the middle ``feature_info``
            level. Shown in the model's repr and saved in the components' config.
        interface: An :class:`Interface`, or the folder or Hub id of one (loaded frozen). Not given: a fresh
            ``Interface(width=64, rp=True)`` (of ``width`` if given), or a given trained head's own. ``None``: an
            independent network.
        num_classes: Classes of the head; default the backbone's own, as in ``timm.create_model`` (or a given
            trained head's).
        head_split: Split point of the head model; defaults to ``split``, or without one, the head model's default.
        class_names: Names of the classes, in label order (DCC maps labels to common classes by name).
        pretrained: Load timm's pretrained weights (``pretrained_cfg_overlay=dict(file=...)`` for a local file);
            the Hub repo they came from is recorded as ``base_model``.
        init_seed: Identical initial weights (IIW): the same backbone and seed give the same initial parameters.
        width: Feature width of a fresh interface, or of an independent network (default 64).
        image_size: Square input size the network is trained at (train.py passes its ``image_size``): recorded in
            the components' ``pretrained_cfg``, so ``timm.data.resolve_data_config(model=...)`` preprocesses at it.
        **model_args: Passed to ``timm.create_model``.

    Returns:
        A :class:`CompatibleModel`.

    Raises:
        ValueError: An invalid argument, or a head that does not fit (interface, width, classes, feature size).
    """
    head = as_head(head)
    interface = as_interface(interface, head, width)
    width = interface.width if interface is not None else width or DEFAULT_WIDTH
    given = isinstance(head, Head)
    num_classes = _classes(num_classes, head if given else None, backbone)
    if given and class_names is not None and head.class_names is not None and \
            not same_classes(class_names, head.class_names):
        raise ValueError(f'class_names={list(class_names)}, but the given head classifies {head.class_names}, in '
                         f'that order: drop class_names, or give a head of those classes.')
    _check_image_size(image_size)
    with torch.random.fork_rng(devices=[], enabled=init_seed is not None):
        if init_seed is not None:
            torch.manual_seed(init_seed)
        extractor, head_module = _build(backbone, head, split, head_split, width, model_args, dict(
            num_classes=num_classes, class_names=class_names, pretrained=pretrained, image_size=image_size))
    extractor.__dict__['interface'] = interface
    if given and (problems := link_problems('the extractor', (width, extractor.interface_id), 'the head',
                                            (head.width, head.interface_id))):
        raise ValueError(mismatch_message(problems, 'Give the interface the head was trained against.'))
    head_module.__dict__['interface'] = interface
    check_fit(extractor, head_module, force=True, remedy=None)
    return CompatibleModel(extractor, head_module, interface)


def _build(backbone: str, head: Union[str, nn.Module], split, head_split, width: int, model_args: Dict[str, Any],
           common: Dict[str, Any]) -> Tuple[Extractor, Head]:
    """The extractor, and the head ``head`` names, built in the order that identical initial weights rely on."""
    tail = isinstance(head, str) and head == 'tail'
    built = build_components(backbone, split, width, roles=('extractor', 'head') if tail else ('extractor',),
                             model_args=model_args, **common)
    if isinstance(head, Head) or tail:
        return built['extractor'], head if not tail else built['head']
    if isinstance(head, nn.Module):
        return built['extractor'], Head(head, width, width, common['num_classes'], common['class_names'])
    return built['extractor'], build_components(head, split if head_split is None else head_split, width,
                                                roles=('head',), **common)['head']


def _check_image_size(image_size: Optional[int]) -> None:
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1):
        raise ValueError(f'image_size must be a positive integer, got {image_size!r}: e.g. image_size=32.')


def _classes(num_classes: Optional[int], head: Optional[Head], backbone: str) -> int:
    """``num_classes`` checked, or its default: a trained head's classes, else the backbone's own."""
    if num_classes is None:
        return head.num_classes if head is not None else default_num_classes(backbone)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f'num_classes must be a positive integer, got {num_classes!r}: e.g. num_classes=10.')
    if head is not None and num_classes != head.num_classes:
        raise ValueError(f'num_classes={num_classes}, but the given head classifies {head.num_classes} classes: '
                         f'drop num_classes, or give a head of {num_classes} classes.')
    return num_classes


def shared_interfaces(model: nn.Module) -> Dict[int, Interface]:
    """A ``copy.deepcopy`` memo that keeps every interface ``model`` or one of its parts references shared.

    An interface is held by reference (its aux heads are what other models are trained against), not as a weight
    of the model: a copy of a stitched or force-joined model, whose parts reference interfaces that the model itself
    does not, must not copy them either.
    """
    return {id(i): i for module in model.modules() if (i := module.__dict__.get('interface')) is not None}


def recombine(extractor: Union[Extractor, str, Path], head: Union[Head, str, Path],
              force: bool = False) -> CompatibleModel:
    """Join an extractor and a head, refusing components of different interfaces.

    ``timm_compat.recombine("org/resnet56-extractor", "org/mnv2-head")`` downloads both (through the Hugging Face
    cache), verifies them (loaded components are in eval mode), checks that they fit and returns the model.

    Args:
        extractor: Any extractor, or the folder or Hub id of one.
        head: Any head, or the folder or Hub id of one.
        force: Join components whose interface ids differ, or that have none (e.g. to measure how incompatible
            they are).

    Returns:
        A :class:`CompatibleModel` on the extractor's interface when it has one.

    Raises:
        ComponentError: A folder or Hub id that does not load (see :func:`~timm_compat.load_component`).
        ValueError: Widths differ (the module could not run), or, unless ``force``, either component was trained
            without an interface or the interface ids differ; the head cannot run on the extractor's features
            (the feature size it takes is named).
    """
    extractor, head = as_component(extractor), as_component(head)
    check_fit(extractor, head, force=force)
    interface = extractor.interface if extractor.interface is head.interface else None
    return CompatibleModel(extractor, head, interface)
