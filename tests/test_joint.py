"""JointModel: the sum and alternate schedules (issue 12, item 4) and DDP with unused aux heads (item 10)."""
import copy
import functools
import json
import os
import socket
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

import timm_compat as tc
from timm_compat.methods import methods_for
from timm_compat.joint import JointModel

CLASSES = {'a': ['cat', 'dog', 'emu'], 'b': ['dog', 'cat', 'yak']}
COMMON = ['cat', 'dog']


def _joint(schedule='sum', rp_weight=1.0, dcc_weight=1.0, freeze=False, dcc_as_head=False):
    """A fresh joint model of two resnet8_cifar networks, copied from a cached one (splitting takes seconds)."""
    return copy.deepcopy(_prototype(schedule, rp_weight, dcc_weight, freeze, dcc_as_head)).train()


@functools.lru_cache(maxsize=None)
def _prototype(schedule, rp_weight, dcc_weight, freeze, dcc_as_head):
    torch.manual_seed(0)
    interface = tc.Interface(width=16, rp=True, dcc_classes=COMMON)
    if freeze:
        interface.freeze()
    classes = {name: COMMON if dcc_as_head else names for name, names in CLASSES.items()}
    networks = {name: tc.make_compatible('resnet8_cifar', split='layer1', interface=interface, num_classes=len(names),
                                         class_names=names, init_seed=0, head=interface.dcc if dcc_as_head else 'tail')
                for name, names in classes.items()}
    return JointModel(networks, interface, methods_for(interface, rp_weight, dcc_weight), schedule=schedule)


def _batch(seed, n=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 16, 16, generator=g), torch.randint(0, 2, (n,), generator=g)


def _batches(joint, step):
    return {name: _batch(100 * step + i) for i, name in enumerate(joint.networks_at(step))}


def _params(module):
    return [p.detach().clone() for p in module.parameters()]


def _train(model, joint, optimizer, steps):
    """What train.py does per step; ``model`` is ``joint`` or its DDP wrapper."""
    for step in range(steps):
        model(_batches(joint, step))['loss'].backward()
        joint.drop_inactive_grads(step)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def _sgd(joint):
    return torch.optim.SGD([p for p in joint.parameters() if p.requires_grad], lr=0.1, momentum=0.9,
                           weight_decay=5e-4)


def test_networks_at():
    assert _joint('sum').networks_at(5) == ['a', 'b']
    alternate = _joint('alternate')
    assert [alternate.networks_at(step) for step in range(4)] == [['a'], ['b'], ['a'], ['b']]
    with pytest.raises(ValueError, match='schedule'):
        JointModel(dict(alternate.networks), alternate.interface, alternate.methods, schedule='round_robin')


def test_alternate_step_is_one_networks_compatibility_loss():
    joint = _joint('alternate')
    reference = copy.deepcopy(joint)
    images, labels = _batch(1)
    losses = joint({'b': (images, labels)})
    expected = tc.compatibility_loss(reference.networks['b'], images, labels, reference.methods)
    assert set(losses) == {'b/task', 'b/rp', 'b/dcc', 'loss'}
    assert torch.allclose(losses['loss'], expected['loss'], atol=1e-6)
    assert torch.allclose(losses['b/rp'], expected['rp'], atol=1e-6)


def test_batches_must_match_the_schedule():
    batch = _batch(0)
    with pytest.raises(ValueError, match='one network a step'):
        _joint('alternate')({'a': batch, 'b': batch})
    with pytest.raises(ValueError, match="all of \\['a', 'b'\\]"):
        _joint('sum')({'a': batch})
    with pytest.raises(ValueError, match='not networks here'):
        _joint('alternate')({'c': batch})
    with pytest.raises(TypeError, match='name: \\(images, labels\\)'):
        _joint('sum')([batch, batch])


def test_alternate_leaves_the_resting_network_unchanged():
    joint = _joint('alternate')
    optimizer = _sgd(joint)
    _train(joint, joint, optimizer, 1)  # step 0 trains a and gives it momentum
    a, b = _params(joint.networks['a']), _params(joint.networks['b'])
    joint({'b': _batch(7)})['loss'].backward()
    assert all(p.grad is not None and not p.grad.any() for p in joint.networks['a'].parameters())
    joint.drop_inactive_grads(1)
    optimizer.step()
    assert all(torch.equal(x, y) for x, y in zip(a, _params(joint.networks['a'])))  # no momentum, no decay
    assert not all(torch.equal(x, y) for x, y in zip(b, _params(joint.networks['b'])))


def test_drop_inactive_grads_keeps_a_head_shared_with_the_active_network():
    joint = _joint('alternate', dcc_as_head=True)
    joint({'a': _batch(3)})['loss'].backward()
    joint.drop_inactive_grads(0)
    assert all(p.grad is not None and p.grad.any() for p in joint.interface.dcc.parameters())


def test_a_dcc_head_no_method_trains_rests_with_its_network():
    # a's head is the interface's DCC head, b's its own, dcc_weight 0: on b's step nothing trains the DCC head.
    torch.manual_seed(0)
    interface = tc.Interface(width=16, rp=True, dcc_classes=COMMON)
    heads = {'a': (COMMON, interface.dcc), 'b': (CLASSES['b'], 'tail')}
    networks = {name: tc.make_compatible('resnet8_cifar', split='layer1', interface=interface, init_seed=0,
                                         num_classes=len(names), class_names=names, head=head)
                for name, (names, head) in heads.items()}
    joint = JointModel(networks, interface, methods_for(interface, 1.0, 0.0), schedule='alternate').train()
    optimizer = _sgd(joint)
    _train(joint, joint, optimizer, 1)  # step 0 trains a, and gives its head momentum
    head = _params(interface.dcc)
    joint({'b': _batch(7)})['loss'].backward()
    joint.drop_inactive_grads(1)
    optimizer.step()
    assert all(torch.equal(x, y) for x, y in zip(head, _params(interface.dcc)))  # no momentum, no decay


def test_aux_heads_no_method_trains_get_no_gradient():
    joint = _joint(rp_weight=0)
    assert not any(p.requires_grad for p in joint.interface.rp.parameters())
    assert all(p.requires_grad for p in joint.interface.dcc.parameters())
    joint = _joint(dcc_weight=0, dcc_as_head=True)  # the DCC head is the networks' own head: it keeps training
    assert all(p.requires_grad for p in joint.interface.dcc.parameters())


# DDP: two processes on the CPU with gloo. Both ranks train on the same batches, so the averaged gradients are those
# of one process and the DDP run must match a plain run of the same steps.

def _ddp_alternate(steps=4):
    joint = _joint('alternate')
    reference = copy.deepcopy(joint)
    ddp = DistributedDataParallel(joint)
    _train(ddp, joint, _sgd(joint), steps)
    _train(reference, reference, _sgd(reference), steps)
    return max((x - y).abs().max().item() for x, y in zip(_params(joint), _params(reference)))


def _ddp_steps(steps=2, **kwargs):
    joint = _joint(**kwargs)
    _train(DistributedDataParallel(joint), joint, _sgd(joint), steps)
    return 'ok'


SCENARIOS = {
    'alternate': _ddp_alternate,
    'rp_weight_0': lambda: _ddp_steps(rp_weight=0),
    'frozen_interface': lambda: _ddp_steps(freeze=True),
    'alternate_rp_weight_0': lambda: _ddp_steps(schedule='alternate', rp_weight=0),
}


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group('gloo', rank=rank, world_size=world, timeout=timedelta(seconds=60))
    results = {}
    for name, scenario in SCENARIOS.items():
        try:
            results[name] = scenario()
        except Exception as e:  # recorded, so that one failing scenario does not hide the others
            results[name] = f'{type(e).__name__}: {str(e)[:300]}'
    dist.destroy_process_group()
    with open(os.path.join(out, f'rank{rank}.json'), 'w') as f:
        json.dump(results, f)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.fixture(scope='module')
def ddp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp('ddp')
    context = mp.start_processes(_ddp_worker, args=(2, _free_port(), str(out)), nprocs=2, join=False,
                                 start_method='spawn')
    deadline = time.monotonic() + 600
    while not context.join(timeout=5):
        if time.monotonic() > deadline:  # a collective that never completes would otherwise hang the suite
            for process in context.processes:
                process.kill()
            pytest.fail('The DDP workers did not finish within 600 s.')
    return [json.loads((out / f'rank{rank}.json').read_text()) for rank in range(2)]


@pytest.mark.slow
@pytest.mark.parametrize('scenario', [name for name in SCENARIOS if name != 'alternate'])
def test_ddp_trains_with_unused_heads_and_resting_networks(ddp_results, scenario):
    assert [r[scenario] for r in ddp_results] == ['ok', 'ok']


@pytest.mark.slow
def test_ddp_alternate_matches_a_single_process(ddp_results):
    for result in ddp_results:
        assert isinstance(result['alternate'], float), result['alternate']
        assert result['alternate'] < 1e-5


def test_compatibility_task_is_a_timm_training_task_a_timm_loop_can_drive(tmp_path):
    from timm.task import TrainingTask
    from timm_compat.joint import CompatibilityTask
    task, plain = _joint(), _joint()
    assert isinstance(task, TrainingTask) and CompatibilityTask is JointModel
    batches = {name: (torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 0, 1])) for name in CLASSES}
    dist.init_process_group('gloo', init_method=f'file://{tmp_path / "pg"}', rank=0, world_size=1)
    try:
        assert task.prepare_distributed() is task
        out = task(batches)  # through DDP now
        out['loss'].backward()
    finally:
        dist.destroy_process_group()
    expected = plain(batches)
    expected['loss'].backward()
    assert set(out) == set(expected) and torch.equal(out['loss'], expected['loss'])
    for (name, p), q in zip(task.named_parameters(), plain.parameters()):
        assert (p.grad is None) == (q.grad is None) and (p.grad is None or torch.allclose(p.grad, q.grad)), name
    assert set(task.state_dict()) == set(plain.state_dict())  # DDP stays outside the module tree
