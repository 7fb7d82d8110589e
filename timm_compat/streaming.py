"""Datasets larger than memory: a split left on disk, its images decoded batch by batch by DataLoader workers.

The in-memory path decodes a split once into one ``uint8`` tensor. That cannot hold ImageNet, so a split whose
decoded size exceeds a memory budget (:func:`choose_storage`) is streamed instead: its ``ImageData.images`` is a
:class:`StreamedImages`, a view of rows of the memory-mapped Arrow table that ``datasets`` keeps on disk, which
indexes like the tensor it replaces (a slice, mask or index gives rows, still on disk). :func:`stream_batches`
decodes the batches of a known index sequence ahead of use, in ``workers`` processes, into pinned memory.

Pixels, augmentation, normalisation, samplers and resume are the in-memory path's: a streamed batch is the
``uint8`` batch the in-memory path gathers, pixel for pixel (both decode with ``_hf_source.pixels``, timm's
evaluation transform), and the sampler's order is a function of the step, so a resumed run streams what the
uninterrupted one did.
"""
import os
from typing import Iterable, Iterator, Optional, Tuple, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ._hardware import cpu_cores
from ._hf_source import decode_cached, pixels, with_images

__all__ = ['StreamedImages', 'materialize', 'stream_batches', 'choose_storage', 'memory_budget_gb', 'default_workers']


class StreamedImages:
    """Rows of a ``datasets.Dataset``'s image column, decoded to ``(N, 3, size, size)`` ``uint8`` on demand.

    Args:
        ds: The split, as ``datasets`` loads it (memory-mapped Arrow: nothing is read until decoded).
        column: Its image column.
        size: Images are decoded at ``size`` x ``size`` (``_hf_source.pixels``).
        rows: The rows of ``ds`` this view holds, in order; default all of them.
        workers: Processes that decode batches ahead of use (:func:`stream_batches`); 0 decodes in this process.
    """
    dtype = torch.uint8
    device = torch.device('cpu')

    def __init__(self, ds, column: str, size: int, rows: Optional[np.ndarray] = None, workers: int = 0):
        self.source, self._images = ds, None
        self.column, self.size = column, size
        self.rows, self.workers = (np.arange(len(ds)) if rows is None else rows), workers

    @property
    def ds(self):
        """The image column, cast to ``datasets.Image`` on first use: casting a column of paths or bytes rewrites
        it, which an in-memory split read from the decode cache never needs."""
        if self._images is None:
            self._images = with_images(self.source, self.column).select_columns([self.column])
        return self._images

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self), 3, self.size, self.size))

    def __getitem__(self, key: Union[slice, torch.Tensor, np.ndarray, list]) -> 'StreamedImages':
        """The rows ``key`` selects (a slice, a boolean mask or indices), as a view: nothing is decoded.

        Raises:
            TypeError: An integer (or 0-d) key, which selects one image rather than rows: ``images[[i]]`` is the
                view of that one row.
        """
        if isinstance(key, torch.Tensor):
            key = key.cpu().numpy()
        if not isinstance(key, slice) and np.ndim(key) == 0:  # its rows would be a scalar that no later use takes
            raise TypeError(f'A streamed split is indexed by rows (a slice, mask or indices), not by one integer '
                            f'{key}: images[[{key}]] is the view of that row, '
                            f'materialize(images[[{key}]])[0] its image.')
        view = StreamedImages.__new__(StreamedImages)
        view.__dict__.update(self.__dict__, rows=self.rows[key])
        return view

    def to(self, device) -> 'StreamedImages':
        """Itself: the images stay on disk; each decoded batch is moved where its consumer runs."""
        return self

    def decode_cached(self) -> torch.Tensor:
        """The whole split decoded into memory once, through the decode cache: the in-memory path.

        Raises:
            ValueError: The view is not the whole split in its stored order (the cache holds that order only).
        """
        # The length alone let a reordered or duplicated full-length view through, decoded in the stored order.
        if not np.array_equal(self.rows, np.arange(len(self.source))):
            raise ValueError('decode_cached decodes a whole split in its stored order, and this view holds other '
                             'rows or another order; decode() decodes the rows of a view.')
        return decode_cached(self.source, self.column, self.size)  # keyed by the split as loaded

    def decode(self) -> torch.Tensor:
        """Every row of the view, decoded here (no workers): for small views such as a whitening sample."""
        return _Rows(self.ds, self.column, self.size).__getitems__(self.rows.tolist())


def materialize(images: Union[torch.Tensor, StreamedImages], device=None) -> torch.Tensor:
    """``images`` as a ``uint8`` tensor on ``device`` (default: where they are), decoding streamed rows."""
    images = images.decode() if isinstance(images, StreamedImages) else images
    return images if device is None else images.to(device, non_blocking=True)


class _Rows(Dataset):
    """The worker's side: rows of the dataset in, one stacked ``uint8`` batch out (timm's prefetcher layout)."""

    def __init__(self, ds, column: str, size: int):
        self.ds, self.column, self.size = ds, column, size

    def __len__(self) -> int:
        return len(self.ds)

    def __getitems__(self, rows):
        images = self.ds[rows][self.column]  # one Arrow read for the batch, then one decode per image
        out = torch.empty((len(rows), 3, self.size, self.size), dtype=torch.uint8)
        for i, img in enumerate(images):
            out[i] = pixels(img, self.size)
        return out


def _whole_batch(batch):
    return batch


def stream_batches(images: StreamedImages, batches: Iterable[torch.Tensor]
                   ) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """``(index, uint8 images)`` for each index batch of ``batches`` (indices into ``images``), in order.

    ``images.workers`` processes decode ahead of the consumer (two batches each; 0 decodes in this process), into
    pinned memory when there is a GPU to copy to. ``batches`` may be a generator over the steps still to run; it is
    read only as far as the workers are ahead. Close the generator to stop the workers of one left unfinished.
    """
    batches = iter(batches)
    expected = []

    def rows():
        for index in batches:
            expected.append(index)
            yield images.rows[index.cpu().numpy()].tolist()

    loader = DataLoader(_Rows(images.ds, images.column, images.size), batch_sampler=rows(),
                        num_workers=images.workers, collate_fn=_whole_batch, pin_memory=torch.cuda.is_available(),
                        prefetch_factor=2 if images.workers else None,
                        generator=torch.Generator())  # its worker seeds must not draw from augmentation's global RNG
    for batch in loader:
        yield expected.pop(0), batch


def choose_storage(storage: str, num_images: int, size: int, budget_gb: Optional[float]) -> str:
    """``'memory'`` or ``'stream'`` for a split of ``num_images`` images at ``size`` px.

    Args:
        storage: ``'memory'``, ``'stream'``, or ``'auto'``: stream when the decoded split (``3 * size**2`` bytes an
            image) would exceed ``budget_gb``.
        num_images: The split's images after any limit, before any shard: the in-memory path decodes the whole
            split and copies a shard out of it, so the whole split is what must fit.
        size: Their decoded size.
        budget_gb: The largest decoded split to hold in memory, in GB; default a quarter of the physical memory
            (train.py gives :func:`memory_budget_gb` of its processes and device).

    Raises:
        ValueError: An unknown ``storage``.
    """
    if storage not in ('memory', 'stream', 'auto'):
        raise ValueError(f"storage {storage!r} is none of 'memory', 'stream' or 'auto'.")
    if storage != 'auto':
        return storage
    if budget_gb is None:
        budget_gb = _physical_memory() / 4 / 1e9
    return 'stream' if num_images * 3 * size * size > budget_gb * 1e9 else 'memory'


def memory_budget_gb(processes: int = 1, device: Optional[torch.device] = None) -> float:
    """The largest decoded split one of ``processes`` processes on this machine keeps in memory, in GB.

    A quarter of the RAM, shared by the machine's processes (each holds its own copy), and no more than a quarter
    of the GPU's memory when ``device`` is a GPU, where the training splits are held again.
    """
    budget = _physical_memory() / 4 / processes
    if device is not None and torch.device(device).type == 'cuda':
        budget = min(budget, torch.cuda.get_device_properties(device).total_memory / 4)
    return budget / 1e9


def _physical_memory() -> int:
    return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')


def default_workers(processes: int) -> int:
    """Decoding workers of one of ``processes`` processes on this machine: its share of the cores, one left to the
    training step, between 1 and 8."""
    return max(1, min(8, cpu_cores() // processes - 1))
