"""benchmarks/device_check.py, the one prepared GPU check (issue 15): its refusals here, and (slow) every step of
its --dry-run on the CPU, so that it runs the moment a GPU is lent."""
import json
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO
from tests.test_recipes import write_cifar10_copy


@pytest.fixture
def device_check(import_script):
    return import_script('benchmarks', 'device_check')


@pytest.mark.skipif(torch.cuda.is_available(), reason='with a GPU there is nothing to refuse')
def test_without_a_gpu_it_asks_for_one_or_for_dry_run(device_check, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        device_check.main(['--output', str(tmp_path / 'out')])
    assert exit_.value.code == 2 and 'No CUDA device here' in capsys.readouterr().err
    assert not (tmp_path / 'out').exists()


def test_a_data_dir_without_cifar10_is_refused_before_anything_runs(device_check, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        device_check.main(['--dry-run', '--data-dir', str(tmp_path), '--output', str(tmp_path / 'out')])
    assert exit_.value.code == 2 and 'no cifar10/train.parquet there' in capsys.readouterr().err
    assert not (tmp_path / 'out').exists()


def test_steps_accepts_every_step_the_check_has(device_check, tmp_path):
    import argparse
    names = [name for name, _, _ in device_check.steps(argparse.Namespace(dry_run=True, data_dir=None), tmp_path)]
    for name in names:
        assert device_check.parse_args(['--dry-run', '--steps', name]).steps == [name]


def test_gpu_steps_fit_the_eight_minutes_and_use_the_gpu(device_check, tmp_path):
    import argparse
    plan = device_check.steps(argparse.Namespace(dry_run=False, data_dir=None), tmp_path)
    assert [name for name, _, _ in plan] == ['tests', 'train_step', 'loader_share', 'stream_loader', 'sec5_2']
    assert sum(limit for _, _, limit in plan) <= 8 * 60
    for name, command, _ in plan[1:4]:
        assert command[command.index('--device') + 1] == 'cuda', name
    recipe = plan[4][1]
    assert recipe[recipe.index('--budget') + 1] == 'fast'


@pytest.mark.slow  # the five steps at their smallest: the recipe's tiny budget is four short train.py runs
def test_dry_run_runs_every_step_on_the_cpu_and_reports_each(tmp_path):
    write_cifar10_copy(tmp_path / 'data', per_split=(400, 100), num_classes=10)
    out = tmp_path / 'out'
    proc = subprocess.run([sys.executable, 'benchmarks/device_check.py', '--dry-run', '--data-dir',
                           str(tmp_path / 'data'), '--output', str(out)], cwd=REPO, capture_output=True, text=True,
                          timeout=1500)
    record = json.loads((out / 'device_check.json').read_text())
    assert proc.returncode == 0, [(s['name'], s['status'], s['output'][-1500:]) for s in record['steps']]
    assert [(s['name'], s['status']) for s in record['steps']] == [
        ('tests', 'ok'), ('train_step', 'ok'), ('loader_share', 'ok'), ('stream_loader', 'ok'), ('sec5_2', 'ok')]
    assert 'skipped' in record['steps'][0]['output']  # no CUDA here: the CUDA tests skip, they do not fail
    report = (out / 'device_check.md').read_text()
    assert '| sec5_2 | ok |' in report and (out / 'head_transfer' / 'report.md').is_file()
