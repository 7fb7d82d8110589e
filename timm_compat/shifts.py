"""Fixed, documented domain shifts: CIFAR-10-C corruptions (Hendrycks & Dietterich, ICLR 2019) on ``uint8`` batches.

The offline stand-ins for a second domain (CIFAR-10 vs. STL-10, Sec. 4; CIFAR-10 -> STL-10 adaptation, Sec. 5.1)
apply these to a CIFAR-10 split. Formulas and severity parameters are those of the CIFAR-10-C code for 32x32
images (``make_cifar_c.py``), with one difference: results are rounded to ``uint8`` where CIFAR-10-C truncates, so
a pixel may be one level brighter. ``gray_contrast`` is not CIFAR-10-C's: it is this project's ``contrast`` before
2026-12-04, which pulled every pixel towards one grey mean over all channels and so also desaturates; the Sec. 4
presets keep it, so that the records made with it stay reproducible. A shift is named ``"corruption:severity"``,
e.g. ``"defocus_blur:2"``; noise is drawn from a fixed seed (per split: :func:`shift_seed`), so a shifted split is
the same on every x86 machine with AVX2 or AVX-512 (torch's generic CPU path, ``ATEN_CPU_CAPABILITY=default``, draws
``torch.randn`` otherwise: a few pixels differ by one level). The noise stays torch's: another generator would change
the shifted images of the data-version-2 records (``data.DATA_VERSION``).
"""
import io
import zlib
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

__all__ = ['CORRUPTIONS', 'apply_shift', 'parse_shift', 'shift_seed']


def _gaussian_noise(x: torch.Tensor, severity: int, g: torch.Generator) -> torch.Tensor:
    c = [0.04, 0.06, 0.08, 0.09, 0.10][severity - 1]
    return x + torch.randn(x.shape, generator=g) * c


def _shot_noise(x: torch.Tensor, severity: int, g: torch.Generator) -> torch.Tensor:
    c = [500, 250, 100, 75, 50][severity - 1]
    return torch.poisson(x * c, generator=g) / c


def _disk(radius: float, alias_blur: float) -> torch.Tensor:
    size = int(np.ceil(radius)) * 2 + 1 if radius > 1 else 3
    ax = torch.arange(size, dtype=torch.float32) - size // 2
    yy, xx = torch.meshgrid(ax, ax, indexing='ij')
    kernel = ((xx ** 2 + yy ** 2) <= radius ** 2).float()
    kernel = kernel / kernel.sum()
    # CIFAR-10-C smooths the disk with a Gaussian of sigma alias_blur to avoid aliasing.
    g = torch.exp(-(ax ** 2) / (2 * alias_blur ** 2))
    g = (g[:, None] * g[None, :]) / (g.sum() ** 2)
    return F.conv2d(kernel[None, None], g[None, None], padding=size // 2)[0, 0]


def _defocus_blur(x: torch.Tensor, severity: int, g: torch.Generator) -> torch.Tensor:
    radius, alias = [(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)][severity - 1]
    k = _disk(radius, alias)
    weight = k[None, None].repeat(x.shape[1], 1, 1, 1)
    return F.conv2d(F.pad(x, [k.shape[0] // 2] * 4, mode='reflect'), weight, groups=x.shape[1])


def _contrast(x: torch.Tensor, severity: int, g: torch.Generator, dim=(2, 3)) -> torch.Tensor:
    c = [0.75, 0.5, 0.4, 0.3, 0.15][severity - 1]
    mean = x.mean(dim=dim, keepdim=True)  # per channel, as CIFAR-10-C's np.mean(x, axis=(0, 1)) on HWC images
    return (x - mean) * c + mean


def _gray_contrast(x: torch.Tensor, severity: int, g: torch.Generator) -> torch.Tensor:
    return _contrast(x, severity, g, dim=(1, 2, 3))


def _pixelate(x: torch.Tensor, severity: int, g: torch.Generator) -> torch.Tensor:
    # PIL's BOX filter down and back up, as CIFAR-10-C: torch's 'area' / 'nearest' place the pixels otherwise
    c = [0.95, 0.9, 0.85, 0.75, 0.65][severity - 1]
    h, w = x.shape[-2:]
    out = []
    for img in (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy():
        small = Image.fromarray(img).resize((int(w * c), int(h * c)), Image.BOX)
        out.append(np.asarray(small.resize((w, h), Image.BOX)))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float() / 255


def _jpeg_compression(x: torch.Tensor, severity: int, g: torch.Generator) -> torch.Tensor:
    quality = [80, 65, 58, 50, 40][severity - 1]
    out = []
    for img in (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy():
        buffer = io.BytesIO()
        Image.fromarray(img).save(buffer, 'JPEG', quality=quality)
        out.append(np.asarray(Image.open(buffer)))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float() / 255


CORRUPTIONS: Dict[str, Callable[[torch.Tensor, int, torch.Generator], torch.Tensor]] = {
    'gaussian_noise': _gaussian_noise,
    'shot_noise': _shot_noise,
    'defocus_blur': _defocus_blur,
    'contrast': _contrast,
    'gray_contrast': _gray_contrast,
    'pixelate': _pixelate,
    'jpeg_compression': _jpeg_compression,
}


# The corruptions that draw from the generator: each gets its own, and draws image by image (apply_shift).
_NOISE = (_gaussian_noise, _shot_noise)


def shift_seed(seed: int, split: str, shard: Optional[Sequence[int]] = None) -> int:
    """The noise seed of one split (or one ``[index, count]`` shard of it) of a run seeded with ``seed``.

    Each split draws its own noise: with one seed for all, test image ``i`` carried the very noise field of
    training image ``i`` (and an adaptation run saw the test split's noise on its unlabelled images). The training
    split keeps ``seed`` itself, so that training data is what the records made before 2026-12-04 trained on.

    So does each shard of a split that is cut in several (a split is shifted after sharding, and with one seed
    image ``k`` of every shard carried one noise field), except shard 1, which keeps the split's seed: the records'
    shifted halves are shard 1 (``train_shard`` ``[1, 2]`` and ``[1, 10]``). Disjoint shards have distinct indices,
    so the index alone tells them apart.
    """
    split_seed = seed if split == 'train' else seed + zlib.crc32(split.encode())
    if shard is None or shard[1] == 1 or shard[0] == 1:
        return split_seed
    return split_seed + zlib.crc32(f'shard {shard[0]}'.encode())


def parse_shift(item: str) -> Tuple[Callable[[torch.Tensor, int, torch.Generator], torch.Tensor], int]:
    """A shift ``"corruption:severity"`` as its corruption and severity; the run config checks shifts with it.

    Raises:
        ValueError: An unknown corruption, or a severity outside 1-5.
    """
    name, _, severity = item.partition(':')
    if name not in CORRUPTIONS or severity not in ('1', '2', '3', '4', '5'):
        raise ValueError(f'Unknown shift {item!r}: use "name:severity" with severity 1-5 and name one of '
                         f'{sorted(CORRUPTIONS)}.')
    return CORRUPTIONS[name], int(severity)


def apply_shift(images: torch.Tensor, shift: Sequence[str], seed: int = 0, batch_size: int = 2048) -> torch.Tensor:
    """Apply corruptions in order to a ``uint8`` batch ``(N, 3, H, W)``; returns ``uint8``.

    Args:
        images: Images to corrupt (CPU).
        shift: Corruption names with severities 1-5, e.g. ``["defocus_blur:2", "contrast:2"]``.
        seed: Seed of the noise corruptions (the first one's; a later one draws from a seed derived from it).
        batch_size: Images processed at once, to bound memory; the result does not depend on it.

    Raises:
        ValueError: A bare string for ``shift``, images not ``uint8`` or not laid out ``(N, 3, H, W)``, or an
            unknown shift (:func:`parse_shift`).
    """
    if isinstance(shift, str):  # a string is a sequence too: each character was read as a shift
        raise ValueError(f'shift is a list of shifts: pass [{shift!r}], not {shift!r}.')
    if images.dim() != 4 or images.shape[1] != 3:  # channels last would be blurred and contrasted along other axes
        raise ValueError(f'apply_shift corrupts RGB images laid out (N, 3, H, W), got {tuple(images.shape)}: '
                         f'permute channels-last images with images.permute(0, 3, 1, 2).')
    if images.dtype != torch.uint8:
        raise ValueError(f'apply_shift corrupts uint8 images (0-255), got {images.dtype}: pass the images as loaded, '
                         f'before normalisation (e.g. (x * 255).round().to(torch.uint8) for floats in [0, 1]).')
    steps = [parse_shift(item) for item in shift]
    generators = _generators(steps, seed)
    out = torch.empty_like(images)
    for start in range(0, images.shape[0], batch_size):
        x = images[start:start + batch_size].float() / 255
        for (fn, severity), g in zip(steps, generators):
            # Noise is drawn image by image from the corruption's own generator, so that it is one stream over
            # the images, whatever batch_size cuts them into: torch draws normals 16 at a time and redraws the last
            # 16 of a tensor whose size is no multiple of 16, and two noise corruptions took turns on one generator.
            x = (torch.cat([fn(image[None], severity, g) for image in x]) if fn in _NOISE else fn(x, severity, g))
            x = x.clamp(0, 1)
        out[start:start + batch_size] = (x * 255).round().to(torch.uint8)
    return out


def _generators(steps: Sequence[Tuple[Callable, int]], seed: int) -> List[torch.Generator]:
    """One generator per corruption: the first noise corruption's (and those before it, which draw nothing) seeded
    with ``seed``, as the records' single noise corruption was; each later noise corruption its own seed."""
    generators, noises = [], 0
    for fn, _ in steps:
        generators.append(torch.Generator().manual_seed(seed if noises == 0 else
                                                        seed + zlib.crc32(f'noise {noises}'.encode())))
        noises += fn in _NOISE
    return generators
