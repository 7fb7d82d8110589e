"""A synthetic two-domain image dataset, generated deterministically in memory, for offline demos and tests.

Like CIFAR-10 and STL-10, the two domains have 10 classes each, 9 of them in common, and a different look:

* domain ``A`` ("photos"): filled shapes in saturated colours on smooth light gradients;
* domain ``B`` ("sketches"): shape outlines with a striped fill on dark, noisy, striped backgrounds.

Every class is an object with an up side (a house, a tree, an arrow, ...) drawn upright with small random tilt,
so rotation prediction is meaningful. Position, scale, aspect, tilt, colours and one distractor blob vary per
image, which keeps the task non-trivial. The images are ``uint8`` tensors; nothing touches the disk.
"""
import math
from typing import Callable, Dict, List, Tuple

import torch

__all__ = ['SYNTHETIC_CLASSES', 'make_synthetic']

COMMON = ['house', 'tree', 'arrow', 'mushroom', 'person', 'letter_t', 'bottle', 'boat', 'lamp']
SYNTHETIC_CLASSES: Dict[str, List[str]] = {
    # Domain B lists its classes in another order, so labels must be matched by name, not index.
    'A': COMMON + ['star'],
    'B': COMMON[::-1] + ['heart'],
}

# Shapes are signed distances (negative inside) on coordinates u (right) and v (down) in about [-1, 1].


def _box(u, v, cu, cv, hu, hv):
    return torch.maximum((u - cu).abs() - hu, (v - cv).abs() - hv)


def _disc(u, v, cu, cv, r):
    return torch.sqrt((u - cu) ** 2 + (v - cv) ** 2) - r


def _triangle_up(u, v, top, base, half_width):
    """Isosceles triangle with apex at (0, top) and base at v=base."""
    h = base - top
    slope = half_width / h
    side = (u.abs() - slope * (v - top)) / math.sqrt(1 + slope ** 2)
    return torch.maximum(side, torch.maximum(v - base, top - v))


def _union(*ds):
    out = ds[0]
    for d in ds[1:]:
        out = torch.minimum(out, d)
    return out


def _star(u, v):
    angle = torch.atan2(v, u) + math.pi / 2
    radius = 0.55 + 0.25 * torch.cos(5 * angle)
    return torch.sqrt(u ** 2 + v ** 2) - radius


def _heart(u, v):
    lobes = _union(_disc(u, v, -0.3, -0.25, 0.35), _disc(u, v, 0.3, -0.25, 0.35))
    return _union(lobes, _triangle_up(u, -v, -0.85, 0.15, 0.68))  # the point faces down


SHAPES: Dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    'house': lambda u, v: _union(_box(u, v, 0, 0.35, 0.55, 0.45), _triangle_up(u, v, -0.85, -0.1, 0.75)),
    'tree': lambda u, v: _union(_triangle_up(u, v, -0.9, 0.45, 0.65), _box(u, v, 0, 0.65, 0.13, 0.25)),
    'arrow': lambda u, v: _union(_triangle_up(u, v, -0.9, -0.1, 0.6), _box(u, v, 0, 0.4, 0.15, 0.5)),
    'mushroom': lambda u, v: _union(torch.maximum(_disc(u, v, 0, 0, 0.75), v), _box(u, v, 0, 0.4, 0.2, 0.45)),
    'person': lambda u, v: _union(_disc(u, v, 0, -0.6, 0.28), _box(u, v, 0, 0.3, 0.32, 0.55)),
    'letter_t': lambda u, v: _union(_box(u, v, 0, -0.65, 0.7, 0.15), _box(u, v, 0, 0.15, 0.15, 0.75)),
    'bottle': lambda u, v: _union(_box(u, v, 0, 0.3, 0.4, 0.55), _box(u, v, 0, -0.55, 0.14, 0.35)),
    'boat': lambda u, v: _union(_box(u, v, 0, 0.55, 0.8, 0.2), _triangle_up(u, v, -0.9, 0.3, 0.45)),
    'lamp': lambda u, v: _union(torch.maximum(_triangle_up(u, v, -1.3, -0.2, 0.75), -v - 0.75),
                                _box(u, v, 0, 0.3, 0.07, 0.5), _box(u, v, 0, 0.8, 0.4, 0.08)),
    'star': _star,
    'heart': _heart,
}


def _random_affine(n: int, g: torch.Generator) -> Tuple[torch.Tensor, ...]:
    scale = 0.5 + 0.35 * torch.rand(n, generator=g)
    aspect = 1 + 0.25 * (torch.rand(n, generator=g) - 0.5)
    tilt = (torch.rand(n, generator=g) - 0.5) * math.radians(30)  # upright, give or take 15 degrees
    shift = (torch.rand(n, 2, generator=g) - 0.5) * 0.5
    return scale, aspect, tilt, shift


def _render_masks(labels: torch.Tensor, class_names: List[str], size: int, g: torch.Generator) -> torch.Tensor:
    """Signed distances ``(n, size, size)`` of each image's object."""
    n = labels.shape[0]
    axis = (torch.arange(size) + 0.5) / size * 2 - 1
    y, x = torch.meshgrid(axis, axis, indexing='ij')
    scale, aspect, tilt, shift = _random_affine(n, g)
    cos, sin = torch.cos(tilt)[:, None, None], torch.sin(tilt)[:, None, None]
    px, py = x[None] - shift[:, 0, None, None], y[None] - shift[:, 1, None, None]
    u = (cos * px + sin * py) / (scale * aspect)[:, None, None]
    v = (-sin * px + cos * py) / scale[:, None, None]
    dist = torch.empty(n, size, size)
    for c, name in enumerate(class_names):
        idx = (labels == c).nonzero().squeeze(1)
        if idx.numel():
            dist[idx] = SHAPES[name](u[idx], v[idx]) * scale[idx, None, None]
    return dist


def _random_colours(n: int, g: torch.Generator, low: float, high: float) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, 3, 1, 1, generator=g)


def _distractor(n: int, size: int, g: torch.Generator) -> torch.Tensor:
    axis = (torch.arange(size) + 0.5) / size * 2 - 1
    y, x = torch.meshgrid(axis, axis, indexing='ij')
    centre = (torch.rand(n, 2, generator=g) - 0.5) * 1.8
    radius = 0.08 + 0.1 * torch.rand(n, generator=g)
    d = torch.sqrt((x[None] - centre[:, 0, None, None]) ** 2 + (y[None] - centre[:, 1, None, None]) ** 2)
    return torch.sigmoid((radius[:, None, None] - d) * size)


def _style_a(dist: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    n, size, _ = dist.shape
    ramp = torch.linspace(0, 1, size)
    direction = torch.rand(n, 1, 1, generator=g)
    gradient = direction * ramp[None, :, None] + (1 - direction) * ramp[None, None, :]
    bg = _random_colours(n, g, 0.55, 0.95) * (0.85 + 0.15 * gradient[:, None])
    fg = _random_colours(n, g, 0.0, 0.4)  # darker than any background: the shape is always visible
    mask = torch.sigmoid(-dist * size * 0.75)[:, None]
    blob = _distractor(n, size, g)[:, None] * 0.6
    img = bg * (1 - blob) + _random_colours(n, g, 0.2, 0.9) * blob
    img = img * (1 - mask) + fg * mask
    return img + 0.03 * torch.randn(img.shape, generator=g)


def _style_b(dist: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    n, size, _ = dist.shape
    axis = torch.arange(size, dtype=torch.float32)
    period = 3 + 3 * torch.rand(n, 1, 1, generator=g)
    angle = torch.rand(n, 1, 1, generator=g) * math.pi
    stripes = 0.5 + 0.5 * torch.sin(2 * math.pi * (torch.cos(angle) * axis[None, None] +
                                                  torch.sin(angle) * axis[None, :, None]) / period)
    bg = _random_colours(n, g, 0.0, 0.3) * (0.6 + 0.4 * stripes[:, None])
    bg = bg + 0.12 * torch.randn(bg.shape, generator=g)
    outline = torch.sigmoid((0.09 - dist.abs()) * size * 0.75)[:, None]
    inside = torch.sigmoid(-dist * size * 0.75)[:, None] * (1 - outline)
    neon = _random_colours(n, g, 0.5, 1.0)
    blob = _distractor(n, size, g)[:, None] * 0.7
    img = bg * (1 - blob) + neon.flip(1) * blob * 0.8
    img = img * (1 - outline) + neon * outline
    return img * (1 - inside * 0.55) + inside * 0.55 * neon * stripes[:, None]


def make_synthetic(domain: str, split: str = 'train', size: int = 32, num_per_class: int = 400,
                   seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor, List[str]]:
    """Generate one split of one domain.

    Args:
        domain: ``'A'`` or ``'B'``.
        split: ``'train'`` or ``'test'``; they are drawn from disjoint random streams.
        size: Image side in pixels.
        num_per_class: Images per class.
        seed: Base seed; the same arguments always give the same images.

    Returns:
        ``(images, labels, class_names)``: ``uint8`` ``(N, 3, size, size)``, ``int64`` ``(N,)``, names in label order.
    """
    if domain not in SYNTHETIC_CLASSES:
        raise ValueError(f'Unknown synthetic domain {domain!r}: use "A" or "B".')
    if split not in ('train', 'test'):
        raise ValueError(f'Unknown split {split!r}: use "train" or "test".')
    class_names = SYNTHETIC_CLASSES[domain]
    g = torch.Generator().manual_seed(seed * 1000 + (0 if domain == 'A' else 500) + (0 if split == 'train' else 1))
    labels = torch.arange(len(class_names)).repeat_interleave(num_per_class)
    labels = labels[torch.randperm(labels.numel(), generator=g)]
    dist = _render_masks(labels, class_names, size, g)
    img = (_style_a if domain == 'A' else _style_b)(dist, g)
    return (img.clamp(0, 1) * 255).round().to(torch.uint8), labels, list(class_names)
