import torch

import timm_compat as tc
from timm_compat.batchnorm import eval_mode


def _bn_state(model):
    return {k: v.clone() for k, v in model.state_dict().items() if 'running' in k or 'num_batches' in k}


def _model():
    return tc.make_compatible('resnet20_cifar', split='layer2', interface=tc.Interface(width=32), num_classes=10)


def test_batch_statistics_leave_running_stats_untouched():
    model = _model()
    before = _bn_state(model)
    x = torch.randn(8, 3, 32, 32) * 2 + 1
    with torch.no_grad(), eval_mode(model, bn='batch'):
        batch_out = model(x)
    after = _bn_state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.training  # mode restored
    with torch.no_grad(), eval_mode(model, bn='running'):
        running_out = model(x)
    assert not torch.allclose(batch_out, running_out)
    # Batch statistics: an example's output depends on the rest of its batch.
    with torch.no_grad(), eval_mode(model, bn='batch'):
        assert not torch.allclose(model(x[:4]), batch_out[:4])


def test_recalibration_changes_running_stats():
    model = _model()
    before = _bn_state(model)
    batches = [torch.randn(8, 3, 32, 32) * 2 + 1 for _ in range(3)]
    tc.recalibrate_bn(model, batches)
    after = _bn_state(model)
    changed = [k for k in before if 'running_mean' in k and not torch.equal(before[k], after[k])]
    assert len(changed) == sum('running_mean' in k for k in before)
    assert model.training


def test_unknown_bn_mode():
    import pytest
    with pytest.raises(ValueError, match='Unknown BN mode'):
        with eval_mode(_model(), bn='adabn'):
            pass
