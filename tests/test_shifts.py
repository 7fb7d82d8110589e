"""The corruptions against CIFAR-10-C's definitions (hendrycks/robustness ``make_cifar_c.py``, written out below in
numpy and PIL as that script computes them on one HWC image), and the noise of each split drawn on its own."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from timm_compat.data import load_image_data
from timm_compat.shifts import CORRUPTIONS, apply_shift, parse_shift, shift_seed

from .datasets_util import write_parquet


def colourful(n=6, size=32, seed=0):
    """Images whose channels differ in mean, the case where a grey mean and per-channel means part."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (n, size, size, 3)).astype(np.float64)
    tint = np.array([1.0, 0.55, 0.25])  # red-heavy, as a sunset
    return (base * tint).astype(np.uint8)


def cifar_c_contrast(img, severity):
    c = [.75, .5, .4, .3, 0.15][severity - 1]
    x = img / 255.
    means = np.mean(x, axis=(0, 1), keepdims=True)
    return np.uint8(np.clip((x - means) * c + means, 0, 1) * 255)


def cifar_c_pixelate(img, severity):
    c = [0.95, 0.9, 0.85, 0.75, 0.65][severity - 1]
    x = Image.fromarray(img).resize((int(32 * c), int(32 * c)), Image.BOX)
    return np.uint8(x.resize((32, 32), Image.BOX))


def cifar_c_jpeg(img, severity):
    buffer = io.BytesIO()
    Image.fromarray(img).save(buffer, 'JPEG', quality=[80, 65, 58, 50, 40][severity - 1])
    return np.uint8(Image.open(buffer))


def ours(images, shift, seed=0):
    return apply_shift(torch.from_numpy(images).permute(0, 3, 1, 2), [shift], seed).permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize('name, reference', [('contrast', cifar_c_contrast), ('pixelate', cifar_c_pixelate),
                                             ('jpeg_compression', cifar_c_jpeg)])
@pytest.mark.parametrize('severity', [1, 2, 5])
def test_deterministic_corruptions_are_cifar_10_cs_up_to_rounding(name, reference, severity):
    images = colourful()
    want = np.stack([reference(img, severity) for img in images]).astype(int)
    diff = ours(images, f'{name}:{severity}').astype(int) - want
    assert diff.min() >= 0 and diff.max() <= 1  # rounded where CIFAR-10-C truncates: at most one level brighter


def test_gray_contrast_is_the_old_contrast_towards_one_grey_and_desaturates():
    images = colourful()
    x = images / 255.
    grey = x.mean(axis=(1, 2, 3), keepdims=True)
    want = np.round(np.clip((x - grey) * 0.5 + grey, 0, 1) * 255)
    assert np.abs(ours(images, 'gray_contrast:2') - want).max() <= 1
    spread = lambda a: np.ptp(a.reshape(len(a), -1, 3).mean(1), axis=1).mean()  # channel means' spread
    assert spread(ours(images, 'gray_contrast:2')) < 0.6 * spread(images)
    assert spread(ours(images, 'contrast:2')) == pytest.approx(spread(images), abs=1.0)


@pytest.mark.parametrize('severity, sigma', [(1, 0.04), (5, 0.10)])
def test_gaussian_noise_has_cifar_10_cs_scale(severity, sigma):
    grey = np.full((8, 32, 32, 3), 128, np.uint8)  # far from the clip at 0 and 255
    noise = (ours(grey, f'gaussian_noise:{severity}').astype(float) - 128) / 255
    assert noise.std() == pytest.approx(sigma, rel=0.05)


def test_each_split_draws_its_own_noise_and_train_keeps_the_run_seed(tmp_path):
    source = write_parquet(tmp_path / 'd', ['a', 'b'], per_split=(24, 24))
    shift = ['gaussian_noise:5']

    def noise(split):
        clean = load_image_data(source, split, seed=3).images.float()
        return (load_image_data(source, split, shift=shift, seed=3).images.float() - clean).flatten()

    train, test = noise('train'), noise('test')
    assert torch.corrcoef(torch.stack([train, test]))[0, 1].abs() < 0.05
    clean_train = load_image_data(source, 'train', seed=3).images
    assert torch.equal(load_image_data(source, 'train', shift=shift, seed=3).images, apply_shift(clean_train, shift, 3))
    assert shift_seed(3, 'train') == 3 and len({shift_seed(3, s) for s in ('train', 'test', 'validation')}) == 3


def test_every_corruption_keeps_uint8_images_in_range():
    images = torch.from_numpy(colourful(2)).permute(0, 3, 1, 2)
    for name in CORRUPTIONS:
        out = apply_shift(images, [f'{name}:5'], 0)
        assert out.dtype == torch.uint8 and out.shape == images.shape


@pytest.mark.parametrize('images', [torch.rand(2, 3, 8, 8), torch.randint(0, 255, (2, 3, 8, 8))])
def test_a_shift_of_images_not_in_uint8_is_refused(images):
    """Float images in [0, 1] were divided by 255 again and came out as black and white noise."""
    with pytest.raises(ValueError, match=r'uint8 images.*got torch\.(float32|int64)'):
        apply_shift(images, ['contrast:1'])


@pytest.mark.parametrize('images', [torch.zeros(2, 8, 8, 3, dtype=torch.uint8), torch.zeros(3, 8, 8, dtype=torch.uint8),
                                    torch.zeros(2, 1, 8, 8, dtype=torch.uint8)])
def test_images_not_laid_out_n_3_h_w_are_refused(images):
    """Channels-last images (as PIL and numpy give them) were blurred and contrasted along the wrong axes."""
    with pytest.raises(ValueError, match=r'\(N, 3, H, W\).*got \(' + ', '.join(map(str, images.shape))):
        apply_shift(images, ['contrast:1'])


def test_a_shift_given_as_one_string_is_refused_naming_the_list():
    """A bare string was iterated character by character: "Unknown shift 'g'"."""
    with pytest.raises(ValueError, match=r"list of shifts.*\['gaussian_noise:5'\]"):
        apply_shift(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), 'gaussian_noise:5')


def as_recorded(images, shift, seed):
    """apply_shift as every record drew it: one generator through the batch, corruption by corruption (a record's
    split, in chunks of 2048 images, drew its single noise corruption as one stream too)."""
    g, x = torch.Generator().manual_seed(seed), images.float() / 255
    for fn, severity in map(parse_shift, shift):
        x = fn(x, severity, g).clamp(0, 1)
    return (x * 255).round().to(torch.uint8)


SEC4 = ['defocus_blur:2', 'gray_contrast:2', 'gaussian_noise:1']  # the Sec. 4 records' shift


@pytest.mark.parametrize('size, shift', [(32, SEC4), (32, ['shot_noise:3']), (30, ['gaussian_noise:5']),
                                         (32, ['gaussian_noise:1', 'shot_noise:1'])])
def test_the_noise_does_not_depend_on_the_batch_size(size, shift):
    """batch_size only bounds memory, but where 3*H*W is no multiple of 16 (torch draws normals 16 at a time), or
    with two noise corruptions (drawn chunk by chunk), it changed the noise."""
    images = torch.from_numpy(colourful(5, size)).permute(0, 3, 1, 2)
    shifted = [apply_shift(images, shift, 3, batch_size=b) for b in (2048, 2, 1)]
    assert all(torch.equal(shifted[0], other) for other in shifted[1:])
    if size == 32 and len(shift) == 3 or shift == ['shot_noise:3']:  # one noise corruption at 32 px: the records'
        assert torch.equal(shifted[0], as_recorded(images, shift, 3))


def test_two_shards_of_a_split_draw_their_own_noise_and_shard_1_keeps_the_records():
    """The shift is applied after sharding with the split's seed: image k of shard 0 and of shard 1 carried one
    noise field. The records' shifted halves are shard 1 (train_shard [1, 2] and [1, 10]): theirs is unchanged."""
    load = lambda shard, shift=None: load_image_data('synthetic:B', 'train', image_size=16, synthetic_per_class=4,
                                                     shard=shard, shift=shift, seed=3).images
    noise = {i: (load([i, 2], ['gaussian_noise:5']).float() - load([i, 2]).float()).flatten() for i in (0, 1)}
    assert torch.corrcoef(torch.stack([noise[0], noise[1]]))[0, 1].abs() < 0.05
    for shard in ([1, 2], [1, 10], None, [0, 1]):
        assert torch.equal(load(shard, SEC4), as_recorded(load(shard), SEC4, 3))
    assert len({shift_seed(3, 'train', shard) for shard in ([0, 2], [1, 2], [2, 3], [3, 4], None)}) == 4
