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
