"""Validation during training (timm_compat.validation): a seeded holdout of each training set, measured every
``validation.every`` steps without touching training, and the best step's components kept."""
import json
import os
import subprocess
import sys

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState, PartialState
from safetensors.torch import load_file

import timm_compat as tc
import train
from timm_compat import engine
from timm_compat.build import build_phases, load_task_data
from timm_compat.config import ConfigError, load_config, resume_conflicts
from timm_compat.evaluation import recombination_matrix
from timm_compat.metrics_log import MetricsLog
from timm_compat.validation import BEST_JSON, measure, read_best, split_holdout

from tests.conftest import REPO

TINY = str(REPO / 'tests' / 'tiny.yaml')
HOLDOUT = 'validation.examples=16'  # of tiny.yaml's 80 training images per network
PARTS = ('interface', 'a/extractor', 'a/head', 'b/extractor', 'b/head')


def _reset_accelerate():
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def run(out, *sets, resume=False):
    # HOLDOUT only where examples are held out: with validation off, or on the test set, the key is refused.
    held = any(s.startswith('validation.every=') for s in sets) and 'validation.data=test' not in sets
    try:
        return train.main(['-c', TINY, '--output-dir', str(out), *(['--set', HOLDOUT] if held else []),
                           *[a for s in sets for a in ('--set', s)], *(['--resume'] if resume else [])])
    finally:
        _reset_accelerate()


def _weights(folder):
    """Every tensor of every component but the interface's nonce, which each run draws anew (os.urandom)."""
    return {part: {k: v for k, v in load_file(folder / part / 'model.safetensors').items() if k != 'nonce'}
            for part in PARTS}


def _equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _column(out, key):
    rows = MetricsLog(out / 'main' / 'validation.csv').rows()
    return [(int(r['step']), float(r[key])) for r in rows]


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    """The same tiny run twice: validating after every step, and only after the last one."""
    root = tmp_path_factory.mktemp('validation')
    torch.manual_seed(0)
    run(root / 'often', 'validation.every=1')
    torch.manual_seed(0)
    run(root / 'once', 'validation.every=100')
    return root


def test_holdout_is_a_seeded_part_of_the_training_set():
    cfg = load_config(TINY, ['validation.every=2', HOLDOUT])
    data = {n.name: load_task_data(n, cfg) for n in cfg.networks}
    kept, holdout = split_holdout(data, 16, cfg.seed)
    for name, (train_set, test_set) in data.items():
        rest, held = kept[name][0], holdout[name]
        assert kept[name][1] is test_set and len(held) == 16 and len(rest) == len(train_set) - 16
        # Every training image is either trained on or held out, never both.
        rows = [[tuple(x) for x in d.images.flatten(1).tolist()] for d in (rest, held, train_set)]
        assert sorted(rows[0] + rows[1]) == sorted(rows[2]) and not set(rows[0]) & set(rows[1])
    assert torch.equal(split_holdout(data, 16, cfg.seed)[1]['a'].images, holdout['a'].images)
    assert not torch.equal(split_holdout(data, 16, cfg.seed + 1)[1]['a'].images, holdout['a'].images)
    # Both phases train on the same reduced sets and validate on the same holdout.
    phases = build_phases(load_config(TINY, ['validation.every=2', HOLDOUT, 'baseline=independent']), data,
                          torch.device('cpu'))
    for phase in phases:
        assert torch.equal(phase.holdout['b'].images, holdout['b'].images)
        assert torch.equal(phase.data['b'][0].images, kept['b'][0].images)
    plain = build_phases(load_config(TINY), data, torch.device('cpu'))[0]
    assert plain.holdout == {} and plain.data['a'][0] is data['a'][0]


def test_validating_every_step_leaves_training_bit_identical(runs):
    # Catches BN running statistics updated by validation, global RNG drawn by it (augmentation would differ
    # afterwards) and networks left in eval mode.
    assert [s for s, _ in _column(runs / 'often', 'mean')] == [1, 2, 3, 4]
    assert [s for s, _ in _column(runs / 'once', 'mean')] == [4]
    often, once = _weights(runs / 'often' / 'main' / 'components'), _weights(runs / 'once' / 'main' / 'components')
    for part in PARTS:
        assert _equal(often[part], once[part]), part


def test_best_holds_the_components_of_the_best_measured_step(runs):
    out = runs / 'often'
    best = json.loads((out / 'main' / 'best' / BEST_JSON).read_text())
    logged = _column(out, 'mean')
    top = max(v for _, v in logged)
    assert best['metric'] == 'mean' and best['eval_bn'] == 'batch' and best['value'] == top
    assert best['step'] == next(s for s, v in logged if v == top)  # the first step that reached it
    summary = json.loads((out / 'main' / 'summary.json').read_text())
    assert summary['best'] == best
    # The tiny run peaks before its end, so the best components are not the final ones ...
    assert best['step'] < 4 and not _equal(_weights(out / 'main' / 'best')['a/extractor'],
                                           _weights(out / 'main' / 'components')['a/extractor'])
    # ... and they measure what best.json says, on the same holdout.
    cfg = load_config(TINY, ['validation.every=1', HOLDOUT])
    _, holdout = split_holdout({n.name: load_task_data(n, cfg) for n in cfg.networks}, 16, cfg.seed)
    models = {n: tc.recombine(out / 'main' / 'best' / n / 'extractor', out / 'main' / 'best' / n / 'head')
              for n in ('a', 'b')}
    assert measure(models, holdout, cfg.eval_batch_size, cfg.eval_bn)['mean'] == best['value']
    assert not list((out / 'main').glob('.best-*'))


def test_a_resumed_run_keeps_a_better_best(tmp_path, monkeypatch):
    real_save = engine.save_checkpoint

    def crash_at_step_2(accelerator, root, state, keep):
        path = real_save(accelerator, root, state, keep)
        if state.step == 2:
            raise KeyboardInterrupt('simulated crash')
        return path

    monkeypatch.setattr(engine, 'save_checkpoint', crash_at_step_2)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / 'run', 'validation.every=1')
    monkeypatch.setattr(engine, 'save_checkpoint', real_save)
    best_json = tmp_path / 'run' / 'main' / 'best' / BEST_JSON
    better = {**json.loads(best_json.read_text()), 'value': 1.0}  # a best no step of the resumed run beats
    best_json.write_text(json.dumps(better))
    weights = (tmp_path / 'run' / 'main' / 'best' / 'a' / 'extractor' / 'model.safetensors').read_bytes()
    summary = run(tmp_path / 'run', 'validation.every=1', resume=True)
    assert summary['phases']['main']['best'] == better and json.loads(best_json.read_text()) == better
    assert (tmp_path / 'run' / 'main' / 'best' / 'a' / 'extractor' / 'model.safetensors').read_bytes() == weights
    assert [s for s, _ in _column(tmp_path / 'run', 'mean')] == [1, 2, 3, 4]  # each step logged once


def test_an_interrupted_replacement_keeps_a_complete_best(tmp_path):
    old = tmp_path / '.best-old'
    old.mkdir()
    (old / BEST_JSON).write_text(json.dumps({'step': 3, 'metric': 'mean', 'value': 0.5, 'eval_bn': 'batch'}))
    # A crash between moving the previous best aside and moving the new one in: the previous one comes back.
    assert read_best(tmp_path / 'best')['step'] == 3 and (tmp_path / 'best' / BEST_JSON).is_file()
    assert not old.exists()
    (tmp_path / 'best' / BEST_JSON).write_text('{"step": "three"}')
    with pytest.raises(ValueError, match=r'best\.json is not a valid record of the best step'):
        read_best(tmp_path / 'best')


def test_bad_validation_settings_are_refused_before_anything_runs(tmp_path):
    with pytest.raises(ConfigError, match=r"validation\.metric must be one of 'mean', 'own' or 'recombination', "
                                          r"got 'top1'"):
        load_config(TINY, ['validation.metric=top1'])
    with pytest.raises(ConfigError, match='validation.metric is recombination, which needs two networks'):
        load_config(None, ['validation.metric=recombination', 'networks=[{name: a}]'])
    with pytest.raises(ConfigError, match='validation.every must be at least 1'):
        load_config(TINY, ['validation.every=0'])
    with pytest.raises(ValueError, match=r"validation.examples=80 would hold out all of network 'a'"):
        run(tmp_path / 'run', 'validation.every=1', 'validation.examples=80')
    assert not (tmp_path / 'run').exists()


def test_resume_may_change_when_to_validate_but_not_whether():
    off, on = load_config(TINY).to_dict(), load_config(TINY, ['validation.every=5']).to_dict()
    assert resume_conflicts(on, load_config(TINY, ['validation.every=50']).to_dict()) == []
    assert resume_conflicts(off, on) == ['validation.every'] and resume_conflicts(on, off) == ['validation.every']
    assert resume_conflicts(on, load_config(TINY, ['validation.every=5', HOLDOUT]).to_dict()) == [
        'validation.examples']
    before_validation = {k: v for k, v in off.items() if k != 'validation'}  # config.yaml of an older run
    assert resume_conflicts(before_validation, off) == [] and resume_conflicts(before_validation, on) == [
        'validation.every']


@pytest.mark.slow  # two processes start
def test_two_process_ddp_validates_on_the_main_process(tmp_path):
    env = {**os.environ, 'CUDA_VISIBLE_DEVICES': '', 'ACCELERATE_USE_CPU': 'true', 'OMP_NUM_THREADS': '1'}
    cmd = [sys.executable, '-m', 'accelerate.commands.launch', '--multi_gpu', '--num_processes', '2',
           '--num_machines', '1', '--mixed_precision', 'no', '--dynamo_backend', 'no', str(REPO / 'train.py'),
           '-c', TINY, '--output-dir', str(tmp_path / 'ddp'), '--set', 'cpu_threads=1', '--set', HOLDOUT,
           '--set', 'validation.every=2']
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [s for s, _ in _column(tmp_path / 'ddp', 'mean')] == [2, 4]
    best = json.loads((tmp_path / 'ddp' / 'main' / 'best' / BEST_JSON).read_text())
    assert json.loads((tmp_path / 'ddp' / 'summary.json').read_text())['phases']['main']['best'] == best


def test_test_set_validation_gives_the_learning_curve_and_keeps_no_best(tmp_path):
    # validation.data=test (benchmarks/time_to_accuracy.py): the last row must be the final evaluation itself, so a
    # curve measured on another set (the holdout, the training set) or a step's time counted wrongly is caught.
    cfg = load_config(TINY, ['validation.every=2', 'validation.data=test'])
    data = {n.name: load_task_data(n, cfg) for n in cfg.networks}
    phase = build_phases(cfg, data, torch.device('cpu'))[0]
    for name, (train_set, test_set) in data.items():
        assert phase.data[name][0] is train_set and phase.holdout[name] is test_set  # nothing held out
    run(tmp_path / 'run', 'validation.every=2', 'validation.data=test')
    main = json.loads((tmp_path / 'run' / 'main' / 'summary.json').read_text())
    rows = MetricsLog(tmp_path / 'run' / 'main' / 'validation.csv').rows()
    assert [int(r['step']) for r in rows] == [2, 4]
    for name in ('a', 'b'):
        assert float(rows[-1][f'{name}/own']) == main['own_accuracy'][name]
    times = [float(r['time']) for r in rows]
    assert 0 < times[0] < times[1] <= main['train_seconds']  # same rounding, so no slack is needed
    assert main['best'] is None and not (tmp_path / 'run' / 'main' / 'best').exists()


def test_a_loaded_network_is_not_validated_on_its_own_training_set(tmp_path):
    """Incremental: the loaded network's training set trained it (in the run that made it), so none of it is held
    out; validation scores the trained network's rows, its extractor with every head (the loaded one's too)."""
    first = tmp_path / 'first' / 'main' / 'components'
    run(tmp_path / 'first')
    cfg = load_config(TINY, ['validation.every=2', HOLDOUT, f'interface.load={first / "interface"}',
                             'interface.width=null', f'networks.0.load={first / "a"}'])
    data = {n.name: load_task_data(n, cfg) for n in cfg.networks}
    phase = build_phases(cfg, data, torch.device('cpu'))[0]
    assert list(phase.holdout) == ['b'] and phase.data['a'][0] is data['a'][0]
    values = measure(phase.models, phase.holdout, cfg.eval_batch_size, cfg.eval_bn)
    a, b = phase.models['a'], phase.models['b']
    common = sorted(set(a.head.class_names) & set(b.head.class_names))
    row = recombination_matrix([b, a], [phase.holdout['b']] * 2, cfg.eval_batch_size, cfg.eval_bn, common=common)[0]
    assert values['mean'] == pytest.approx(row.mean().item())
    assert values['recombination'] == pytest.approx(row[1].item())
    assert values['own'] == values['b/own'] and 'a/own' not in values
