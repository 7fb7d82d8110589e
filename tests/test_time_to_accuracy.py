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
    # The runs' own synthetic data are set differently (the pair's second network has overrides plain lacks), so
    # no ratio: report() compares only records measured alike.
    assert "compatible_one / plain: no ratio (settings differ: [] only in plain, ['networks.1." in printed
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


def _record(run, **changes):
    """A finished run's record as measure_run writes it, bf16 on one machine; ``changes`` replace fields."""
    rp = {'plain': [], 'compatible_one': ['interface.rp_rotations=one']}[run]
    record = {'run': run, 'seed': 0, 'tta': 'none', 'every': 1.0, 'curve': [[60.0, 50.0]],
              'overrides': rp + ['seed=0', 'init_seed=0', 'eval_tta=none', 'validation.every=48',
                                 'validation.data=test'],
              'time_to': {'90.0': None, '93.0': None}, 'train_seconds': 600.0 if run == 'plain' else 1500.0,
              'steps': 476, 'images_per_step': 1024, 'flops_per_image': 1e9 if run == 'plain' else 2e9,
              'own_accuracy': {'a': 0.5}, 'recombination_matrix': [[0.5]], 'recombination_over_own': None,
              'mixed_precision': 'bf16', 'hardware': 'device cpu: AMD EPYC x 2 cores, 2 torch threads; torch 2',
              'data_dir': '/data'}
    record.update(changes)
    return {k: v for k, v in record.items() if v is not _DROP}


_DROP = object()


@pytest.mark.parametrize('change, reason', [
    ({'mixed_precision': 'no'}, "mixed_precision differs: 'bf16' in plain, 'no' in compatible_one"),
    ({'hardware': 'device cpu: Intel Xeon x 2 cores, 2 torch threads; torch 2'}, 'hardware differs'),
    ({'data_dir': '/elsewhere'}, 'data_dir differs'),
    ({'overrides': ['interface.rp_rotations=one', 'seed=0', 'init_seed=0', 'eval_tta=none', 'optim.lr=1.0',
                    'validation.every=48', 'validation.data=test']}, "settings differ: [] only in plain, ['optim.lr"),
    ({'every': 0.5}, 'measurement interval differs'),
    ({'every': _DROP}, "'every 1.0 epochs' in plain, 'every 48 steps' in compatible_one"),
    ({'mixed_precision': _DROP}, 'mixed_precision is not recorded in compatible_one'),
])
def test_report_refuses_a_ratio_of_records_measured_differently(bench, capsys, change, reason):
    # A bf16 EPYC pair over an fp32 Xeon plain run printed "7.01x" as if it were the cost of compatibility.
    bench.report({'plain': _record('plain'), 'compatible_one': _record('compatible_one', **change)})
    printed = capsys.readouterr().out
    assert 'seconds per training image' not in printed and 'FLOP-ideal' not in printed
    assert f'compatible_one / plain: no ratio' in printed and reason in printed


def test_report_gives_the_ratio_of_records_measured_alike(bench, capsys):
    # The torch threads of the benchmark's own process are not the run's (train.py sets its own): not compared.
    pair = _record('compatible_one', hardware='device cpu: AMD EPYC x 2 cores, 1 torch threads; torch 2')
    bench.report({'plain': _record('plain'), 'compatible_one': pair})
    assert 'compatible_one / plain: seconds per training image 2.50x' in capsys.readouterr().out


def test_report_only_refuses_mixed_records_and_reads_the_committed_ones(bench, tmp_path, capsys):
    root = tmp_path / 'seed0'
    root.mkdir()
    (root / 'plain.json').write_text(json.dumps(_record('plain', mixed_precision='no')))
    (root / 'compatible_one.json').write_text(json.dumps(_record('compatible_one')))
    bench.main(['--report-only', '--output', str(tmp_path), '--runs', 'plain', 'compatible_one'])
    assert 'compatible_one / plain: no ratio (mixed_precision differs' in capsys.readouterr().out
    # The committed bf16 EPYC records (before --every and a resolved data_dir were recorded) agree in everything
    # else, so their ratios are the ones docs/performance.md quotes.
    bench.main(['--report-only', '--output', str(bench.REPO / 'docs' / 'results' / 'time_to_accuracy_bf16_epyc')])
    printed = capsys.readouterr().out
    assert 'compatible_one / plain: seconds per training image 2.27x' in printed
    assert 'compatible_four / plain: seconds per training image 5.17x' in printed


def _args(bench, *argv):
    fields = dict(seed=0, tta='none', epochs=None, set=[], every=1.0, data_dir=None, runs=list(bench.RUNS))
    return bench.argparse.Namespace(**{**fields, **dict(zip(argv[::2], argv[1::2]))})


def test_a_run_to_train_beside_a_record_of_another_machine_is_refused_before_training(bench, tmp_path, monkeypatch):
    root = tmp_path / 'seed0'
    root.mkdir()
    other = _record('plain', hardware='device cpu: Some Other CPU x 64 cores, 2 torch threads; torch 2')
    other['overrides'] = ['seed=0', 'init_seed=0', 'eval_tta=none', 'validation.every=48', 'validation.data=test']
    other['data_dir'] = None
    (root / 'plain.json').write_text(json.dumps(other))
    monkeypatch.setattr(bench, 'prepare', lambda *a: pytest.fail('prepared a run before refusing'))
    monkeypatch.setattr(bench, 'train', lambda *a: pytest.fail('trained before refusing'))
    with pytest.raises(SystemExit, match=r"hardware differs: 'device cpu: Some Other CPU.*' in plain\.json"):
        bench.main(['--runs', 'plain', 'compatible_one', '--output', str(tmp_path)])


def _finished_run(out, config):
    """A finished train.py run folder of ``config`` (a dict), as measure_run reads it."""
    (out / 'main').mkdir(parents=True)
    (out / 'main' / 'summary.json').write_text(json.dumps({
        'recombination_matrix': [[0.5]], 'own_accuracy': {'net': 0.5}, 'train_seconds': 60.0, 'steps': 4}))
    (out / 'main' / 'validation.csv').write_text('step,time,net/own\n4,60.0,0.5\n')
    (out / 'summary.json').write_text(json.dumps({'mixed_precision': 'no', 'config': config}))


def _setup(overrides):
    return {'overrides': overrides, 'flops_per_image': 1.0, 'images_per_step': 8, 'steps_per_epoch': 1}


def test_the_record_holds_the_resolved_data_dir(bench, tmp_path, monkeypatch):
    # A relative --data-dir names another folder from another working directory: recorded as resolved.
    monkeypatch.chdir(tmp_path)
    args = _args(bench, 'data_dir', 'data')
    overrides = bench.run_overrides(args, 'plain') + ['validation.every=1', 'validation.data=test']
    monkeypatch.setattr(bench, 'prepare', lambda *a: _setup(overrides))
    monkeypatch.setattr(bench, 'train', lambda args, name, out, o: _finished_run(out, {}))
    record = bench.measure_run(args, 'plain', tmp_path / 'seed0')
    assert record['data_dir'] == str(tmp_path / 'data')
    # Written whole, in one rename: the record on disk is the one returned, and no temporary file is left over.
    assert json.loads((tmp_path / 'seed0' / 'plain.json').read_text()) == json.loads(json.dumps(record))
    assert [p.name for p in (tmp_path / 'seed0').iterdir() if p.is_file()] == ['plain.json']


def test_a_finished_run_without_its_record_is_read_only_if_it_ran_these_settings(bench, tmp_path, monkeypatch):
    # A run folder whose record is missing was read back as this command's run whatever config it had trained.
    args = _args(bench)
    overrides = bench.run_overrides(args, 'plain') + ['validation.every=1', 'validation.data=test']
    out = tmp_path / 'seed0' / 'plain'
    other = [o.replace('seed=0', 'seed=5') for o in overrides]
    _finished_run(out, load_config(str(FAST / 'plain.yaml'), other + [f'output_dir={out}']).to_dict())
    monkeypatch.setattr(bench, 'prepare', lambda *a: _setup(overrides))
    monkeypatch.setattr(bench, 'train', lambda *a: pytest.fail('trained a finished run'))
    with pytest.raises(SystemExit, match=r'finished run of other settings \(seed, init_seed\)'):
        bench.measure_run(args, 'plain', tmp_path / 'seed0')
    # The same folder of this command's settings is read back, not retrained.
    (out / 'summary.json').write_text(json.dumps({'mixed_precision': 'no', 'config': load_config(
        str(FAST / 'plain.yaml'), overrides + [f'output_dir={out}']).to_dict()}))
    assert bench.measure_run(args, 'plain', tmp_path / 'seed0')['own_accuracy'] == {'net': 0.5}
