"""Checks of the run config's datasets that no single key can make: which trained networks share training images,
which train on a split that some network is measured on, and which shifted splits would be streamed.

``train_shard: [index, count]`` keeps the examples ``index::count`` of a split (``data._shard``), so two shards
``[i1, c1]`` and ``[i2, c2]`` of one split share an example exactly when some ``n`` has ``n = i1 (mod c1)`` and
``n = i2 (mod c2)``, which (Chinese remainder theorem) is when ``i1 = i2 (mod gcd(c1, c2))``.
"""
import math
import os
from typing import Any, List, Optional, Tuple

__all__ = ['shard_problems', 'split_problems', 'shift_problems']

_LOCAL_PREFIXES = ('parquet:', 'imagefolder:', 'synthetic:')


def _split_key(source: str, split: str, data_dir: Optional[str]) -> Tuple[str, str]:
    """The split's data, however it is named: a Hub id read from ``data_dir`` is its Parquet copy there, and a
    folder written two ways (``./x/``, ``x``) is one folder (as ``_hf_source.local_source`` reads them)."""
    if source.startswith('synthetic:'):
        return source, split
    if source.startswith(_LOCAL_PREFIXES):
        prefix, path = source.split(':', 1)
        return f'{prefix}:{os.path.abspath(path)}', split
    if data_dir is not None:
        return f'parquet:{os.path.abspath(os.path.join(data_dir, source.rstrip("/").rsplit("/", 1)[-1]))}', split
    return source, split


def _overlap(a: List[int], b: List[int]) -> bool:
    return (a[0] - b[0]) % math.gcd(a[1], b[1]) == 0


def shard_problems(networks: List[Any], data_dir: Optional[str]) -> List[str]:
    """One line per pair of trained networks whose ``train_shard`` parts of one split would share images."""
    trained = [(i, n) for i, n in enumerate(networks) if not n.load and n.dataset.train_shard]
    problems = []
    for k, (i, a) in enumerate(trained):
        for j, b in trained[k + 1:]:
            da, db = a.dataset, b.dataset
            if _split_key(da.source, da.train_split, data_dir) != _split_key(db.source, db.train_split, data_dir):
                continue
            # load_image_data draws train_limit's random subset before taking the shard: disjoint shards of one
            # split stay disjoint only over the same subset.
            if da.train_limit != db.train_limit:
                problems.append(
                    f'networks {a.name} and {b.name} take train_shard parts of {da.source} with train_limit '
                    f'{da.train_limit} and {db.train_limit}: the limit draws its images before the shard, so their '
                    f'training images would overlap. Give both the same train_limit, or a finer shard (e.g. '
                    f'train_shard: [1, 10]) instead of a limit.')
            if _overlap(da.train_shard, db.train_shard):
                (ia, ca), (ib, cb) = da.train_shard, db.train_shard
                problems.append(
                    f'networks.{i}.dataset.train_shard={[ia, ca]} and networks.{j}.dataset.train_shard={[ib, cb]} '
                    f'overlap: networks {a.name} and {b.name} would both train on one in every '
                    f'{math.lcm(ca, cb)} images of {da.source} (split {da.train_split}). Shards [i1, c1] and '
                    f'[i2, c2] are disjoint exactly when i1 and i2 differ modulo gcd(c1, c2): e.g. [0, 2] and '
                    f'[1, 2], or [0, 2] and [1, 10].')
    return problems


def split_problems(networks: List[Any], data_dir: Optional[str]) -> List[str]:
    """One line per trained network whose training split is the test split of a network (itself or another) on
    the same data: every accuracy measured there (own, or of a recombination with it) would be on training images.
    A network with ``load`` trains nothing here, so its splits may be any."""
    tests = {_split_key(n.dataset.source, n.dataset.test_split, data_dir): (j, n.name)
             for j, n in reversed(list(enumerate(networks)))}  # the first network measured on a split names it
    problems = []
    for i, n in enumerate(networks):
        measured = tests.get(_split_key(n.dataset.source, n.dataset.train_split, data_dir))
        if not n.load and measured is not None:
            problems.append(f'networks.{i}.dataset.train_split is {n.dataset.train_split!r} of {n.dataset.source}, '
                            f'the split network {measured[1]!r} is measured on (networks.{measured[0]}.dataset.'
                            f'test_split): every accuracy on it would be of training images. Give one of the two '
                            f'another split.')
    return problems


def shift_problems(networks: List[Any], data_storage: str) -> List[str]:
    """A shift corrupts a split once, in memory: under ``data_storage: stream`` load_image_data would refuse it
    only once the run had started. Synthetic sources are always generated in memory, so they may be shifted."""
    if data_storage != 'stream':
        return []
    return [f'networks.{i}.dataset.shift corrupts its splits once, in memory, but data_storage is stream, which '
            f'keeps them on disk: set data_storage=memory (or auto, which holds a split in memory up to '
            f'data_memory_gb), or drop networks.{i}.dataset.shift.'
            for i, n in enumerate(networks) if n.dataset.shift and not n.dataset.source.startswith('synthetic:')]
