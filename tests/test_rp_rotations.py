"""RP at lower cost (issue 16, part 3): the upright image plus one random rotation, ``rotations='one'``."""
import copy
import itertools
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import timm_compat as tc
from tests.conftest import REPO
from timm_compat.build import build_phase, load_task_data
from timm_compat.config import ConfigError, load_config
from timm_compat.methods import (
    chunked_batch_norm, draw_rotations, methods_for, one_rotation_labels, one_rotation_loss, rotate_batch,
    rotate_one_batch, rotation_generator, rotation_loss)

TINY = str(REPO / 'tests' / 'tiny.yaml')


def _model():
    interface = tc.Interface(width=16, rp=True, dcc_classes=['cat', 'dog'])
    model = tc.make_compatible('resnet8_cifar', split='layer1', interface=interface, num_classes=3,
                               class_names=['cat', 'dog', 'emu'], init_seed=0)
    return model.train()


def _bn_state(module):
    return {k: v.clone() for k, v in module.state_dict().items() if 'running' in k or 'num_batches' in k}


def _cheap(norm='separate', step=0, seed=0):
    method = tc.RotationPrediction(norm=norm, rotations='one', seed=seed)
    method.set_step(step)
    return method


@pytest.mark.parametrize('memory_format', [torch.contiguous_format, torch.channels_last])
def test_labels_are_the_rotations_applied(memory_format):
    images = torch.randn(6, 3, 5, 5).contiguous(memory_format=memory_format)
    rotations = draw_rotations(6, rotation_generator(0, 3))
    batch, labels = rotate_one_batch(images, rotations), one_rotation_labels(rotations)
    assert batch.shape == (12, 3, 5, 5) and labels.shape == (12,)
    assert batch.is_contiguous(memory_format=memory_format)
    for row, label in zip(batch, labels):
        # Rotating back by the label gives the upright image of that row.
        assert any(torch.equal(torch.rot90(row, -int(label), (-2, -1)), image) for image in images)
    for i in range(6):
        assert labels[i] == 0 and torch.equal(batch[i], images[i])
        assert torch.equal(torch.rot90(batch[6 + i], -int(labels[6 + i]), (-2, -1)), images[i])
    with pytest.raises(ValueError, match='square'):
        rotate_one_batch(torch.zeros(1, 3, 4, 6), rotations[:1])


def test_expected_loss_is_eq1():
    # A fixed per-image classifier (eval mode: rows do not interact); enumerating every draw of 3 images gives the
    # exact expectation of the cheap loss, which must be the four-rotation loss of eq. (1).
    torch.manual_seed(0)
    classifier = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                               nn.Linear(8 * 3 * 3, 4)).double().eval()
    images = torch.randn(3, 3, 5, 5, dtype=torch.float64)
    draws = [torch.tensor(k) for k in itertools.product((1, 2, 3), repeat=3)]
    expected = torch.stack([one_rotation_loss(classifier(rotate_one_batch(images, k)), k) for k in draws]).mean()
    assert torch.allclose(expected, rotation_loss(classifier(rotate_batch(images))), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match='rotate_one_batch'):
        one_rotation_loss(torch.zeros(5, 4), torch.ones(3, dtype=torch.long))


def test_draws_depend_on_seed_and_step_only():
    images = torch.randn(32, 3, 4, 4)
    global_rng = torch.get_rng_state()
    history = _cheap(step=0)
    for step in range(1, 10):  # a long-running method and a fresh one (a resume) draw the same at step 5
        history.set_step(step)
        history.expand(images)
    history.set_step(5)
    assert torch.equal(history.expand(images), _cheap(step=5).expand(images))
    assert torch.equal(torch.get_rng_state(), global_rng)  # augmentation's randomness is left alone
    assert not torch.equal(_cheap(step=5).expand(images), _cheap(step=6).expand(images))
    assert not torch.equal(_cheap(step=5).expand(images), _cheap(step=5, seed=1).expand(images))
    drawn = torch.cat([draw_rotations(32, rotation_generator(0, step)) for step in range(100)])
    assert drawn.unique().tolist() == [1, 2, 3]
    assert (drawn.bincount()[1:].float() / len(drawn) - 1 / 3).abs().max() < 0.05


def test_set_step_is_required_and_values_are_checked():
    with pytest.raises(RuntimeError, match='set_step'):
        tc.RotationPrediction(rotations='one').expand(torch.zeros(2, 3, 4, 4))
    with pytest.raises(ValueError, match='rp_rotations'):
        tc.RotationPrediction(rotations='two')


@pytest.mark.parametrize('norm', ['per_rotation', 'separate'])
def test_upright_and_rotated_halves_are_normalised_apart(norm):
    model = _model()
    reference = copy.deepcopy(model)
    calls = []
    model.extractor.register_forward_hook(lambda m, i, o: calls.append(o.shape[0]))
    images, labels = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 0])
    method = _cheap(norm, step=2)
    losses = tc.compatibility_loss(model, images, labels, [method, tc.CommonClassDiscrimination()])
    assert calls == [8]  # one pass on 2N images: no extra task pass, even for 'separate'
    rotations = draw_rotations(4, rotation_generator(0, 2))
    upright = reference.extractor(images)  # the only pass that may move running statistics
    rotated = copy.deepcopy(reference.extractor)(rotate_one_batch(images, rotations)[4:])
    assert torch.allclose(losses['task'], F.cross_entropy(reference.head(upright), labels), atol=1e-6)
    rp = one_rotation_loss(reference.interface.rp(torch.cat([upright, rotated])), rotations)
    assert torch.allclose(losses['rp'], rp, atol=1e-6)
    for key, value in _bn_state(reference.extractor).items():
        assert torch.allclose(_bn_state(model.extractor)[key].float(), value.float(), atol=1e-6), key


def test_shared_normalises_the_2n_batch_as_one():
    model = _model()
    reference = copy.deepcopy(model)
    images, labels = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 0])
    losses = tc.compatibility_loss(model, images, labels, [_cheap('shared', step=2)])
    rotations = draw_rotations(4, rotation_generator(0, 2))
    features = reference.extractor(rotate_one_batch(images, rotations))
    assert torch.allclose(losses['task'], F.cross_entropy(reference.head(features[:4]), labels), atol=1e-6)
    assert torch.allclose(losses['rp'], one_rotation_loss(reference.interface.rp(features), rotations), atol=1e-6)
    assert not torch.allclose(losses['task'], F.cross_entropy(copy.deepcopy(model)(images), labels), atol=1e-4)


@pytest.mark.parametrize('norm', ['shared', 'per_rotation', 'separate'])
def test_default_all_rotations_is_bit_identical(norm):
    # The four-rotation form written out from the functional form, as the class form computed it before the cheap
    # form existed: expanded pass first, then the task pass if 'separate'.
    model = _model()
    reference = copy.deepcopy(model)
    images, labels = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 0])
    losses = tc.compatibility_loss(model, images, labels, methods_for(model.interface, 0.5, 0, rp_norm=norm))
    contexts = {'shared': lambda e: nullcontext(),
                'per_rotation': lambda e: chunked_batch_norm(e, 4, running_chunk=0),
                'separate': lambda e: chunked_batch_norm(e, 1, running_chunk=None)}
    with contexts[norm](reference.extractor):
        features = reference.extractor(rotate_batch(images))
    task_features = reference.extractor(images) if norm == 'separate' else features[:4]
    assert torch.equal(losses['task'], F.cross_entropy(reference.head(task_features), labels))
    assert torch.equal(losses['rp'], 0.5 * rotation_loss(reference.interface.rp(features)))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))


def test_config_key_reaches_the_method():
    assert load_config(TINY, []).interface.rp_rotations == 'all'
    assert methods_for(tc.Interface(width=16, rp=True))[0].rotations == 'all'
    cfg = load_config(TINY, ['interface.rp_rotations=one', 'seed=3'])
    phase = build_phase('main', cfg, {n.name: load_task_data(n, cfg) for n in cfg.networks}, torch.device('meta'))
    method = phase.joint.methods[0]
    assert (method.rotations, method.seed, method.norm, method.separate_task_pass) == ('one', 3, 'separate', False)
    with pytest.raises(ConfigError, match='rp_rotations'):
        load_config(TINY, ['interface.rp_rotations=two'])
