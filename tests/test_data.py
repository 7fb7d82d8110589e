import pytest
import torch

from timm_compat.data import EpochSampler, ImageData, augment, load_image_data, normalize, training_batch
from timm_compat.synthetic import SYNTHETIC_CLASSES, make_synthetic

from datasets_util import write_imagefolder, write_parquet

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
    import timm_compat.data as data_module
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
