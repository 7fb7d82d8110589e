"""Small benchmark scripts (benchmarks/): their argument checks and summary statistics, on tiny inputs; nothing
here times or trains anything for real."""
import types

import pytest
import torch


def test_fast_family_precision_reports_the_true_median_of_an_even_number_of_blocks(import_script, monkeypatch):
    # Catches the upper middle (sorted(v)[len(v) // 2]) reported as the median: with two blocks of 1 s and 2 s the
    # median is 1.5 s, not 2 s.
    bench = import_script('benchmarks', 'fast_family_precision')
    repeats = 2
    ticks = iter([t for r in range(repeats) for _ in bench.MODES for t in (0.0, float(r + 1))])
    monkeypatch.setattr(bench, 'time', types.SimpleNamespace(perf_counter=lambda: next(ticks)))
    tiny = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                               torch.nn.Linear(2, 10))
    monkeypatch.setattr(bench.timm, 'create_model', lambda name, num_classes: tiny)
    assert bench.measure('tiny', batch_size=2, steps=1, repeats=repeats) == {k: 1.5 for k, _, _ in bench.MODES}


@pytest.mark.skipif(torch.cuda.is_available(), reason='with a GPU there is nothing to refuse')
def test_applications_precision_refuses_cuda_without_a_gpu_before_anything_runs(import_script, monkeypatch):
    # docs/performance.md gives the --device cuda command: on a CPU-only machine it crashed in hardware() with
    # torch's raw "Found no NVIDIA driver" RuntimeError.
    bench = import_script('benchmarks', 'applications_precision')
    monkeypatch.setattr(bench, 'application', lambda *a: pytest.fail('built the application before refusing'))
    with pytest.raises(SystemExit, match=r'--device cuda: no CUDA device is visible.*--device cpu'):
        bench.main(['--device', 'cuda'])


def test_eval_order_refuses_a_training_batch_larger_than_the_training_set_before_training(import_script,
                                                                                         monkeypatch, capsys):
    # The training batch was hard-coded to 64: --per-class 6 (60 images) crashed in EpochSampler with "lower the
    # batch size", a size no flag could set.
    bench = import_script('benchmarks', 'eval_order')
    monkeypatch.setattr(bench, 'train', lambda *a, **k: pytest.fail('trained before refusing'))
    with pytest.raises(SystemExit) as exit_:
        bench.main(['--per-class', '6'])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and '--train-batch-size 64' in err and '60 training images' in err


def test_eval_order_trains_with_the_training_batch_it_is_given(import_script, monkeypatch, capsys):
    bench = import_script('benchmarks', 'eval_order')
    sizes = []
    sampler = bench.EpochSampler
    monkeypatch.setattr(bench, 'EpochSampler', lambda n, batch_size, **k: sizes.append(batch_size) or sampler(
        n, batch_size, **k))
    bench.main(['--per-class', '2', '--train-batch-size', '8', '--steps', '1', '--batch-size', '5'])
    assert sizes == [8] and '| sorted by class |' in capsys.readouterr().out


def test_split_sweep_refuses_an_unknown_family_before_sweeping(import_script, monkeypatch, capsys):
    # An unknown --families name was swept, counted as a family error ("min() arg is an empty sequence") and the
    # sweep exited 0.
    bench = import_script('benchmarks', 'split_sweep')
    monkeypatch.setattr(bench, 'sweep_family', lambda *a: pytest.fail('swept before refusing'))
    monkeypatch.setattr('sys.argv', ['split_sweep.py', '--families', 'resnet', 'squeezenet'])
    with pytest.raises(SystemExit) as exit_:
        bench.main()
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and 'no timm module named squeezenet;' in err and 'timm.list_modules()' in err


def test_split_sweep_family_time_limit_is_a_flag(import_script, monkeypatch, capsys):
    # The per-family limit was a fixed 120 s: on a loaded machine no family finished within it and nothing could
    # raise it.
    bench = import_script('benchmarks', 'split_sweep')
    alarms = []
    monkeypatch.setattr(bench.signal, 'alarm', alarms.append)
    monkeypatch.setattr(bench, 'sweep_family', lambda *a: 'swept')
    bench.main(['--families', 'resnet', '--family-seconds', '900'])
    assert alarms == [900, 0] and 'swept' in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        bench.main(['--families', 'resnet', '--family-seconds', '0'])
    assert exit_.value.code == 2 and '--family-seconds' in capsys.readouterr().err


def test_train_step_refuses_a_breakdown_it_would_not_run(import_script, capsys):
    # --breakdown times the four-rotation step of rp_norm shared only; since the default became 'separate' the
    # documented --breakdown commands printed no breakdown and no word about it.
    bench = import_script('benchmarks', 'train_step')
    with pytest.raises(SystemExit):
        bench.parse_args(['--breakdown'])
    assert '--rp-norm shared --rp-rotations all, or drop --breakdown' in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.parse_args(['--breakdown', '--rp-norm', 'shared', '--rp-rotations', 'one'])
    assert bench.parse_args(['--breakdown', '--rp-norm', 'shared']).breakdown
