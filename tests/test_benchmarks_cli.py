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
