"""Split a timm model into a trunk and a tail at a named module, with torch.fx.

The model's ``forward`` is traced with the split module kept as a leaf; the graph is cut right after it. A cut
is valid only where the split module's output is the one value that flows on (no skip connection crosses it),
so ``tail(trunk(x))`` replays exactly the operations of ``model(x)``. Both halves are ``fx.GraphModule``\\ s that
hold the model's own leaf modules: no weight is copied.

A split is checked before it is returned: it must reproduce the model in train and in eval mode on a probe
input, or :func:`split_model` refuses it with the reason. Modules whose code reads ``self.training`` (dropout,
drop-path, attention-bias caches) stay leaves so that their mode is live, and what remains mode dependent in the
traced code (``F.dropout(..., training=self.training)`` in a ``forward_head``) reads the halves' own ``training``
flag. Channels-last features (Swin, MambaOut, Sequencer, ...) leave the trunk as ``(N, C, H, W)``; the tail
permutes them back.
"""
import contextlib
import copy
import functools
import inspect
import math
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import fx, nn

import timm
from timm.layers import get_notrace_functions, get_notrace_modules

from ._split_probe import channels_last, check_split, model_name as _model_name, probe, writes_input

__all__ = ['split_model', 'split_points', 'resolve_split', 'default_split', 'default_num_classes', 'DEFAULT_SPLITS']

_READS_TRAINING = re.compile(r'\bself\.training\b')


@functools.lru_cache(maxsize=None)
def _reads_training(cls: type) -> bool:
    """True when a module class's own code (not torch.nn's) branches on ``self.training``."""
    for klass in cls.__mro__:
        if klass.__module__.startswith('torch.') or klass in (nn.Module, object):
            continue
        try:
            if _READS_TRAINING.search(inspect.getsource(klass)):
                return True
        except (OSError, TypeError):  # classes defined in a REPL or C extension have no source to read
            continue
    return False


class _SplitTracer(fx.Tracer):
    """fx tracer that keeps ``split_at``, timm's no-trace modules and mode-dependent modules as leaves."""

    def __init__(self, split_at: str):
        super().__init__(autowrap_modules=(math,), autowrap_functions=tuple(get_notrace_functions()))
        self.split_at = split_at
        self.leaf_types = tuple(get_notrace_modules())

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name == self.split_at:
            return True
        if self.leaf_types and isinstance(m, self.leaf_types):
            return True
        # A module holding the split point must be traced through, mode dependent or not; the train/eval graph
        # comparison covers it.
        holds_split = self.split_at.startswith(module_qualified_name + '.')
        if _reads_training(type(m)) and not holds_split:
            return True
        return super().is_leaf_module(m, module_qualified_name)


def split_points(model: nn.Module) -> List[str]:
    """Names worth offering as split points: ``feature_info`` modules, then every block of every stage.

    Any module whose output is the only value passed on is a valid split; this lists the usual ones. Only names
    of modules that exist in ``model`` are listed (some ``feature_info`` entries name modules of the
    ``features_only`` variant).
    """
    modules = dict(model.named_modules())
    sequentials = {name for name, m in modules.items() if isinstance(m, nn.Sequential) and name}

    def inside_a_block(name: str) -> bool:
        # True for e.g. 'layer2.0.downsample': an ancestor is itself one block of a Sequential.
        parts = name.split('.')
        return any('.'.join(parts[:i - 1]) in sequentials for i in range(2, len(parts)))

    names = [info['module'] for info in getattr(model, 'feature_info', [])]
    for name in sorted(sequentials, key=lambda n: list(modules).index(n)):
        if not inside_a_block(name):
            names.extend(f'{name}.{child}' for child, _ in modules[name].named_children())
    return list(dict.fromkeys(n for n in names if n in modules))


def resolve_split(model: nn.Module, at: Union[str, int]) -> str:
    """Turn a ``feature_info`` index or a module path into a module path, or raise naming the valid ones."""
    modules = dict(model.named_modules())
    if isinstance(at, int) and not isinstance(at, bool):
        info = getattr(model, 'feature_info', None)
        if not info:
            raise ValueError(f'{_model_name(model)} has no feature_info; give the split as a module path instead.')
        if not -len(info) <= at < len(info):
            raise ValueError(
                f'Split index {at} is out of range for {_model_name(model)}: feature_info has {len(info)} levels '
                f'({", ".join(i["module"] for i in info)}).')
        if info[at]['module'] not in modules:
            raise ValueError(
                f'feature_info level {at} of {_model_name(model)} names module {info[at]["module"]!r}, which this '
                f'model does not have; give a module path from timm_compat.split_points(model) instead.')
        return info[at]['module']
    if not isinstance(at, str) or at not in modules or not at:
        points = split_points(model)
        shown = ', '.join(points[:40]) + (f', ... ({len(points) - 40} more)' if len(points) > 40 else '')
        raise ValueError(
            f'Unknown split point {at!r} for {_model_name(model)}. Valid split points include: {shown}. '
            f'A feature_info index (0..{len(getattr(model, "feature_info", [])) - 1}) also works.')
    return at


_MOBILENETV2_11TH_BLOCK = 'blocks.4.0'
DEFAULT_SPLITS = {
    **{name: 'layer2' for name in ('resnet8_cifar', 'resnet20_cifar', 'resnet56_cifar', 'wide_resnet56_cifar',
                                   'wrn28_10_cifar')},
    **{f'mobilenetv2_{m}': _MOBILENETV2_11TH_BLOCK for m in ('035', '050', '075', '100', '140', '100_cifar')},
    **{name: 'stages.1' for name in ('airbench94_cifar', 'airbench_desktop_cifar', 'airbench_mobile_cifar')},
}
"""The split of Gygli et al. (2021) for the backbones it names, by timm model name.

CIFAR ResNets split after stage 2 of 3 (``layer2``; Sec. 4 uses ResNet-56). MobileNetV2 splits after its 11th
inverted residual block (Sec. 5.2), counted as Sandler et al. (Table 2) and torchvision count them, the ``t=1``
bottleneck first: timm's ``blocks.0.0`` (a ``DepthwiseSeparableConv``) is the 1st, ``blocks.1.*`` the 2nd-3rd,
``blocks.2.*`` the 4th-6th, ``blocks.3.*`` the 7th-10th, so ``blocks.4.0`` (the first 96-channel block) is the 11th,
of 17. Only the variants of standard depth are listed; the deeper ``d`` variants have other block counts.
The airbench family (not in the paper) splits after its second of three groups (``stages.1``, 7x7 at 32x32 for
every member), so an extractor of one member and a head of another recombine."""


def default_split(model: nn.Module, name: Optional[str] = None) -> str:
    """The split used when none is given: :data:`DEFAULT_SPLITS` for the paper's backbones, otherwise the middle
    ``feature_info`` level (of those whose module the model has; the deeper one of two middles).

    Args:
        model: The timm model.
        name: Its timm model name (tags such as ``.a1_in1k`` are ignored); defaults to the model's own.

    Raises:
        ValueError: The model is not one of the paper's and has no usable ``feature_info``.
    """
    name = (name or _model_name(model)).split('.')[0]
    if name in DEFAULT_SPLITS:
        return DEFAULT_SPLITS[name]
    modules = dict(model.named_modules())
    levels = [info['module'] for info in getattr(model, 'feature_info', []) if info.get('module') in modules]
    if not levels:
        raise ValueError(f'{name} has no feature_info to choose a default split from: give split=... (a module '
                         f'path from timm_compat.split_points(model)).')
    return levels[len(levels) // 2]


@contextlib.contextmanager
def _preserved(model: nn.Module):
    """Undo what tracing and probing do to ``model``: new attributes, filled caches, modes, BN statistics."""
    modules = list(model.modules())
    modes = [m.training for m in modules]
    attrs = [dict(vars(m)) for m in modules]
    contents = [{k: copy.copy(v) for k, v in vars(m).items() if type(v) in (dict, list)} for m in modules]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        yield
    finally:
        for m, mode, before, saved in zip(modules, modes, attrs, contents):
            m.__dict__.clear()
            m.__dict__.update(before)
            for k, v in saved.items():
                before[k].clear()
                before[k].update(v) if isinstance(v, dict) else before[k].extend(v)
            m.training = mode
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)


def _trace(model: nn.Module, at: str, training: bool) -> Tuple[fx.Graph, Dict[str, Any]]:
    """Trace in one mode with optional ``forward`` arguments at their defaults; also return new constants."""
    params = list(inspect.signature(model.forward).parameters.values())[1:]
    concrete = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
    before = set(vars(model))
    model.train(training)
    try:
        graph = _SplitTracer(at).trace(model, concrete_args=concrete)
    except Exception as e:  # fx raises many types; all mean the same thing to the user
        raise ValueError(
            f'Cannot trace {_model_name(model)} with torch.fx to split it at {at!r}: {e}. '
            f'Register the offending module with timm.layers.register_notrace_module.') from e
    constants = {k: getattr(model, k) for k in set(vars(model)) - before}
    for k in constants:  # so the other mode's trace gives its constants the same names (_tensor_constant0, ...)
        delattr(model, k)
    _drop_specialised_inputs(graph)
    return graph, constants


def _drop_specialised_inputs(graph: fx.Graph) -> None:
    """Remove the placeholders fx keeps for arguments traced at their defaults, with the checks that guard them."""
    for ph in [n for n in graph.nodes if n.op == 'placeholder'][1:]:
        doomed, frontier = [], [ph]
        while frontier:
            node = frontier.pop()
            doomed.append(node)
            frontier.extend(node.users)
        for node in sorted(set(doomed), key=list(graph.nodes).index, reverse=True):
            graph.erase_node(node)


class _ModeMismatch(Exception):
    pass


def _merge_modes(train: fx.Graph, evaluation: fx.Graph, model_name: str) -> fx.Graph:
    """One graph for both modes: arguments that are True in train and False in eval read ``self.training``.

    Raises:
        ValueError: The two traces differ in any other way (a branch on ``self.training`` in traced code).
    """
    train_nodes, eval_nodes = list(train.nodes), list(evaluation.nodes)
    partner = dict(zip(eval_nodes, train_nodes))
    live = []

    def merge(a, b):
        if isinstance(a, fx.Node) and isinstance(b, fx.Node):
            if partner.get(b) is not a:
                raise _ModeMismatch
            return a
        if isinstance(a, slice) and isinstance(b, slice):
            return slice(merge(a.start, b.start), merge(a.stop, b.stop), merge(a.step, b.step))
        if a is True and b is False:
            if not live:
                with train.inserting_before(train_nodes[1] if len(train_nodes) > 1 else None):
                    live.append(train.get_attr('training'))
            return live[0]
        if isinstance(a, (tuple, list)) and type(a) is type(b) and len(a) == len(b):
            return type(a)(merge(x, y) for x, y in zip(a, b))
        if isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys():
            return {k: merge(a[k], b[k]) for k in a}
        if type(a) is not type(b) or a != b:
            raise _ModeMismatch
        return a

    if len(train_nodes) != len(eval_nodes):
        raise ValueError(_mode_refusal(model_name, f'{len(train_nodes)} vs {len(eval_nodes)} operations'))
    for a, b in zip(train_nodes, eval_nodes):
        try:
            if (a.op, a.target) != (b.op, b.target):
                raise _ModeMismatch
            a.args, a.kwargs = merge(a.args, b.args), merge(a.kwargs, b.kwargs)
        except _ModeMismatch:
            raise ValueError(_mode_refusal(model_name, f'{a.format_node()} in train mode, {b.format_node()} in '
                                                       f'eval mode')) from None
    return train


def _mode_refusal(model_name: str, what: str) -> str:
    return (f'Cannot split {model_name}: its forward() runs different code in train and eval mode ({what}), so a '
            f'traced split would keep one mode. Split at a module inside the branch-free part, or register the '
            f'module that branches with timm.layers.register_notrace_module.')


def _cut(graph: fx.Graph, at: str, channels_last: bool, clone_input: bool = False) -> Tuple[fx.Graph, fx.Graph]:
    """Trunk and tail graphs; with ``channels_last`` the trunk emits NCHW and the tail takes NCHW; with
    ``clone_input`` the tail works on a copy of its input."""
    nodes = list(graph.nodes)
    cuts = [n for n in nodes if n.op == 'call_module' and n.target == at]
    if len(cuts) != 1:
        raise ValueError(
            f'Module {at!r} is called {len(cuts)} times in forward(); split at a module that runs exactly once.')
    cut = cuts[0]
    before, after = nodes[:nodes.index(cut) + 1], nodes[nodes.index(cut) + 1:]
    defined = set(before)
    crossing = {a for n in after for a in n.all_input_nodes if a in defined and a is not cut and a.op != 'get_attr'}
    if crossing:
        raise ValueError(
            f'Cannot split at {at!r}: values other than its output flow past it '
            f'({", ".join(sorted(c.name for c in crossing))}), e.g. a skip connection. '
            f'Split at the end of a block or stage instead; see timm_compat.split_points(model).')

    trunk_graph, env = fx.Graph(), {}
    for n in before:
        env[n] = trunk_graph.node_copy(n, lambda a: env[a])
    out = env[cut]
    trunk_graph.output(trunk_graph.call_method('permute', (out, 0, 3, 1, 2)) if channels_last else out)

    tail_graph = fx.Graph()
    x = tail_graph.placeholder('x')
    if clone_input:  # the tail writes its input in place (e.g. ReLU(inplace=True)): the extractor's features
        x = tail_graph.call_method('clone', (x,))
    env = {cut: tail_graph.call_method('permute', (x, 0, 2, 3, 1)) if channels_last else x}
    for n in after:
        for a in n.all_input_nodes:
            if a not in env:  # parameters, buffers and the mode read with get_attr
                env[a] = tail_graph.node_copy(a, lambda b: env[b])
        env[n] = tail_graph.node_copy(n, lambda a: env[a])
    return trunk_graph, tail_graph


def split_model(model_or_name: Union[nn.Module, str], at: Union[str, int], *,
                input_size: Optional[Sequence[int]] = None, **create_kwargs) -> Tuple[fx.GraphModule, fx.GraphModule]:
    """Split a model into ``(trunk, tail)`` right after module ``at``.

    The split is checked on a probe input: ``tail(trunk(x))`` must equal ``model(x)`` in eval mode and, with the
    same dropout draws, in train mode. ``model`` itself is left as it was (modes, caches, BN statistics).

    Args:
        model_or_name: A model, or a timm model name passed to ``timm.create_model`` with ``create_kwargs``.
        at: Module path (``'layer2'``, ``'blocks.4.0'``, ``'stages.1'``) or ``feature_info`` index. The split
            module belongs to the trunk.
        input_size: ``(C, H, W)`` of the probe input; defaults to ``pretrained_cfg['input_size']``.
        **create_kwargs: Passed to ``timm.create_model`` when a name is given.

    Returns:
        ``(trunk, tail)`` with ``tail(trunk(x))`` equal to ``model(x)`` in either mode. Both share the model's
        modules and follow their own ``train()``/``eval()``. Channels-last features leave the trunk as NCHW.

    Raises:
        ValueError: Unknown model or split point, a split that a skip connection crosses, a split module whose
            output is not one tensor, or a split that does not reproduce the model.
    """
    model = create_backbone(model_or_name, **create_kwargs) if isinstance(model_or_name, str) else model_or_name
    _check_no_grad_checkpointing(model)
    at = resolve_split(model, at)
    with _preserved(model):
        x, features, output = probe(model, at, input_size)
        if not isinstance(features, torch.Tensor):
            raise ValueError(
                f'Cannot split {_model_name(model)} at {at!r}: the module returns a {type(features).__name__}, '
                f'not one tensor. Split at a module that returns a tensor (see split_points).')
        nhwc = channels_last(model, at, features.shape, x.shape[-2:])
        train_graph, constants = _trace(model, at, True)
        eval_graph, eval_constants = _trace(model, at, False)
        for k, v in eval_constants.items():
            if k not in constants or not torch.equal(constants[k], v):
                raise ValueError(_mode_refusal(_model_name(model), f'constant {k} differs'))
        graph = _merge_modes(train_graph, eval_graph, _model_name(model))
        trunk_graph, tail_graph = _cut(graph, at, nhwc)
        for k, v in constants.items():  # the halves take their copies; the model loses them again on exit
            setattr(model, k, v)
        trunk = fx.GraphModule(model, trunk_graph, class_name='Trunk')
        tail = fx.GraphModule(model, tail_graph, class_name='Tail')
        if writes_input(trunk, tail, x):
            tail = fx.GraphModule(model, _cut(graph, at, nhwc, clone_input=True)[1], class_name='Tail')
        check_split(model, trunk, tail, x, at, output)
    # Only the halves' own flags: their shared submodules keep whatever modes the model gave them.
    trunk.training = tail.training = model.training
    return trunk, tail


def _check_no_grad_checkpointing(model: nn.Module) -> None:
    """Refuse a model whose forward is checkpointed: timm's ``checkpoint_seq`` calls a stage's blocks rather than the
    stage, so the split module may never run, and the traced halves would not keep the checkpointing anyway."""
    if any(getattr(m, 'grad_checkpointing', False) is True for m in model.modules()):
        raise ValueError(f'Cannot split {_model_name(model)} with gradient checkpointing on: the halves could not '
                         f'keep it. Call model.set_grad_checkpointing(False) before splitting.')


def create_backbone(name: str, **kwargs) -> nn.Module:
    """``timm.create_model`` with an error that suggests close names when the model is unknown."""
    if not timm.is_model(name):
        close = timm.list_models(f'*{name.split("_")[0]}*')[:12]
        hint = f' Similar: {", ".join(close)}.' if close else ''
        raise ValueError(f'Unknown timm model {name!r}.{hint} See timm.list_models().')
    return timm.create_model(name, **kwargs)


def default_num_classes(name: str) -> int:
    """The classes of ``timm.create_model(name)``: the ``num_classes`` of its pretrained_cfg, as timm's builder
    defaults it, or (a model whose cfg names none) the model's own, read from an instance."""
    cfg = timm.models.get_pretrained_cfg(name) if timm.is_model(name) else None
    if cfg is not None and cfg.num_classes is not None and cfg.num_classes >= 0:
        return cfg.num_classes
    return create_backbone(name).num_classes


@torch.no_grad()
def output_shape(module: nn.Module, input_size: Tuple[int, int, int]) -> Tuple[int, ...]:
    """Shape (without batch) of ``module``'s output for one input of ``input_size``, in eval mode."""
    was_training = module.training
    module.eval()
    try:
        out = module(torch.zeros(1, *input_size, device=next(module.parameters()).device))
    except (RuntimeError, AssertionError) as e:
        raise ValueError(
            f'Cannot run the model on its pretrained_cfg input size {tuple(input_size)}: {e}. If you changed the '
            f'input size, say so with pretrained_cfg_overlay=dict(input_size=(3, H, W)).') from e
    finally:
        module.train(was_training)
    return tuple(out.shape[1:])
