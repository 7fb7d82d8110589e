"""The fast recipe's data keys (issue 16): airbench94's translate and alternating flip, and flip/translate TTA.

The default augmentation is checked bit for bit against a copy of the code before these keys existed.
"""
import numpy as np
import pytest
import torch
from torch import nn

from timm_compat.config import RunConfig
from timm_compat.data import EpochSampler, ImageData, augment, iterate_batches, normalize, training_batch
from timm_compat.evaluation import accuracy, recombination_matrix
from timm_compat.tta import tta_logits, tta_views

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def _old_augment(images, pad=4, flip=True):
    """timm_compat.data.augment as it was before issue 16 (zero-pad, random crop, random flip)."""
    n, _, h, w = images.shape
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n, 1))
    dx = torch.randint(0, 2 * pad + 1, (n, 1))
    rows = (dy + torch.arange(h))[:, None, :, None]
    cols = (dx + torch.arange(w))[:, None, None, :]
    images = padded[torch.arange(n)[:, None, None, None], torch.arange(images.shape[1])[None, :, None, None], rows,
                    cols]
    mirror = torch.rand(n, 1, 1, 1) < 0.5
    return torch.where(mirror, images.flip(-1), images)


def _images(n=16, size=8, seed=0):
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_defaults_are_bit_identical_to_the_augmentation_before_the_keys():
    data = ImageData(_images(40), torch.arange(40) % 4, list('abcd'))
    index = torch.tensor([3, 17, 5, 30, 8, 1])
    torch.manual_seed(11)
    new, labels = training_batch(data, index, MEAN, STD)
    torch.manual_seed(11)
    assert torch.equal(new, normalize(_old_augment(data.images[index]), MEAN, STD))
    assert torch.equal(labels, data.labels[index])
    cfg = RunConfig()  # what the engine passes to training_batch by default
    assert (cfg.augment_translate, cfg.augment_pad_mode, cfg.augment_flip, cfg.eval_tta) == (
        4, 'constant', 'random', 'none')


@pytest.mark.parametrize('pad_mode', ['reflect', 'constant'])
def test_translate_is_a_shift_of_the_padded_image(pad_mode):
    x, pad = _images(64), 2
    torch.manual_seed(0)
    y = augment(x, pad=pad, flip=False, pad_mode=pad_mode)
    padded = np.pad(x.numpy(), ((0, 0), (0, 0), (pad, pad), (pad, pad)), mode=pad_mode)
    shifts = set()
    for n in range(len(x)):
        found = [(dy, dx) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
                 if np.array_equal(y[n].numpy(), padded[n, :, dy:dy + 8, dx:dx + 8])]
        assert found, f'image {n} is no shift of its padded self'
        shifts.add(found[0])
    assert len(shifts) > 10  # shifts are drawn per image, over the whole range


def _flips_by_index(sampler, epoch):
    steps = range(epoch * sampler.steps_per_epoch, (epoch + 1) * sampler.steps_per_epoch)
    return {int(i): bool(f) for s in steps for i, f in zip(sampler.batch(s), sampler.alternating_flips(s))}


def test_alternating_flip_shows_each_image_both_ways_every_two_epochs():
    sampler = EpochSampler(40, 10, seed=3)
    first, second, third = _flips_by_index(sampler, 0), _flips_by_index(sampler, 1), _flips_by_index(sampler, 2)
    assert sorted(first) == sorted(second) == list(range(40))
    assert all(first[i] != second[i] for i in range(40))
    assert first == third
    assert 10 < sum(first.values()) < 30  # a fair coin in the first epoch
    # A function of (seed, index, epoch): a resumed sampler, other ranks and other seeds.
    assert torch.equal(EpochSampler(40, 10, seed=3).alternating_flips(7), sampler.alternating_flips(7))
    ranks = [EpochSampler(40, 10, seed=3, rank=r, world_size=2) for r in range(2)]
    assert all(bool(f) == second[int(i)] for r in ranks for i, f in zip(r.batch(2), r.alternating_flips(2)))
    assert _flips_by_index(EpochSampler(40, 10, seed=4), 0) != first


def test_given_flips_mirror_exactly_those_images_and_leave_the_global_rng():
    x, flips = _images(6), torch.tensor([True, False, False, True, True, False])
    state = torch.get_rng_state()
    y = augment(x, pad=0, flips=flips)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(y, torch.where(flips.view(-1, 1, 1, 1), x.flip(-1), x))


def _left_half(x):
    return x[..., :x.shape[-1] // 2].mean((2, 3))  # one logit per channel, from the left half only


def test_flip_tta_of_a_mirror_invariant_model_is_its_plain_logits():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    x = torch.randn(5, 3, 8, 8)
    assert torch.allclose(tta_logits(model, x, 'flip'), model(x), atol=1e-6)


def test_flip_tta_of_a_left_half_reader_averages_both_views():
    x = torch.randn(5, 3, 8, 8)
    expected = (_left_half(x) + _left_half(x.flip(-1))) / 2
    assert torch.allclose(tta_logits(_left_half, x, 'flip'), expected)
    assert not torch.allclose(expected, _left_half(x))
    assert torch.equal(tta_logits(_left_half, x, 'none'), _left_half(x))


def test_flip_translate_tta_has_airbench94_views_and_weights():
    x = torch.randn(2, 3, 8, 8)
    padded = torch.from_numpy(np.pad(x.numpy(), ((0, 0), (0, 0), (1, 1), (1, 1)), mode='reflect'))
    down_right, up_left = padded[..., :8, :8], padded[..., 2:, 2:]
    expected = [(0.25, x), (0.25, x.flip(-1)), (0.125, down_right), (0.125, down_right.flip(-1)),
                (0.125, up_left), (0.125, up_left.flip(-1))]
    views = tta_views(x, 'flip_translate')
    assert [w for w, _ in views] == [w for w, _ in expected]
    assert all(torch.equal(v, e) for (_, v), (_, e) in zip(views, expected))


def test_each_tta_view_is_normalised_as_its_own_batch():
    model = nn.Sequential(nn.BatchNorm2d(3), nn.Flatten()).train()  # batch statistics, as in the paper's eval
    x = torch.randn(4, 3, 8, 8) * torch.linspace(0.5, 3, 8)  # shifted views have other statistics
    expected = sum(w * model(v) for w, v in tta_views(x, 'flip_translate'))
    assert torch.allclose(tta_logits(model, x, 'flip_translate'), expected)
    whole = model(torch.cat([v for _, v in tta_views(x, 'flip_translate')])).view(6, 4, -1)
    pooled = sum(w * whole[k] for k, (w, _) in enumerate(tta_views(x, 'flip_translate')))
    assert not torch.allclose(expected, pooled, atol=1e-4)  # one batch of all views would differ


def test_unknown_tta_mode_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="'flip_translate'"):
        tta_logits(_left_half, torch.zeros(1, 3, 4, 4), 'mirror')


class LeftHalfNet(nn.Module):
    """Class 1 iff the normalised left half is bright: right on uniform images, wrong on the split ones below."""

    def __init__(self):
        super().__init__()
        self.extractor, self.head = nn.Identity(), nn.Identity()
        self.extractor.pretrained_cfg = {'mean': MEAN, 'std': STD}
        self.head.class_names = ['dark', 'light']
        self.head.forward = lambda f: torch.stack([-f[..., :4].mean((1, 2, 3)), f[..., :4].mean((1, 2, 3))], 1)

    def forward(self, x):
        return self.head(self.extractor(x))


def _split_data():
    """Uniform images, and images whose left half says the opposite of the whole (what flip TTA gets right)."""
    left = torch.tensor([60, 200, 100, 150]).repeat(10)
    right = torch.tensor([60, 200, 250, 10]).repeat(10)
    images = torch.cat([left.view(-1, 1, 1, 1).expand(-1, 3, 8, 4), right.view(-1, 1, 1, 1).expand(-1, 3, 8, 4)], 3)
    return ImageData(images.to(torch.uint8).contiguous(), torch.tensor([0, 1, 1, 0]).repeat(10), ['dark', 'light'])


def test_evaluation_applies_tta_to_own_accuracy_and_the_matrix_in_both_bn_modes():
    data, nets = _split_data(), [LeftHalfNet(), LeftHalfNet()]
    plain = sum(int((nets[0](normalize(x, MEAN, STD)).argmax(1) == y).sum()) for x, y in iterate_batches(data, 16))
    for bn in ('batch', 'running'):
        assert accuracy(nets[0], data, 16, bn) == accuracy(nets[0], data, 16, bn, tta='none') == plain / 40 == 0.5
        assert accuracy(nets[0], data, 16, bn, tta='flip') == 1.0
        assert torch.equal(recombination_matrix(nets, [data, data], 16, bn), torch.full((2, 2), 0.5))
        assert torch.equal(recombination_matrix(nets, [data, data], 16, bn, tta='flip'), torch.ones(2, 2))


def test_reflect_padding_wider_than_the_image_is_refused_before_a_run():
    from timm_compat.config import ConfigError, load_config
    with pytest.raises(ConfigError, match='augment_translate=8 reflect-pads more than the image'):
        load_config(None, ['augment_pad_mode=reflect', 'augment_translate=8', 'image_size=8'])
    load_config(None, ['augment_pad_mode=reflect', 'augment_translate=7', 'image_size=8'])
