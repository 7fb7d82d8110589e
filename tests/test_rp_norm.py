"""How BatchNorm treats the rotated copies of rotation prediction (issue 12, item 3)."""
import copy

import pytest
import torch
import torch.nn.functional as F
from timm.layers import BatchNormAct2d, LayerNorm2d
from torch import nn

import timm_compat as tc
from timm_compat.batchnorm import set_batch_statistics
from timm_compat.methods import chunked_batch_norm, methods_for, rotation_loss
from timm_compat._hardware import COMPILE_TESTED_TORCH
from timm_compat.config import InterfaceConfig

CHANNELS_LAST = torch.channels_last


def _model(memory_format=torch.contiguous_format):
    interface = tc.Interface(width=16, rp=True, dcc_classes=['cat', 'dog'])
    model = tc.make_compatible('resnet8_cifar', split='layer1', interface=interface, num_classes=3,
                               class_names=['cat', 'dog', 'emu'], init_seed=0)
    return model.to(memory_format=memory_format).train()


def _bn_state(module):
    return {k: v.clone() for k, v in module.state_dict().items() if 'running' in k or 'num_batches' in k}


def _assert_same_state(a, b):
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-6), k


@pytest.mark.parametrize('norm', ['per_rotation', 'separate'])
@pytest.mark.parametrize('memory_format', [torch.contiguous_format, CHANNELS_LAST])
def test_task_loss_and_running_stats_as_an_upright_pass(norm, memory_format):
    model = _model(memory_format)
    upright = copy.deepcopy(model)
    images = torch.randn(4, 3, 16, 16).contiguous(memory_format=memory_format)
    labels = torch.tensor([0, 1, 2, 0])
    methods = [tc.RotationPrediction(norm=norm), tc.CommonClassDiscrimination()]
    losses = tc.compatibility_loss(model, images, labels, methods)
    features = upright.extractor(images)
    assert torch.allclose(losses['task'], F.cross_entropy(upright.head(features), labels), atol=1e-6)
    dcc = tc.compatibility_loss(upright, images, labels, methods[1:])['dcc']  # DCC sees the upright features too
    assert torch.allclose(losses['dcc'], dcc, atol=1e-6)
    # The upright batch was run twice on ``upright``: compare with one pass of a fresh copy for the running stats.
    once = _model(memory_format)
    once.extractor(images)
    _assert_same_state(_bn_state(model.extractor), _bn_state(once.extractor))


def test_shared_mixes_rotations_into_task_statistics():
    model = _model()
    upright = copy.deepcopy(model)
    images, labels = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 0])
    losses = tc.compatibility_loss(model, images, labels, [tc.RotationPrediction(norm='shared')])
    assert not torch.allclose(losses['task'], F.cross_entropy(upright(images), labels), atol=1e-4)
    shared, once = _bn_state(model.extractor), _bn_state(upright.extractor)
    first = next(k for k in shared if k.endswith('running_mean'))  # the stem BN: rotations change its inputs' stats
    assert not torch.allclose(shared[first], once[first], atol=1e-4)


def test_per_rotation_rp_loss_as_four_separate_passes():
    model = _model()
    separate = copy.deepcopy(model)
    images = torch.randn(3, 3, 16, 16)
    rp = tc.compatibility_loss(model, images, torch.tensor([0, 1, 2]), [tc.RotationPrediction(norm='per_rotation')])
    features = torch.cat([separate.extractor(torch.rot90(images, k, (2, 3))) for k in range(4)])
    assert torch.allclose(rp['rp'], rotation_loss(separate.interface.rp(features)), atol=1e-6)


def test_separate_mode_runs_the_extractor_on_4n_and_n():
    model = _model()
    calls = []
    model.extractor.register_forward_hook(lambda m, i, o: calls.append(o.shape[0]))
    tc.compatibility_loss(model, torch.randn(2, 3, 16, 16), torch.tensor([0, 1]), [tc.RotationPrediction(norm='separate')])
    assert calls == [8, 2]


def _bn_stack():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), BatchNormAct2d(4))


@pytest.mark.parametrize('running_chunk', [0, 2, None])
def test_chunked_batch_norm_is_separate_passes(running_chunk):
    net = _bn_stack().train()
    reference = copy.deepcopy(net)
    x = torch.randn(8, 3, 8, 8)
    with chunked_batch_norm(net, 4, running_chunk=running_chunk):
        out = net(x)
    expected = []
    for i, part in enumerate(x.chunk(4)):
        expected.append(reference(part) if i == running_chunk else copy.deepcopy(reference)(part))
    assert torch.allclose(out, torch.cat(expected), atol=1e-6)
    if running_chunk is None:
        reference = _bn_stack()  # nothing may have moved the running statistics
    _assert_same_state(_bn_state(net), _bn_state(reference))
    assert all('forward' not in m.__dict__ for m in net.modules())  # the class's forward is back


def test_chunked_batch_norm_under_batch_statistics_and_running_statistics():
    net = _bn_stack()
    x = torch.randn(8, 3, 8, 8)
    set_batch_statistics(net)  # what a frozen interface and eval_bn='batch' use: batch stats, no updates
    before = _bn_state(net)
    with chunked_batch_norm(net, 2):
        out = net(x)
    assert torch.allclose(out, torch.cat([net(p) for p in x.chunk(2)]), atol=1e-6)
    _assert_same_state(_bn_state(net), before)
    net = _bn_stack().eval()  # running statistics: rows do not interact, nothing to chunk
    with chunked_batch_norm(net, 2):
        assert torch.equal(net(x), net.eval()(x))
    with pytest.raises(ValueError, match='equal chunks'), chunked_batch_norm(net.train(), 3):
        net(x)


def test_group_and_layer_norm_are_left_alone():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.Conv2d(4, 4, 3), LayerNorm2d(4)).train()
    x = torch.randn(8, 3, 8, 8)
    with chunked_batch_norm(net, 4):
        assert torch.equal(net(x), nn.Sequential(*net)(x))


def test_methods_for_passes_rp_norm():
    interface = tc.Interface(width=16, rp=True)
    # One default everywhere, the config's: the API's used to be 'shared', which mixes the rotations' BN statistics.
    assert methods_for(interface)[0].norm == tc.RotationPrediction().norm == InterfaceConfig.model_fields['rp_norm'].default
    assert InterfaceConfig.model_fields['rp_norm'].default == 'separate'
    assert methods_for(interface, 0.5, 1.0, rp_norm='per_rotation')[0].norm == 'per_rotation'
    with pytest.raises(ValueError, match='rp_norm'):
        methods_for(interface, rp_norm='rotation')


def test_two_expanding_methods_are_refused():
    model = _model()
    with pytest.raises(ValueError, match='At most one method'):
        tc.compatibility_loss(model, torch.randn(2, 3, 16, 16), torch.tensor([0, 1]),
                              [tc.RotationPrediction(), tc.RotationPrediction()])


@pytest.mark.xfail(torch.torch_version.TorchVersion(torch.__version__) < COMPILE_TESTED_TORCH, strict=True,
                   reason='torch 2.4.1 recompiles the chunked pass at every step (compile_backend warns)')
def test_a_compiled_extractor_compiles_the_chunked_pass_once_not_every_step():
    """The context puts a new ``forward`` on each BN layer at every step; torch.compile (as ``compile: true`` does,
    on each extractor) must not recompile for each of them: two graphs in all, the chunked pass and the plain one.
    The eager backend has the same guards as inductor, without its code generation."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    extractor = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), BatchNormAct2d(8))
    extractor.compile(backend='eager')
    images = torch.randn(4, 3, 8, 8)
    for _ in range(5):
        with chunked_batch_norm(extractor, 4, running_chunk=0):
            extractor(images).sum().backward()
        extractor(images[:1]).sum().backward()
    assert counters['stats']['unique_graphs'] == 2 and counters['frames']['ok'] == 2
    torch._dynamo.reset()


def test_the_step_benchmark_times_the_step_train_py_takes(import_script):
    bench = import_script('benchmarks', 'train_step')
    default = bench.build_compat('resnet56_cifar', 16)
    assert {m.norm for m in default.methods if isinstance(m, tc.RotationPrediction)} == \
        {InterfaceConfig.model_fields['rp_norm'].default}
    assert bench.task_passes(default) == 1  # 'separate' adds an upright pass the FLOP ideal must count
    assert bench.task_passes(bench.build_compat('resnet56_cifar', 16, rp_norm='shared')) == 0
    assert bench.parse_args(['--rp-norm', 'shared']).rp_norm == 'shared'
