"""Image classification data through Hugging Face ``datasets``, decoded once into ``uint8`` tensors.

Small-image datasets (CIFAR, STL-10 at 32x32) fit in memory: they are decoded once, kept as one ``uint8`` tensor
(on the accelerator if there is one) and augmented there, so a data loader can never starve the GPU. A split too
large for memory is streamed instead (:mod:`timm_compat.streaming`): decoded batch by batch, then augmented and
normalised on the device as the in-memory path does.

Sources:

* a Hub dataset id (``uoft-cs/cifar10``, ``tanganke/stl10``, ``uoft-cs/cifar100``), downloaded by ``datasets``,
  or read from a local Parquet copy in ``DATA_DIR/cifar10/`` when a run sets ``data_dir`` (:func:`local_source`);
* ``parquet:DIR`` with ``DIR/{split}.parquet`` (or the Hub's shards ``{split}-00000-of-00004.parquet``, ...) in the
  same schema;
* ``imagefolder:DIR`` with ``DIR/{split}/{class}/*.png`` (any split folder name, ``val`` included);
* ``synthetic:A`` / ``synthetic:B``, the built-in two-domain dataset (:mod:`timm_compat.synthetic`).
"""
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ._hf_source import KNOWN_SCHEMAS, columns, load_hf, local_source
from .classes import canonical_class_name, check_distinct, same_classes
from .shifts import apply_shift, shift_seed
from .streaming import StreamedImages, choose_storage, materialize, stream_batches
from .synthetic import make_synthetic

__all__ = ['DATA_VERSION', 'ImageData', 'load_image_data', 'local_source', 'augment', 'normalize', 'training_batch',
           'EpochSampler', 'steps_per_epoch', 'iterate_batches', 'evaluation_batches', 'random_subset', 'KNOWN_SCHEMAS']

# What a run trains and is scored on, beyond its config. A run or record of another version is not resumed or
# pooled with this one's. 1: before 2026-12-04. 2: networks that alternate index their data order and flips by
# their own steps (they took every other batch of two permutations); each split draws its own shift noise;
# `contrast` is CIFAR-10-C's per-channel contrast (the old one is `gray_contrast`); under IIW a network trained
# against a loaded one starts from its whitening (timm_compat.whitening).
DATA_VERSION = 2


@dataclass
class ImageData:
    """A split: ``uint8`` images ``(N, 3, S, S)`` (in memory, or streamed from disk), ``int64`` labels and the class
    names."""
    images: Union[torch.Tensor, StreamedImages]
    labels: torch.Tensor
    class_names: List[str]
    name: str = ''

    def __len__(self) -> int:
        return self.labels.shape[0]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def select_classes(self, classes: Sequence[str]) -> 'ImageData':
        """Keep only ``classes`` (by name, up to synonyms: 'car' finds 'automobile'), relabelled in the given
        order and named as given."""
        if len(classes) == 0:
            raise ValueError(f'{self.name}: classes=[] keeps no class; pass classes=None to keep them all.')
        index = {canonical_class_name(c): i for i, c in enumerate(self.class_names)}
        missing = [c for c in classes if canonical_class_name(c) not in index]
        if missing:
            raise ValueError(f'{self.name}: classes {missing} are not in the dataset; it has {self.class_names}.')
        check_distinct(classes, 'classes')
        new_label = torch.full((self.num_classes,), -1, dtype=torch.long, device=self.labels.device)
        for i, c in enumerate(classes):
            new_label[index[canonical_class_name(c)]] = i
        mapped = new_label[self.labels]
        keep = mapped >= 0
        return ImageData(self.images[keep], mapped[keep], list(classes), self.name)

    def take(self, n: Optional[int], seed: int = 0) -> 'ImageData':
        """A seeded random subset of ``n`` examples (all of them if ``n`` is ``None`` or too large).

        Random rather than the first ``n``: stored data is often sorted by class (``imagefolder``), and its first
        ``n`` examples would then hold only the first classes. The subset keeps the stored order.
        """
        if n is None or n >= len(self):
            return self
        index = random_subset(len(self), n, seed).to(self.labels.device)
        return ImageData(self.images[index], self.labels[index], self.class_names, self.name)

    def to(self, device) -> 'ImageData':
        return ImageData(self.images.to(device), self.labels.to(device), self.class_names, self.name)


def random_subset(num_examples: int, n: int, seed: int = 0) -> torch.Tensor:
    """Sorted indices of a seeded random ``n``-subset of ``range(num_examples)``, the same on every machine."""
    if n < 0:
        raise ValueError(f'Cannot take {n} examples: the limit must be a non-negative count (or None for all).')
    order = torch.randperm(num_examples, generator=torch.Generator().manual_seed(seed))
    return order[:n].sort().values


def load_image_data(source: str, split: str, *, image_size: int = 32, image_column: Optional[str] = None,
                    label_column: Optional[str] = None, class_names: Optional[Sequence[str]] = None,
                    classes: Optional[Sequence[str]] = None, limit: Optional[int] = None,
                    shard: Optional[Sequence[int]] = None, shift: Optional[Sequence[str]] = None,
                    synthetic_per_class: int = 400, seed: int = 0, storage: str = 'memory',
                    memory_budget_gb: Optional[float] = None, workers: int = 0) -> ImageData:
    """Load one split: decoded into memory, or streamed from disk (:mod:`timm_compat.streaming`).

    Args:
        source: Hub id, ``parquet:DIR``, ``imagefolder:DIR`` or ``synthetic:A|B``.
        split: Split name (``train``, ``test``).
        image_size: Images are resized to ``image_size`` x ``image_size`` (``_hf_source.pixels``).
        image_column: Image column; default from the known schema or the usual names.
        label_column: Label column; likewise.
        class_names: Names for the labels when the label column is not a ``ClassLabel``.
        classes: Keep only these classes, relabelled in this order.
        limit: Keep a random subset of ``limit`` examples, drawn with ``seed`` (before ``shard`` and ``classes``).
        shard: ``[index, count]``: keep examples ``index::count`` (disjoint parts of one split).
        shift: Corruptions applied once at load (see :func:`timm_compat.shifts.apply_shift`); in memory only.
        synthetic_per_class: Images per class for ``synthetic:`` sources.
        seed: Seed of ``synthetic:`` sources, of the ``limit`` subset and, per split and shard, of ``shift``
            (:func:`~timm_compat.shifts.shift_seed`).
        storage: ``'memory'``, ``'stream'`` or ``'auto'`` (:func:`~timm_compat.streaming.choose_storage`);
            ``synthetic:`` sources are generated in memory.
        memory_budget_gb: The largest decoded split ``'auto'`` keeps in memory; default a quarter of the RAM. It
            counts the split after ``limit`` and before ``shard``: a shard is copied out of the whole decoded split.
        workers: Decoding processes of a streamed split.

    Raises:
        ValueError: Missing columns (naming those found), labels out of range, no class names, a streamed shift.
    """
    name = f'{source}[{split}]'
    if shard is not None and not 0 <= shard[0] < shard[1]:
        raise ValueError(f'shard {list(shard)} must be [index, count] with 0 <= index < count.')
    if source.startswith('synthetic:'):
        images, labels, names = make_synthetic(source.split(':', 1)[1], split, image_size, synthetic_per_class, seed)
        data = ImageData(images, labels, names, name).take(limit, seed)
    else:
        data = _load_split(source, split, name, image_size, image_column, label_column, class_names, limit, seed)
        _place(data, storage, image_size, memory_budget_gb, workers, shift)
    if shard is not None:
        data = _shard(data, *shard)
    if shift:
        data = ImageData(apply_shift(data.images, shift, shift_seed(seed, split, shard)), data.labels,
                         data.class_names, data.name)
    if len(data) == 0:
        raise ValueError(f'{name} is empty.')
    low, high = int(data.labels.min()), int(data.labels.max())
    if low < 0 or high >= data.num_classes:
        raise ValueError(f'{name}: labels range over [{low}, {high}] but there are {data.num_classes} classes '
                         f'{data.class_names}. Fix the labels or the class names.')
    return data if classes is None else data.select_classes(classes)


def _place(data: ImageData, storage: str, image_size: int, memory_budget_gb: Optional[float], workers: int,
           shift: Optional[Sequence[str]]) -> None:
    """Decode ``data``'s images into memory, or leave them on disk to stream with ``workers`` processes."""
    # The in-memory path decodes the whole (limited) split, through the decode cache, and copies a shard out:
    # what it would decode, not the shard, must fit the budget.
    if choose_storage(storage, len(data), image_size, memory_budget_gb) == 'stream':
        if shift:  # named by their config keys: a run's config is where they are set
            raise ValueError(f'{data.name}: shift corrupts a split once, in memory, but this one is streamed '
                             f'(data_storage: {storage}). Set data_storage: memory, or raise data_memory_gb to at '
                             f'least {len(data) * 3 * image_size ** 2 / 1e9:.3g} GB (load_image_data: storage, '
                             f'memory_budget_gb).')
        data.images.workers = workers
    else:
        data.images = data.images.decode_cached()


def _shard(data: ImageData, index: int, count: int) -> ImageData:
    images = data.images[index::count]
    # A strided view of a decoded split would keep all of it alive for the whole run: copy out the shard.
    images = images.clone() if isinstance(images, torch.Tensor) else images
    return ImageData(images, data.labels[index::count].clone(), data.class_names, data.name)


def _load_split(source, split, name, image_size, image_column, label_column, class_names, limit, seed) -> ImageData:
    """The split with its labels read and its images still on disk (:class:`StreamedImages`)."""
    ds = load_hf(source, split)
    image_column, label_column = columns(ds, source, image_column, label_column)
    if limit is not None and limit < len(ds):  # before decoding, so that a small limit decodes little
        ds = ds.select(random_subset(len(ds), limit, seed).tolist())
    names = _class_names(ds.features[label_column], label_column, class_names, name)
    values = np.asarray(ds[label_column])
    if not np.issubdtype(values.dtype, np.integer):
        kind = 'string' if values.dtype.kind in 'USO' else values.dtype
        raise ValueError(f'{name}: label column {label_column!r} holds {kind} values, not class indices. Give the '
                         f'column of integer labels with label_column: ..., or convert the labels to integers.')
    labels = torch.as_tensor(values, dtype=torch.long)
    return ImageData(StreamedImages(ds, image_column, image_size), labels, list(names), name)


def _class_names(feature, label_column: str, class_names: Optional[Sequence[str]], name: str) -> List[str]:
    """The ``ClassLabel``'s names, or ``class_names``: these may name an unnamed ``ClassLabel`` of as many classes
    (its names are ``'0'``, ``'1'``, ...), never rename a named one (DCC matches classes by name)."""
    own = getattr(feature, 'names', None)
    if class_names is None or own is None:
        if not (class_names or own):
            raise ValueError(f'{name}: label column {label_column!r} is not a ClassLabel, so the class names are '
                             f'unknown. Give them with class_names: [...].')
        return list(class_names or own)
    if len(class_names) != len(own):
        raise ValueError(f'{name}: label column {label_column!r} is a ClassLabel of {len(own)} classes but '
                         f'class_names names {len(class_names)}: drop class_names, or give one name per class.')
    if own != [str(i) for i in range(len(own))] and not same_classes(own, class_names):
        raise ValueError(f'{name}: label column {label_column!r} is a ClassLabel with the names {own}, which '
                         f'class_names {list(class_names)} would rename: drop class_names (it is for label columns '
                         f'that are not ClassLabels).')
    return list(class_names)


def augment(images: torch.Tensor, pad: int = 4, flip: bool = True, pad_mode: str = 'constant',
            flips: Optional[torch.Tensor] = None) -> torch.Tensor:
    """CIFAR augmentation of a ``uint8`` batch, on its device: pad, random crop (a shift of up to ``pad``), h-flip.

    Args:
        images: ``(N, C, H, W)`` batch.
        pad: Padding on each side, so the maximal shift; 0 crops nothing.
        flip: Mirror images at all.
        pad_mode: ``'constant'`` (zeros) or ``'reflect'`` (airbench94's translate), as in ``torch.nn.functional.pad``.
        flips: ``(N,)`` bools saying which images to mirror (e.g. :meth:`EpochSampler.alternating_flips`); default a
            fair coin per image from the global RNG.
    """
    n, _, h, w = images.shape
    if pad:
        padded = torch.nn.functional.pad(images, (pad, pad, pad, pad), mode=pad_mode)
        dy = torch.randint(0, 2 * pad + 1, (n, 1), device=images.device)
        dx = torch.randint(0, 2 * pad + 1, (n, 1), device=images.device)
        rows = (dy + torch.arange(h, device=images.device))[:, None, :, None]
        cols = (dx + torch.arange(w, device=images.device))[:, None, None, :]
        batch = torch.arange(n, device=images.device)[:, None, None, None]
        chans = torch.arange(images.shape[1], device=images.device)[None, :, None, None]
        images = padded[batch, chans, rows, cols]
    if flip:
        mirror = (torch.rand(n, device=images.device) < 0.5) if flips is None else flips.to(images.device)
        images = torch.where(mirror.view(n, 1, 1, 1), images.flip(-1), images)
    return images


def normalize(images: torch.Tensor, mean, std, memory_format=torch.contiguous_format) -> torch.Tensor:
    """``uint8`` -> normalised float. ``mean``/``std`` may be device tensors, which keeps the hot loop copy-free."""
    mean = torch.as_tensor(mean, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    return ((images.float() / 255 - mean) / std).contiguous(memory_format=memory_format)


def training_batch(data: ImageData, index: torch.Tensor, mean, std, augment_images: bool = True,
                   memory_format=torch.contiguous_format, images: Optional[torch.Tensor] = None,
                   **augment_args) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rows ``index`` of ``data`` as training sees them: gathered, augmented and normalised on the labels' device.

    With the images on the accelerator this is the whole data loader: a few kernels per step and no host copy.
    ``images``: the rows' ``uint8`` images when already decoded (a streamed split's batch from
    :func:`~timm_compat.streaming.stream_batches`); else they are gathered, or decoded here.
    ``augment_args`` (``pad``, ``pad_mode``, ``flips``) go to :func:`augment`.
    """
    images = materialize(data.images[index] if images is None else images, data.labels.device)
    images = augment(images, **augment_args) if augment_images else images
    return normalize(images, mean, std, memory_format), data.labels[index]


def steps_per_epoch(num_examples: int, batch_size: int, world_size: int = 1, what: str = 'the training set') -> int:
    """Whole batches of ``batch_size`` per process in one epoch of ``num_examples`` (:class:`EpochSampler`'s).

    Raises:
        ValueError: Not one batch; ``what`` names the examples in the message.
    """
    steps = num_examples // (batch_size * world_size)
    if steps == 0:
        raise ValueError(f'{what}: {num_examples} examples are fewer than one batch of {batch_size} on each of '
                         f'{world_size} process(es): lower batch_size, or give it more examples.')
    return steps


class EpochSampler:
    """Index batches for step ``s`` of a run, the same on every resume, sharded over processes.

    Each epoch is a fresh permutation seeded by ``(seed, epoch)``; process ``rank`` takes every
    ``world_size``-th index, and the last incomplete batch is dropped.
    """

    def __init__(self, num_examples: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 device=None):
        self.num_examples, self.batch_size = num_examples, batch_size
        self.seed, self.rank, self.world_size, self.device = seed, rank, world_size, device
        self.steps_per_epoch = steps_per_epoch(num_examples, batch_size, world_size)
        self._epoch, self._order, self._coins = -1, None, None

    def batch(self, step: int) -> torch.Tensor:
        epoch, index = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 100003 + epoch)
            # Drawn on the CPU for the same order everywhere, moved once per epoch rather than once per batch.
            self._order = torch.randperm(self.num_examples, generator=g)[self.rank::self.world_size].to(self.device)
            self._epoch = epoch
        return self._order[index * self.batch_size:(index + 1) * self.batch_size]

    def alternating_flips(self, step: int) -> torch.Tensor:
        """Which images of ``self.batch(step)`` to mirror under airbench94's alternating flip (Jordan 2024).

        Epoch 0 mirrors each image by a fair coin drawn from ``seed`` and the image's index; every later epoch
        mirrors exactly the images the epoch before did not, so each pair of epochs sees both orientations. A
        function of (seed, index, epoch) only: a resumed run flips as the uninterrupted one.
        """
        if self._coins is None:
            coins = np.random.default_rng([self.seed, 1]).random(self.num_examples) < 0.5
            self._coins = torch.from_numpy(coins).to(self.device)
        index = self.batch(step)
        return self._coins[index] ^ bool(step // self.steps_per_epoch % 2)


def evaluation_batches(num_examples: int, batch_size: int, seed: int = 0) -> List[torch.Tensor]:
    """Index batches of one evaluation pass: a seeded permutation cut into batches of nearly equal size.

    With batch-statistics BN a prediction depends on the rest of its batch, so batches must not follow the stored
    order (class-sorted data would make class-homogeneous batches) and none may be tiny (a batch of a few images
    has statistics of its own). ``ceil(num_examples / batch_size)`` batches share the examples evenly: none is larger
    than ``batch_size`` (the memory the caller budgeted) and, when there are several, none is smaller than half
    of it.
    """
    if batch_size < 1:
        raise ValueError(f'batch_size must be a positive number of images, got {batch_size}.')
    count = -(-num_examples // batch_size)
    if count <= 1:  # one batch has the same statistics in any order; the stored order keeps results bit-exact
        return [torch.arange(num_examples)] if num_examples else []
    order = torch.randperm(num_examples, generator=torch.Generator().manual_seed(seed))
    base, extra = divmod(num_examples, count)
    return list(order.split([base + 1] * extra + [base] * (count - extra)))


def iterate_batches(data: ImageData, batch_size: int, seed: int = 0, shard: Tuple[int, int] = (0, 1)
                    ) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """``(images, labels)`` batches for evaluation, in the order of :func:`evaluation_batches`.

    The order depends only on ``len(data)`` and ``seed``, so two models evaluated on the same data see the same
    batches, and the stored order of the data (e.g. sorted by class) does not bias batch statistics. ``shard``
    ``(rank, processes)``: every ``processes``-th batch from ``rank`` on; the shards' batches are the whole pass's.
    """
    rank, processes = shard
    batches = evaluation_batches(len(data), batch_size, seed)[rank::processes]
    if isinstance(data.images, StreamedImages):
        for index, images in stream_batches(data.images, batches):
            yield materialize(images, data.labels.device), data.labels[index.to(data.labels.device)]
        return
    for index in batches:
        index = index.to(data.labels.device)
        yield data.images[index], data.labels[index]
