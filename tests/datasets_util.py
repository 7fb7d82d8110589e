"""Small real datasets on disk, in the schemas of the Hub datasets the project reads."""
from pathlib import Path
from typing import Sequence

import datasets
import numpy as np
from PIL import Image


def _images(n: int, size: int, seed: int):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def write_parquet(root: Path, class_names: Sequence[str], per_split=(40, 20), size: int = 32,
                  image_column: str = 'img', label_column: str = 'label', class_label: bool = True,
                  seed: int = 0) -> str:
    """``root/train.parquet`` and ``root/test.parquet`` with a ClassLabel column, as ``uoft-cs/cifar10`` has."""
    root.mkdir(parents=True, exist_ok=True)
    label_feature = datasets.ClassLabel(names=list(class_names)) if class_label else datasets.Value('int64')
    features = datasets.Features({image_column: datasets.Image(), label_column: label_feature})
    for i, (split, n) in enumerate(zip(('train', 'test'), per_split)):
        labels = [j % len(class_names) for j in range(n)]
        ds = datasets.Dataset.from_dict({image_column: _images(n, size, seed + i), label_column: labels},
                                        features=features)
        ds.to_parquet(str(root / f'{split}.parquet'))
    return f'parquet:{root}'


def write_imagefolder(root: Path, class_names: Sequence[str], per_class: int = 3, size: int = 40) -> str:
    for split in ('train', 'test'):
        for c, name in enumerate(class_names):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for k, img in enumerate(_images(per_class, size, seed=c * 10 + len(split))):
                img.save(folder / f'{k}.png')
    return f'imagefolder:{root}'
