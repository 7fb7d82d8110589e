"""The airbench family (timm_compat/models/airbench.py): timm conventions, exact splits, whitening, recombination."""
import copy
import itertools

import pytest
import timm
import torch
import torch.nn.functional as F

import timm_compat
from timm_compat._split import default_split
from timm_compat.components import build_components
from timm_compat.models.airbench import init_whitening, whitening_layers, whitening_weight
from timm_compat.models.cifar_resnet import CIFAR10_MEAN, CIFAR10_STD

MEMBERS = ['airbench94_cifar', 'airbench_desktop_cifar', 'airbench_mobile_cifar']


def _batch(n=2, size=32):
    return torch.randn(n, 3, size, size)


@pytest.mark.parametrize('name', MEMBERS)
def test_registered_with_cifar_cfg_and_feature_info(name):
    model = timm.create_model(name)
    assert name in timm.list_models('*_cifar')
    cfg = model.pretrained_cfg
    assert cfg['input_size'] == (3, 32, 32) and cfg['mean'] == CIFAR10_MEAN and cfg['std'] == CIFAR10_STD
    assert [i['reduction'] for i in model.feature_info] == [1, 2, 4, 8]
    assert [i['module'] for i in model.feature_info] == ['whiten_act', 'stages.0', 'stages.1', 'stages.2']
    assert default_split(model) == 'stages.1'


def test_members_differ_and_server_is_airbench94():
    models = {n: timm.create_model(n) for n in MEMBERS}
    groups = {n: type(m.stages[0]).__name__ for n, m in models.items()}
    assert len(set(groups.values())) == 3, groups
    params = {n: sum(p.numel() for p in m.parameters()) for n, m in models.items()}
    # airbench94's 1.97M parameters (Jordan 2024), less its frozen whitening weight and BN scales (buffers here).
    assert params['airbench94_cifar'] == 1971352
    assert params['airbench94_cifar'] == max(params.values())
    assert [i['num_chs'] for i in models['airbench94_cifar'].feature_info] == [24, 64, 256, 256]
    # airbench's dirac init: a conv that keeps the width starts as the identity (an implicit residual).
    conv2 = models['airbench94_cifar'].stages[0].conv2.weight
    assert torch.equal(conv2, torch.nn.init.dirac_(torch.empty_like(conv2)))


@pytest.mark.parametrize('name', MEMBERS)
def test_head_pools_max_and_scales_logits_by_one_ninth(name):
    model = timm.create_model(name).eval()
    x = _batch()
    with torch.no_grad():
        feats = model.forward_features(x)
        pooled = model.forward_head(feats, pre_logits=True)
        torch.testing.assert_close(pooled, feats.amax((2, 3)))
        torch.testing.assert_close(model(x), model.fc(pooled) / 9)
    assert feats.shape[1:] == (model.num_features, 3, 3) and model.fc.bias is None


@pytest.mark.parametrize('name', MEMBERS)
def test_reset_classifier_and_unpooled_head(name):
    model = timm.create_model(name).eval()
    x = _batch()
    feats = model.forward_features(x)
    model.reset_classifier(0, '')
    assert torch.equal(model(x), feats)
    model.reset_classifier(5, 'avg')
    assert model(x).shape == (2, 5)
    model.reset_classifier(0)  # keeps the pooling
    assert model(x).shape == (2, model.num_features)
    model.reset_classifier(3, '')  # no pooling: logits at every position
    assert model(x).shape == (2, 3, 3, 3)
    assert timm.create_model(name, num_classes=0, global_pool='').eval()(x).shape == feats.shape


@pytest.mark.parametrize('name', MEMBERS)
def test_intermediates_features_only_and_pruning(name):
    x = _batch()
    built = []
    for kwargs in ({}, dict(features_only=True), dict(features_only=True, feature_cls='getter')):
        torch.manual_seed(0)  # the same initial weights in all three
        built.append(timm.create_model(name, **kwargs).eval())
    model, listed, getter = built
    with torch.no_grad():
        final, taps = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x))
        assert [t.shape[1] for t in taps] == [i['num_chs'] for i in model.feature_info]
        assert [t.shape[-1] for t in taps] == [31, 15, 7, 3]
        assert listed.feature_info.out_indices == getter.feature_info.out_indices == (0, 1, 2, 3)
        for a, b, tap in zip(listed(x), getter(x), taps):
            torch.testing.assert_close(a, tap)
            torch.testing.assert_close(b, tap)
        for i, tap in enumerate(taps):
            pruned = copy.deepcopy(model)
            pruned.prune_intermediate_layers([i])
            torch.testing.assert_close(pruned.forward_features(x), tap)
            assert pruned(x).shape == tap.shape  # head removed: the unpooled map


@pytest.mark.parametrize('name', MEMBERS)
def test_torchscript_matches_eager(name):
    model = timm.create_model(name).eval()
    x = _batch()
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.script(model)(x), model(x))


def _run_counting_group_calls(model, x, intermediates):
    calls = []
    # A pre-hook: torch stops a recomputation once it has what backward needs, before forward hooks would run.
    handle = model.stages[0].register_forward_pre_hook(lambda *_: calls.append(1))
    out = model.forward_intermediates(x)[0] if intermediates else model(x)
    out.square().mean().backward()
    handle.remove()
    return out.detach(), {n: p.grad for n, p in model.named_parameters()}, len(calls)


@pytest.mark.parametrize('intermediates', [False, True])
def test_grad_checkpointing_recomputes_and_matches(intermediates):
    model = timm.create_model('airbench_mobile_cifar').train()
    checkpointed = copy.deepcopy(model)
    checkpointed.set_grad_checkpointing()
    x = _batch(4)
    out, grads, calls = _run_counting_group_calls(model, x, intermediates)
    out_ckpt, grads_ckpt, calls_ckpt = _run_counting_group_calls(checkpointed, x, intermediates)
    assert (calls, calls_ckpt) == (1, 2)  # a checkpointed group runs again during backward
    torch.testing.assert_close(out_ckpt, out)
    for n in grads:
        torch.testing.assert_close(grads_ckpt[n], grads[n], msg=lambda m: f'{n}: {m}')


@pytest.mark.parametrize('name', MEMBERS)
@pytest.mark.parametrize('level', [0, 1, 2, 3])
def test_split_at_every_feature_level_is_exact(name, level):
    model = timm.create_model(name).eval()
    x = _batch()
    trunk, tail = timm_compat.split_model(model, level)
    with torch.no_grad():
        features = trunk(x)
        assert torch.equal(features, model.forward_intermediates(x, indices=[level], intermediates_only=True)[0])
        assert torch.equal(tail(features), model(x))


def _correlated_images(n=48, size=16):
    """Smooth random images whose colour channels are strongly correlated: far from white patches."""
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(n, 3, size + 2, size + 2, generator=g)
    smooth = F.avg_pool2d(noise, 3, stride=1)
    mix = torch.tensor([[1.0, 0.8, 0.6], [0.8, 1.0, 0.7], [0.6, 0.7, 1.0]])
    return torch.einsum('dc,nchw->ndhw', mix, smooth) + 0.05 * noise[..., 1:-1, 1:-1]


def _patch_second_moment(images, weight=None):
    """Second moment of the 2x2 patches, or of the outputs of a 2x2 conv of ``weight`` on them."""
    out = F.unfold(images, 2) if weight is None else F.conv2d(images, weight).flatten(2)
    out = out.transpose(1, 2).reshape(-1, out.shape[1]).double()
    return out.T @ out / len(out)


def test_whitened_patches_have_identity_covariance():
    images = _correlated_images()
    before = _patch_second_moment(images)
    assert (before - torch.eye(12, dtype=torch.double)).abs().max() > 0.3  # the test data is far from white
    model = timm.create_model('airbench94_cifar')
    init_whitening(model, images, eps=1e-9)
    weight = model.whiten.weight
    assert weight.shape == (24, 3, 2, 2)
    torch.testing.assert_close(weight[12:], -weight[:12])
    after = _patch_second_moment(images, weight[:12])
    torch.testing.assert_close(after, torch.eye(12, dtype=torch.double), atol=1e-4, rtol=0)
    # With airbench's eps the outputs stay uncorrelated; a direction of variance l keeps l / (l + eps).
    after = _patch_second_moment(images, whitening_weight(images)[:12])
    variances = torch.linalg.eigvalsh(before).flip(0)
    torch.testing.assert_close(after, torch.diag(variances / (variances + 5e-4)), atol=1e-4, rtol=0)


def test_uint8_images_are_normalised_with_the_cfg_statistics():
    pixels = (_correlated_images() * 40 + 128).clamp(0, 255).to(torch.uint8)
    model = timm.create_model('airbench_desktop_cifar')
    init_whitening(model, pixels)
    mean, std = (torch.tensor(s).view(1, 3, 1, 1) for s in (CIFAR10_MEAN, CIFAR10_STD))
    expected = whitening_weight((pixels.float() / 255 - mean) / std)
    torch.testing.assert_close(model.whiten.weight, expected)


@pytest.mark.parametrize('call,match', [
    (lambda: init_whitening(timm.create_model('resnet8_cifar'), _batch()), 'no whitening conv'),
    (lambda: init_whitening(timm.create_model('airbench94_cifar'), torch.rand(2, 32, 32, 3)), r'\(N, 3, H, W\)'),
    (lambda: init_whitening(timm.create_model('airbench94_cifar'), _batch(), eps=0), 'eps must be positive'),
    (lambda: init_whitening(timm.create_model('airbench94_cifar'), _batch().long()), 'uint8'),
    (lambda: init_whitening(torch.nn.ModuleList([timm.create_model('airbench_mobile_cifar'),
                                                 timm.create_model('airbench_mobile_cifar', in_chans=1)]), _batch()),
     'different shapes'),
    # One-channel pixels with the 3-channel CIFAR-10 mean/std broadcast to 3 channels, then crashed the copy.
    (lambda: init_whitening(timm.create_model('airbench_mobile_cifar', in_chans=1),
                            torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)), r'mean/std of 3 channels.*mean='),
])
def test_init_whitening_refuses_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize('name', MEMBERS)
def test_whitening_and_bn_scales_frozen_biases_trained(name):
    model = timm.create_model(name).train()
    params = dict(model.named_parameters())
    bns = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert 'whiten.weight' not in params and 'whiten.bias' in params
    assert not any(f'{n}.weight' in params for n in bns) and all(f'{n}.bias' in params for n in bns)
    assert all(m.eps == 1e-12 and m.momentum == 0.4 for m in bns.values())
    frozen = {k: v.clone() for k, v in model.state_dict().items() if k == 'whiten.weight' or
              k.endswith('.weight') and k.rsplit('.', 1)[0] in bns}
    biases = {k: params[k].detach().clone() for k in ['whiten.bias', *(f'{n}.bias' for n in bns)]}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    F.cross_entropy(model(_batch(4)), torch.tensor([0, 1, 2, 3])).backward()
    optimizer.step()
    for k, v in frozen.items():
        assert torch.equal(model.state_dict()[k], v), k
    assert all(torch.equal(v, torch.ones_like(v)) for k, v in frozen.items() if k != 'whiten.weight')
    assert all(not torch.equal(params[k], v) for k, v in biases.items())


def test_bn_running_statistics_keep_six_tenths():
    model = timm.create_model('airbench94_cifar').train()
    norm = model.stages[0].norm1
    seen = []
    norm.register_forward_hook(lambda m, inputs, out: seen.append(inputs[0].detach()))
    with torch.no_grad():
        model(_batch(4))
    torch.testing.assert_close(norm.running_mean, 0.4 * seen[0].mean((0, 2, 3)))


def test_whitening_weight_survives_a_state_dict_round_trip():
    model = timm.create_model('airbench_mobile_cifar')
    init_whitening(model, _correlated_images(8))
    fresh = timm.create_model('airbench_mobile_cifar')
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(fresh.whiten.weight, model.whiten.weight)


def test_extractors_and_heads_recombine_across_members():
    first = timm_compat.make_compatible(MEMBERS[0])
    nets = [first] + [timm_compat.make_compatible(n, interface=first.interface) for n in MEMBERS[1:]]
    x = _batch(4)
    for a, b in itertools.permutations(nets, 2):
        mixed = timm_compat.recombine(a.extractor, b.head).eval()
        with torch.no_grad():
            assert a.extractor(x).shape == (4, 64, 7, 7)
            assert mixed(x).shape == (4, 10)
    parts = build_components('airbench_desktop_cifar', None, 64)
    mixed = timm_compat.recombine(parts['extractor'], nets[2].head, force=True).eval()
    assert torch.isfinite(mixed(x)).all()
    # init_whitening reaches the whitening conv of every extractor in a module holding several networks.
    images = _correlated_images(8)
    init_whitening(torch.nn.ModuleList(nets), images)
    assert len(whitening_layers(torch.nn.ModuleList(nets))) == 3
    for net in nets:
        torch.testing.assert_close(net.extractor.trunk.whiten.weight, whitening_weight(images))


@pytest.mark.slow
def test_a_few_steps_fit_a_tiny_batch():
    torch.manual_seed(0)
    model = timm.create_model('airbench_mobile_cifar').train()
    images, labels = _correlated_images(16, 32), torch.arange(16) % 10
    init_whitening(model, images)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9, nesterov=True)
    losses = []
    for _ in range(15):
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
