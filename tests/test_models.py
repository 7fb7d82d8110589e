import copy

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


# Logits of the first of two seeded 32x32 images from each seeded, untrained model in eval mode, recorded before
# the models took timm's classifier / checkpointing / pruning API (commit 20d6f2f, torch 2.14.1 CPU): that change
# must not move the default forward. Eval mode uses untrained running statistics, hence resnet56's large values.
_PINNED_LOGITS = {
    'resnet8_cifar': [-0.0300675, -0.271886, -0.0367481, -0.164212, -0.160779, -0.214272, -0.335464, -0.00311051,
                      -0.0170749, 0.221761],
    'resnet56_cifar': [97.7446, 630.421, 1414.64, -193.79, 572.382, 858.106, -92.8597, 960.144, -2240.03, 1337.21],
    'mobilenetv2_100_cifar': [-8.01414, 9.94692, 4.33485, -2.2115, -0.510396, -14.8586, 9.98961, -0.754339,
                              3.83226, -5.66364],
}


@pytest.mark.parametrize('name', sorted(_PINNED_LOGITS))
def test_default_forward_is_pinned(name):
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    torch.manual_seed(1)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits = model(x)
    torch.testing.assert_close(logits[0], torch.tensor(_PINNED_LOGITS[name]), rtol=1e-4, atol=1e-5)


def test_preact_block_adds_its_raw_input_as_identity_shortcut():
    """A pre-activation block (He et al. 2016; WRN; timm's PreActBasic) is x + F(x) with F starting at BN-ReLU: the
    identity shortcut carries x itself, only a projection shortcut sees the normalised input."""
    from timm_compat.models.cifar_resnet import PreActBlock
    torch.manual_seed(0)
    block, x = PreActBlock(8, 8).eval(), torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        for bn in (block.bn1, block.bn2):  # non-trivial statistics, so that BN-ReLU is not close to the identity
            bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2)
        branch = block.conv2(block.act2(block.bn2(block.conv1(block.act1(block.bn1(x.clone()))))))
        torch.testing.assert_close(block(x.clone()), branch + x)


def _small(name, **kwargs):
    """A small instance of each model family: post-activation and pre-activation (WRN) ResNets, MobileNetV2."""
    if name == 'wrn28_10_cifar':
        kwargs = dict(layers=(1, 1, 1), widths=(8, 16, 32), **kwargs)
    return timm.create_model(name, **kwargs)


@pytest.mark.parametrize('name', ['resnet8_cifar', 'wrn28_10_cifar', 'mobilenetv2_100_cifar'])
def test_unpooled_head_keeps_the_nchw_map(name):
    model = _small(name).eval()
    x = torch.randn(2, 3, 32, 32)
    feats = model.forward_features(x)
    model.reset_classifier(0, '')
    assert feats.ndim == 4 and model(x).shape == feats.shape
    model.reset_classifier(5, 'avg')
    assert model(x).shape == (2, 5)
    model.reset_classifier(0)  # keeps the pooling
    assert model(x).shape == (2, model.num_features)
    assert _small(name, num_classes=0, global_pool='').eval()(x).shape == feats.shape


@pytest.mark.parametrize('name', ['resnet8_cifar', 'wrn28_10_cifar'])
def test_torchscript_matches_eager(name):
    model = _small(name).eval()
    x = torch.randn(2, 3, 32, 32)
    scripted = torch.jit.script(model)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x))


def _run_counting_block_calls(model, x, **kwargs):
    """Train-mode forward + backward; returns the output, the gradients and how often the first block ran."""
    calls = []
    block = model.blocks[0][0] if hasattr(model, 'blocks') else model.layer1[0]
    # A pre-hook: torch stops a recomputation once it has what backward needs, before forward hooks would run.
    handle = block.register_forward_pre_hook(lambda *_: calls.append(1))
    out = model.forward_intermediates(x, **kwargs)[0] if kwargs else model(x)
    out.square().mean().backward()
    handle.remove()
    return out.detach(), {n: p.grad for n, p in model.named_parameters()}, len(calls)


@pytest.mark.parametrize('intermediates', [False, True])
@pytest.mark.parametrize('name', ['resnet8_cifar', 'wrn28_10_cifar', 'mobilenetv2_100_cifar'])
def test_grad_checkpointing_recomputes_and_matches(name, intermediates):
    model = _small(name) if 'mobilenet' in name else _small(name, block_drop_rate=0.2)
    model.train()
    checkpointed = copy.deepcopy(model)
    checkpointed.set_grad_checkpointing()
    x = torch.randn(4, 3, 32, 32)
    kwargs = dict(indices=[1, 2]) if intermediates else {}
    torch.manual_seed(1)  # the same dropout masks in both runs; checkpointing replays them
    out, grads, calls = _run_counting_block_calls(model, x, **kwargs)
    torch.manual_seed(1)
    out_ckpt, grads_ckpt, calls_ckpt = _run_counting_block_calls(checkpointed, x, **kwargs)
    # A checkpointed block runs again during backward to rebuild its activations.
    assert (calls, calls_ckpt) == (1, 2)
    torch.testing.assert_close(out_ckpt, out)
    assert grads.keys() == grads_ckpt.keys()
    for n in grads:
        torch.testing.assert_close(grads_ckpt[n], grads[n], msg=lambda m: f'{n}: {m}')


@pytest.mark.parametrize('name', ['resnet8_cifar', 'wrn28_10_cifar', 'mobilenetv2_100_cifar'])
def test_features_only_default_levels_and_getter(name):
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(0)
    listed = _small(name, features_only=True).eval()
    torch.manual_seed(0)
    getter = _small(name, features_only=True, feature_cls='getter').eval()
    assert listed.feature_info.out_indices == getter.feature_info.out_indices == (0, 1, 2, 3)
    with torch.no_grad():
        maps, got = listed(x), getter(x)
    assert [m.shape[-1] for m in maps] == [32 // r for r in listed.feature_info.reduction()]
    assert [m.shape[1] for m in maps] == listed.feature_info.channels()
    for a, b in zip(maps, got):
        torch.testing.assert_close(b, a)


def test_forward_intermediates_updates_the_final_norm_once():
    """With the last level asked for, a pre-activation model ran its final BN twice, counting two batches."""
    from timm_compat.models.cifar_resnet import CifarResNet
    torch.manual_seed(0)
    model = CifarResNet(layers=(1, 1, 1), widths=(8, 8, 8), preact=True, stem_width=8).train()
    x = torch.randn(4, 3, 8, 8)
    reference = copy.deepcopy(model)
    final, intermediates = model.forward_intermediates(x)
    assert model.norm.num_batches_tracked.item() == 1
    assert torch.equal(final, reference.forward_features(x)) and torch.equal(intermediates[-1], final)
    assert torch.equal(model.norm.running_mean, reference.norm.running_mean)


@pytest.mark.parametrize('output_stride, reductions', [(None, [1, 2, 4, 8]), (8, [1, 2, 4, 8]), (4, [1, 2, 4, 4])])
def test_mobilenetv2_cifar_output_stride_counts_its_stride_1_stem(output_stride, reductions):
    # timm places the dilation while it still counts the ImageNet stem's stride of 2: output_stride=8 dilated the
    # last stage (total stride 4, four times its cost) and output_stride=4 gave stride 2.
    kwargs = {} if output_stride is None else dict(output_stride=output_stride)
    model = timm.create_model('mobilenetv2_100_cifar', features_only=True, **kwargs).eval()
    with torch.no_grad():
        maps = model(torch.randn(1, 3, 32, 32))
    assert [32 // m.shape[-1] for m in maps] == model.feature_info.reduction() == reductions
