import pytest
import timm
import torch
from torch import fx, nn

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


# The largest models only in the slow run: the split logic they exercise is the same as their small siblings'.
HEAVY = {'resnet50', 'wide_resnet50_2', 'mobilenetv2_100', 'wide_resnet56_cifar', 'wrn28_10_cifar'}


@pytest.mark.parametrize('name,points,size', [pytest.param(*c, marks=pytest.mark.slow) if c[0] in HEAVY else c
                                              for c in CASES], ids=[c[0] for c in CASES])
def test_split_is_exact_and_shares_weights(name, points, size):
    model = timm.create_model(name).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected = model(x)
    for at in points:
        trunk, tail = timm_compat.split_model(model, at, input_size=(3, size, size))
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
    trunk, tail = timm_compat.split_model('resnet18', 'layer2', num_classes=5, input_size=(3, 64, 64))
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


def _small_swin():
    return timm.create_model('swin_tiny_patch4_window7_224', img_size=64, window_size=4, embed_dim=24,
                             depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 4))


def _differ_by_seed(module, x):
    outs = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        with torch.no_grad():
            outs.append(module(x))
    return not torch.equal(*outs)


def test_split_made_in_train_mode_has_no_dropout_in_eval():
    model = timm.create_model('resnet20_cifar', drop_rate=0.2)  # train mode, as make_compatible splits
    trunk, tail = timm_compat.split_model(model, 'layer2')
    x = torch.randn(4, 3, 32, 32)
    halves = nn.Sequential(trunk, tail)
    with torch.no_grad():
        first, second = halves.eval()(x), halves(x)
        assert torch.equal(first, second)
        assert torch.equal(first, model.eval()(x))
    assert _differ_by_seed(halves.train(), x)  # train mode still drops
    for module in (model, halves):  # the same dropout draws as the unsplit model
        torch.manual_seed(3)
        with torch.no_grad():
            module.train()
            out = module(x)
        first = out if module is model else first
    assert torch.equal(out, first)


def test_drop_path_inside_blocks_follows_mode_after_split_in_eval_mode():
    # zero_init_last=False: with the last BN of a block at zero, drop-path would have nothing to drop.
    model = timm.create_model('resnet18', drop_path_rate=0.5, zero_init_last=False).eval()
    # The tail: its blocks are traced (the split module itself stays a leaf, whose mode was always live).
    trunk, tail = timm_compat.split_model(model, 'layer1', input_size=(3, 32, 32))
    with torch.no_grad():
        features = trunk(torch.randn(2, 3, 32, 32))
    assert _differ_by_seed(tail.train(), features)
    assert not _differ_by_seed(tail.eval(), features)


class _NoiseWhileTraining(nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.head = nn.Conv2d(3, 4, 3), nn.Linear(4, 2)

    def forward(self, x):
        x = self.body(x)
        if self.training:  # a branch on the mode that tracing would freeze
            x = x + torch.randn_like(x)
        return self.head(x.mean((2, 3)))


def test_branch_on_mode_in_traced_code_refused():
    with pytest.raises(ValueError, match='different code in train and eval mode'):
        timm_compat.split_model(_NoiseWhileTraining(), 'body', input_size=(3, 8, 8))


def test_channels_last_stages_leave_the_trunk_as_nchw():
    model = _small_swin().eval()
    x = torch.randn(2, 3, 64, 64)
    trunk, tail = timm_compat.split_model(model, 'layers.1', input_size=(3, 64, 64))
    with torch.no_grad():
        features = trunk(x)
        timm_nchw = model.forward_intermediates(x, indices=[1], intermediates_only=True)[0]
        assert features.shape == (2, model.feature_info[1]['num_chs'], 8, 8)
        assert torch.equal(features, timm_nchw)
        assert torch.equal(tail(features), model(x))


def test_splitting_leaves_the_model_unchanged():
    model = _small_swin()
    attributes, state = set(vars(model)), set(model.state_dict())
    for _ in range(3):
        timm_compat.split_model(model, 'layers.2', input_size=(3, 64, 64))
    assert set(vars(model)) == attributes and set(model.state_dict()) == state
    assert model.training and all(m.training for m in model.modules())


def test_attention_bias_cache_not_written_by_tracing():
    model = timm.create_model('levit_128s', img_size=64).eval()
    x = torch.randn(2, 3, 64, 64)
    for _ in range(2):
        trunk, tail = timm_compat.split_model(model, 'stages.1', input_size=(3, 64, 64))
    caches = [v for m in model.modules() for v in getattr(m, 'attention_bias_cache', {}).values()]
    assert not any(isinstance(v, fx.Proxy) for v in caches)
    with torch.no_grad():
        assert torch.equal(tail(trunk(x)), model(x))


def test_optional_forward_argument_traced_at_its_default():
    model = timm.create_model('hiera_tiny_224', img_size=64).eval()
    x = torch.randn(2, 3, 64, 64)
    trunk, tail = timm_compat.split_model(model, 'blocks.2', input_size=(3, 64, 64))
    with torch.no_grad():
        assert torch.equal(tail(trunk(x)), model(x))


def test_split_module_returning_a_list_refused():
    with pytest.raises(ValueError, match="'features.1'.*returns a list, not one tensor"):
        timm_compat.split_model('selecsls42b', 'features.1', input_size=(3, 64, 64))


def test_split_points_name_existing_modules_only():
    model = timm.create_model('twins_svt_small')
    modules = dict(model.named_modules())
    points = timm_compat.split_points(model)
    assert points and all(p in modules for p in points)
    with pytest.raises(ValueError, match="names module 'block.0', which this model does not have"):
        timm_compat.split_model(model, 0)


class _ChannelsLastMixer(nn.Module):
    """A conv stem, then a Linear over channels in NHWC (as SAM-ViT blocks), with no layout metadata."""

    def __init__(self):
        super().__init__()
        self.stem, self.mix, self.fc = nn.Conv2d(3, 16, 4, stride=4), nn.Linear(16, 16), nn.Linear(16, 3)

    def forward(self, x):
        x = self.mix(self.stem(x).permute(0, 2, 3, 1))
        return self.fc(x.mean((1, 2)))


def test_channels_last_read_from_which_dimensions_scale_with_the_image():
    model = _ChannelsLastMixer().eval()
    x = torch.randn(2, 3, 32, 32)
    trunk, tail = timm_compat.split_model(model, 'mix', input_size=(3, 32, 32))
    with torch.no_grad():
        features = trunk(x)
        assert torch.equal(features, model.mix(model.stem(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2))
        assert torch.equal(tail(features), model(x))


@pytest.mark.parametrize('name, at', [('resnet8_cifar', 'bn1'), ('vgg11', 'features.0')])
def test_a_tail_that_starts_in_place_leaves_the_trunks_features_alone(name, at):
    """A ReLU(inplace=True) right after the split rewrote the extractor's features when the head ran, so RP and DCC,
    scored after the head, saw post-ReLU features (check_split compared outputs only)."""
    trunk, tail = timm_compat.split_model(name, at, input_size=(3, 32, 32))
    trunk.eval(), tail.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features = trunk(x)
        before = features.clone()
        tail(features)
    assert torch.equal(features, before)


class _InPlaceDropoutAfterSplit(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.drop, self.b = nn.Conv2d(3, 4, 1), nn.Dropout(0.5, inplace=True), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return self.b(self.drop(self.a(x)))


def test_a_tail_that_writes_in_place_only_in_training_leaves_the_features_alone():
    """The in-place check ran in eval mode only, where dropout is the identity: in training the tail zeroed half of
    the extractor's features before RP and DCC scored them."""
    trunk, tail = timm_compat.split_model(_InPlaceDropoutAfterSplit(), 'a', input_size=(3, 8, 8))
    trunk.train(), tail.train()
    with torch.no_grad():
        features = trunk(torch.randn(2, 3, 8, 8))
        before = features.clone()
        tail(features)
    assert torch.equal(features, before)


class _ConstantInForward(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return self.b(self.a(x)) * torch.tensor([1., 2., 3., 4.]).view(1, -1, 1, 1)


def test_a_tensor_made_in_forward_does_not_look_like_a_mode_branch():
    """The train trace left its _tensor_constant0 on the model, so the eval trace named its own _tensor_constant1
    and the split was refused as 'different code in train and eval mode'."""
    model = _ConstantInForward().eval()
    trunk, tail = timm_compat.split_model(model, 'a', input_size=(3, 8, 8))
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(tail.eval()(trunk.eval()(x)), model(x))
    assert not any(k.startswith('_tensor_constant') for k in vars(model))  # the model keeps no trace's leftovers


def test_rp_scores_the_extractors_features_when_the_head_starts_in_place():
    itf = timm_compat.Interface(width=16, rp=True)
    model = timm_compat.make_compatible('resnet8_cifar', split='bn1', interface=itf, num_classes=3)
    model.eval()
    images = torch.randn(2, 3, 32, 32)
    rp = timm_compat.RotationPrediction()
    losses = timm_compat.compatibility_loss(model, images, torch.tensor([0, 2]), [rp])
    from timm_compat.methods import rotate_batch, rotation_loss
    expected = rotation_loss(itf.rp(model.extractor(rotate_batch(images))))
    assert torch.allclose(losses['rp'], expected)


@pytest.mark.parametrize('name, at', [('resnet8_cifar', 'layer2'), ('airbench94_cifar', 'stages.1'),
                                      ('resnet18', 'layer2'), ('convnext_atto', 'stages.1')])
def test_a_model_with_gradient_checkpointing_is_refused_naming_the_switch(name, at):
    # It failed as 'layer2 is not called in forward()' (checkpoint_seq calls the blocks, not the stage), or split
    # with the checkpointing silently lost from both halves.
    model = timm.create_model(name, num_classes=10)
    model.set_grad_checkpointing(True)
    with pytest.raises(ValueError, match=r'gradient checkpointing .*set_grad_checkpointing\(False\)'):
        timm_compat.split_model(model, at)
    model.set_grad_checkpointing(False)
    trunk, tail = timm_compat.split_model(model.eval(), at)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(tail(trunk(x)), model(x))
