import pytest
import torch

import timm_compat as tc
from timm_compat.classes import canonical_class_name, common_class_map, common_classes
from timm_compat.methods import (
    NUM_ROTATIONS, IdenticalInitialWeights, common_class_loss, dcc, iiw, init_seed, rotate_batch, rotation_labels,
    rotation_loss, rp)

CIFAR10 = ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck']
STL10 = ['airplane', 'bird', 'car', 'cat', 'deer', 'dog', 'horse', 'monkey', 'ship', 'truck']


def test_rotation_batch_layout():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    r = rotate_batch(x)
    assert r.shape == (8, 3, 4, 4)
    assert torch.equal(r[:2], x)  # the 0-degree copy comes first and is reused for the task loss
    assert torch.equal(r[2:4], torch.rot90(x, 1, (2, 3)))
    assert torch.equal(rotation_labels(2), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]))
    perfect = torch.nn.functional.one_hot(rotation_labels(2), 4).float() * 50
    assert rotation_loss(perfect) < 1e-6
    with pytest.raises(ValueError, match='square'):
        rotate_batch(torch.zeros(1, 3, 4, 6))


def test_rotation_batch_keeps_channels_last():
    x = torch.randn(2, 3, 4, 4)
    r = rotate_batch(x.contiguous(memory_format=torch.channels_last))
    assert r.is_contiguous(memory_format=torch.channels_last) and not r.is_contiguous()
    assert torch.equal(r, rotate_batch(x)) and rotate_batch(x).is_contiguous()


def test_common_classes_by_name_with_synonyms():
    common = common_classes([CIFAR10, STL10])
    assert len(common) == 9 and 'automobile' in common and 'frog' not in common and 'monkey' not in common
    stl_map = common_class_map(STL10, common)
    assert stl_map[STL10.index('car')] == common.index('automobile')
    assert stl_map[STL10.index('monkey')] == -1


def test_common_class_loss_masks():
    logits = torch.randn(4, 3, requires_grad=True)
    targets = torch.tensor([0, -1, 2, -1])
    loss = common_class_loss(logits, targets)
    expected = torch.nn.functional.cross_entropy(logits[[0, 2]], targets[[0, 2]])
    assert torch.allclose(loss, expected)
    none = common_class_loss(logits, torch.full((4,), -1))
    assert none.item() == 0 and none.requires_grad
    # Eq. (2)'s form: the kept examples' sum over the whole batch, half the mean when half the batch is common.
    assert torch.allclose(common_class_loss(logits, targets, 'batch'), expected / 2)
    with pytest.raises(ValueError, match='reduction must be one of'):
        common_class_loss(logits, targets, 'sum')


@pytest.mark.parametrize('config, reduction', [('configs/sec4/dcc.yaml', 'batch'), (None, 'common')])
def test_the_sec4_configs_train_dcc_in_eq2s_form(config, reduction):
    """The reproduction configs reach the method with the paper's reduction; the default keeps the mean."""
    from timm_compat.build import build_phase, load_task_data
    from timm_compat.config import load_config
    from tests.conftest import REPO
    # One step only builds the run: no warm-up (the config's 390 updates would not fit it, and are refused).
    sets = ['steps=1', 'optim.warmup_steps=0', 'networks.0.backbone=resnet8_cifar', 'networks.1.backbone=resnet8_cifar']
    cfg = load_config(config and str(REPO / config), sets + (
        [f'networks.{i}.dataset.{k}' for i in (0, 1) for k in ('source=synthetic:A', 'shift=null', 'classes=null',
                                                                  'train_shard=null', 'train_limit=null')]
        + ['interface.dcc_classes=null', 'mixed_precision=no', 'channels_last=false'] if config else []))
    data = {n.name: load_task_data(n, cfg) for n in cfg.networks}
    methods = build_phase('main', cfg, data, torch.device('cpu')).joint.methods
    assert [m.reduction for m in methods if m.name == 'dcc'] == [reduction]


@pytest.mark.parametrize('norm, passes', [('shared', [16]), ('per_rotation', [16]), ('separate', [16, 4])])
def test_one_extractor_pass_for_task_and_rp_unless_the_task_gets_its_own(norm, passes):
    # 'separate' (the default) gives the task loss an upright pass of its own, normalised as at test time.
    itf = tc.Interface(width=32, rp=True, dcc_classes=common_classes([CIFAR10, STL10]))
    model = tc.make_compatible('resnet20_cifar', split='layer2', interface=itf, num_classes=10, class_names=STL10)
    calls = []
    model.extractor.register_forward_hook(lambda m, i, o: calls.append(o.shape[0]))
    losses = tc.compatibility_loss(model, torch.randn(4, 3, 32, 32), torch.tensor([0, 2, 7, 9]),
                                   [tc.RotationPrediction(0.5, norm=norm), tc.CommonClassDiscrimination()])
    assert calls == passes
    assert set(losses) == {'task', 'rp', 'dcc', 'loss'}
    assert torch.allclose(losses['loss'], losses['task'] + losses['rp'] + losses['dcc'])


def test_dcc_labels_out_of_range():
    itf = tc.Interface(width=32, dcc_classes=['cat', 'dog'])
    model = tc.make_compatible('resnet20_cifar', split='layer2', interface=itf, num_classes=3,
                               class_names=['cat', 'dog', 'emu'])
    with pytest.raises(ValueError, match=r'Labels must lie in \[0, 3\)'):
        tc.compatibility_loss(model, torch.randn(2, 3, 32, 32), torch.tensor([0, 5]), [tc.CommonClassDiscrimination()])


def test_dcc_no_overlap():
    itf = tc.Interface(width=32, dcc_classes=['cat', 'dog'])
    model = tc.make_compatible('resnet20_cifar', split='layer2', interface=itf, num_classes=2,
                               class_names=['emu', 'yak'])
    with pytest.raises(ValueError, match='None of the classes'):
        tc.compatibility_loss(model, torch.randn(2, 3, 32, 32), torch.tensor([0, 1]), [tc.CommonClassDiscrimination()])


def test_rp_without_rp_head():
    model = tc.make_compatible('resnet20_cifar', split='layer2', interface=tc.Interface(width=32), num_classes=2)
    with pytest.raises(ValueError, match='RP head'):
        tc.compatibility_loss(model, torch.randn(2, 3, 32, 32), torch.tensor([0, 1]), [tc.RotationPrediction()])


def test_rotation_loss_on_arbitrary_logits_matches_a_hand_computed_cross_entropy():
    n = 3
    logits = torch.randn(4 * n, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3
    labels = [0] * n + [1] * n + [2] * n + [3] * n  # rotate_batch's layout: all 0-degree copies first
    expected = (logits.logsumexp(1) - logits[torch.arange(4 * n), labels]).mean().item()
    assert rotation_loss(logits).item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize('module, section', [(rp, 'eq. 1'), (dcc, 'eq. 2'), (iiw, 'Sec. 3.3')],
                         ids=['rp', 'dcc', 'iiw'])
def test_every_method_has_a_method_card(module, section):
    card = module.__doc__
    assert 'METHOD CARD' in card and section in card.replace('eq. (', 'eq. ').replace(')', '')
    for part in ('What:', 'Equation', 'Hyperparameters', "Paper's numbers", 'Fig. 2', 'Functional form:',
                 'Class form:'):
        assert part in card, f'{module.__name__} card lacks {part!r}'


@pytest.mark.parametrize('seed', [0, 3, 2 ** 32 - 1])
@pytest.mark.parametrize('identical', [True, False])
def test_iiw_init_seed_is_the_old_builder_expression(seed, identical):
    for index in range(4):
        old = seed if identical else seed + 1000 * (index + 1)  # build_network's expression before issue 14
        assert init_seed(seed, index, identical) == old
        assert IdenticalInitialWeights(seed, identical).init_seed(index) == old
    assert 'identical=' in repr(IdenticalInitialWeights(seed, identical))


def test_num_rotations_is_defined_once():
    assert tc.Interface(width=8, rp=True).aux_heads['rp'](torch.randn(2, 8, 4, 4)).shape == (2, NUM_ROTATIONS)
    assert rotate_batch(torch.zeros(1, 3, 4, 4)).shape[0] == NUM_ROTATIONS


def test_class_vocabulary_is_one_module():
    assert canonical_class_name(' Aero-plane ') == 'aero_plane' and canonical_class_name('Car') == 'automobile'
    assert not hasattr(dcc, 'canonical_class_name') and not hasattr(dcc, 'SYNONYMS')


@pytest.mark.parametrize('dcc_head', ['conv', {'type': 'timm', 'backbone': 'resnet8_cifar', 'split': 'layer2'}],
                         ids=['conv', 'timm'])
def test_dcc_counts_once_for_a_network_whose_classifier_is_the_dcc_head(dcc_head):
    # Sec. 5.2: with head=interface.dcc the task loss already is eq. 2's DCC term; DCC must not add it a second time
    # (with dcc_weight 1 that doubled the shared head's gradient). A timm-built DCC head (the head-transfer configs')
    # is a Head itself, not wrapped in one, and was counted twice.
    torch.manual_seed(0)
    itf = tc.Interface(width=32, dcc_classes=['cat', 'dog', 'ship'], dcc_head=dcc_head)
    itf.dcc.__dict__['interface'] = itf  # as build_network binds the head of a head: dcc network
    model = tc.make_compatible('resnet20_cifar', split='layer2', interface=itf, head=itf.dcc,
                               num_classes=3, class_names=['cat', 'dog', 'ship'])
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 2, 1, 2])
    losses = tc.compatibility_loss(model, images, labels, [tc.CommonClassDiscrimination()])
    assert losses['dcc'].item() == 0
    assert torch.equal(losses['loss'], losses['task'])
    # Another network, with its own classifier, still trains the shared DCC head.
    other = tc.make_compatible('resnet20_cifar', split='layer2', interface=itf, num_classes=3,
                              class_names=['cat', 'dog', 'ship'])
    assert tc.compatibility_loss(other, images, labels, [tc.CommonClassDiscrimination()])['dcc'].item() > 0
