import pytest
import torch

import timm_compat as tc
from timm_compat.batchnorm import batch_statistics

CLASSES = ['airplane', 'bird', 'cat']


def test_keyword_form_and_heads():
    itf = tc.Interface(width=64, rp=True, dcc_classes=CLASSES)
    feats = torch.randn(4, 64, 8, 8)
    assert itf.rp(feats).shape == (4, 4)
    assert itf.dcc(feats).shape == (4, 3)
    assert tc.Interface(width=64).rp is None and tc.Interface(width=64).dcc is None


def test_mobilenetv2_tail_dcc_head():
    itf = tc.Interface(width=64, dcc_classes=CLASSES,
                       dcc_head={'type': 'timm', 'backbone': 'mobilenetv2_100', 'split': 'blocks.4.0'})
    assert isinstance(itf.dcc, tc.Head)
    assert itf.dcc(torch.randn(2, 64, 8, 8)).shape == (2, 3)
    assert itf.spec['dcc_head']['backbone'] == 'mobilenetv2_100'


def test_id_stable_across_save_load_and_changes_with_weights(tmp_path):
    itf = tc.Interface(width=32, rp=True, dcc_classes=CLASSES)
    iid = itf.id
    assert len(iid) == 12 and itf.id == iid
    itf.save_pretrained(tmp_path / 'itf')
    loaded = tc.Interface.from_pretrained(tmp_path / 'itf')
    assert loaded.id == iid
    assert loaded.spec == itf.spec
    with torch.no_grad():
        itf.rp[-1].bias.add_(1e-3)
    assert itf.id != iid


def test_id_depends_on_spec():
    a = tc.Interface(width=32, dcc_classes=['cat', 'dog'])
    b = tc.Interface(width=32, dcc_classes=['dog', 'cat'])
    b.load_state_dict(a.state_dict())  # the same nonce and weights: only the spec differs
    assert a.id != b.id


@pytest.mark.parametrize('heads', [{}, {'rp': True}], ids=['no aux heads', 'rp'])
def test_two_interfaces_never_share_an_id(heads):
    """Not even when created alike from one seed: independent networks must not claim one interface."""
    ids = set()
    for _ in range(3):
        torch.manual_seed(0)
        ids.add(tc.Interface(width=32, **heads).id)
    assert len(ids) == 3


def test_id_is_restored_with_the_weights(tmp_path):
    itf = tc.Interface(width=32)
    itf.save_pretrained(tmp_path / 'itf')
    assert tc.Interface.from_pretrained(tmp_path / 'itf').id == itf.id
    resumed = tc.Interface(width=32)
    resumed.load_state_dict(itf.state_dict())  # as a checkpoint resume restores it
    assert resumed.id == itf.id


def test_freeze_keeps_interface_bit_identical():
    itf = tc.Interface(width=16, rp=True).freeze()
    iid = itf.id
    itf.train()
    out = itf.rp(torch.randn(8, 16, 4, 4) * 3 + 1)
    assert not out.requires_grad
    assert all(not p.requires_grad for p in itf.parameters())
    assert itf.id == iid
    # Frozen heads keep normalising with batch statistics, as in the joint training that produced them.
    x = torch.randn(8, 16, 4, 4) * 5 + 2
    with batch_statistics(itf):
        reference = itf.rp(x)
    assert torch.equal(itf.rp(x), reference)


def test_dcc_needs_classes():
    with pytest.raises(ValueError, match='DCC head needs common classes'):
        tc.Interface(width=64, dcc_classes=[])


def test_unknown_aux_head_spec():
    with pytest.raises(ValueError, match='Unknown aux head spec'):
        tc.Interface(width=64, rp=True, aux_head={'type': 'mlp'})


def test_aux_head_spec_is_checked_before_it_is_saved():
    with pytest.raises(ValueError, match=r"unknown keys \['pretrained'\]"):
        tc.Interface(width=16, rp=True, rp_head={'type': 'timm', 'backbone': 'resnet8_cifar', 'split': 'layer2',
                                                 'pretrained': True})
    with pytest.raises(ValueError, match='"hidden" must be a positive integer'):
        tc.Interface(width=16, rp=True, aux_head={'type': 'conv', 'hidden': '/tmp/x'})


def test_conv_aux_head_logit_scale(tmp_path):
    # The fast recipe's aux heads scale their logits as airbench's classifier does (unscaled, the DCC head
    # diverged at its learning rate). Catches the scale dropped on save/load, applied twice, or folded into the
    # spec of unscaled heads (which would change every existing interface's id).
    scaled = tc.Interface(width=16, rp=True, dcc_classes=CLASSES, aux_head={'type': 'conv', 'logit_scale': 1 / 9})
    plain = tc.Interface(width=16, rp=True, dcc_classes=CLASSES)
    plain.load_state_dict(scaled.state_dict())  # same parameters: the scale has none
    feats = torch.randn(4, 16, 8, 8)
    plain.eval(), scaled.eval()
    assert torch.allclose(scaled.dcc(feats), plain.dcc(feats) / 9, atol=1e-6)
    assert torch.allclose(scaled.rp(feats), plain.rp(feats) / 9, atol=1e-6)
    scaled.save_pretrained(tmp_path / 'itf')
    loaded = tc.Interface.from_pretrained(tmp_path / 'itf').eval()
    assert loaded.id == scaled.id and torch.allclose(loaded.dcc(feats), scaled.dcc(feats))
    assert plain.spec == tc.Interface(width=16, rp=True, dcc_classes=CLASSES,
                                      aux_head={'type': 'conv', 'hidden': None, 'logit_scale': None}).spec
    assert 'logit_scale' not in str(plain.spec) and scaled.id != plain.id
    with pytest.raises(ValueError, match='"logit_scale" must be a positive number'):
        tc.Interface(width=16, rp=True, aux_head={'type': 'conv', 'logit_scale': 0})
