import pytest
import torch

from timm_compat.data import (
    EpochSampler, ImageData, augment, evaluation_batches, iterate_batches, load_image_data, normalize, random_subset,
    training_batch)
from timm_compat.synthetic import SYNTHETIC_CLASSES, make_synthetic

from tests.datasets_util import write_imagefolder, write_parquet

CIFAR10 = ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck']


def test_parquet_in_cifar10_schema(tmp_path):
    source = write_parquet(tmp_path / 'c10', CIFAR10)
    data = load_image_data(source, 'train')
    assert data.images.dtype == torch.uint8 and data.images.shape == (40, 3, 32, 32)
    assert data.class_names == CIFAR10
    assert data.labels.tolist()[:11] == list(range(10)) + [0]


def test_stl10_schema_resized_to_32(tmp_path):
    source = write_parquet(tmp_path / 'stl', ['airplane', 'bird', 'car'], size=96, image_column='image')
    data = load_image_data(source, 'test', image_size=32)
    assert data.images.shape == (20, 3, 32, 32)


def test_cifar100_fine_label_column(tmp_path):
    source = write_parquet(tmp_path / 'c100', [f'c{i}' for i in range(5)], label_column='fine_label')
    assert load_image_data(source, 'train').num_classes == 5


def test_imagefolder(tmp_path):
    source = write_imagefolder(tmp_path / 'folder', ['cat', 'dog'])
    data = load_image_data(source, 'train', image_size=32)
    assert data.class_names == ['cat', 'dog'] and len(data) == 6 and data.images.shape[-1] == 32


def test_missing_columns_named(tmp_path):
    source = write_parquet(tmp_path / 'odd', CIFAR10, image_column='picture', label_column='y')
    with pytest.raises(ValueError, match=r"no image column.*columns \['picture', 'y'\]"):
        load_image_data(source, 'train')
    data = load_image_data(source, 'train', image_column='picture', label_column='y')
    assert len(data) == 40


def test_labels_out_of_range(tmp_path):
    source = write_parquet(tmp_path / 'bad', CIFAR10, class_label=False)
    with pytest.raises(ValueError, match=r'labels range over \[0, 9\] but there are 3 classes'):
        load_image_data(source, 'train', class_names=['a', 'b', 'c'])
    with pytest.raises(ValueError, match='not a ClassLabel'):
        load_image_data(source, 'train')


def test_select_classes_relabels(tmp_path):
    data = load_image_data(write_parquet(tmp_path / 'c10', CIFAR10), 'train', classes=['cat', 'airplane'])
    assert data.class_names == ['cat', 'airplane'] and set(data.labels.tolist()) == {0, 1} and len(data) == 8


def test_synthetic_domains():
    a_img, a_lab, a_names = make_synthetic('A', 'train', num_per_class=5)
    again, _, _ = make_synthetic('A', 'train', num_per_class=5)
    b_img, _, b_names = make_synthetic('B', 'train', num_per_class=5)
    test_img, _, _ = make_synthetic('A', 'test', num_per_class=5)
    assert torch.equal(a_img, again)  # deterministic
    assert not torch.equal(a_img, test_img)
    assert a_names == SYNTHETIC_CLASSES['A'] and len(set(a_names) & set(b_names)) == 9
    assert a_names != b_names[:10]  # same classes, other order: matching must go by name
    # Visibly different styles: domain A is light, domain B dark.
    assert a_img.float().mean() > b_img.float().mean() + 60


def test_augment_and_normalize():
    x = torch.randint(0, 255, (6, 3, 32, 32), dtype=torch.uint8)
    y = augment(x)
    assert y.shape == x.shape and y.dtype == torch.uint8
    assert not torch.equal(x, y)
    assert torch.equal(augment(x, pad=0, flip=False), x)
    z = normalize(x, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert torch.allclose(z, (x.float() / 255 - 0.5) / 0.25, atol=1e-5)


def test_training_batch_gathers_augments_normalises():
    data = ImageData(torch.randint(0, 255, (20, 3, 8, 8), dtype=torch.uint8), torch.arange(20) % 4, list('abcd'))
    index = torch.tensor([3, 17, 5])
    mean, std = torch.tensor([0.5, 0.4, 0.3]), torch.tensor([0.2, 0.2, 0.2])
    images, labels = training_batch(data, index, mean, std, augment_images=False)
    assert torch.equal(labels, data.labels[index])
    assert torch.allclose(images, normalize(data.images[index], mean, std))
    augmented, _ = training_batch(data, index, mean, std, memory_format=torch.channels_last)
    assert augmented.dtype == torch.float32 and augmented.is_contiguous(memory_format=torch.channels_last)
    assert not torch.allclose(augmented, images)


def test_epoch_sampler_deterministic_and_sharded():
    s0, s1 = EpochSampler(100, 10, seed=3, rank=0, world_size=2), EpochSampler(100, 10, seed=3, rank=1, world_size=2)
    assert s0.steps_per_epoch == 5
    epoch0 = torch.cat([s0.batch(i) for i in range(5)] + [s1.batch(i) for i in range(5)])
    assert sorted(epoch0.tolist()) == list(range(100))  # the two ranks cover an epoch exactly once
    assert torch.equal(EpochSampler(100, 10, seed=3, rank=0, world_size=2).batch(7), s0.batch(7))
    assert not torch.equal(s0.batch(0), s0.batch(5))  # a new permutation each epoch
    with pytest.raises(ValueError, match='fewer than one batch'):
        EpochSampler(5, 10)


def test_decoded_images_cached(tmp_path, monkeypatch):
    import timm_compat._hf_source as data_module
    cache = tmp_path / 'cache'
    monkeypatch.setenv('TIMM_COMPAT_CACHE', str(cache))
    source = write_parquet(tmp_path / 'c10', CIFAR10)
    first = load_image_data(source, 'train')
    [entry] = cache.glob('decoded-*.safetensors')
    real_decode, calls = data_module._decode, []
    monkeypatch.setattr(data_module, '_decode', lambda *a: calls.append(1) or real_decode(*a))
    assert torch.equal(load_image_data(source, 'train').images, first.images) and calls == []
    entry.write_bytes(b'garbage')  # a damaged entry is decoded again, not trusted
    assert torch.equal(load_image_data(source, 'train').images, first.images) and calls == [1]


@pytest.mark.parametrize('umask', [0o022, 0o077])
def test_decode_cache_honours_the_umask(tmp_path, monkeypatch, umask):
    import os
    monkeypatch.setenv('TIMM_COMPAT_CACHE', str(tmp_path / 'cache'))
    source = write_parquet(tmp_path / 'c10', CIFAR10)
    old = os.umask(umask)
    try:
        load_image_data(source, 'train')
    finally:
        os.umask(old)
    [entry] = (tmp_path / 'cache').iterdir()  # the entry alone: no temporary file left behind
    assert entry.name.startswith('decoded-') and entry.stat().st_mode & 0o777 == 0o666 & ~umask


def test_evaluation_batches_are_a_seeded_permutation_without_tiny_batches():
    for n, batch_size in [(21, 10), (1001, 250), (5, 4), (400, 40), (41, 40)]:
        batches = evaluation_batches(n, batch_size, seed=3)
        sizes = [len(b) for b in batches]
        assert len(batches) == -(-n // batch_size) and max(sizes) <= batch_size
        assert min(sizes) >= batch_size / 2 and max(sizes) - min(sizes) <= 1  # (41, 40): 21 + 20, not 40 + 1
        assert sorted(torch.cat(batches).tolist()) == list(range(n))  # every example exactly once
        assert not torch.equal(torch.cat(batches), torch.arange(n))  # not the stored order
    first, again = evaluation_batches(1001, 250, seed=3), evaluation_batches(1001, 250, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(evaluation_batches(1001, 250, seed=4)[0], first[0])
    with pytest.raises(ValueError, match='batch_size must be a positive'):
        evaluation_batches(10, 0)


def test_iterate_batches_pairs_images_with_their_labels():
    data = ImageData(torch.arange(30, dtype=torch.uint8).view(30, 1, 1, 1).expand(30, 3, 2, 2), torch.arange(30),
                     [str(i) for i in range(30)])
    seen = []
    for images, labels in iterate_batches(data, 8):
        assert torch.equal(images[:, 0, 0, 0].long(), labels)
        seen += labels.tolist()
    assert sorted(seen) == list(range(30)) and seen != list(range(30))


@pytest.mark.parametrize('processes', [2, 3, 5])
def test_the_shards_of_an_evaluation_pass_are_its_batches(processes):
    # A sharded evaluation must score the very batches of one pass (batch statistics depend on them), each once.
    data = ImageData(torch.zeros(30, 3, 2, 2, dtype=torch.uint8), torch.arange(30), [str(i) for i in range(30)])
    whole = [labels.tolist() for _, labels in iterate_batches(data, 8, seed=1)]
    shards = [[labels.tolist() for _, labels in iterate_batches(data, 8, seed=1, shard=(r, processes))]
              for r in range(processes)]
    assert sorted(b for shard in shards for b in shard) == sorted(whole) and len(whole) == 4
    assert all(len(shard) in (len(whole) // processes, -(-len(whole) // processes)) for shard in shards)


def sorted_by_class(num_classes=10, per_class=50):
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    return ImageData(labels.to(torch.uint8).view(-1, 1, 1, 1).expand(-1, 3, 2, 2), labels,
                     [f'c{i}' for i in range(num_classes)])


def test_take_is_a_seeded_random_subset():
    data = sorted_by_class()
    subset = data.take(50)
    assert len(subset) == 50 and len(subset.labels.unique()) == 10  # the first 50 would all be class 0
    assert torch.equal(subset.images[:, 0, 0, 0].long(), subset.labels)  # images stay with their labels
    assert torch.equal(data.take(50).labels, subset.labels) and not torch.equal(data.take(50, seed=1).labels,
                                                                                subset.labels)
    assert data.take(None) is data and data.take(500) is data
    with pytest.raises(ValueError, match='non-negative'):
        data.take(-1)


def test_limit_takes_a_random_subset_of_class_sorted_data(tmp_path):
    source = write_imagefolder(tmp_path / 'folder', ['cat', 'dog'], per_class=10, size=8)
    full = load_image_data(source, 'test', image_size=8)
    assert full.labels.tolist() == [0] * 10 + [1] * 10  # imagefolder stores the classes in order
    limited = load_image_data(source, 'test', image_size=8, limit=10)
    assert len(limited) == 10 and set(limited.labels.tolist()) == {0, 1}
    index = random_subset(20, 10)
    assert torch.equal(limited.images, full.images[index]) and torch.equal(limited.labels, full.labels[index])


@pytest.mark.parametrize('classes,twice', [(['cat', 'airplane', 'cat'], 'cat'),
                                           (['airplane', 'car', 'automobile'], 'automobile')])
def test_select_classes_refuses_a_class_named_twice(tmp_path, classes, twice):
    """A synonym or a repeat would empty one of the two labels and duplicate a head column without an error."""
    data = load_image_data(write_parquet(tmp_path / 'c10', CIFAR10), 'train')
    with pytest.raises(ValueError, match=rf"names the class '{twice}' twice"):
        data.select_classes(classes)


def test_an_empty_class_list_is_refused_rather_than_meaning_all_classes(tmp_path):
    """``classes=[]`` (e.g. a list emptied by a filter) once silently loaded every class."""
    source = write_parquet(tmp_path / 'c10', CIFAR10)
    with pytest.raises(ValueError, match=r'classes=\[\] .*None'):
        load_image_data(source, 'train', classes=[])
    with pytest.raises(ValueError, match=r'classes=\[\] .*None'):
        load_image_data(source, 'train').select_classes([])
    assert load_image_data(source, 'train', classes=None).num_classes == 10


def test_a_limit_on_one_of_two_shards_of_a_split_is_refused():
    """The limit draws a random subset before the shard is taken, so halves with other limits would overlap."""
    from timm_compat.config import ConfigError, load_config
    halves = ['networks.1.dataset.source=synthetic:A', 'networks.0.dataset.train_shard=[0, 2]',
              'networks.1.dataset.train_shard=[1, 2]']
    with pytest.raises(ConfigError, match=r'networks a and b .*train_shard .*train_limit.*overlap'):
        load_config(None, halves + ['networks.1.dataset.train_limit=100'])
    load_config(None, halves + ['networks.0.dataset.train_limit=100', 'networks.1.dataset.train_limit=100'])
    load_config(None, halves)
    load_config(None, halves[1:] + ['networks.1.dataset.train_limit=100'])  # shards of two sources


@pytest.mark.parametrize('first, other', [([0, 2], [4, 10]), ([0, 2], [0, 2]), ([0, 2], [2, 4]), ([0, 3], [1, 2]),
                                          ([4, 10], [0, 2])])
def test_overlapping_shards_of_one_split_are_refused(first, other):
    """Shard [index, count] is examples index::count: [0, 2] and [4, 10] share every tenth image (4, 14, ...), and
    [0, 3] and [1, 2] every sixth (3, 9, ...); both networks would train on them."""
    from timm_compat.config import ConfigError, load_config
    shards = [f'networks.0.dataset.train_shard={first}', f'networks.1.dataset.train_shard={other}']
    assert set(range(first[0], 600, first[1])) & set(range(other[0], 600, other[1]))
    with pytest.raises(ConfigError, match=rf'networks\.0\.dataset\.train_shard=\[{first[0]}, {first[1]}\] and '
                                          rf'networks\.1\.dataset\.train_shard=\[{other[0]}, {other[1]}\] overlap'):
        load_config(None, shards + ['networks.1.dataset.source=synthetic:A'])
    load_config(None, shards)  # shards of two sources


@pytest.mark.parametrize('other', [[1, 2], [1, 10], [3, 4], [5, 6]])
def test_disjoint_shards_of_one_split_are_accepted(other):
    from timm_compat.config import load_config
    images = set(range(0, 600, 2)) & set(range(other[0], 600, other[1]))
    assert not images  # the claim the config check makes, on the indices data._shard takes
    load_config(None, ['networks.1.dataset.source=synthetic:A', 'networks.0.dataset.train_shard=[0, 2]',
                       f'networks.1.dataset.train_shard={other}'])


def test_one_folder_named_two_ways_is_one_split(tmp_path, monkeypatch):
    """A Hub id read from data_dir is its Parquet copy there; ./x and x are one folder."""
    from timm_compat.config import ConfigError, load_config
    monkeypatch.chdir(tmp_path)
    shards = ['networks.0.dataset.train_shard=[0, 2]', 'networks.1.dataset.train_shard=[0, 2]']
    for sources in (['parquet:data/cifar10', 'parquet:./data/cifar10/'], ['uoft-cs/cifar10', 'parquet:data/cifar10']):
        with pytest.raises(ConfigError, match='overlap'):
            load_config(None, shards + ['data_dir=data'] + [f'networks.{i}.dataset.source={s}'
                                                             for i, s in enumerate(sources)])
