"""The recipes (recipes/*.py), run as a user runs them: CIFAR-10 by Hub id, read from a local copy with --data-dir,
and reports that give every accuracy with BN batch statistics and with running statistics."""
import copy
import json
import os
import shutil
import subprocess
import sys

import datasets
import numpy as np
import pytest
import torch

import timm_compat as tc
from tests.conftest import REPO

CIFAR10_CLASSES = ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck']


def write_cifar10_copy(data_dir, per_split=(80, 40), num_classes=1):
    """``data_dir/cifar10/{train,test}.parquet`` in the schema of ``uoft-cs/cifar10``, random images of classes
    0, 1, ..., ``num_classes - 1`` in turn (by default every image of class 0)."""
    root = data_dir / 'cifar10'
    root.mkdir(parents=True)
    features = datasets.Features({'img': datasets.Image(), 'label': datasets.ClassLabel(names=CIFAR10_CLASSES)})
    rng = np.random.default_rng(0)
    for split, n in zip(('train', 'test'), per_split):
        images = list(rng.integers(0, 255, (n, 32, 32, 3), dtype=np.uint8))
        labels = [i % num_classes for i in range(n)]
        datasets.Dataset.from_dict({'img': images, 'label': labels}, features=features).to_parquet(
            str(root / f'{split}.parquet'))


def save_source(folder):
    """A source model whose head, in plain eval mode, predicts class 0 for every image (BN running variances so
    large that each BN outputs its zero shift, so the logits are the classifier's bias, largest for class 0), while
    with batch statistics its features decide. On data of class 0 alone, running statistics score 100 %."""
    interface = tc.Interface(width=16, rp=True)
    model = tc.make_compatible('resnet8_cifar', split='layer2', interface=interface, num_classes=10,
                               class_names=CIFAR10_CLASSES, init_seed=0)
    for module in model.head.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.running_var.fill_(1e12)
    with torch.no_grad():
        model.head.tail.fc.bias.zero_()
        model.head.tail.fc.bias[0] = 1e-3
    for name, component in (('interface', interface), ('extractor', model.extractor), ('head', model.head)):
        component.save_pretrained(folder / name)
    return [f'--{name}={folder / name}' for name in ('interface', 'extractor', 'head')]


def run_recipe(script, *args):
    env = dict(os.environ, HF_HUB_OFFLINE='1', HF_DATASETS_OFFLINE='1')  # a Hub download would fail, not hang
    return subprocess.run([sys.executable, str(REPO / 'recipes' / script), *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_adaptation_recipe_reads_the_local_copy_and_reports_both_bn_modes(tmp_path):
    write_cifar10_copy(tmp_path / 'data')
    out = tmp_path / 'out'
    proc = run_recipe('adaptation.py', '--setting', 'cifar10_shift', '--budget', 'tiny', '--adapt-steps', 2,
                      '--threads', 1, '--data-dir', tmp_path / 'data', '--output', out, *save_source(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / 'results.json').read_text())
    scores = results['scores']
    assert scores['source'] == scores['adapted_running_bn'] == 100.0  # running statistics
    assert scores['source_test_bn'] < 100.0 and scores['adapted'] < 100.0  # batch statistics
    assert results['args']['data_dir'] == str(tmp_path / 'data')
    report = (out / 'report.md').read_text()
    assert 'BN=batch' in report and 'BN=running' in report and '100.0' in report
    assert f'local Parquet copies in `{tmp_path / "data"}`' in report and 'CIFAR-10 (JPEG copy)' in report
    assert 'adaptation: stages' in proc.stderr  # the recipe's bar, on stderr


@pytest.mark.slow  # one tiny source training and four 2-step adaptations
def test_adaptation_sweep_adapts_one_source_to_each_corruption_and_seed_and_skips_finished_runs(tmp_path,
                                                                                               import_script):
    write_cifar10_copy(tmp_path / 'data')
    out = tmp_path / 'out'
    args = ('--budget', 'tiny', '--shifts', 'gaussian_noise:5', 'contrast:5', '--source-seeds', 1, '--adapt-seeds', 2,
            '--adapt-steps', 2, '--data-dir', tmp_path / 'data', '--output', out)
    proc = run_recipe('adaptation_sweep.py', *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = sorted(out.glob('source0/*/adapt*/results.json'))
    assert [f'{r.parent.parent.name}/{r.parent.name}' for r in runs] == [
        'contrast_5/adapt0', 'contrast_5/adapt1', 'gaussian_noise_5/adapt0', 'gaussian_noise_5/adapt1']
    results = [json.loads(r.read_text()) for r in runs]
    source = str(out / 'source0' / 'main' / 'components' / 'source' / 'extractor')
    assert all(r['args']['extractor'] == source and r['args']['seed'] == 0 for r in results)  # one source, reused
    assert [r['args']['shift'] for r in results] == [['contrast:5']] * 2 + [['gaussian_noise:5']] * 2
    assert [r['args']['adapt_seed'] for r in results] == [0, 1, 0, 1]
    # Each record carries the fingerprint its next seeds are planned with (source config and adaptation keys).
    sweep = import_script('recipes', 'adaptation_sweep')
    planned = sweep.source_fingerprint(sweep.parse_args([str(a) for a in args]), out, 0)
    assert [r['config'] for r in results] == [planned] * 4
    # The source and its test-time BN do not depend on the adaptation seed.
    assert results[0]['scores']['source'] == results[1]['scores']['source']
    report = (out / 'report.md').read_text()
    assert '| gaussian_noise:5 | 2 |' in report and '| contrast:5 | 2 |' in report
    before = [r.stat().st_mtime_ns for r in runs]
    proc = run_recipe('adaptation_sweep.py', *args)  # everything finished: read back, nothing rerun
    assert proc.returncode == 0 and [r.stat().st_mtime_ns for r in runs] == before
    # A new corruption under another budget needs the source: the tiny one is not adapted as if it were the cpu one.
    # The records of OUTPUT are of the tiny budget: refused up front, before the source's folder is touched.
    other = ('--budget', 'cpu', '--shifts', 'pixelate:5', *args[5:])
    source_config = (out / 'source0' / 'config.yaml').read_text()
    proc = run_recipe('adaptation_sweep.py', *other)
    assert proc.returncode != 0 and '--budget tiny (now cpu)' in proc.stderr, proc.stderr
    assert (out / 'source0' / 'config.yaml').read_text() == source_config
    assert not list(out.glob('source0/pixelate_5/*/results.json'))
    # A later sitting with only the adaptations' records: the source is not needed, so not trained again.
    for item in (out / 'source0').iterdir():
        if not item.name.endswith('_5'):
            shutil.rmtree(item) if item.is_dir() else item.unlink()
    proc = run_recipe('adaptation_sweep.py', *args)
    assert proc.returncode == 0 and not (out / 'source0' / 'main').exists()
    assert (out / 'report.md').read_text() == report


def test_adaptation_sweep_refuses_an_unknown_corruption_before_anything_runs(tmp_path):
    proc = run_recipe('adaptation_sweep.py', '--shifts', 'gaussian_noise:5', 'fog:3', '--output', tmp_path / 'out')
    assert proc.returncode == 2 and "Unknown shift 'fog:3'" in proc.stderr
    assert not (tmp_path / 'out').exists()


# One interpreter runs every recipe's main (a recipe imports its siblings from its own folder, hence PYTHONPATH):
# each must refuse the empty copy folder with the exit status and message of argparse.
CHECK_ALL = """
import runpy, sys
data_dir, scripts = sys.argv[1], sys.argv[2:]
for script in scripts:
    sys.argv = [script, '--data-dir', data_dir, '--output', data_dir + '/out']
    try:
        runpy.run_path(script, run_name='__main__')
    except SystemExit as e:
        print(script, e.code, flush=True)
"""


def test_recipes_read_cifar10_from_the_copy_in_data_dir(tmp_path):
    """Every recipe's default data is uoft-cs/cifar10; with --data-dir it is DIR/cifar10/*.parquet, checked before
    anything runs."""
    scripts = ['adaptation.py', 'transfer.py', 'head_transfer.py', 'sec4_methods.py', 'adaptation_sweep.py']
    env = dict(os.environ, PYTHONPATH=str(REPO / 'recipes'), HF_HUB_OFFLINE='1', HF_DATASETS_OFFLINE='1')
    proc = subprocess.run([sys.executable, '-c', CHECK_ALL, str(tmp_path),
                           *(str(REPO / 'recipes' / s) for s in scripts)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.stdout.split() == [str(REPO / 'recipes' / s) if i % 2 == 0 else '2'
                                   for s in scripts for i in range(2)], proc.stderr[-3000:]
    refusal = (f"'uoft-cs/cifar10' is read from a local Parquet copy, but there is no "
               f"{tmp_path / 'cifar10' / 'train.parquet'}")
    assert proc.stderr.count(refusal) == len(scripts)
    assert not (tmp_path / 'out').exists()


@pytest.mark.slow  # eight train.py runs of 30 ResNet-8 steps on synthetic data, then the curves and stitches
def test_transfer_recipe_measures_and_marks_one_epoch_of_the_target_on_every_curve(tmp_path):
    """Fig. 5 marks one epoch of fine-tuning: the curves are measured at the step that completes it, wherever it
    falls among the budget's steps (here between the tiny budget's 1 and 3)."""
    out = tmp_path / 'out'
    proc = run_recipe('transfer.py', '--setting', 'synthetic', '--budget', 'tiny', '--threads', 1, '--output', out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / 'results.json').read_text())
    epoch = results['target_train'] // 64  # the sampler's whole batches: a partial last batch is dropped
    assert results['target_train'] % 64 and results['epoch_steps'] == epoch and epoch not in (0, 1, 3, 5)
    assert results['data_version'] == tc.data.DATA_VERSION  # what --resume and results.md's versions go by
    for kind in ('ours', 'independent'):
        assert all(c['steps'] == sorted({0, 1, 3, 5, epoch}) for c in results[kind]['curves'])
    # The re-initialised head is a baseline: on the independent sources, as the paper's (Sec. 5.3).
    modes = {kind: {c['mode'] for c in results[kind]['curves']} for kind in ('ours', 'independent')}
    assert modes == {'ours': {'recombined'}, 'independent': {'recombined', 'reinit_head'}}
    assert f'(one epoch: {epoch} steps)' in (out / 'report.md').read_text()
    # --reuse keeps a finished run only for the same config: another --seed trains other networks (it kept them).
    proc = run_recipe('transfer.py', '--setting', 'synthetic', '--budget', 'tiny', '--threads', 1, '--output', out,
                      '--reuse', '--seed', 1)
    assert proc.returncode != 0 and "seed: 0 -> 1" in (out / 'runs' / 'target.log').read_text()


def test_a_recipes_seed_reaches_its_networks_initial_weights(import_script):
    """--seed S of Sec. 5.1 and 5.3 is a new draw of every network's initial weights (init_seed), not only of the
    data order and noise; seed 0 keeps the init seeds its records were made with."""
    from argparse import Namespace
    adaptation = import_script('recipes', 'adaptation')
    setting = adaptation.SETTINGS['synthetic']
    assert [adaptation.source_config(Namespace(seed=s), setting)['init_seed'] for s in (0, 1, 2)] == [0, 1, 2]
    transfer = import_script('recipes', 'transfer')
    seeds = {(s, k): transfer.network_config(Namespace(seed=s), transfer.BUDGETS['tiny'], 'n', {}, k)[0]['init_seed']
             for s in (0, 1) for k in (0, 1, 10)}
    assert [seeds[0, k] for k in (0, 1, 10)] == [0, 1, 10] and len(set(seeds.values())) == 6


@pytest.mark.parametrize('seed', [0, 3])
def test_sec53_stitches_are_fitted_on_the_labelled_images_its_seed_draws(import_script, monkeypatch, seed):
    """--seed S draws the few labelled target images of the stitches too, not seed 0's whatever S."""
    from argparse import Namespace
    from timm_compat.data import ImageData
    transfer = import_script('recipes', 'transfer')
    train = ImageData(torch.zeros(50, 3, 4, 4, dtype=torch.uint8), torch.arange(50) % 5, list('abcde'))
    drawn = []
    monkeypatch.setattr(ImageData, 'take', lambda self, n, seed=0: drawn.append((n, seed)) or self)
    transfer.stitch_sources(Namespace(seed=seed), {'stitch_images': 20}, None, None, {}, {}, train, None)
    assert drawn == [(20, seed)]


def test_head_transfer_report_draws_fig4_from_every_seed_with_the_papers_values(import_script, tmp_path):
    head_transfer = import_script('recipes', 'head_transfer')

    def record(seed, resnet, upper):
        cells = {'recombined': resnet, 'classes_0_4': 90.0, 'classes_5_9': 80.0}
        return {'seed': seed, 'wall_seconds': 60.0, 'stage1_seconds': 30.0, 'hardware': 'cpu', 'data_dir': None,
                'budget': 'cpu', 'epochs': None,
                'results': {'wide_resnet56': {bn: dict(cells, recombined=95.0) for bn in ('batch', 'running')},
                            'resnet56': {bn: dict(cells, upper_bound=upper) for bn in ('batch', 'running')}}}

    records = [record(0, 80.0, 90.0), record(1, 84.0, 92.0)]
    bars, paper = head_transfer.figure_bars(records)
    assert bars == {'wide_resnet56: updated head': [95.0, 95.0], 'resnet56: updated head': [80.0, 84.0],
                    'resnet56: upper bound': [90.0, 92.0]}  # no upper bound measured for the reference here
    assert paper == {'resnet56: updated head': 91.7, 'resnet56: upper bound': 94.6}
    for seed, r in enumerate(records):
        (tmp_path / f'seed{seed}').mkdir()
        (tmp_path / f'seed{seed}' / 'results.json').write_text(json.dumps(r))
    head_transfer.main(['--report-only', '--seeds', '2', '--budget', 'cpu', '--output', str(tmp_path)])
    report = (tmp_path / 'report.md').read_text()
    assert '| resnet56 | batch | 82.0 ± 2.8 |' in report and '](figures/head_transfer_bars.png)' in report
    assert (tmp_path / 'figures' / 'head_transfer_bars.png').is_file()
    # Records from before data versions are reported, but never in one table with a newer version's.
    (tmp_path / 'seed1' / 'results.json').write_text(json.dumps({**records[1], 'data_version': 2}))
    with pytest.raises(SystemExit):
        head_transfer.main(['--report-only', '--seeds', '2', '--budget', 'cpu', '--output', str(tmp_path)])
    assert (tmp_path / 'report.md').read_text() == report


def test_head_transfer_fine_tunes_the_fast_head_by_stage1s_recipe_and_the_paper_head_by_sgd(import_script):
    """The fast family's head (logits at 1/9) barely moves under the paper budgets' SGD at lr 0.01: the fast budget
    fine-tunes it with stage 1's own optimisation, as train.py built it."""
    from timm_compat.config import load_config
    from timm_compat.data import ImageData
    from timm_compat.optim import step_gain
    head_transfer = import_script('recipes', 'head_transfer')
    fast = load_config(str(REPO / 'configs' / 'fast' / 'head_transfer.yaml'))
    paper = load_config(str(REPO / 'configs' / 'head_transfer' / 'stage1.yaml'))
    head = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4), torch.nn.AdaptiveAvgPool2d(1),
                               torch.nn.Flatten(), torch.nn.Linear(4, 10))
    optim, optimizer, _ = head_transfer.head_optimizer(head, fast, head_transfer.BUDGETS['fast']['head_optim'], 1024,
                                                       100)
    weights, norm_biases = optimizer.param_groups
    assert optim.label_smoothing == 0.2 and type(optimizer).__name__ == 'Lookahead'
    assert norm_biases['params'] == [head[1].bias] and norm_biases['lr'] == pytest.approx(64 * weights['lr'])
    assert weights['lr'] == pytest.approx(2.3 / step_gain(0.85))  # the triangle's start, at batch 1024
    optim, optimizer, _ = head_transfer.head_optimizer(head, paper, head_transfer.BUDGETS['paper']['head_optim'], 128,
                                                       100)
    assert [g['lr'] for g in optimizer.param_groups] == [pytest.approx(0.01)] and type(optimizer) is torch.optim.SGD
    assert optim.label_smoothing == 0 and optim.clip_grad_norm == paper.optim.clip_grad_norm is not None
    # The fast path trains for real: alternating flips, channels_last and the budget's precision on a frozen extractor.
    extractor = torch.nn.Identity()
    extractor.pretrained_cfg = {'mean': (0.5, 0.5, 0.5), 'std': (0.25, 0.25, 0.25)}
    data = ImageData(torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8), torch.arange(64) % 10, CIFAR10_CLASSES)
    before = head[4].weight.detach().clone()
    # 16 updates, so that lookahead's slow weights (every 5), where the run ends, have moved.
    losses = head_transfer.finetune_head(extractor, head, data, 2, 8, fast, None, torch.device('cpu'))
    assert len(losses) == 16 and all(np.isfinite(losses)) and not torch.equal(head[4].weight, before)
    # Each seed its own data order and flips: the same seed repeats, another differs (the crops follow torch's seed).
    start = copy.deepcopy(head)

    def seeded(seed):
        torch.manual_seed(0)
        return head_transfer.finetune_head(extractor, copy.deepcopy(start), data, 1, 8, fast, None,
                                           torch.device('cpu'), seed=seed)
    assert seeded(1) == seeded(1) != seeded(0)


def test_head_transfer_keeps_a_seeds_record_only_for_the_same_data(import_script, tmp_path):
    """A seed trained on the Hub's CIFAR-10 is not pooled with seeds trained on a local (here: JPEG) copy."""
    import argparse
    from timm_compat.data import DATA_VERSION
    head_transfer = import_script('recipes', 'head_transfer')
    record = {'data_version': DATA_VERSION, 'budget': 'fast', 'epochs': None, 'data_dir': '../shared/data'}
    (tmp_path / 'results_seed0.json').write_text(json.dumps(record))
    args = argparse.Namespace(budget='fast', epochs=None, data_dir='../shared/data', report_only=False)
    assert head_transfer.saved_record(argparse.ArgumentParser(), args, tmp_path / 'results_seed0.json') == record
    with pytest.raises(SystemExit):
        head_transfer.saved_record(argparse.ArgumentParser(), argparse.Namespace(**{**vars(args), 'data_dir': None}),
                                   tmp_path / 'results_seed0.json')


@pytest.mark.parametrize('seed', [0, 1])
def test_head_transfer_scores_the_test_images_its_upper_bounds_are_scored_on(import_script, tmp_path, seed):
    """With a test_limit, the recombined networks and the upper bounds (train.py runs of the seed) must see one
    subset of the test split, and the head fine-tunes on the stage-1 run's training subset."""
    from timm_compat.build import load_task_data
    from timm_compat.config import load_config
    head_transfer = import_script('recipes', 'head_transfer')
    write_cifar10_copy(tmp_path, per_split=(60, 50), num_classes=10)
    budget = dict(head_transfer.BUDGETS['tiny'], train_limit=30, test_limit=20)
    cfg = load_config(str(budget['upper']),
                      head_transfer.upper_bound_overrides(budget, 'resnet56', seed) + [f'data_dir={tmp_path}'])
    train, test = load_task_data(cfg.networks[0], cfg)
    ours_train, ours_test = head_transfer.load_cifar10(str(tmp_path), budget, seed)
    assert torch.equal(ours_test.images, test.images) and torch.equal(ours_test.labels, test.labels)
    assert torch.equal(ours_train.images, train.images)
