"""Starting from pre-trained extractors (``networks.N.init``) and RP pre-training without labels (``task_weight: 0``):
the stand-in for the paper's ILSVRC-12 rotation pre-training (Fig. 2 right)."""
import json

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState, PartialState

import timm_compat as tc
import train
from timm_compat.build import build_phases, load_task_data
from timm_compat.config import ConfigError, load_config
from timm_compat.methods import compatibility_loss, methods_for

from tests.conftest import REPO

TINY = str(REPO / 'tests' / 'tiny.yaml')
pytestmark = pytest.mark.usefixtures('fresh_accelerate')


def _phase(overrides):
    cfg = load_config(TINY, overrides)
    return build_phases(cfg, {n.name: load_task_data(n, cfg) for n in cfg.networks}, torch.device('cpu'))[0]


def _saved_extractor(tmp_path, backbone='resnet8_cifar', split='layer2', seed=7):
    torch.manual_seed(seed)
    model = tc.make_compatible(backbone, split=split, interface=tc.Interface(width=16, rp=True), num_classes=10)
    model.extractor.save_pretrained(tmp_path / f'pre{seed}')
    return tmp_path / f'pre{seed}', model.extractor.state_dict()


def test_init_sets_the_extractor_weights_and_keeps_the_runs_interface(tmp_path):
    folder, weights = _saved_extractor(tmp_path)
    plain = _phase([])
    phase = _phase([f'networks.0.init={folder}', f'networks.1.init={folder}'])
    for name in 'ab':
        got = phase.models[name].extractor.state_dict()
        assert all(torch.equal(got[k], v) for k, v in weights.items()), name
        assert phase.models[name].extractor.interface_id == phase.interface.id
    # Only extractors move: the heads are the run's own initial weights.
    for k, v in plain.models['a'].head.state_dict().items():
        assert torch.equal(phase.models['a'].head.state_dict()[k], v), k


def test_init_keeps_the_pretrained_whitening_of_the_airbench_family(tmp_path):
    folder, weights = _saved_extractor(tmp_path, 'airbench_mobile_cifar', 'stages.1')
    arch = ['networks.0.backbone=airbench_mobile_cifar', 'networks.0.split=stages.1',
            'networks.1.backbone=airbench_mobile_cifar', 'networks.1.split=stages.1']
    phase = _phase(arch + [f'networks.0.init={folder}', f'networks.1.init={folder}'])
    fresh = _phase(arch)  # whitened from the data at build time
    key = next(k for k in weights if k.endswith('whiten.weight'))
    assert torch.equal(phase.models['a'].extractor.state_dict()[key], weights[key])
    assert not torch.equal(fresh.models['a'].extractor.state_dict()[key], weights[key])


def test_an_init_of_another_architecture_is_refused_naming_the_difference(tmp_path):
    folder, _ = _saved_extractor(tmp_path, split='layer1')
    with pytest.raises(ValueError, match=r"networks.0.init: .* split 'layer1'.* split 'layer2'"):
        _phase([f'networks.0.init={folder}', f'networks.1.init={folder}'])


@pytest.mark.parametrize('overrides, named', [
    (['networks.0.init=x', 'networks.0.load=y'], 'networks.0.init and networks.0.load'),
    (['networks.1.init=x', 'networks.1.pretrained=true'], 'networks.1.init and networks.1.pretrained'),
    (['networks.0.init=x', 'networks.1.init=z'], 'iiw is true'),
    (['networks.0.init=x'], 'iiw is true'),  # one network from x, the other from scratch: not identical
    (['task_weight=0', 'interface.rp=false', 'interface.dcc=false'], 'task_weight is 0'),
])
def test_init_and_task_weight_conflicts_are_refused_at_config_time(overrides, named):
    with pytest.raises(ConfigError, match=named):
        load_config(TINY, overrides)
    if 'iiw is true' in named:
        load_config(TINY, overrides + ['iiw=false'])  # two pre-trainings: the paper's non-IIW case


@pytest.mark.parametrize('start', [['networks.0.init=x', 'networks.1.init=x'],
                                   ['networks.0.pretrained=true', 'networks.1.pretrained=true']])
def test_networks_from_the_same_weights_are_never_called_independent(start):
    """Two networks of one backbone from one init (or timm's pretrained weights) start identical: that is IIW, so
    neither iiw=false nor the independent baseline may claim different initial weights for them."""
    with pytest.raises(ConfigError, match=r'iiw is false, but networks a and b start from the same weights'):
        load_config(TINY, start + ['iiw=false'])
    with pytest.raises(ConfigError, match=r'independent baseline would start networks a and b from the same '
                                          r'weights.*baseline=null'):
        load_config(TINY, start + ['baseline=independent'])
    load_config(TINY, start)  # IIW from shared weights, without a baseline: what it says
    load_config(TINY, start + ['iiw=false', 'networks.1.backbone=resnet20_cifar'])  # two architectures


def test_task_weight_scales_the_task_loss_and_zero_leaves_the_head_untrained():
    interface = tc.Interface(width=16, rp=True)
    model = tc.make_compatible('resnet8_cifar', split='layer2', interface=interface, num_classes=3).train()
    images, labels = torch.randn(6, 3, 16, 16), torch.tensor([0, 1, 2, 0, 1, 2])
    methods = methods_for(interface)
    torch.manual_seed(0)
    full = compatibility_loss(model, images, labels, methods)
    torch.manual_seed(0)
    half = compatibility_loss(model, images, labels, methods, task_weight=0.5)
    torch.testing.assert_close(half['loss'], 0.5 * full['task'] + full['rp'])
    torch.testing.assert_close(half['rp'], full['rp'])
    # The task loss is logged as it is, whatever its weight: under 0 it still tells how the head does.
    torch.testing.assert_close(half['task'], full['task'])
    torch.manual_seed(0)
    assert compatibility_loss(model, images, labels, methods, task_weight=0.0)['task'] > 0
    model.zero_grad(set_to_none=True)
    compatibility_loss(model, images, labels, methods, task_weight=0.0)['loss'].backward()
    assert all(p.grad is None or not p.grad.any() for p in model.head.parameters())
    assert any(p.grad is not None and p.grad.any() for p in model.extractor.parameters())


def _reset_accelerate():
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


@pytest.mark.slow  # two train.py runs end to end: about 8 s on a 2-core Zen 1
def test_rp_pretraining_then_training_from_it_end_to_end(tmp_path):
    pre = train.main(['-c', TINY, '--output-dir', str(tmp_path / 'pre'), '--set', 'task_weight=0',
                      '--set', 'baseline=null',  # an independent baseline would have no loss left to train
                      '--set', 'interface.dcc=false', '--set', 'networks=[{name: p, backbone: resnet8_cifar, '
                      'split: layer2, dataset: {source: "synthetic:B", synthetic_per_class: 8}}]'])
    logged = (tmp_path / 'pre' / 'main' / 'metrics.csv').read_text().splitlines()
    header, last = logged[0].split(','), logged[-1].split(',')
    # The task loss is logged as it is (the head's chance-level cross-entropy), though its weight is 0.
    assert float(last[header.index('p/task')]) > 1.0 and float(last[header.index('p/rp')]) > 0
    assert float(last[header.index('loss')]) == pytest.approx(float(last[header.index('p/rp')]), rel=1e-4)
    extractor = tmp_path / 'pre' / 'main' / 'components' / 'p' / 'extractor'
    _reset_accelerate()
    train.main(['-c', TINY, '--output-dir', str(tmp_path / 'run'), '--set', f'networks.0.init={extractor}',
                '--set', f'networks.1.init={extractor}'])
    config = json.loads((tmp_path / 'run' / 'summary.json').read_text())['config']
    assert [n['init'] for n in config['networks']] == [str(extractor)] * 2
    assert pre['phases']['main']['interface_id'] != json.loads(
        (tmp_path / 'run' / 'main' / 'summary.json').read_text())['interface_id']
