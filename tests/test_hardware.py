"""``_hardware.configure_cuda``: fast cuDNN and TF32 settings by default, bit-identical reruns with
``deterministic: true``; a CPU run leaves them alone."""
import os

import pytest
import torch

import train
from timm_compat._hardware import configure_cuda
from tests.conftest import REPO

CUDNN, MATMUL = torch.backends.cudnn, torch.backends.cuda.matmul


@pytest.fixture
def saved_backends(monkeypatch):
    """Puts back every global that configure_cuda sets."""
    monkeypatch.delenv('CUBLAS_WORKSPACE_CONFIG', raising=False)
    saved = (CUDNN.benchmark, CUDNN.deterministic, MATMUL.allow_tf32, CUDNN.allow_tf32,
             torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    yield
    CUDNN.benchmark, CUDNN.deterministic, MATMUL.allow_tf32, CUDNN.allow_tf32 = saved[:4]
    torch.use_deterministic_algorithms(saved[4], warn_only=saved[5])


@pytest.mark.parametrize('deterministic', [False, True])
def test_configure_cuda_is_fast_or_deterministic(saved_backends, deterministic):
    configure_cuda(deterministic)
    fast = not deterministic
    assert (CUDNN.benchmark, MATMUL.allow_tf32, CUDNN.allow_tf32) == (fast, fast, fast)
    assert CUDNN.deterministic is deterministic and torch.are_deterministic_algorithms_enabled() is deterministic
    assert (os.environ.get('CUBLAS_WORKSPACE_CONFIG') == ':4096:8') is deterministic


@pytest.mark.usefixtures('fresh_accelerate')
def test_a_cpu_run_leaves_the_cuda_settings_alone(saved_backends, tmp_path):
    if torch.cuda.is_available():
        pytest.skip('tests/test_cuda.py checks the GPU run')
    before = torch.are_deterministic_algorithms_enabled(), CUDNN.benchmark
    summary = train.main(['-c', str(REPO / 'tests' / 'tiny.yaml'), '--output-dir', str(tmp_path / 'run'),
                          '--set', 'deterministic=true'])
    assert summary['config']['deterministic'] is True
    assert (torch.are_deterministic_algorithms_enabled(), CUDNN.benchmark) == before
