"""Where a split's images come from: a Hub dataset, a local Parquet copy or an image folder, through Hugging Face
``datasets``, and how each image becomes ``uint8`` pixels (timm's evaluation transform, shared by the in-memory and
the streamed path so that both see the same pixels)."""
import functools
import glob
import hashlib
import os
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file
from timm.data import create_transform

from ._integrity import atomic_save_safetensors

__all__ = ['KNOWN_SCHEMAS', 'local_source', 'load_hf', 'columns', 'decode_cached', 'with_images', 'pixels']

# (image column, label column) of the Hub datasets the paper uses.
KNOWN_SCHEMAS = {
    'uoft-cs/cifar10': ('img', 'label'),
    'tanganke/stl10': ('image', 'label'),
    'uoft-cs/cifar100': ('img', 'fine_label'),
}
_IMAGE_COLUMNS = ('img', 'image', 'pixel_values')
_LABEL_COLUMNS = ('label', 'fine_label', 'labels')
# Sources that name local or generated data; anything else is a Hub dataset id.
_LOCAL_PREFIXES = ('parquet:', 'imagefolder:', 'synthetic:')


def _parquet_files(root: str, split: str) -> List[str]:
    """``root/{split}.parquet``, or the Hub's shards ``root/{split}-00000-of-00002[-HASH].parquet``, sorted.

    Only the Hub's shard names count, so that ``test-fog.parquet`` beside ``test.parquet`` is not read as part of it.

    Raises:
        ValueError: Both a whole-split file and shards of it: one of them is a copy of the other, or another split.
    """
    shard = '[0-9]' * 5
    whole = glob.glob(os.path.join(glob.escape(root), f'{glob.escape(split)}.parquet'))
    shards = sorted(glob.glob(os.path.join(glob.escape(root), f'{glob.escape(split)}-{shard}-of-{shard}*.parquet')))
    if whole and shards:
        raise ValueError(f'{root!r} holds both {split}.parquet and the shards {", ".join(map(os.path.basename, shards))} '
                         f'of split {split!r}: reading all of them would count images twice. Keep one of the two.')
    return whole or shards


def local_source(source: str, data_dir: Optional[str], splits: Sequence[str] = ('train', 'test')) -> str:
    """Where to read ``source`` from: a Hub id ``org/name`` becomes ``parquet:DATA_DIR/name`` when ``data_dir`` is set.

    ``data_dir`` is a folder of local Parquet copies of Hub datasets, one folder per dataset named as on the Hub
    (``DATA_DIR/cifar10/train.parquet`` for ``uoft-cs/cifar10``), for machines without network access. The source
    stays the Hub id everywhere else (configs, run records): it names the data, the folder only says where it is.

    Args:
        source: A dataset source; ``parquet:``, ``imagefolder:`` and ``synthetic:`` sources are returned unchanged.
        data_dir: The folder of local copies, or ``None`` to load Hub ids from the Hub.
        splits: The splits that must be there.

    Returns:
        ``source``, or ``parquet:DATA_DIR/name`` for a Hub id when ``data_dir`` is set.

    Raises:
        FileNotFoundError: ``data_dir`` is set but holds no Parquet copy of a split of ``source``.
    """
    if data_dir is None or source.startswith(_LOCAL_PREFIXES):
        return source
    root = os.path.join(data_dir, _hub_name(source))
    missing = [split for split in splits if not _parquet_files(root, split)]
    if missing:
        expected = ', '.join(os.path.join(root, f'{split}.parquet') for split in missing)
        shards = '/'.join(f'{split}-*' for split in missing)
        raise FileNotFoundError(
            f'data_dir (--data-dir) is {data_dir!r}, so {source!r} is read from a local Parquet copy, but there is no '
            f'{expected} (nor {shards}.parquet shards). Put the Parquet files of {source!r} there (the Hub '
            f'dataset\'s own, in its schema), or drop --data-dir to download {source!r} from the Hub.')
    return f'parquet:{root}'


def _hub_name(source: str) -> str:
    """The dataset's name in a Hub id (``cifar10`` in ``uoft-cs/cifar10``): its folder in ``data_dir``."""
    return source.rstrip('/').rsplit('/', 1)[-1]


def load_hf(source: str, split: str):
    """The split as a ``datasets.Dataset``: memory-mapped Arrow on disk, nothing decoded."""
    import datasets
    if source.startswith('parquet:'):
        root = source[len('parquet:'):]
        files = _parquet_files(root, split)
        if not files:
            raise FileNotFoundError(f'No {split}.parquet or {split}-00000-of-0000N.parquet shards in {root!r}.')
        return datasets.load_dataset('parquet', data_files={split: files}, split=split)
    if source.startswith('imagefolder:'):
        return _load_imagefolder(source[len('imagefolder:'):], split)
    try:
        return datasets.load_dataset(source, split=split)
    except ValueError as e:
        if not str(e).startswith('Unknown split'):  # not the download's fault: offline advice would mislead
            raise
        # datasets names the splits the dataset has ("Should be one of [...]")
        raise ValueError(f'Hub dataset {source!r} has no split {split!r}: {e} Set networks.N.dataset.train_split '
                         f'or test_split to one of them.') from e
    except (ConnectionError, OSError) as e:
        raise ConnectionError(
            f'Could not load Hub dataset {source!r} (split {split!r}): {e}. Without network access, put a local '
            f'Parquet copy in DIR/{_hub_name(source)}/{split}.parquet and pass --data-dir DIR (config key data_dir).'
        ) from e


def _load_imagefolder(root: str, split: str):
    """``root/{split}/{class}/*``, with one label map over all split folders (a class missing from one keeps its label).

    Every split folder is named explicitly: left to itself, ``datasets`` infers splits from folder-name keywords,
    so ``val/`` became ``validation`` and ``test_fog/`` was merged into ``test``.
    """
    import datasets
    folders = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d))) if os.path.isdir(root) else []
    if split not in folders:
        raise FileNotFoundError(f'imagefolder source {root!r} has no {split}/ folder of class folders (it has '
                                f'{folders}).')
    # Split names must be identifiers to datasets; the keys only tell the folders apart.
    files = {f'split{i}': os.path.join(glob.escape(os.path.join(root, d)), '**') for i, d in enumerate(folders)}
    return datasets.load_dataset('imagefolder', data_files=files, split=f'split{folders.index(split)}')


def columns(ds, source: str, image_column: Optional[str], label_column: Optional[str]) -> Tuple[str, str]:
    found = list(ds.column_names)
    known = KNOWN_SCHEMAS.get(source, (None, None))
    image_column = image_column or known[0] or next((c for c in _IMAGE_COLUMNS if c in found), None)
    label_column = label_column or known[1] or next((c for c in _LABEL_COLUMNS if c in found), None)
    for kind, col in (('image', image_column), ('label', label_column)):
        if col is None or col not in found:
            raise ValueError(f'{source}: no {kind} column {col!r}; the dataset has columns {found}. '
                             f'Name the right one with {kind}_column: ...')
    return image_column, label_column


def _cache_dir() -> Path:
    return Path(os.environ.get('TIMM_COMPAT_CACHE', Path.home() / '.cache' / 'timm_compat'))


def decode_cached(ds, image_column: str, size: int) -> torch.Tensor:
    """Decoded images, from a safetensors cache keyed by the dataset's fingerprint when they were decoded before.

    Decoding 50,000 JPEGs takes minutes on two cores; every run and every network of a run reads the same splits.
    """
    key = hashlib.sha256(f'{ds._fingerprint}:{image_column}:{size}:{len(ds)}'.encode()).hexdigest()[:24]
    path = _cache_dir() / f'decoded-{key}.safetensors'
    if path.is_file():
        try:
            return load_file(str(path))['images']
        except (SafetensorError, OSError, KeyError):  # a damaged cache entry is decoded again, never trusted
            path.unlink(missing_ok=True)
    images = _decode(ds, image_column, size)
    _write_cache(path, images)
    return images


def _write_cache(path: Path, images: torch.Tensor) -> None:
    """Write the cache entry in one rename, readable as the umask allows; any failure leaves no entry."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_save_safetensors({'images': images}, path, metadata={})
    except OSError:  # a read-only or full disk still trains, just without the cache
        pass


def _decode(ds, image_column: str, size: int) -> torch.Tensor:
    ds = with_images(ds, image_column)
    out = torch.empty((len(ds), 3, size, size), dtype=torch.uint8)
    i = 0
    for batch in ds.select_columns([image_column]).iter(batch_size=1000):
        for img in batch[image_column]:
            out[i] = pixels(img, size)
            i += 1
    return out


def with_images(ds, image_column: str):
    """``ds`` with ``image_column`` decoded to PIL images on access (a column of paths or bytes is cast)."""
    import datasets
    if isinstance(ds.features[image_column], datasets.Image):
        return ds
    return ds.cast_column(image_column, datasets.Image())


def pixels(img: Image.Image, size: int) -> torch.Tensor:
    """One image as ``(3, size, size)`` ``uint8``: timm's evaluation transform at ``crop_pct`` 1 and ``crop_mode``
    squash (resized whole to ``size`` x ``size``, antialiased bilinear: STL-10's 96 px to 32, as the components'
    ``pretrained_cfg`` records), as timm's prefetcher takes it, unnormalised; an image already that size is kept."""
    img = img.convert('RGB')
    if img.size == (size, size):
        return torch.from_numpy(np.array(img)).permute(2, 0, 1)
    return _eval_transform(size)(img)


@functools.lru_cache(maxsize=None)
def _eval_transform(size: int):
    return create_transform(input_size=(3, size, size), is_training=False, use_prefetcher=True, crop_pct=1.0,
                            crop_mode='squash', interpolation='bilinear')
