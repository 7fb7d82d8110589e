"""benchmarks/time_to_accuracy.py (issue 16): its FLOP-ideal ratio and, on tiny synthetic runs, the whole
benchmark: curves from test-set validation, time to an accuracy, a re-run reading finished runs."""
import json

import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

from timm_compat.build import load_task_data
from timm_compat.config import load_config

from tests.test_fast_configs import FAST, _synthetic

pytestmark = pytest.mark.usefixtures('fresh_accelerate')


@pytest.fixture
def bench(import_script):
    return import_script('benchmarks', 'time_to_accuracy')


def _flops(bench, name, *extra):
    cfg = load_config(str(FAST / f'{name}.yaml'), _synthetic(name, *extra))
    return bench.flops_per_image(cfg, {n.name: load_task_data(n, cfg) for n in cfg.networks})


@pytest.mark.slow  # counts the FLOPs of full training steps: about 15 s on a 2-core Zen 1
def test_flops_per_image_is_a_training_step_per_image(bench):
    # Catches a count per batch instead of per image, the backward pass left out, and a pair's FLOPs summed
    # over its networks instead of averaged over its images.
    cfg = load_config(str(FAST / 'plain.yaml'), _synthetic('plain'))
    classes = load_task_data(cfg.networks[0], cfg)[0].num_classes
    model = timm.create_model('airbench94_cifar', num_classes=classes)
    with FlopCounterMode(display=False) as counter:
        torch.nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.randint(0, classes, (4,))).backward()
    plain = _flops(bench, 'plain')
    assert plain == pytest.approx(counter.get_total_flops() / 4, rel=1e-6)
    no_methods = _flops(bench, 'compatible_halves', 'interface.rp=false', 'interface.dcc=false')
    assert no_methods == pytest.approx(plain, rel=1e-6)
    one = _flops(bench, 'compatible_halves', 'interface.rp_rotations=one')
    four = _flops(bench, 'compatible_halves', 'interface.rp_rotations=all')
    assert no_methods < one < four


def test_time_to_is_the_first_measurement_at_the_threshold(bench):
    points = [(10.0, 80.0), (20.0, 90.0), (30.0, 89.0), (40.0, 93.5)]
    assert bench.time_to(points, 90.0) == 20.0 and bench.time_to(points, 93.0) == 40.0
    assert bench.time_to(points, 95.0) is None


@pytest.mark.slow
def test_benchmark_end_to_end_on_synthetic_runs(bench, tmp_path, capsys):
    out = str(tmp_path / 'bench')
    for name, config in (('plain', 'plain'), ('compatible_one', 'compatible_halves')):
        sets = [a for o in _synthetic(config) for a in ('--set', o)]
        bench.main(['--runs', name, '--every', '0.2', '--output', out, *sets])
    root = tmp_path / 'bench' / 'seed0'
    pair = json.loads((root / 'compatible_one.json').read_text())
    rows = (root / 'compatible_one' / 'main' / 'validation.csv').read_text().splitlines()
    summary = json.loads((root / 'compatible_one' / 'main' / 'summary.json').read_text())
    # The curve's last point is the final evaluation's worse network, at no more than the training time.
    assert pair['curve'][-1][1] == pytest.approx(100 * min(summary['own_accuracy'].values()))
    assert len(pair['curve']) == len(rows) - 1 and pair['curve'][-1][0] <= summary['train_seconds']
    assert 0 < pair['recombination_over_own'] and pair['flops_per_image'] > 0
    # A re-run reads the finished runs (nothing retrained) and compares the pair with the plain run.
    before = (root / 'compatible_one' / 'main' / 'summary.json').stat().st_mtime_ns
    capsys.readouterr()
    bench.main(['--runs', 'plain', 'compatible_one', '--output', out, '--report-only'])
    printed = capsys.readouterr().out
    assert 'compatible_one / plain: seconds per training image' in printed and 'FLOP-ideal' in printed
    assert (root / 'compatible_one' / 'main' / 'summary.json').stat().st_mtime_ns == before
    # --flops-only counts what the runs counted.
    capsys.readouterr()
    plain_sets = [a for o in _synthetic('plain') for a in ('--set', o)]
    bench.main(['--runs', 'plain', '--output', out, '--flops-only', *plain_sets])
    plain = json.loads((root / 'plain.json').read_text())['flops_per_image'] / 1e9
    assert f'plain: {plain:.3f} GFLOP per training image (1.00x plain)' in capsys.readouterr().out
    with pytest.raises(SystemExit, match='measured with other settings'):
        bench.main(['--runs', 'plain', '--output', out, '--seed', '0', '--set', 'optim.lr=1.0'])
    # Measured every 0.2 epochs: not reused for a comparison measured at another interval.
    with pytest.raises(SystemExit, match=r'measured with other settings.*every 0\.2 epochs'):
        bench.main(['--runs', 'plain', '--output', out, '--every', '1.0', *plain_sets])
