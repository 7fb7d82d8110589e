from pathlib import Path

import pytest
import torch

torch.set_num_threads(2)

REPO = Path(__file__).resolve().parents[1]


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
