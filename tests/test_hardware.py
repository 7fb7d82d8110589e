"""``_hardware.configure_cuda``: fast cuDNN and TF32 settings by default, bit-identical reruns with
``deterministic: true``; a CPU run leaves them alone. ``sync_batchnorm``: timm's ``--sync-bn``."""
import os
import warnings
from pathlib import Path

import pytest
import torch

import train
import timm
from torch.nn.modules.batchnorm import _BatchNorm

import timm_compat  # noqa: F401  (registers the CIFAR backbones)
from timm_compat._hardware import compile_backend, configure_cuda, cpu_description, sync_batchnorm
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


@pytest.mark.parametrize('backbone', ['resnet8_cifar', 'airbench94_cifar', 'mobilenetv2_100'])
def test_sync_batchnorm_converts_every_bn_and_keeps_weights_flags_and_outputs(backbone):
    torch.manual_seed(0)
    model = timm.create_model(backbone, num_classes=10).train()
    x = torch.randn(4, 3, 32, 32)
    expected = model(x)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    frozen = sorted(k for k, p in model.named_parameters() if not p.requires_grad)
    sync_batchnorm(model, torch.device('cuda'), processes=2)  # converting needs no GPU; training would
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    assert bns and all(type(m).__name__.startswith('SyncBatchNorm') for m in bns)
    assert sorted(k for k, p in model.named_parameters() if not p.requires_grad) == frozen  # airbench's BN weights
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # Outside a process group SyncBatchNorm is plain BN: timm's BatchNormAct2d must keep its activation.
    torch.testing.assert_close(model(x), expected)


def test_sync_batchnorm_is_a_no_op_for_one_process_and_refused_on_cpu():
    model = timm.create_model('resnet8_cifar', num_classes=10)
    sync_batchnorm(model, torch.device('cpu'), processes=1)
    assert not any(type(m).__name__.startswith('Sync') for m in model.modules())
    with pytest.raises(ValueError, match='sync_batchnorm=false'):
        sync_batchnorm(model, torch.device('cpu'), processes=2)
    assert not any(type(m).__name__.startswith('Sync') for m in model.modules())


def test_compile_backend_warns_on_a_torch_where_the_chunked_pass_recompiles(monkeypatch):
    # At the torch floor (2.4.1) a compiled extractor recompiled RP's chunked BN pass at every step.
    monkeypatch.setattr(torch, '__version__', '2.4.1+cu121')
    with pytest.warns(UserWarning, match='recompiled at every step on torch 2.4.1.*compile: false'):
        assert compile_backend('eager') == 'eager'
    monkeypatch.setattr(torch, '__version__', '2.14.1+cpu')
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        assert compile_backend('eager') == 'eager' and compile_backend(False) is None


def test_compile_backend_names_the_backend_or_refuses_an_unknown_one():
    assert compile_backend(False) is None and compile_backend(True) == 'inductor'
    assert compile_backend('eager') == 'eager'
    with pytest.raises(ValueError, match=r"compile='inductr' is not a torch.compile backend.*'inductor'.*false"):
        compile_backend('inductr')


@pytest.mark.usefixtures('fresh_accelerate')  # the refused run has built its Accelerator
def test_an_unknown_compile_backend_is_refused_before_data_is_read_or_the_folder_claimed(tmp_path):
    # The missing dataset would be the error if the data were read first; the typo is the one to report.
    with pytest.raises(ValueError, match="'inductr' is not a torch.compile backend"):
        train.main(['-c', str(REPO / 'tests' / 'tiny.yaml'), '--output-dir', str(tmp_path / 'run'),
                    '--set', 'compile=inductr', '--set', f'networks.0.dataset.source={tmp_path / "missing"}'])
    assert not (tmp_path / 'run').exists()


ZEN1 = 'processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 23\nmodel\t\t: 1\nmodel name\t: AMD EPYC\n'
ZEN5 = 'processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\nmodel\t\t: 2\nmodel name\t: AMD EPYC\n'


def test_the_machine_line_tells_apart_cpus_that_share_a_model_name():
    """Under KVM a Zen 1 and a Zen 5 both say "AMD EPYC"; a fast-budget step is about 10x slower on the first, so a
    result's machine line must tell them apart (the first CPU's entry is read, not the last)."""
    zen1 = cpu_description(ZEN1 + '\n' + ZEN5.replace('26', '25'), {'avx2': True, 'avx': True, 'avx512_f': False})
    zen5 = cpu_description(ZEN5, {'avx2': True, 'avx512_f': True, 'avx512_bf16': True})
    assert zen1 == 'AMD EPYC (family 23 model 1, avx2)'
    assert zen5 == 'AMD EPYC (family 26 model 2, avx512_bf16)'
    assert cpu_description('', {}) == 'unknown CPU (no AVX)'


def test_auto_precision_picks_bf16_only_on_a_gpu_that_has_it_natively(monkeypatch):
    """A T4 or V100 (compute capability 7.x) emulates bf16: torch's default check says yes, and auto picked it."""
    from timm_compat._hardware import resolve_precision
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    for native in (False, True):
        monkeypatch.setattr(torch.cuda, 'is_bf16_supported',
                            lambda including_emulation=True: including_emulation or native)
        assert resolve_precision('auto', 'cuda') == ('bf16' if native else 'no')


@pytest.mark.skipif(not hasattr(torch.cpu, 'get_capabilities') or not Path('/proc/cpuinfo').is_file(),
                    reason='compares torch >= 2.11 with /proc/cpuinfo')
def test_without_torchs_capabilities_cpuinfo_gives_the_same_machine_line_and_precision(monkeypatch):
    """torch before 2.11 has no torch.cpu.get_capabilities: /proc/cpuinfo's flags stand in, under torch's names."""
    from timm_compat._hardware import CPUINFO_FLAGS, cpu_capabilities, fast_bf16, hardware, read_cpuinfo
    torchs = {key: bool(torch.cpu.get_capabilities().get(key)) for key in CPUINFO_FLAGS}
    line, bf16 = hardware(torch.device('cpu')), fast_bf16('cpu')
    monkeypatch.delattr(torch.cpu, 'get_capabilities')
    assert {key: cpu_capabilities(read_cpuinfo())[key] for key in CPUINFO_FLAGS} == torchs
    assert (hardware(torch.device('cpu')), fast_bf16('cpu')) == (line, bf16)

