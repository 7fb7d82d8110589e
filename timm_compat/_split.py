"""Split a timm model into a trunk and a tail at a named module, with torch.fx.

The model's ``forward`` is traced with the split module kept as a leaf; the graph is cut right after it. A cut
is valid only where the split module's output is the one value that flows on (no skip connection crosses it),
so ``tail(trunk(x))`` replays exactly the operations of ``model(x)``. Both halves are ``fx.GraphModule``\\ s that
hold the model's own leaf modules: no weight is copied.
"""
import math
from typing import List, Tuple, Union

import torch
from torch import fx, nn

import timm
from timm.layers import get_notrace_functions, get_notrace_modules

__all__ = ['split_model', 'split_points', 'resolve_split']


class _SplitTracer(fx.Tracer):
    """fx tracer that keeps ``split_at`` and timm's no-trace modules as leaves."""

    def __init__(self, split_at: str):
        super().__init__(autowrap_modules=(math,), autowrap_functions=tuple(get_notrace_functions()))
        self.split_at = split_at
        self.leaf_types = tuple(get_notrace_modules())

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name == self.split_at:
            return True
        if self.leaf_types and isinstance(m, self.leaf_types):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def split_points(model: nn.Module) -> List[str]:
    """Names worth offering as split points: ``feature_info`` modules, then every block of every stage.

    Any module whose output is the only value passed on is a valid split; this lists the usual ones.
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
    return list(dict.fromkeys(n for n in names if n))


def resolve_split(model: nn.Module, at: Union[str, int]) -> str:
    """Turn a ``feature_info`` index or a module path into a module path, or raise naming the valid ones."""
    model_name = getattr(model, 'pretrained_cfg', {}).get('architecture', type(model).__name__)
    if isinstance(at, int) and not isinstance(at, bool):
        info = getattr(model, 'feature_info', None)
        if not info:
            raise ValueError(f'{model_name} has no feature_info; give the split as a module path instead.')
        if not -len(info) <= at < len(info):
            raise ValueError(
                f'Split index {at} is out of range for {model_name}: feature_info has {len(info)} levels '
                f'({", ".join(i["module"] for i in info)}).')
        return info[at]['module']
    modules = dict(model.named_modules())
    if not isinstance(at, str) or at not in modules or not at:
        points = split_points(model)
        shown = ', '.join(points[:40]) + (f', ... ({len(points) - 40} more)' if len(points) > 40 else '')
        raise ValueError(
            f'Unknown split point {at!r} for {model_name}. Valid split points include: {shown}. '
            f'A feature_info index (0..{len(getattr(model, "feature_info", [])) - 1}) also works.')
    return at


def _trace(model: nn.Module, at: str) -> fx.Graph:
    try:
        return _SplitTracer(at).trace(model)
    except Exception as e:  # fx raises many types; all mean the same thing to the user
        raise ValueError(
            f'Cannot trace {type(model).__name__} with torch.fx to split it at {at!r}: {e}. '
            f'Register the offending module with timm.layers.register_notrace_module.') from e


def split_model(model_or_name: Union[nn.Module, str], at: Union[str, int], **create_kwargs) -> Tuple[fx.GraphModule, fx.GraphModule]:
    """Split a model into ``(trunk, tail)`` right after module ``at``.

    Args:
        model_or_name: A model, or a timm model name passed to ``timm.create_model`` with ``create_kwargs``.
        at: Module path (``'layer2'``, ``'blocks.4.0'``, ``'stages.1'``) or ``feature_info`` index. The split
            module belongs to the trunk.
        **create_kwargs: Passed to ``timm.create_model`` when a name is given.

    Returns:
        ``(trunk, tail)`` with ``tail(trunk(x))`` equal to ``model(x)``. Both share the model's modules.

    Raises:
        ValueError: Unknown model, unknown split point, or a split that a skip connection crosses.
    """
    model = create_backbone(model_or_name, **create_kwargs) if isinstance(model_or_name, str) else model_or_name
    at = resolve_split(model, at)
    graph = _trace(model, at)
    nodes = list(graph.nodes)
    cuts = [n for n in nodes if n.op == 'call_module' and n.target == at]
    if len(cuts) != 1:
        raise ValueError(
            f'Module {at!r} is called {len(cuts)} times in forward(); split at a module that runs exactly once.')
    cut = cuts[0]
    before = nodes[:nodes.index(cut) + 1]
    after = [n for n in nodes[len(before):]]
    # Extra forward() arguments with defaults (a ViT's attn_mask) are re-declared in the tail.
    extra_inputs = [n for n in before if n.op == 'placeholder'][1:]
    defined = set(before)
    crossing = {a for n in after for a in n.all_input_nodes
                if a in defined and a is not cut and a.op not in ('get_attr', 'placeholder')}
    if crossing:
        raise ValueError(
            f'Cannot split at {at!r}: values other than its output flow past it '
            f'({", ".join(sorted(c.name for c in crossing))}), e.g. a skip connection. '
            f'Split at the end of a block or stage instead; see timm_compat.split_points(model).')

    trunk_graph, env = fx.Graph(), {}
    for n in before:
        env[n] = trunk_graph.node_copy(n, lambda a: env[a])
    trunk_graph.output(env[cut])

    tail_graph = fx.Graph()
    env = {cut: tail_graph.placeholder('x')}
    for n in extra_inputs:
        env[n] = tail_graph.node_copy(n)
    for n in after:
        for a in n.all_input_nodes:
            if a not in env:  # parameters and buffers read with get_attr
                env[a] = tail_graph.node_copy(a, lambda b: env[b])
        env[n] = tail_graph.node_copy(n, lambda a: env[a])

    trunk = fx.GraphModule(model, trunk_graph, class_name='Trunk')
    tail = fx.GraphModule(model, tail_graph, class_name='Tail')
    trunk.train(model.training)
    tail.train(model.training)
    return trunk, tail


def create_backbone(name: str, **kwargs) -> nn.Module:
    """``timm.create_model`` with an error that suggests close names when the model is unknown."""
    if not timm.is_model(name):
        close = timm.list_models(f'*{name.split("_")[0]}*')[:12]
        hint = f' Similar: {", ".join(close)}.' if close else ''
        raise ValueError(f'Unknown timm model {name!r}.{hint} See timm.list_models().')
    return timm.create_model(name, **kwargs)


@torch.no_grad()
def output_channels(module: nn.Module, input_size: Tuple[int, int, int]) -> Tuple[int, ...]:
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
