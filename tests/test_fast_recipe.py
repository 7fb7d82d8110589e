"""The fast recipe's optimisation keys (issue 16, item 2): label smoothing, airbench's batch-size independent lr and
weight decay, norm biases at a multiple of the lr, its triangular schedule, timm's lookahead."""
import copy
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from timm.optim import Lookahead
from torch import nn

import timm_compat as tc
from timm_compat.config import ConfigError, OptimConfig, load_config
from timm_compat.fit import ClassificationTask
from timm_compat.joint import JointModel
from timm_compat.methods import compatibility_loss, methods_for
from timm_compat.optim import make_optimizer, make_scheduler, param_groups

RECIPE = Path(__file__).resolve().parents[1] / 'configs' / 'fast' / 'recipe.yaml'
AIRBENCH = dict(lr=11.5, momentum=0.85, weight_decay=0.0153, lr_reference_batch=1024, norm_bias_lr_scale=64.0)


def _net():
    """Conv, BN with a frozen weight (as airbench's), a linear layer with a bias that is not a norm's."""
    net = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(4, 3))
    net[1].weight.requires_grad_(False)
    return net


def _optim(model, o, examples, schedule='constant', total=10, **schedule_args):
    optimizer = make_optimizer(param_groups(model, o, examples), o.optimizer, o.lr, o.momentum, o.weight_decay,
                               **o.optimizer_args)
    return optimizer, make_scheduler(optimizer, schedule, total, o.warmup_steps, warmup_fraction=o.warmup_fraction,
                                     **schedule_args)


def test_label_smoothing_is_torchs_on_the_task_loss_only():
    interface = tc.Interface(width=16, rp=True, dcc_classes=['cat', 'dog'])
    model = tc.make_compatible('resnet8_cifar', split='layer1', interface=interface, num_classes=3,
                               class_names=['cat', 'dog', 'emu']).eval()  # BN per image: one pass or two agree
    images, labels = torch.randn(6, 3, 16, 16), torch.tensor([0, 1, 2, 0, 1, 2])
    methods = methods_for(interface)
    plain = compatibility_loss(model, images, labels, methods)
    smoothed = compatibility_loss(model, images, labels, methods, label_smoothing=0.2)
    assert smoothed['rp'] == plain['rp'] and smoothed['dcc'] == plain['dcc']
    logits = model.head(model.extractor(images))
    assert torch.allclose(smoothed['task'], F.cross_entropy(logits, labels, label_smoothing=0.2))
    assert not torch.allclose(smoothed['task'], plain['task'])
    net = _net()
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 1])
    assert torch.equal(ClassificationTask(net, label_smoothing=0.3)((x, y))['loss'],
                       F.cross_entropy(net(x), y, label_smoothing=0.3))


def test_airbench_groups_norm_biases_scaled_lr_and_decoupled_weight_decay():
    net, batch = _net(), 512
    optimizer, _ = _optim(net, OptimConfig(**AIRBENCH), batch)
    rest, biases = optimizer.param_groups
    assert [id(p) for p in biases['params']] == [id(net[1].bias)]  # the linear bias is no norm's; BN weight frozen
    assert {id(p) for p in rest['params']} == {id(net[0].weight), id(net[5].weight), id(net[5].bias)}
    # airbench94.py's own arithmetic, for its loss summed over the batch; the runs here average it over the batch.
    kilostep_scale = 1024 * (1 + 1 / (1 - 0.85))
    lr = 11.5 / kilostep_scale
    wd = 0.0153 * batch / kilostep_scale
    for group, summed_lr in ((rest, lr), (biases, lr * 64)):
        assert group['lr'] == pytest.approx(summed_lr * batch, rel=1e-12)
        assert group['lr'] * group['weight_decay'] == pytest.approx(summed_lr * (wd / summed_lr) * batch / batch)


def test_defaults_are_one_plain_group_as_before():
    net = _net()
    groups = param_groups(net, OptimConfig(), 64)
    assert groups == [{'params': [p for p in net.parameters() if p.requires_grad]}]
    c = load_config().optim
    assert (c.label_smoothing, c.lr_reference_batch, c.norm_bias_lr_scale, c.warmup_fraction) == (0, None, 1, 0)


def test_norm_bias_scale_alone_scales_lr_and_divides_weight_decay():
    optimizer, _ = _optim(_net(), OptimConfig(lr=0.1, weight_decay=5e-4, norm_bias_lr_scale=4.0), 64)
    assert [(g['lr'], g['weight_decay']) for g in optimizer.param_groups] == [(0.1, 5e-4), (0.4, 5e-4 / 4)]


@pytest.mark.parametrize('weight_decay', [0.0, 0.0153])
def test_one_update_of_2b_examples_is_two_of_b(weight_decay):
    """A loss linear in the weights has one gradient everywhere: per example, batch size must not matter. Weight
    decay alone (zero inputs: no gradient) must decay as much per example, to first order."""
    x = torch.randn(64, 5) if weight_decay == 0 else torch.zeros(64, 5)
    o = OptimConfig(lr=11.5, momentum=0.0, weight_decay=weight_decay, lr_reference_batch=1024)

    def train(batch):
        w = nn.Linear(5, 1, bias=False)
        w.weight.data.fill_(1.0)
        optimizer, scheduler = _optim(w, o, batch)
        for chunk in x.split(batch):
            optimizer.zero_grad()
            w(chunk).mean().backward()
            optimizer.step()
            scheduler.step()
        return w.weight.detach()

    assert torch.allclose(train(64), train(32), rtol=0, atol=1e-6)
    assert not torch.allclose(train(64), torch.ones(1, 5), rtol=0, atol=1e-4)  # it trained


def _triangle(steps, start=0.2, end=0.07, peak=0.23):
    """airbench94's lr multiplier at every update: piecewise linear through (0, start), (int(peak T), 1), (T, end)."""
    return np.interp(np.arange(steps + 1), [0, int(peak * steps), steps], [start, 1.0, end])


@pytest.mark.parametrize('total', [97, 40])
def test_poly_of_power_one_with_a_warmup_fraction_is_airbenchs_triangle_in_every_group(total):
    o = load_config(str(RECIPE)).optim
    net, batch = _net(), 256
    optimizer, scheduler = _optim(net, o, batch, o.schedule, total, **o.schedule_args)
    got = []
    for _ in range(total + 1):
        got.append([g['lr'] for g in optimizer.param_groups])
        scheduler.step()
    base = 11.5 * batch / (1024 * (1 + 1 / (1 - 0.85)))
    want = np.outer(_triangle(total), [base, base * 64])
    assert np.allclose(np.array(got), want, rtol=1e-9, atol=0)
    resumed = _optim(_net(), o, batch, o.schedule, total, **o.schedule_args)[1]
    resumed.load_state_dict(scheduler.state_dict())
    assert resumed.get_last_lr() == pytest.approx(want[-1].tolist())


def test_lookahead_takes_alpha_and_k_and_its_slow_weights_survive_a_state_dict_round_trip():
    torch.manual_seed(0)
    net, data = _net(), [(torch.randn(4, 3, 8, 8), torch.randint(0, 3, (4,))) for _ in range(13)]
    o = OptimConfig(**AIRBENCH, optimizer='lookahead_sgd', optimizer_args={'lookahead_alpha': 0.3, 'lookahead_k': 5})
    optimizer, _ = _optim(net, o, 4)
    assert isinstance(optimizer, Lookahead)
    assert {(g['lookahead_alpha'], g['lookahead_k']) for g in optimizer.param_groups} == {(0.3, 5)}

    def steps(model, opt, batches):
        for images, labels in batches:
            opt.zero_grad()
            F.cross_entropy(model(images), labels).backward()
            opt.step()

    steps(net, optimizer, data[:7])  # one slow update (step 5) and two fast steps since
    saved_net, saved = copy.deepcopy(net.state_dict()), copy.deepcopy(optimizer.state_dict())
    resumed_net = _net()
    resumed_net.load_state_dict(saved_net)
    resumed, _ = _optim(resumed_net, o, 4)
    resumed.load_state_dict(saved)
    slow = resumed.state_dict()['state'][0]['lookahead_slow_buff']  # the first group's first parameter
    assert not torch.equal(slow, resumed_net[0].weight)  # slow weights, not a copy of the fast ones
    steps(net, optimizer, data[7:])
    steps(resumed_net, resumed, data[7:])  # the slow update at step 10 pulls both towards the same slow weights
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), resumed_net.state_dict().values()))


def _airbench_reference(net, batches, lr, k):
    """airbench94.py's loop: SGD-Nesterov, every k steps ``ema.lerp_(net, 1 - decay)`` then ``net = ema`` with
    ``decay = 0.95**k * (step / total)**3``, and ``net = ema`` after the last step (its ``update(decay=1.0)``)."""
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.85, nesterov=True)
    total = len(batches)
    ema = {n: p.detach().clone() for n, p in net.named_parameters()}
    decays = 0.95 ** k * (torch.arange(total + 1) / total) ** 3
    for step, (images, labels) in enumerate(batches, start=1):
        optimizer.zero_grad()
        F.cross_entropy(net(images), labels).backward()
        optimizer.step()
        if step % k == 0:
            with torch.no_grad():
                for n, p in net.named_parameters():
                    ema[n].lerp_(p, 1 - decays[step].item())
                    p.copy_(ema[n])
    with torch.no_grad():
        for n, p in net.named_parameters():
            p.copy_(ema[n])


@pytest.mark.parametrize('total, resume_at', [(12, 7), (10, 5), (9, 0)])  # the last update on and off a sync
def test_airbench_lookahead_schedule_matches_airbenchs_loop_and_resumes(total, resume_at):
    torch.manual_seed(0)
    batches = [(torch.randn(4, 3, 8, 8), torch.randint(0, 3, (4,))) for _ in range(total)]
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 3))  # no BN: its statistics
    want = copy.deepcopy(net)                                                            # are not in timm's lookahead
    _airbench_reference(want, batches, 0.05, 5)
    o = OptimConfig(optimizer='lookahead_sgd', optimizer_args={'lookahead_k': 5}, lr=0.05, momentum=0.85,
                    weight_decay=0.0, schedule='constant', lookahead_schedule='airbench')

    def train(model, state=None, start=0):
        optimizer = make_optimizer(param_groups(model, o, 4), o.optimizer, o.lr, o.momentum, 0.0, **o.optimizer_args)
        scheduler = make_scheduler(optimizer, 'constant', total, lookahead_schedule='airbench')
        if state is not None:
            optimizer.load_state_dict(state[0])
            scheduler.load_state_dict(state[1])
        for images, labels in batches[start:resume_at if state is None and resume_at else total]:
            optimizer.zero_grad()
            F.cross_entropy(model(images), labels).backward()
            optimizer.step()
            scheduler.step()
        return copy.deepcopy((optimizer.state_dict(), scheduler.state_dict()))

    state = train(net)
    if resume_at:  # a fresh optimiser and schedule from the state dicts, as a checkpoint resume builds them
        train(net, state, resume_at)
    for a, b in zip(net.parameters(), want.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    far = copy.deepcopy(want)
    _airbench_reference(far, batches[:total - 1] + batches[:1], 0.05, 5)  # the last update not dropped: differs
    assert not torch.allclose(far[0].weight, net[0].weight)


@pytest.mark.parametrize('total', [20, 23, 24])  # the last update: a's, b's; on a sync, off one
def test_airbench_lookahead_lands_every_network_taking_turns_on_its_slow_weights(total):
    # Under the alternate schedule the resting network has no gradient: timm's update_slow would skip it at the end.
    torch.manual_seed(0)
    nets = {k: nn.Linear(6, 3) for k in 'ab'}
    shared, frozen = nn.Linear(3, 3), nn.Parameter(torch.zeros(3))  # an interface head; a whitening bias
    model = nn.ModuleDict({**nets, 'shared': shared})
    model.register_parameter('frozen', frozen)
    k, freeze_at = 5, 7
    optimizer = make_optimizer(model.parameters(), 'lookahead_sgd', 0.1, 0.85, 0.0, lookahead_k=k)
    scheduler = make_scheduler(optimizer, 'constant', total, lookahead_schedule='airbench', lookahead_fixed=[frozen])
    after_sync = {}
    for update in range(1, total + 1):
        turn = 'ab'[(update - 1) % 2]
        optimizer.zero_grad(set_to_none=True)
        x = torch.randn(8, 6)
        F.cross_entropy(shared(nets[turn](x) + frozen), torch.randint(0, 3, (8,))).backward()
        if update > freeze_at:
            frozen.grad = None
        fast_frozen = frozen.detach().clone()
        optimizer.step()
        if update % k == 0:  # the network whose turn it is was synced: fast = slow, kept until its next sync
            after_sync[turn] = copy.deepcopy(nets[turn].state_dict())
            after_sync['shared'] = copy.deepcopy(shared.state_dict())
        scheduler.step()
    for name, module in {**nets, 'shared': shared}.items():
        for key, value in module.state_dict().items():
            torch.testing.assert_close(value, after_sync[name][key], rtol=0, atol=0, msg=f'{name}.{key}')
    torch.testing.assert_close(frozen.detach(), fast_frozen, rtol=0, atol=0)  # not its stale slow weights


@pytest.mark.parametrize('k, networks, refused', [(6, 2, True), (4, 2, True), (6, 3, True), (5, 2, False),
                                                  (5, 3, False)])
def test_lookahead_k_must_reach_every_network_taking_turns(k, networks, refused):
    overrides = ['joint_schedule=alternate', 'optim.optimizer=lookahead_sgd', f'optim.optimizer_args={{lookahead_k: {k}}}',
                 'networks=[' + ','.join(f'{{name: n{i}, backbone: resnet8_cifar}}' for i in range(networks)) + ']']
    if refused:
        with pytest.raises(ConfigError, match=f'lookahead_k {k} with {networks} networks taking turns'):
            load_config(None, overrides)
    else:
        load_config(None, overrides)


@pytest.mark.parametrize('overrides, named', [
    (['optim.optimizer_args={lookahead_k: 5}'], 'lookahead_sgd'),
    (['optim.lr_reference_batch=1024', 'optim.optimizer=adamw'], 'lookahead_sgd'),  # airbench's rule is SGD's
    (['optim.warmup_fraction=0.2', 'optim.warmup_steps=10'], 'set one of them to 0'),
    (['optim.label_smoothing=1.0'], 'label_smoothing'),
    (['optim.norm_bias_lr_scale=0'], 'norm_bias_lr_scale'),
    (['optim.lookahead_schedule=airbench'], 'use lookahead_sgd')])
def test_bad_recipe_keys_are_refused_at_config_time_with_the_fix(overrides, named):
    with pytest.raises(ConfigError, match=named):
        load_config(None, overrides)


def test_the_recipe_file_is_airbenchs_and_other_configs_inherit_it(tmp_path):
    o = load_config(str(RECIPE)).optim
    assert (o.lr, o.momentum, o.weight_decay, o.lr_reference_batch, o.norm_bias_lr_scale, o.label_smoothing) == (
        11.5, 0.85, 0.0153, 1024, 64.0, 0.2)
    assert o.schedule_args == {'decay_rate': 1.0, 'warmup_lr': pytest.approx(0.2 * o.lr),
                               'min_lr': pytest.approx(0.07 * o.lr)}
    child = tmp_path / 'run.yaml'
    child.write_text(f'base: {RECIPE}\nbatch_size: 512\noptim: {{lr: 5.0}}\n')
    cfg = load_config(str(child))
    assert cfg.batch_size == 512 and cfg.optim.lr == 5.0 and cfg.optim.norm_bias_lr_scale == 64.0



def test_joint_model_smooths_each_networks_task_loss():
    interface = tc.Interface(width=16, rp=True, dcc_classes=['cat', 'dog'])
    nets = {k: tc.make_compatible('resnet8_cifar', split='layer1', interface=interface, num_classes=3,
                                  class_names=['cat', 'dog', 'emu']) for k in 'ab'}
    joint = JointModel(nets, interface, methods_for(interface), label_smoothing=0.2).eval()
    images, labels = torch.randn(6, 3, 16, 16), torch.tensor([0, 1, 2, 0, 1, 2])
    losses = joint({'a': (images, labels), 'b': (images, labels)})
    expected = compatibility_loss(nets['a'], images, labels, joint.methods, label_smoothing=0.2)
    assert torch.equal(losses['a/task'], expected['task']) and torch.equal(losses['a/rp'], expected['rp'])


@pytest.mark.slow  # about 30 s on the shared 2-core machine: builds both phases of tests/tiny.yaml
def test_the_runs_phases_take_label_smoothing_from_the_config():
    from timm_compat.build import build_phases, load_task_data
    cfg = load_config(str(Path(__file__).parent / 'tiny.yaml'), ['optim.label_smoothing=0.2', 'baseline=independent'])
    data = {n.name: load_task_data(n, cfg) for n in cfg.networks}
    assert [p.joint.label_smoothing for p in build_phases(cfg, data, torch.device('cpu'))] == [0.2, 0.2]
