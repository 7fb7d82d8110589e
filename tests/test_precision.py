"""``mixed_precision: auto``: bf16 where the hardware makes it faster (GPUs, AMX CPUs, AMD CPUs with avx512_bf16),
fp32 elsewhere."""
import json
from types import MappingProxyType

import pytest

import train
from timm_compat import _hardware
from timm_compat._hardware import cpu_capabilities, fast_bf16, read_cpuinfo, resolve_precision

from tests.conftest import REPO

TINY = str(REPO / 'tests' / 'tiny.yaml')


XEON = 'Intel(R) Xeon(R) Processor'


def _cpu_with(monkeypatch, amx: bool, name: str = XEON, avx512_bf16: bool = True):
    caps = dict(cpu_capabilities(read_cpuinfo()), amx_bf16=amx, avx512_bf16=avx512_bf16, cpu_name=name)
    monkeypatch.setattr(_hardware, 'cpu_capabilities', lambda cpuinfo: MappingProxyType(caps))


# Measured (docs/models.md): avx512_bf16 alone is slower than fp32 on the Xeon, twice as fast on a Zen 5 EPYC.
@pytest.mark.parametrize('amx, name, avx512_bf16, want', [
    (True, XEON, True, 'bf16'), (False, XEON, True, 'no'), (False, XEON, False, 'no'),
    (False, 'AMD EPYC', True, 'bf16'), (False, 'AMD EPYC 7763 64-Core Processor', False, 'no')])
def test_auto_is_bf16_only_on_cpus_that_multiply_bf16_fast(monkeypatch, amx, name, avx512_bf16, want):
    _cpu_with(monkeypatch, amx, name, avx512_bf16)
    assert fast_bf16('cpu') is (want == 'bf16')
    assert resolve_precision('auto', 'cpu') == want
    for given in (None, 'no', 'bf16', 'fp16'):  # anything else is the user's choice, passed through
        assert resolve_precision(given, 'cpu') == given


@pytest.mark.usefixtures('fresh_accelerate')
@pytest.mark.parametrize('amx, want', [(True, 'bf16'), (False, 'no')])
def test_a_run_with_auto_trains_in_and_records_the_chosen_precision(monkeypatch, tmp_path, amx, want):
    _cpu_with(monkeypatch, amx)
    summary = train.main(['-c', TINY, '--output-dir', str(tmp_path / 'run'), '--set', 'mixed_precision=auto',
                          '--set', 'steps=2'])
    assert summary['mixed_precision'] == want
    assert json.loads((tmp_path / 'run' / 'summary.json').read_text())['mixed_precision'] == want
