import importlib
import os
import sys
import time
from pathlib import Path

import pytest
import torch

torch.set_num_threads(2)

REPO = Path(__file__).resolve().parents[1]


def pytest_runtest_setup(item):
    """.ci/run's time budget: past ``TIMM_COMPAT_TEST_DEADLINE`` (seconds since the epoch) a test is skipped, saying
    so, rather than the whole run killed with its failures unreported. CI sets it for the slow suite only, which it
    runs "if the time allows" on whatever machine it gets (a 2-core Zen 1 runs it several times slower than a Zen 5)."""
    deadline = os.environ.get('TIMM_COMPAT_TEST_DEADLINE')
    if deadline and time.time() > float(deadline):
        pytest.skip('out of CI time: TIMM_COMPAT_TEST_DEADLINE has passed (see .ci/run)')


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _decode_cache(tmp_path_factory, monkeypatch):
    """Decoded-image caches of tests stay in a temporary folder, never in the user's ~/.cache."""
    monkeypatch.setenv('TIMM_COMPAT_CACHE', str(tmp_path_factory.mktemp('timm_compat_cache')))



@pytest.fixture
def fresh_accelerate():
    """Each in-process run builds its own Accelerator; accelerate keeps global state between them."""
    from accelerate.state import AcceleratorState, GradientState, PartialState
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


@pytest.fixture
def import_script(monkeypatch):
    """``import_script('recipes', 'sec4_methods')``: a script of recipes/ or benchmarks/ imported as it runs there.

    Both folders have their own ``common.py``: the script and its ``common`` are imported fresh and dropped from
    ``sys.modules`` afterwards, so that a test importing one folder's scripts never hands another test the other's.
    """
    loaded = []

    def _import(folder: str, name: str):
        monkeypatch.syspath_prepend(str(REPO / folder))
        for module in ('common', name):
            monkeypatch.delitem(sys.modules, module, raising=False)
            loaded.append(module)
        return importlib.import_module(name)

    yield _import
    for module in loaded:  # before monkeypatch puts back what was there
        sys.modules.pop(module, None)


def crash_after_logging(monkeypatch, step: int) -> None:
    """Make a train.py run die right after it logs ``step`` (its metrics row written), as a kill would."""
    from timm_compat import engine
    real_log = engine.TrainLoop.log

    def log_then_crash(self, at, means):
        real_log(self, at, means)
        if at == step:
            raise KeyboardInterrupt(f'simulated kill after logging step {step}')

    monkeypatch.setattr(engine.TrainLoop, 'log', log_then_crash)
