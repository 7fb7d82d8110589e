"""Incremental training (Sec. 3.4, stage 2): what a run against a loaded, frozen interface trains, and which of its
interface keys it honours or refuses."""
import pytest
import torch

import timm_compat as tc
from timm_compat import build
from timm_compat.classes import common_classes
from timm_compat.config import load_config
from timm_compat.synthetic import SYNTHETIC_CLASSES

from tests.conftest import REPO

TINY = str(REPO / 'tests' / 'tiny.yaml')
COMMON = common_classes([SYNTHETIC_CLASSES['A'], SYNTHETIC_CLASSES['B']])


@pytest.fixture
def frozen(tmp_path):
    path = tmp_path / 'interface'
    tc.Interface(width=16, rp=True, dcc_classes=COMMON).save_pretrained(path)
    return path


def methods(frozen, *overrides):
    cfg = load_config(TINY, [f'interface.load={frozen}', 'interface.width=null', *overrides])
    data = {n.name: build.load_task_data(n, cfg) for n in cfg.networks}
    return [type(m).__name__ for m in build.build_phase('main', cfg, data, torch.device('cpu')).joint.methods]


def test_both_methods_train_against_the_loaded_heads_by_default(frozen):
    assert methods(frozen) == ['RotationPrediction', 'CommonClassDiscrimination']


@pytest.mark.parametrize('off, left', [('rp', ['CommonClassDiscrimination']), ('dcc', ['RotationPrediction'])])
def test_a_method_switched_off_is_not_trained_against_the_loaded_interface(frozen, off, left):
    assert methods(frozen, f'interface.{off}=false') == left


@pytest.mark.parametrize('key, value', [
    ('dcc_classes', '[cat, dog]'),
    ('aux_head', '{type: conv, hidden: 8}'),
    ('rp_head', '{type: conv, logit_scale: 0.5}'),
    ('dcc_head', '{type: conv, hidden: 4}'),
])
def test_a_key_the_loaded_interface_does_not_match_is_refused(frozen, key, value):
    with pytest.raises(ValueError, match=rf'interface\.{key}=.*loaded interface.*drop interface\.{key}'):
        methods(frozen, f'interface.{key}={value}')


def test_keys_that_match_the_loaded_interface_are_accepted(frozen):
    names = '[' + ', '.join(c.upper() for c in COMMON) + ']'  # class names match up to synonyms and case
    assert methods(frozen, f'interface.dcc_classes={names}', 'interface.aux_head=conv') == [
        'RotationPrediction', 'CommonClassDiscrimination']


def test_a_method_the_loaded_interface_lacks_is_refused_when_asked_for(tmp_path):
    tc.Interface(width=16, dcc_classes=COMMON).save_pretrained(tmp_path / 'dcc_only')
    with pytest.raises(ValueError, match=r'interface\.rp_head=.*has no RP head'):
        methods(tmp_path / 'dcc_only', 'interface.rp_head={type: conv, hidden: 8}')
    assert methods(tmp_path / 'dcc_only') == ['CommonClassDiscrimination']


def test_a_run_without_an_interface_loads_an_independent_network_and_refuses_a_compatible_one(tmp_path, frozen):
    """Re-evaluating independently trained networks: the run shares no interface, so neither does the network."""
    classes = SYNTHETIC_CLASSES['A']
    independent = tc.make_compatible('resnet8_cifar', split='layer2', interface=None, width=16,
                                     num_classes=len(classes), class_names=classes, init_seed=1).eval()
    compatible = tc.make_compatible('resnet8_cifar', split='layer2', interface=tc.Interface.from_pretrained(frozen),
                                    num_classes=len(classes), class_names=classes, init_seed=1).eval()
    for name, model in (('independent', independent), ('compatible', compatible)):
        model.extractor.save_pretrained(tmp_path / name / 'extractor')
        model.head.save_pretrained(tmp_path / name / 'head')
    shares_nothing = ['iiw=false', 'interface.rp=false', 'interface.dcc=false']
    cfg = load_config(TINY, [*shares_nothing, f'networks.0.load={tmp_path / "independent"}'])
    assert build.build_interface(cfg, [classes, SYNTHETIC_CLASSES['B']]) is None
    loaded = build.build_network(cfg.networks[0], 0, cfg, None, classes).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), independent(x))
    with pytest.raises(ValueError, match=r"head's classes \['house'.*dataset's \['tree', 'house'"):
        build.build_network(cfg.networks[0], 0, cfg, None, [classes[1], classes[0], *classes[2:]])
    build.build_network(cfg.networks[0], 0, cfg, None, [c.upper() for c in classes])  # the same classes
    cfg = load_config(TINY, [*shares_nothing, f'networks.0.load={tmp_path / "compatible"}'])
    with pytest.raises(ValueError, match=r"fits interface .*, but this run shares no interface: load the interface"):
        build.build_network(cfg.networks[0], 0, cfg, None, classes)


@pytest.mark.parametrize('dcc_classes,named', [(['cat', 'catt'], "'catt'"), (['dgo'], "'dgo'"),
                                                (['cat', 'horse'], "'horse'")])
def test_dcc_classes_outside_the_common_classes_are_refused(dcc_classes, named):
    """Eq. 2's classes are common to the tasks: a typo or a class of one task would train an output no network
    (or only one) has examples of."""
    a, b = ['cat', 'dog', 'frog', 'horse'], ['cat', 'dog', 'ship']
    cfg = load_config(TINY, [f'interface.dcc_classes={dcc_classes}'])
    with pytest.raises(ValueError, match=rf"interface.dcc_classes {named}.* not common to the tasks.*\['cat', 'dog'\]"):
        build.build_interface(cfg, [a, b])
    cfg = load_config(TINY, ["interface.dcc_classes=['Dog']"])
    assert build.build_interface(cfg, [a, b]).dcc_classes == ['Dog']
