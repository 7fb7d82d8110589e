"""checkpoint.py's resume of a model that registers one module under two names, as ``head: dcc`` does (the shared
DCC head is ``interface.aux_heads.dcc`` and ``networks.<name>.head``): Accelerate saves one name per tensor."""
import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from torch import nn

from timm_compat.checkpoint import TrainState, resume_train_state, save_checkpoint

pytestmark = pytest.mark.usefixtures('fresh_accelerate')


def shared_head_model(extra_buffer: bool = False) -> nn.Module:
    shared = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    model = nn.Module()
    model.interface, model.head = nn.Sequential(shared), nn.Sequential(shared)
    if extra_buffer:
        model.register_buffer('later', torch.zeros(3))
    return model


def checkpointed(tmp_path, model: nn.Module):
    """The prepared model, its Accelerator and its state as checkpointed at step 2 (BN statistics moved)."""
    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(model)
    model.interface(torch.randn(2, 3, 5, 5))  # train mode: running statistics and num_batches_tracked move
    save_checkpoint(accelerator, tmp_path / 'checkpoints', TrainState(step=2))
    return model, accelerator, {k: v.clone() for k, v in model.state_dict().items()}


def perturb(model: nn.Module) -> None:
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.add_(1)


def test_a_module_registered_under_two_names_resumes(tmp_path):
    model, accelerator, saved = checkpointed(tmp_path, shared_head_model())
    perturb(model)
    state = resume_train_state('main', accelerator, tmp_path, True, 4)
    assert state.step == 2
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())


def test_a_checkpoint_of_another_model_is_refused_before_loading(tmp_path):
    model, accelerator, _ = checkpointed(tmp_path, shared_head_model())
    weights = tmp_path / 'checkpoints' / 'step_00000002' / 'model.safetensors'
    save_file({**load_file(weights), 'stranger.weight': torch.zeros(2)}, weights)  # a key this model lacks
    perturb(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r'unexpected: stranger\.weight.*another model'):
        resume_train_state('main', accelerator, tmp_path, True, 4)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing was loaded


def test_a_key_the_checkpoint_lacks_is_refused_unless_an_alias(tmp_path):
    model, accelerator, _ = checkpointed(tmp_path, shared_head_model(extra_buffer=True))
    weights = tmp_path / 'checkpoints' / 'step_00000002' / 'model.safetensors'
    save_file({k: v for k, v in load_file(weights).items() if k != 'later'}, weights)
    with pytest.raises(ValueError, match=r'missing: later\b'):
        resume_train_state('main', accelerator, tmp_path, True, 4)
