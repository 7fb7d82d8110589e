"""The deployable model: BN recalibrated on unlabelled target images (AdaBN), its card and its dtypes."""
import copy
import json
from pathlib import Path

import pytest
import timm
import torch

import timm_compat as tc
from timm_compat.batchnorm import eval_mode, recalibrate_bn
from timm_compat.data import ImageData, normalize
from timm_compat.synthetic import make_synthetic
from tests.test_deploy import NAMES, pair  # noqa: F401 (fixture)


# Deployment: AdaBN. One small network trained for a few seconds on synthetic domain A; network "b" is a copy of it
# whose BN layers gathered their statistics on domain B, as a network trained there would: its head fits a's
# features (one interface) but its running statistics describe other features, which is the recombined case.

def _train(model, data, steps=200, seed=0):
    cfg, g = model.extractor.pretrained_cfg, torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    model.train()
    for _ in range(steps):
        index = torch.randint(0, len(data), (64,), generator=g)
        loss = torch.nn.functional.cross_entropy(model(normalize(data.images[index], cfg['mean'], cfg['std'])),
                                                data.labels[index])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def _domain(domain, split, per_class):
    images, labels, names = make_synthetic(domain, split, size=32, num_per_class=per_class)
    return ImageData(images, labels, names, domain)


@pytest.fixture(scope='module')
def recombined():
    torch.manual_seed(0)
    train_a = _domain('A', 'train', 100)
    a = _train(tc.make_compatible('resnet8_cifar', split='layer2', interface=tc.Interface(width=32), num_classes=10,
                                  class_names=train_a.class_names, init_seed=0), train_a)
    b = copy.deepcopy(a, {id(a.interface): a.interface})
    cfg = b.extractor.pretrained_cfg
    recalibrate_bn(b, [normalize(x, cfg['mean'], cfg['std']) for x in _domain('B', 'train', 20).images.split(100)])
    return tc.recombine(a.extractor, b.head)


@pytest.fixture(scope='module')
def shifted():
    """Domain A test images, dimmed to 40 % contrast around a grey: a photometric shift, labels kept."""
    test = _domain('A', 'test', 30)
    return ImageData((test.images.float() * 0.4 + 100).round().to(torch.uint8), test.labels, test.class_names)


@pytest.mark.slow  # trains a ResNet-8 for its fixture: about 27 s on a 2-core Zen 1
def test_adabn_recovers_the_accuracy_that_stale_running_statistics_lose(recombined, shifted):
    report = tc.bn_accuracy_report(recombined, shifted, unlabeled=shifted.images)
    assert list(report) == ['batch', 'running', 'adabn']
    assert report['running'] < 0.5 and report['adabn'] > 0.9 and report['batch'] > 0.9, report
    assert report['adabn'] >= report['running'] + 0.4, report
    # Recalibrated on other unlabelled images of the target (another draw, shifted alike), not the test images.
    images, _, _ = make_synthetic('A', 'test', size=32, num_per_class=20, seed=1)
    unlabeled = (images.float() * 0.4 + 100).round().to(torch.uint8)
    assert tc.accuracy(tc.deploy(recombined, unlabeled), shifted, bn='running') > 0.9


def test_deployed_model_classifies_single_images_as_in_a_batch(recombined, shifted):
    deployed = tc.deploy(recombined, shifted.images[:200], batch_size=50)
    assert not deployed.training and deployed.bn_calibration == {'method': 'adabn', 'images': 200}
    cfg = deployed.extractor.pretrained_cfg
    x = normalize(shifted.images[:8], cfg['mean'], cfg['std'])
    with torch.no_grad():
        batch = deployed(x)
        single = torch.cat([deployed(x[i:i + 1]) for i in range(8)])
        torch.testing.assert_close(single, batch, rtol=1e-5, atol=1e-5)
        assert torch.equal(single.argmax(1), batch.argmax(1))
        # The paper's batch-statistics mode has no such thing: one image alone has degenerate statistics.
        with eval_mode(recombined, 'batch'):
            assert not torch.allclose(recombined(x[:1]), recombined(x)[:1], atol=1e-2)


def test_a_half_precision_model_is_deployed_and_evaluated_from_uint8_images(recombined, shifted):
    """uint8 images were normalised to float32 and fed to the bf16 weights (bf16 pairs save and load as bf16)."""
    half = copy.deepcopy(recombined).to(torch.bfloat16)
    unlabeled = shifted.images[:200]
    deployed = {torch.float32: tc.deploy(recombined, unlabeled), torch.bfloat16: tc.deploy(half, unlabeled)}
    cfg = recombined.extractor.pretrained_cfg
    x = normalize(shifted.images, cfg['mean'], cfg['std'])
    with torch.no_grad():
        full, low = (deployed[dtype](x.to(dtype)).argmax(1) for dtype in deployed)
    assert (full == low).float().mean() > 0.9
    expected = tc.bn_accuracy_report(recombined, shifted, unlabeled=unlabeled)
    report = tc.bn_accuracy_report(half, shifted, unlabeled=unlabeled)  # accuracy() for 'batch' and 'running'
    assert all(abs(report[bn] - expected[bn]) < 0.05 for bn in expected), (report, expected)


def test_deploy_leaves_the_original_untouched_and_shares_its_interface(recombined, shifted, tmp_path):
    before = {k: v.clone() for k, v in recombined.state_dict().items()}
    recombined.train()
    deployed = tc.deploy(recombined, iter([shifted.images[:64], shifted.images[64:128]]))
    assert recombined.training and all(torch.equal(before[k], v) for k, v in recombined.state_dict().items())
    assert deployed.interface is recombined.interface and deployed.extractor is not recombined.extractor
    assert deployed.bn_calibration['images'] == 128
    recombined.eval()
    # Saved, the card says it was recalibrated, and the loaded model keeps the record.
    deployed.save_pretrained(tmp_path)
    assert 'recalibrated on 128 unlabelled target images' in (tmp_path / 'README.md').read_text()
    assert tc.load_recombined(tmp_path).bn_calibration == {'method': 'adabn', 'images': 128}


def test_deploy_shares_the_interfaces_of_a_stitched_or_force_joined_models_parts(pair):
    """Only model.interface was shared: the parts of a StitchedModel (or of a force-joined pair, whose own
    interface is None) got private copies of their interfaces."""
    from timm_compat.stitching import Stitch, StitchedModel
    other = tc.make_compatible('resnet8_cifar', split='layer2', interface=tc.Interface(width=24), num_classes=4,
                               class_names=NAMES)
    stitched = StitchedModel(pair.extractor, Stitch(24, 24, False, pair.extractor.interface_id,
                                                    other.head.interface_id), other.head)
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    for model in (stitched, tc.recombine(pair.extractor, other.head, force=True)):
        deployed = tc.deploy(model, images)
        assert deployed.extractor.interface is pair.extractor.interface
        assert deployed.head.interface is other.head.interface and deployed.head is not other.head


def test_deploy_refuses_bn_without_running_statistics_and_empty_data(recombined):
    model = copy.deepcopy(recombined)
    model.head.tail.get_submodule('layer3.0').bn1 = torch.nn.BatchNorm2d(64, track_running_stats=False)
    with pytest.raises(ValueError, match='without running statistics'):
        tc.deploy(model, torch.zeros(4, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match='no batches'):
        tc.deploy(recombined, [])


def test_deploy_of_a_model_without_bn_refuses_empty_data_and_records_that_it_has_no_bn(pair, tmp_path):
    """A model without BN took no images silently and recorded an AdaBN calibration on 0 images."""
    model = copy.deepcopy(pair)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, torch.nn.BatchNorm2d):
                setattr(module, name, torch.nn.Identity())
    with pytest.raises(ValueError, match='no batches'):
        tc.deploy(model, [])
    deployed = tc.deploy(model, torch.zeros(4, 3, 32, 32, dtype=torch.uint8))
    assert deployed.bn_calibration == {'method': 'no_bn', 'images': 0}
    deployed.save_pretrained(tmp_path)
    card = (tmp_path / 'README.md').read_text()
    assert 'has no BatchNorm layer' in card and 'recalibrate' not in card and 'AdaBN' not in card


def test_the_documented_snippet_runs_as_written(recombined, shifted, tmp_path, monkeypatch):
    text = (Path(__file__).resolve().parents[1] / 'docs' / 'deploy.md').read_text()
    snippet = text.split('```python\n')[1].split('```')[0]
    monkeypatch.chdir(tmp_path)
    scope = {'timm': timm, 'timm_compat': tc, 'model': recombined, 'unlabelled_target_images': shifted.images}
    exec(snippet, scope)
    cfg = recombined.extractor.pretrained_cfg
    x = normalize(shifted.images[:16], cfg['mean'], cfg['std'])
    with torch.no_grad():
        assert torch.equal(scope['model'].eval()(x), scope['deployable'](x))
    assert json.loads((tmp_path / 'my-model' / 'config.json').read_text())['bn_calibration']['method'] == 'adabn'


def test_training_summaries_report_running_statistics_next_to_batch_statistics(recombined, shifted):
    from timm_compat.evaluation import evaluate_networks
    deployed = tc.deploy(recombined, shifted)
    models, tests = {'stale': recombined, 'adabn': deployed}, {'stale': shifted, 'adabn': shifted}
    result = evaluate_networks(models, tests, 256, 'batch', title='[main] ')
    assert set(result) == {'own_accuracy', 'recombination_matrix', 'own_accuracy_running',
                           'recombination_matrix_running', 'table'}
    assert result['own_accuracy']['stale'] == tc.accuracy(recombined, shifted, 256, bn='batch')
    assert result['own_accuracy_running'] == {'stale': tc.accuracy(recombined, shifted, 256, bn='running'),
                                              'adabn': tc.accuracy(deployed, shifted, 256, bn='running')}
    assert result['own_accuracy_running']['stale'] < result['own_accuracy_running']['adabn']
    batch_table, running_table = result['table'].split('\n[main] ')
    assert 'BN=batch' in batch_table and 'BN=running' in running_table
    flipped = evaluate_networks(models, tests, 256, 'running')
    assert flipped['own_accuracy'] == result['own_accuracy_running'] and 'own_accuracy_batch' in flipped


def test_deploy_takes_a_loader_of_image_label_pairs_and_refuses_channels_last_images(pair):
    """PyTorch's usual DataLoader of (images, labels) failed with "'list' object has no attribute 'to'", and
    channels-last images (as PIL and numpy give them) with a shape error deep inside the first conv."""
    x = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    pairs = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.zeros(16, dtype=torch.long)),
                                        batch_size=8)
    from_pairs, from_images = tc.deploy(pair, pairs), tc.deploy(pair, list(x.split(8)))
    assert from_pairs.bn_calibration == {'method': 'adabn', 'images': 16}
    assert all(torch.equal(a, b) for a, b in zip(from_pairs.state_dict().values(), from_images.state_dict().values()))
    for images in (x.permute(0, 2, 3, 1), [x.permute(0, 2, 3, 1)], x[0], [(x.float()[:, :1], None)]):
        with pytest.raises(ValueError, match=r'\(N, 3, H, W\).*got \(.*permute\(0, 3, 1, 2\)'):
            tc.deploy(pair, images)


def test_deployment_reuses_batchnorms_modes_and_evaluations_input_preparation():
    """BN_MODES, the model's device and the uint8 -> input conversion were written out again in deployment, where
    they could drift from the ones evaluation and batchnorm use."""
    from timm_compat import batchnorm, deployment, evaluation
    assert deployment.BN_MODES is batchnorm.BN_MODES
    assert deployment._device is evaluation._device and deployment._inputs is evaluation._inputs
