import pytest
import torch

import timm_compat as tc
from timm_compat.batchnorm import eval_mode, set_batch_statistics


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


def test_unknown_bn_mode():
    import pytest
    with pytest.raises(ValueError, match='Unknown BN mode'):
        with eval_mode(_model(), bn='adabn'):
            pass


def test_recalibration_is_the_cumulative_average_of_batch_statistics():
    """AdaBN: every batch weighs the same (momentum=None), starting from reset statistics; num_batches is honoured."""
    bn = torch.nn.BatchNorm2d(2, momentum=0.3)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 2, 1), bn)
    bn.running_mean.fill_(5.0)  # stale statistics and count that must not leak into the result
    bn.num_batches_tracked.fill_(7)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(n, 2, 3, 3, generator=g) * (i + 1) + 3 * i for i, n in enumerate((4, 6, 8))]
    with torch.no_grad():
        conv = [model[0](x) for x in batches[:2]]
    tc.recalibrate_bn(model, iter(batches), num_batches=2)
    mean = torch.stack([f.mean((0, 2, 3)) for f in conv]).mean(0)
    var = torch.stack([f.var((0, 2, 3), unbiased=True) for f in conv]).mean(0)
    assert torch.allclose(bn.running_mean, mean, rtol=1e-6, atol=1e-7)
    assert torch.allclose(bn.running_var, var, rtol=1e-6, atol=1e-7)
    assert bn.num_batches_tracked.item() == 2 and bn.momentum == 0.3 and model.training


def _stale():
    bn = torch.nn.BatchNorm2d(2)
    bn.running_mean.fill_(5.0)
    bn.running_var.fill_(3.0)
    bn.num_batches_tracked.fill_(7)
    return torch.nn.Sequential(torch.nn.Conv2d(2, 2, 1), bn), bn


def _failing(batches):
    yield from batches
    raise RuntimeError('the loader broke')


def test_failed_recalibration_keeps_the_running_statistics():
    """No batches, or a loader that breaks midway: the statistics of before are kept, not left reset or partial."""
    import pytest
    model, bn = _stale()
    before = _bn_state(model)
    with pytest.raises(ValueError, match='no batches'):
        tc.recalibrate_bn(model, [])
    with pytest.raises(RuntimeError, match='the loader broke'):
        tc.recalibrate_bn(model, _failing([torch.randn(4, 2, 3, 3)]))
    assert all(torch.equal(before[k], v) for k, v in _bn_state(model).items()) and bn.momentum == 0.1


def test_recalibration_refuses_no_batches_also_without_a_bn_layer():
    """A module with nothing to recalibrate returned early, before the empty data was noticed."""
    for model in (torch.nn.Conv2d(2, 2, 1), torch.nn.BatchNorm2d(2, track_running_stats=False)):
        with pytest.raises(ValueError, match='no batches'):
            tc.recalibrate_bn(model, iter([]))
        assert tc.recalibrate_bn(model, [torch.randn(4, 2, 3, 3)]) is model


def test_recalibration_of_a_model_left_in_batch_statistics():
    """Layers whose running statistics are switched off (set_batch_statistics) are recalibrated, and stay off."""
    model, bn = _stale()
    set_batch_statistics(model)
    x = torch.randn(6, 2, 3, 3)
    tc.recalibrate_bn(model, [x])
    with torch.no_grad():
        assert torch.allclose(bn.running_mean, model[0](x).mean((0, 2, 3)), atol=1e-6)
    assert bn.num_batches_tracked.item() == 1 and not bn.track_running_stats


def test_batch_statistics_never_sync_across_processes(tmp_path):
    """SyncBatchNorm (and timm's SyncBatchNormAct) under eval_mode('batch'): each process's test batch is normalised
    with its own statistics, as in a single-process pass; syncing would mix the ranks' different test batches (and
    hang when their batch counts differ). Gloo stands in: the sync path refuses CPU tensors before it syncs."""
    import torch.distributed as dist
    from timm.layers import BatchNormAct2d, convert_sync_batchnorm
    model = convert_sync_batchnorm(torch.nn.Sequential(torch.nn.Conv2d(2, 3, 1), torch.nn.BatchNorm2d(3),
                                                       BatchNormAct2d(3, act_layer=torch.nn.ReLU)))
    plain = torch.nn.Sequential(model[0], torch.nn.BatchNorm2d(3), BatchNormAct2d(3, act_layer=torch.nn.ReLU))
    plain.load_state_dict(model.state_dict())
    before, x = _bn_state(model), torch.randn(5, 2, 4, 4)
    dist.init_process_group('gloo', init_method=f'file://{tmp_path / "pg"}', rank=0, world_size=1)
    try:
        with torch.no_grad(), eval_mode(model, bn='batch'):
            out = model(x)
    finally:
        dist.destroy_process_group()
    with torch.no_grad(), eval_mode(plain, bn='batch'):
        assert torch.allclose(out, plain(x)) and (out == 0).any()  # the activation ran
    assert isinstance(model[1], torch.nn.SyncBatchNorm) and model.training
    assert _bn_state(model).keys() == before.keys() and all(torch.equal(before[k], v) for k, v in _bn_state(model).items())


@pytest.mark.parametrize('num_batches', [0, -1])
def test_recalibration_refuses_fewer_than_one_batch(num_batches):
    model, bn = _stale()
    before = _bn_state(model)
    with pytest.raises(ValueError, match=f'num_batches={num_batches}.*at least 1'):
        tc.recalibrate_bn(model, [torch.randn(4, 2, 3, 3)], num_batches=num_batches)
    assert all(torch.equal(before[k], v) for k, v in _bn_state(model).items())
