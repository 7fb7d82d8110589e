"""One line naming the machine a result was measured on, for recipe reports and benchmark output."""
import os
import warnings
from typing import Optional, Union

import timm
import torch
from timm.layers import convert_sync_batchnorm
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ._cpu import keep_freed_memory
from .models.airbench_groups import freeze_weight

__all__ = ['hardware', 'cpu_description', 'cpu_cores', 'local_processes', 'fast_bf16', 'resolve_precision', 'configure_device', 'configure_cuda',
           'check_launch', 'compile_backend', 'check_sync_batchnorm', 'sync_batchnorm']


def cpu_cores() -> int:
    """The cores this process may run on (its affinity mask where the OS has one, else every core)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()


def local_processes(processes: int) -> int:
    """The processes of a run of ``processes`` that share this machine's cores and memory: ``LOCAL_WORLD_SIZE`` as
    ``accelerate launch`` (torchrun) sets it, so that a multi-node run does not divide one machine by all of them."""
    return int(os.environ.get('LOCAL_WORLD_SIZE', processes))


# The widest vector / matrix extension is named: it decides CPU training speed and whether bf16 pays (fast_bf16).
SIMD_LEVELS = ('amx_bf16', 'avx512_bf16', 'avx512_f', 'avx2', 'avx', 'sve2', 'sve', 'neon')


# /proc/cpuinfo's flag for each capability torch.cpu.get_capabilities() names (torch >= 2.11; arm64 says asimd).
CPUINFO_FLAGS = {'amx_bf16': 'amx_bf16', 'avx512_bf16': 'avx512_bf16', 'avx512_f': 'avx512f', 'avx2': 'avx2',
                 'avx': 'avx', 'sve2': 'sve2', 'sve': 'sve', 'neon': 'asimd'}


def cpu_capabilities(cpuinfo: str) -> dict:
    """``torch.cpu.get_capabilities()`` where torch has it (2.11 on), else the same keys read from ``/proc/cpuinfo``'s
    flags (its ``cpuinfo`` text) and model name: enough for :func:`cpu_description` and :func:`fast_bf16`."""
    if hasattr(torch.cpu, 'get_capabilities'):
        return torch.cpu.get_capabilities()
    fields = cpuinfo_fields(cpuinfo)
    flags = set((fields.get('flags') or fields.get('Features') or '').split())
    return {'cpu_name': fields.get('model name', fields.get('vendor_id', '')),
            **{key: flag in flags for key, flag in CPUINFO_FLAGS.items()}}


def cpuinfo_fields(cpuinfo: str) -> dict:
    """``/proc/cpuinfo``'s ``key: value`` lines as a dict, the first processor's value of each key."""
    fields = {}
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(':')
        fields.setdefault(key.strip(), value.strip())
    return fields


def read_cpuinfo() -> str:
    """``/proc/cpuinfo``'s text, empty where there is none (macOS, Windows)."""
    try:
        with open('/proc/cpuinfo') as f:
            return f.read()
    except OSError:
        return ''


def cpu_description(cpuinfo: str, capabilities: dict) -> str:
    """The CPU's model name, family/model numbers and widest SIMD extension, from ``/proc/cpuinfo``'s text and
    ``cpu_capabilities``. A model name alone can hide a 5x speed difference: a Zen 1 with AVX2 and a
    Zen 5 with avx512_bf16 both call themselves "AMD EPYC" under KVM."""
    fields = cpuinfo_fields(cpuinfo)
    simd = next((level for level in SIMD_LEVELS if capabilities.get(level)), 'no AVX')
    family = f'family {fields["cpu family"]} model {fields["model"]}, ' if 'cpu family' in fields else ''
    return f'{fields.get("model name", "unknown CPU")} ({family}{simd})'


def hardware(device: Optional[torch.device] = None) -> str:
    """The device (the GPU's name on CUDA), the CPU (:func:`cpu_description`) and cores, torch threads and the torch
    and timm versions.

    Args:
        device: The device that ran; default: the first GPU if there is one, else the CPU.
    """
    if device is None:
        device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    cpuinfo = read_cpuinfo()
    name = cpu_description(cpuinfo, cpu_capabilities(cpuinfo))
    gpu = f'{torch.cuda.get_device_name(device)}; ' if device.type == 'cuda' else ''
    return (f'device {device.type}: {gpu}{name} x {cpu_cores()} cores, {torch.get_num_threads()} torch threads; '
            f'torch {torch.__version__}, timm {timm.__version__}')


def fast_bf16(device_type: str) -> bool:
    """Whether bf16 autocast is expected to train faster than fp32 on this machine's ``device_type``.

    On CUDA where the GPU has bf16 natively (compute capability 8.0 on). On CPU with AMX tiles (``amx_bf16``), or on an AMD CPU with ``avx512_bf16``
    (measured on Zen 5; Zen 4 has the same instruction, not measured). Not on an Intel CPU with ``avx512_bf16``
    alone, where a bf16 step of the fast family's larger members took 1.15-1.29x the fp32 one, while on a Zen 5
    EPYC it took 0.50-0.56x (``benchmarks/fast_family_precision.py``, docs/models.md).
    """
    if device_type == 'cuda':
        # Natively only: compute capability 7.x (T4, V100) emulates bf16, far slower than fp16 or fp32.
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device_type == 'cpu':
        caps = cpu_capabilities(read_cpuinfo())
        amd = 'AMD' in str(caps.get('cpu_name', ''))
        return bool(caps.get('amx_bf16', False) or (amd and caps.get('avx512_bf16', False)))
    return False


def resolve_precision(mixed_precision: Optional[str], device_type: str) -> Optional[str]:
    """``mixed_precision`` as Accelerate takes it: ``'auto'`` becomes ``'bf16'`` where :func:`fast_bf16`, else
    ``'no'``; other values (None: what ``accelerate launch`` says) are passed through."""
    if mixed_precision != 'auto':
        return mixed_precision
    return 'bf16' if fast_bf16(device_type) else 'no'


def configure_device(device: torch.device, deterministic: bool, processes: int, cpu_threads: Optional[int]) -> None:
    """Backend settings of one of ``processes`` processes running on ``device``: :func:`configure_cuda` on CUDA; on
    CPU ``cpu_threads`` threads (default: this process's share of this machine's cores, since ``accelerate launch`` leaves
    OMP_NUM_THREADS=1 unless told otherwise) and glibc told to keep freed activation memory."""
    if device.type == 'cuda':
        configure_cuda(deterministic)
    elif device.type == 'cpu':
        torch.set_num_threads(cpu_threads or max(1, cpu_cores() // local_processes(processes)))
        keep_freed_memory()


def configure_cuda(deterministic: bool) -> None:
    """cuDNN and matmul settings of a CUDA run.

    Fast by default, as timm's train.py runs: cuDNN autotuning (the inputs have one fixed size) and TF32 in matmuls
    and convolutions. ``deterministic`` trades both for reruns that repeat bit for bit: deterministic algorithms
    (an op without one warns), no autotuning, full fp32, and the cuBLAS workspace setting PyTorch asks for, set
    before the first cuBLAS call.
    """
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cuda.matmul.allow_tf32 = not deterministic
    torch.backends.cudnn.allow_tf32 = not deterministic
    if deterministic:
        os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')
    torch.use_deterministic_algorithms(deterministic, warn_only=True)


def check_launch(device: torch.device, processes: int) -> None:
    """Refuse processes that were launched together but each train alone (``--multi_gpu`` on a machine without
    GPUs): they would race for one output folder, and their results would not be one run's.

    Args:
        device: The device Accelerate gave this process.
        processes: The processes Accelerate counts in this run.

    Raises:
        ValueError: Saying how to launch a multi-process run on CPU.
    """
    launched = int(os.environ.get('WORLD_SIZE', '1'))
    if launched > 1 and processes == 1:
        raise ValueError(f'{launched} processes were launched, but each runs alone on {device} '
                         f'(accelerate launch --multi_gpu without usable GPUs). For a multi-process run on CPU, '
                         f'set ACCELERATE_USE_CPU=true: ACCELERATE_USE_CPU=true accelerate launch --multi_gpu '
                         f'--num_processes {launched} train.py ... (accelerate\'s --cpu flag launches one process).')


# The torch on which tests/test_rp_norm.py shows a compiled extractor compiles RP's chunked pass once.
COMPILE_TESTED_TORCH = '2.14'


def compile_backend(compile: Union[bool, str]) -> Optional[str]:
    """The ``torch.compile`` backend the config key ``compile`` names: None for false, inductor for true.

    Raises:
        ValueError: For a name torch does not know, with the names it does; checked when the run starts, not at
            its first compiled step.
    """
    if compile is False:
        return None
    if torch.torch_version.TorchVersion(torch.__version__) < COMPILE_TESTED_TORCH:
        warnings.warn(f'compile with torch {torch.__version__}: RP\'s chunked BatchNorm pass (rp_norm separate or '
                      f'per_rotation, rp_rotations one) compiles once on torch {COMPILE_TESTED_TORCH}, but was '
                      f'recompiled at every step on torch 2.4.1 (versions between not measured), which makes the run '
                      f'slower, not wrong. Upgrade torch, or set compile: false.', stacklevel=2)
    backend = 'inductor' if compile is True else compile
    from torch._dynamo import list_backends  # dynamo is slow to import: only for runs that compile
    if backend not in list_backends(exclude_tags=()):
        raise ValueError(f'compile={backend!r} is not a torch.compile backend; this torch has {list_backends()}: '
                         f'set compile=true (inductor), one of these, or false.')
    return backend


def check_sync_batchnorm(device: torch.device, processes: int) -> None:
    """Refuse ``sync_batchnorm`` where torch's ``SyncBatchNorm`` cannot run: several processes off CUDA.

    Raises:
        ValueError: Naming the device and the fix.
    """
    if processes > 1 and device.type != 'cuda':
        raise ValueError(f'sync_batchnorm runs on CUDA only (torch.nn.SyncBatchNorm), this run has {processes} '
                         f'processes on {device.type}: set sync_batchnorm=false, or train on GPUs.')


def sync_batchnorm(module: nn.Module, device: torch.device, processes: int) -> None:
    """timm's ``--sync-bn``: every BN layer of ``module`` (timm's ``BatchNormAct2d`` too), converted in place,
    normalises with the statistics of the global batch, not of its process's ``batch_size`` examples. A no-op for
    one process.

    Raises:
        ValueError: From :func:`check_sync_batchnorm`.
    """
    check_sync_batchnorm(device, processes)
    if processes == 1:
        return
    # timm's converter takes BN weights for parameters; airbench's frozen ones are buffers (freeze_weight).
    frozen = {name for name, m in module.named_modules() if isinstance(m, _BatchNorm) and 'weight' in m._buffers}
    for name in frozen:
        bn = module.get_submodule(name)
        bn.weight = nn.Parameter(bn._buffers.pop('weight'), requires_grad=False)
    convert_sync_batchnorm(module)
    for name in frozen:
        freeze_weight(module.get_submodule(name))
