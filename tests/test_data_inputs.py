"""What a local dataset folder holds is what a split reads: no sibling folder or file merged in, no label map
replaced, no label silently converted, no decoded split held beyond its shard."""
import shutil

import datasets
import pytest
import torch

from timm_compat.data import load_image_data

from tests.datasets_util import write_imagefolder, write_parquet

CIFAR10 = ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck']


def test_imagefolder_reads_a_val_folder_and_never_merges_sibling_folders(tmp_path):
    source = write_imagefolder(tmp_path / 'folder', ['cat', 'dog'], per_class=3, size=8)
    shutil.copytree(tmp_path / 'folder' / 'test', tmp_path / 'folder' / 'val')  # ImageNet's layout
    shutil.copytree(tmp_path / 'folder' / 'test', tmp_path / 'folder' / 'test_fog')
    (tmp_path / 'folder' / 'test_fog' / 'dog' / '0.png').unlink()
    assert len(load_image_data(source, 'val', image_size=8)) == 6
    assert len(load_image_data(source, 'test', image_size=8)) == 6  # test_fog/ is not part of test/
    assert len(load_image_data(source, 'test_fog', image_size=8)) == 5
    assert len(load_image_data(source, 'train', image_size=8)) == 6


def test_imagefolder_keeps_one_label_map_over_its_split_folders(tmp_path):
    source = write_imagefolder(tmp_path / 'folder', ['cat', 'dog', 'fox'], per_class=2, size=8)
    shutil.rmtree(tmp_path / 'folder' / 'test' / 'dog')
    test = load_image_data(source, 'test', image_size=8)
    assert test.class_names == ['cat', 'dog', 'fox'] and test.labels.tolist() == [0, 0, 2, 2]


def test_parquet_refuses_a_merged_split_file_beside_its_shards(tmp_path):
    source = write_parquet(tmp_path / 'c10', CIFAR10, per_split=(20, 10))
    shutil.copy(tmp_path / 'c10' / 'train.parquet', tmp_path / 'c10' / 'train-00000-of-00001.parquet')
    with pytest.raises(ValueError, match=r'both train\.parquet and .*train-00000-of-00001\.parquet'):
        load_image_data(source, 'train')


def test_parquet_split_does_not_take_other_splits_named_like_it(tmp_path):
    source = write_parquet(tmp_path / 'c10', CIFAR10, per_split=(20, 10))
    shutil.copy(tmp_path / 'c10' / 'test.parquet', tmp_path / 'c10' / 'test-fog.parquet')
    assert len(load_image_data(source, 'test')) == 10


def test_parquet_reads_the_hubs_sharded_layout(tmp_path):
    write_parquet(tmp_path / 'c10', CIFAR10, per_split=(20, 10))
    for split in ('train', 'test'):
        (tmp_path / 'c10' / f'{split}.parquet').rename(tmp_path / 'c10' / f'{split}-00000-of-00001.parquet')
    assert len(load_image_data(f'parquet:{tmp_path / "c10"}', 'train')) == 20


@pytest.mark.parametrize('names, error', [
    (CIFAR10[::-1], r"'label' is a ClassLabel with the names \['airplane'.*would rename"),
    (CIFAR10 + ['x', 'y'], r"'label' is a ClassLabel of 10 classes but class_names names 12")])
def test_class_names_cannot_rename_a_named_class_label(tmp_path, names, error):
    source = write_parquet(tmp_path / 'c10', CIFAR10, per_split=(20, 10))
    assert load_image_data(source, 'train', class_names=[c.upper() for c in CIFAR10]).num_classes == 10
    with pytest.raises(ValueError, match=error):
        load_image_data(source, 'train', class_names=names)


def test_class_names_name_an_unnamed_class_label_of_as_many_classes(tmp_path):
    features = datasets.Features({'img': datasets.Image(), 'label': datasets.ClassLabel(num_classes=2)})
    images = load_image_data(write_parquet(tmp_path / 'c', ['a', 'b'], per_split=(4, 2)), 'train').images
    rows = {'img': [img.permute(1, 2, 0).numpy() for img in images], 'label': [0, 1, 0, 1]}
    (tmp_path / 'u').mkdir()
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(tmp_path / 'u' / 'train.parquet'))
    assert load_image_data(f'parquet:{tmp_path / "u"}', 'train', class_names=['cat', 'dog']).class_names == \
        ['cat', 'dog']
    with pytest.raises(ValueError, match=r'ClassLabel of 2 classes but class_names names 3'):
        load_image_data(f'parquet:{tmp_path / "u"}', 'train', class_names=['cat', 'dog', 'fox'])


@pytest.mark.parametrize('labels, dtype', [([0.0, 0.9, 1.5, 1.99], 'float64'), (['a', 'b', 'a', 'b'], 'string')])
def test_a_label_column_of_other_than_integers_is_refused(tmp_path, labels, dtype):
    images = load_image_data(write_parquet(tmp_path / 'c', ['a', 'b'], per_split=(4, 2)), 'train').images
    features = datasets.Features({'img': datasets.Image(), 'label': datasets.Value(dtype)})
    rows = {'img': [img.permute(1, 2, 0).numpy() for img in images], 'label': labels}
    (tmp_path / 'f').mkdir()
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(tmp_path / 'f' / 'train.parquet'))
    with pytest.raises(ValueError, match=rf"label column 'label' holds {dtype}"):
        load_image_data(f'parquet:{tmp_path / "f"}', 'train', class_names=['a', 'b'])


def test_an_unknown_storage_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"storage 'streamed'.*'memory', 'stream' or 'auto'"):
        load_image_data(write_parquet(tmp_path / 'c', CIFAR10, per_split=(20, 10)), 'train', storage='streamed')


def test_an_in_memory_shard_holds_only_its_own_images(tmp_path):
    source = write_parquet(tmp_path / 'c', CIFAR10, per_split=(40, 10), size=8)
    shard = load_image_data(source, 'train', image_size=8, shard=[1, 4], storage='memory')
    assert len(shard) == 10 and shard.images.untyped_storage().nbytes() == 10 * 3 * 8 * 8
    full = load_image_data(source, 'train', image_size=8, storage='memory')
    assert torch.equal(shard.images, full.images[1::4]) and torch.equal(shard.labels, full.labels[1::4])
