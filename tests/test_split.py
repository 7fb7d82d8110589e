import pytest
import timm
import torch

import timm_compat

# (model, split points, input size): every family the split must hold for.
CASES = [
    ('resnet18', ['layer2', 3], 64),
    ('resnet50', ['layer3'], 64),
    ('wide_resnet50_2', ['layer2'], 64),
    ('mobilenetv2_100', ['blocks.4.0', 'blocks.2', 2], 64),
    ('efficientnet_b0', ['blocks.3'], 64),
    ('convnext_tiny', ['stages.1'], 64),
    ('regnety_002', ['s2'], 64),
    ('resnet20_cifar', ['layer1'], 32),
    ('resnet56_cifar', ['layer2', 1], 32),
    ('wide_resnet56_cifar', ['layer2'], 32),
    ('wrn28_10_cifar', ['layer3'], 32),
]


@pytest.mark.parametrize('name,points,size', CASES, ids=[c[0] for c in CASES])
def test_split_is_exact_and_shares_weights(name, points, size):
    model = timm.create_model(name).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected = model(x)
    for at in points:
        trunk, tail = timm_compat.split_model(model, at)
        with torch.no_grad():
            assert torch.equal(tail(trunk(x)), expected), at
        model_params = {p.data_ptr() for p in model.parameters()}
        split_params = [p.data_ptr() for p in list(trunk.parameters()) + list(tail.parameters())]
        assert set(split_params) <= model_params
        assert len(split_params) == len(model_params)  # every parameter on exactly one side


def test_mobilenetv2_split_after_eleventh_block():
    model = timm.create_model('mobilenetv2_100')
    blocks = [f'blocks.{i}.{j}' for i, stage in enumerate(model.blocks) for j in range(len(stage))]
    assert len(blocks) == 17 and blocks[10] == 'blocks.4.0'
    trunk, _ = timm_compat.split_model(model, 'blocks.4.0')
    assert trunk(torch.randn(2, 3, 32, 32)).shape[1] == 96


def test_split_by_name_and_train_mode_gradients():
    trunk, tail = timm_compat.split_model('resnet18', 'layer2', num_classes=5)
    out = tail(trunk(torch.randn(2, 3, 64, 64)))
    out.sum().backward()
    assert out.shape == (2, 5)
    assert all(p.grad is not None for p in trunk.parameters())


def test_vit_token_features():
    model = timm.create_model('vit_tiny_patch16_224', img_size=64).eval()
    x = torch.randn(2, 3, 64, 64)
    trunk, tail = timm_compat.split_model(model, 'blocks.5')
    with torch.no_grad():
        tokens = trunk(x)
        assert tokens.shape == (2, 17, 192)
        assert torch.equal(tail(tokens), model(x))


def test_unknown_split_lists_valid_names():
    with pytest.raises(ValueError, match=r"Unknown split point 'layer9'.*layer1, layer2"):
        timm_compat.split_model('resnet18', 'layer9')
    with pytest.raises(ValueError, match='out of range'):
        timm_compat.split_model('resnet18', 17)


def test_split_across_skip_connection_refused():
    with pytest.raises(ValueError, match='skip connection'):
        timm_compat.split_model('resnet18', 'layer2.0.conv1')


def test_unknown_backbone():
    with pytest.raises(ValueError, match=r"Unknown timm model 'resnet1800'.*list_models"):
        timm_compat.split_model('resnet1800', 'layer2')
