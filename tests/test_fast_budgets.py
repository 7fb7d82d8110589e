"""The recipes' ``fast`` budget (issue 16, part 5): every train.py run it launches resolves to a valid config of the
fast CIFAR family under the fast recipe, on full data, with every CPU thread and checkpoints to resume from; the
paper budgets keep the paper's architectures."""
import argparse
import functools
import json
import os
import shutil
import subprocess
import sys

import pytest
import timm
import torch

from tests.conftest import REPO
from tests.test_recipes import run_recipe, write_cifar10_copy
from timm_compat.config import load_config

FAST = REPO / 'configs' / 'fast'
FAMILY = {'airbench94_cifar', 'airbench_desktop_cifar', 'airbench_mobile_cifar'}
# One interpreter (a recipe imports its siblings from its own folder, hence PYTHONPATH) resolves the config of every
# run the recipes launch, with the overrides they pass, and prints them as JSON with the budgets' architectures.
RESOLVE = """
import argparse, json, sys
from pathlib import Path
from timm_compat.config import load_config
import adaptation, head_transfer, sec4_methods, transfer

tmp, runs = Path(sys.argv[1]), {}
def resolve(label, path, sets):
    runs[label] = load_config(str(path), sets).to_dict()

for budget in ('paper', 'fast'):
    args = argparse.Namespace(budget=budget, setting='cifar10_halves', epochs=None, init='random')
    for method in sec4_methods.METHODS:
        for path, run_dir, sets in sec4_methods.method_runs(method, 0, args, tmp / 'sec4'):
            resolve(f'sec4/{budget}/{run_dir.name}', path, sets)
args = argparse.Namespace(budget='fast', setting='cifar10_halves', epochs=None, init='rp_pretrained')
pre = sec4_methods.pretraining_runs(sec4_methods.ALL_METHODS, args, tmp / 'pre')
for method in sec4_methods.ALL_METHODS:
    pre += sec4_methods.method_runs(method, 0, args, tmp / 'pre')
for path, run_dir, sets in pre:
    resolve(f'sec4/pretrained/{run_dir.name}', path, sets)
fast = head_transfer.BUDGETS['fast']
resolve('head_transfer/stage1', fast['stage1'], head_transfer.run_overrides(fast, fast['networks']))
for name in fast['upper_bound']:
    resolve(f'head_transfer/upper_{name}', fast['upper'], head_transfer.upper_bound_overrides(fast, name))
args = argparse.Namespace(seed=0, output=str(tmp / 'transfer'))
source = adaptation.source_config(args, adaptation.SETTINGS['cifar10_shift'])
resolve('adaptation/source', *adaptation.write_run(source, tmp / 'source', adaptation.BUDGETS['fast']['train']))
setting, budget = transfer.SETTINGS['cifar10_halves'], transfer.BUDGETS['fast']
tasks = {'target': setting['target'], **setting['sources']}
for i, (name, classes) in enumerate(tasks.items()):
    data = transfer.dataset(args, setting, 'target' if name == 'target' else 'source', classes, budget)
    frozen = None if name == 'target' else tmp / 'interface'
    for label, interface in ((name, frozen), (name + '_independent', None)):
        config, sets = transfer.network_config(args, budget, label, data, i, interface)
        resolve(f'transfer/{label}', *adaptation.write_run(config, tmp / label, sets))
tables = {b: dict(reference=v['reference'], upper_bound=v['upper_bound'], threads=v['threads'],
                  networks={n: net._asdict() for n, net in v['networks'].items()})
          for b, v in head_transfer.BUDGETS.items()}
other = dict(adaptation=adaptation.BUDGETS['fast'], transfer={k: v for k, v in budget.items() if k != 'train'})
import common
(tmp / 'killed').mkdir()
(tmp / 'killed' / 'run.json').write_text('{}')
claims = {f'{folder} {resume}': [a for a in common.launch_command(fast['stage1'], tmp / folder, [], None, resume)
                                  if a in ('--resume', '--overwrite')]
          for folder in ('killed', 'new') for resume in (True, False)}
print(json.dumps(dict(runs=runs, head_transfer=tables, other=other, claims=claims)))
"""


@pytest.fixture(scope='module')
def resolved(tmp_path_factory):
    """``{'runs': {label: resolved config}, 'head_transfer': {budget: architectures}, 'other': budgets}``."""
    env = dict(os.environ, PYTHONPATH=str(REPO / 'recipes'), HF_HUB_OFFLINE='1', HF_DATASETS_OFFLINE='1')
    proc = subprocess.run([sys.executable, '-c', RESOLVE, str(tmp_path_factory.mktemp('fast_budgets'))], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


@functools.lru_cache(maxsize=None)
def channels_at(backbone: str, split: str, model_args: str = '{}') -> int:
    """Channels of ``backbone`` (with the JSON ``model_args``) at the output of module ``split`` on a 32x32 image."""
    model = timm.create_model(backbone, **json.loads(model_args)).eval()
    out = []
    model.get_submodule(split).register_forward_hook(lambda module, args, output: out.append(output.shape[1]))
    with torch.no_grad():
        model(torch.zeros(1, 3, 32, 32))
    return out[0]


def fast_runs(resolved, prefix):
    runs = {k: v for k, v in resolved['runs'].items() if k.startswith(prefix)}
    assert runs, prefix
    return runs


def check_fast(label, cfg):
    """The fast recipe's optimisation and the fast budget's keys, full data, every thread, frequent checkpoints."""
    recipe = load_config(str(FAST / 'recipe.yaml'))
    assert cfg['optim'] == recipe.optim.to_dict(), label  # the whole section: no paper warmup or clip left over
    assert cfg['optim']['lr_reference_batch'] == 1024 and cfg['optim']['optimizer'] == 'lookahead_sgd', label
    assert [cfg[k] for k in ('augment_translate', 'augment_pad_mode', 'augment_flip')] == [
        recipe.augment_translate, recipe.augment_pad_mode, recipe.augment_flip], label
    assert (cfg['batch_size'], cfg['epochs'], cfg['steps']) == (1024, 9.9, None), label
    assert (cfg['whitening_init_examples'], cfg['whitening_bias_epochs']) == (5000, 3), label
    assert (cfg['mixed_precision'], cfg['channels_last'], cfg['eval_tta']) == ('auto', True, 'none'), label
    assert cfg['cpu_threads'] is None and cfg['checkpoint_every'] <= 100, label
    for net in cfg['networks']:
        assert net['backbone'] in FAMILY and net['split'] == 'stages.1', label
        assert net['dataset']['train_limit'] is None and net['dataset']['test_limit'] is None, label


def test_sec4_fast_trains_the_server_member_under_the_fast_recipe(resolved):
    runs = fast_runs(resolved, 'sec4/fast/')
    assert len(runs) == 10  # eight methods, incremental and the upper bound in two runs each
    for label, cfg in runs.items():
        check_fast(label, cfg)
        assert {n['backbone'] for n in cfg['networks']} == {'airbench94_cifar'}, label
        assert cfg['interface']['width'] == channels_at('airbench94_cifar', 'stages.1') == 256, label
        paper = resolved['runs'][label.replace('/fast/', '/paper/')]
        # Each method keeps its own keys: the budget sets no part of the interface but its width and the aux
        # heads' airbench temperature (an unscaled DCC head diverged under the fast recipe).
        assert cfg['iiw'] == paper['iiw'] and cfg['joint_schedule'] == paper['joint_schedule'], label
        for key in ('rp', 'dcc', 'load', 'dcc_classes'):
            assert cfg['interface'][key] == paper['interface'][key], (label, key)
        assert cfg['interface']['aux_head'] == {'type': 'conv', 'logit_scale': 1 / 9}, label
        assert [n['dataset'] for n in cfg['networks']] == [n['dataset'] for n in paper['networks']], label
    assert len(runs['sec4/fast/incremental_stage1_seed0']['networks']) == 1


def test_sec4_from_rp_pretraining_starts_iiw_methods_from_one_pretraining_and_the_others_from_two(resolved):
    runs = fast_runs(resolved, 'sec4/pretrained/')
    extractor = '{}/main/components/a/extractor'
    for k in (0, 1):
        pre = runs[f'sec4/pretrained/rp_pretraining{k}']
        assert pre['task_weight'] == 0 and pre['interface']['rp'] and not pre['interface']['dcc']
        assert len(pre['networks']) == 1 and pre['networks'][0]['dataset']['train_shard'] is None
        assert pre['seed'] == k and pre['networks'][0]['init'] is None
    inits = {label.split('/')[-1]: [n['init'] and n['init'].split('/pre/')[1] for n in cfg['networks']]
             for label, cfg in runs.items() if 'rp_pretraining' not in label}
    one, two = extractor.format('rp_pretraining0'), extractor.format('rp_pretraining1')
    for method in ('iiw', 'iiw_dcc', 'iiw_rp_dcc', 'control'):
        assert inits[f'{method}_seed0'] == [one, one], method
    for method in ('independent', 'rp', 'dcc'):
        assert inits[f'{method}_seed0'] == [one, two], method
    assert inits['incremental_stage1_seed0'] == [one] and inits['incremental_seed0'] == [None, one]
    assert runs['sec4/pretrained/iiw_dcc_seed0']['iiw'] and runs['sec4/pretrained/iiw_dcc_seed0']['interface']['dcc']
    for label, cfg in runs.items():
        check_fast(label, cfg)


def test_sec4_paper_budget_keeps_resnet56(resolved):
    for label, cfg in fast_runs(resolved, 'sec4/paper/').items():
        assert {n['backbone'] for n in cfg['networks']} == {'resnet56_cifar'}, label
        assert cfg['optim']['optimizer'] == 'sgd' and cfg['batch_size'] == 128 and cfg['epochs'] == 160, label


def test_head_transfer_fast_stage1_is_the_family_in_the_budgets_order(resolved):
    cfg = resolved['runs']['head_transfer/stage1']
    check_fast('stage1', cfg)
    table = resolved['head_transfer']['fast']
    assert [(n['name'], n['backbone'], n['split']) for n in cfg['networks']] == [
        (name, net['backbone'], net['split']) for name, net in table['networks'].items()]
    assert {net['backbone'] for net in table['networks'].values()} == FAMILY
    # The server member is the reference extractor, as Wide ResNet-56 is the paper's.
    assert table['networks'][table['reference']]['backbone'] == 'airbench94_cifar'
    assert cfg['interface']['rp'] and cfg['interface']['dcc'] and table['threads'] is None


def test_head_transfer_fast_upper_bounds_are_each_member_trained_plainly_without_adapter(resolved):
    table = resolved['head_transfer']['fast']
    assert sorted(table['upper_bound']) == sorted(table['networks'])
    for name in table['upper_bound']:
        cfg, net = resolved['runs'][f'head_transfer/upper_{name}'], table['networks'][name]
        check_fast(name, cfg)
        assert [(n['backbone'], n['split']) for n in cfg['networks']] == [(net['backbone'], net['split'])]
        info = {f['module']: f['num_chs'] for f in timm.create_model(net['backbone']).feature_info}
        assert cfg['interface']['width'] == info[net['split']], name  # no adapter
        assert not (cfg['interface']['rp'] or cfg['interface']['dcc']), name
        assert cfg['networks'][0]['dataset']['classes'] is None, name  # all 10 classes


@pytest.mark.parametrize('budget', ['tiny', 'cpu', 'paper', 'fast'])
def test_head_transfer_widths_are_each_trunks_own(resolved, budget):
    """An upper bound's interface width is the trunk's width, so it adds no adapter; the paper's budget keeps the
    paper's architectures with Wide ResNet-56 as the reference."""
    table = resolved['head_transfer'][budget]
    for name, net in table['networks'].items():
        assert net['width'] == channels_at(net['backbone'], net['split'], json.dumps(net['model_args'] or {})), name
    if budget == 'paper':
        assert {n['backbone'] for n in table['networks'].values()} == {
            'resnet56_cifar', 'wide_resnet56_cifar', 'mobilenetv2_100_cifar'}
        assert table['reference'] == 'wide_resnet56' and not table['networks']['wide_resnet56']['model_args']


def test_adaptation_fast_source_is_the_server_member_with_its_rp_head(resolved):
    cfg = resolved['runs']['adaptation/source']
    check_fast('source', cfg)
    assert [n['backbone'] for n in cfg['networks']] == ['airbench94_cifar']
    assert cfg['interface']['width'] == 256 and cfg['interface']['rp'] and not cfg['interface']['dcc']
    budget = resolved['other']['adaptation']
    assert budget['train_limit'] is None and budget['test_limit'] is None
    assert budget['adapt_steps'] > 0 and budget['adapt_batch'] > 0


def test_transfer_fast_trains_every_network_as_the_server_member(resolved):
    runs = fast_runs(resolved, 'transfer/')
    assert len(runs) == 8  # target and three sources, compatible and independent
    for label, cfg in runs.items():
        check_fast(label, cfg)
        assert [n['backbone'] for n in cfg['networks']] == ['airbench94_cifar'], label
        frozen = cfg['interface']['load'] is not None
        # A source trained against the target's frozen interface takes its width from it.
        assert frozen == (label != 'transfer/target' and not label.endswith('_independent')), label
        assert cfg['interface']['width'] == (None if frozen else 256), label
    assert resolved['other']['transfer']['train_limit'] is None


@pytest.mark.slow  # one train.py step of airbench94 at batch 1024 (no RP: 4x cheaper), and the report
def test_sec4_fast_budget_runs_end_to_end_on_a_local_copy(tmp_path):
    """The fast budget's overrides (the optim section as one JSON value among them) pass through train.py's
    command line, and the recipe writes its report. 2,400 training images: each half's network sees more than one
    batch of 1024 (side b keeps 9 of the 10 classes)."""
    write_cifar10_copy(tmp_path / 'data', per_split=(2400, 100), num_classes=10)
    out = tmp_path / 'out'
    proc = run_recipe('sec4_methods.py', '--setting', 'cifar10_halves', '--budget', 'fast', '--methods',
                      'independent', '--seeds', 1, '--epochs', 0.01, '--data-dir', tmp_path / 'data', '--output', out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = out / 'independent_seed0'
    cfg = load_config(str(run / 'config.yaml'))
    check_fast('run', cfg.to_dict() | {'epochs': 9.9})  # --epochs shortened it
    assert json.loads((run / 'main' / 'summary.json').read_text())['steps'] >= 1
    assert 'Budget `fast`' in (out / 'report.md').read_text()


@pytest.mark.slow  # six short train.py runs of ResNet-8 (two pre-trainings, the upper bound's two, IIW, RP)
def test_sec4_upper_bound_and_rp_pretraining_run_end_to_end(tmp_path, import_script):
    write_cifar10_copy(tmp_path / 'data', per_split=(400, 100), num_classes=10)
    out = tmp_path / 'out'
    proc = run_recipe('sec4_methods.py', '--setting', 'cifar10_halves', '--budget', 'cpu', '--methods', 'upper_bound',
                      'iiw', 'rp', '--init', 'rp_pretrained', '--seeds', 1, '--epochs', 0.2,
                      '--data-dir', tmp_path / 'data', '--output', out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    pre = [out / f'rp_pretraining{k}' / 'main' / 'components' / 'a' / 'extractor' for k in range(2)]
    assert all((p / 'model.safetensors').is_file() for p in pre)
    inits = {m: [n.init for n in load_config(str(out / f'{m}_seed0' / 'config.yaml')).networks] for m in ('iiw', 'rp')}
    assert inits == {'iiw': [str(pre[0])] * 2, 'rp': [str(pre[0]), str(pre[1])]}
    # Each record's fingerprint, from the config.yaml its runs wrote, is the one a next seed's runs are planned with.
    sec4 = import_script('recipes', 'sec4_methods')
    saved = json.loads((out / 'results.json').read_text())
    args = argparse.Namespace(**saved['args'])
    assert {m: r[0]['config'] for m, r in saved['results'].items()} == {
        m: sec4.method_fingerprint(m, 1, args, out) for m in ('upper_bound', 'iiw', 'rp')}
    results = json.loads((out / 'results.json').read_text())['results']
    upper = results['upper_bound'][0]
    assert upper['run'] == [str(out / 'upper_bound_a_seed0'), str(out / 'upper_bound_b_seed0')]
    for bn in ('batch', 'running'):  # the upper bound is each network alone on the common classes: the diagonal
        m = upper['matrix'][bn]
        assert upper['recombination'][bn] == pytest.approx(100 * (m[0][0] + m[1][1]) / 2)
    trained = [json.loads((out / f'upper_bound_{side}_seed0' / 'summary.json').read_text())['phases']['main']
               ['train_seconds'] for side in 'ab']
    assert min(trained) > 0 and upper['train_seconds'] == pytest.approx(sum(trained), abs=0.1)  # both runs' time
    for side in 'ab':
        cfg = load_config(str(out / f'upper_bound_{side}_seed0' / 'config.yaml'))
        assert [n.name for n in cfg.networks] == [side] and cfg.interface.rp and not cfg.interface.dcc
    report = (out / 'report.md').read_text()
    assert '| Upper bound |' in report and 'each network trained alone with its own RP head' in report
    assert 'paired t-test p' in report and '--init rp_pretrained' in report
    assert '](figures/recombination_bars.png)' in report and (out / 'figures' / 'recombination_bars.png').is_file()
    # Fig. 3 is in the records: shared heads align channels directly, the upper bound's only up to a permutation.
    assert [results[m][0]['correlation']['kind'] for m in ('upper_bound', 'iiw')] == ['permuted', 'direct']
    assert '](figures/correlation_iiw.png)' in report and (out / 'figures' / 'correlation_iiw.png').is_file()
    # A later sitting without the run folders: the same command with --resume trains nothing and rebuilds the report.
    for run in out.glob('*_seed0'):
        shutil.rmtree(run)
    proc = run_recipe('sec4_methods.py', '--setting', 'cifar10_halves', '--budget', 'cpu', '--methods', 'upper_bound',
                      'iiw', 'rp', '--init', 'rp_pretrained', '--seeds', 1, '--epochs', 0.2,
                      '--data-dir', tmp_path / 'data', '--output', out, '--resume')
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not list(out.glob('*_seed0')) and (out / 'report.md').read_text() == report


def test_resume_continues_a_run_in_the_folder_and_starts_a_new_one(resolved):
    """A killed fast-budget run (checkpoints every 100 steps) continues under the recipe's --resume; without it, or
    where no run was started, the folder is (over)written."""
    assert resolved['claims'] == {'killed True': ['--resume'], 'killed False': ['--overwrite'],
                                  'new True': ['--overwrite'], 'new False': ['--overwrite']}
