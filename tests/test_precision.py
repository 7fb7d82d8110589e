"""``mixed_precision: auto``: bf16 where the hardware makes it faster (GPUs, AMX CPUs), fp32 elsewhere."""
import json
from types import MappingProxyType

import pytest
import torch

import train
from timm_compat._hardware import fast_bf16, resolve_precision

from tests.conftest import REPO

TINY = str(REPO / 'tests' / 'tiny.yaml')


def _cpu_with(monkeypatch, amx: bool):
    caps = dict(torch.cpu.get_capabilities(), amx_bf16=amx, avx512_bf16=True)
    monkeypatch.setattr(torch.cpu, 'get_capabilities', lambda: MappingProxyType(caps))


@pytest.mark.parametrize('amx, want', [(True, 'bf16'), (False, 'no')])
def test_auto_is_bf16_only_on_cpus_with_amx(monkeypatch, amx, want):
    _cpu_with(monkeypatch, amx)  # avx512_bf16 alone is slower than fp32 for the fast family (docs/models.md)
    assert fast_bf16('cpu') is amx
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
