import pytest
import timm
import torch

import timm_compat  # noqa: F401  (registers the models)

CIFAR_MODELS = ['resnet8_cifar', 'resnet20_cifar', 'resnet56_cifar', 'wide_resnet56_cifar', 'wrn28_10_cifar']


@pytest.mark.parametrize('name', CIFAR_MODELS)
def test_registered_with_timm_conventions(name):
    assert name in timm.list_models('*_cifar')
    model = timm.create_model(name, num_classes=7)
    cfg = model.pretrained_cfg
    assert tuple(cfg['input_size']) == (3, 32, 32)
    assert cfg['mean'] == pytest.approx((0.4914, 0.4822, 0.4465))
    x = torch.randn(2, 3, 32, 32)
    feats = model.forward_features(x)
    assert feats.shape == (2, model.num_features, 8, 8)
    assert model.forward_head(feats).shape == (2, 7)
    assert model.forward_head(feats, pre_logits=True).shape == (2, model.num_features)
    final, inter = model.forward_intermediates(x)
    assert torch.allclose(final, feats)
    assert [t.shape[1] for t in inter] == [i['num_chs'] for i in model.feature_info]
    model.reset_classifier(3)
    assert model(x).shape == (2, 3)


def test_architecture_sizes():
    def blocks(m):
        return [len(getattr(m, f'layer{i}')) for i in (1, 2, 3)]
    r56 = timm.create_model('resnet56_cifar')
    assert blocks(r56) == [9, 9, 9] and [i['num_chs'] for i in r56.feature_info[1:]] == [16, 32, 64]
    assert blocks(timm.create_model('resnet20_cifar')) == [3, 3, 3]
    wide = timm.create_model('wide_resnet56_cifar', widen_factor=2)
    assert blocks(wide) == [9, 9, 9] and wide.num_features == 128
    assert timm.create_model('wide_resnet56_cifar').num_features == 256
    wrn = timm.create_model('wrn28_10_cifar')
    assert blocks(wrn) == [4, 4, 4] and wrn.num_features == 640
    # 36.5M parameters, as reported by Zagoruyko & Komodakis for WRN-28-10.
    assert sum(p.numel() for p in wrn.parameters()) == pytest.approx(36.5e6, rel=0.01)


def test_features_only():
    model = timm.create_model('resnet56_cifar', features_only=True)
    assert [f.shape[1:] for f in model(torch.randn(1, 3, 32, 32))] == [
        (16, 32, 32), (16, 32, 32), (32, 16, 16), (64, 8, 8)]
