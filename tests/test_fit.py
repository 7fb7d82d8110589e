"""The one training loop: fit() against hand-written loops, resume, log means, hooks, mixed precision."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from timm_compat.fit import ClassificationTask, call_frozen, fit

STEPS = 6


@pytest.fixture(scope='module', autouse=True)
def one_thread():
    """Tiny tensors: a second thread adds only synchronisation, and one thread keeps sums in a fixed order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 3))


def data(n=64):
    generator = torch.Generator().manual_seed(1)
    return torch.randn(n, 8, generator=generator), torch.randint(0, 3, (n,), generator=generator)


def batch_at(step, batch_size=16):
    """A batch that depends on the step alone, as fit's contract asks: a resume sees the same batches."""
    x, y = data()
    start = step * batch_size % len(x)
    return x[start:start + batch_size], y[start:start + batch_size]


def sgd(net):
    """Nesterov SGD with weight decay under a decaying schedule: every piece of optimiser state matters."""
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 / (1 + s))


def assert_same_weights(a, b):
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_fit_equals_a_hand_written_loop():
    net, ref = model(), model()
    optimizer, scheduler = sgd(net)
    rows = fit(ClassificationTask(net), batch_at, STEPS, optimizer, scheduler, clip_grad_norm=0.5)

    ref_optimizer, ref_scheduler = sgd(ref)
    losses = []
    for step in range(STEPS):
        x, y = batch_at(step)
        loss = F.cross_entropy(ref(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
        ref_optimizer.step()
        ref_scheduler.step()
        ref_optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    assert_same_weights(net, ref)  # BN running statistics included
    # The log's running mean adds the losses one by one, stack().mean() pairwise: float32 may round them 1e-7 apart
    # (torch 2.4 does); the weights above are the exact check.
    assert rows == [{'step': STEPS, 'loss': pytest.approx(torch.stack(losses).mean().item(), rel=1e-6)}]
    assert all(p.grad is None for p in net.parameters())


def test_resume_at_start_step_equals_an_uninterrupted_run():
    whole = model()
    optimizer, scheduler = sgd(whole)
    fit(ClassificationTask(whole), batch_at, STEPS, optimizer, scheduler)

    first = model()
    optimizer, scheduler = sgd(first)
    fit(ClassificationTask(first), batch_at, 2, optimizer, scheduler)
    saved = copy.deepcopy((first.state_dict(), optimizer.state_dict(), scheduler.state_dict()))
    # A new process: fresh objects, state loaded from the "checkpoint", batches from step 2 on.
    resumed = model()
    optimizer, scheduler = sgd(resumed)
    for obj, state in zip((resumed, optimizer, scheduler), saved):
        obj.load_state_dict(state)
    seen = []
    fit(ClassificationTask(resumed), lambda s: seen.append(s) or batch_at(s), STEPS, optimizer, scheduler,
        start_step=2)
    assert seen == list(range(2, STEPS))
    assert_same_weights(resumed, whole)


class Scripted(nn.Module):
    """A task whose logged values are known: 'loss' is ``step`` in value, 'odd' appears on odd steps only."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))

    def forward(self, step):
        losses = {'loss': self.w * 0 + step, 'output': torch.zeros(2, 3)}  # non-scalar: not logged
        if step % 2:
            losses['odd'] = torch.tensor(10.0 * step)
        return losses


def test_log_means_cover_each_interval_and_the_short_last_one():
    logged, stepped = [], []
    rows = fit(Scripted(), lambda step: step, 10, torch.optim.SGD(Scripted().parameters(), lr=0.1),
               log_every=4, on_log=lambda step, means: logged.append((step, means)),
               on_step=lambda step, losses: stepped.append((step, losses['loss'].item())))
    # Steps 0-3, 4-7 and 8-9 (the last interval is short); 'odd' over its own steps: 1, 3 / 5, 7 / 9.
    assert rows == [{'step': 4, 'loss': 1.5, 'odd': 20.0}, {'step': 8, 'loss': 5.5, 'odd': 60.0},
                    {'step': 10, 'loss': 8.5, 'odd': 90.0}]
    assert logged == [(row['step'], {k: v for k, v in row.items() if k != 'step'}) for row in rows]
    assert stepped == [(s + 1, float(s)) for s in range(10)]  # callbacks after the update get the steps done


def test_log_every_zero_logs_the_last_step_only_and_a_resume_logs_its_own_steps():
    task = Scripted()
    optimizer = torch.optim.SGD(task.parameters(), lr=0.1)
    assert fit(task, lambda step: step, 4, optimizer) == [{'step': 4, 'loss': 1.5, 'odd': 20.0}]
    assert fit(task, lambda step: step, 7, optimizer, start_step=4, log_every=2) == [
        {'step': 6, 'loss': 4.5, 'odd': 50.0}, {'step': 7, 'loss': 6.0}]


def test_before_optimizer_step_runs_after_backward_and_before_the_step():
    net = model()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)  # no momentum or decay: no grad, no change
    events = []
    optimizer.register_step_pre_hook(lambda *_: events.append('optimizer.step'))
    frozen_bias = net[3].bias.detach().clone()

    def drop_bias_grad(step):
        assert net[3].bias.grad is not None  # after backward
        events.append(step)
        net[3].bias.grad = None

    fit(ClassificationTask(net), batch_at, 3, optimizer, before_optimizer_step=drop_bias_grad)
    assert events == [0, 'optimizer.step', 1, 'optimizer.step', 2, 'optimizer.step']
    assert torch.equal(net[3].bias, frozen_bias)
    assert not torch.equal(net[3].weight, model()[3].weight)


def test_bf16_autocast_runs_the_matmuls_in_bf16_and_trains():
    net, dtypes = model(), []
    task = ClassificationTask(net)
    net[3].register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.2, momentum=0.9)
    rows = fit(task, batch_at, 40, optimizer, mixed_precision='bf16', log_every=10)
    assert set(dtypes) == {torch.bfloat16}
    assert rows[-1]['loss'] < rows[0]['loss']
    assert all(p.dtype == torch.float32 for p in net.parameters())  # autocast, not a bf16 model

    fit(task, batch_at, 1, optimizer)
    assert dtypes[-1] == torch.float32  # the default stays fp32


def test_fp16_trains_through_a_gradient_scaler():
    net, dtypes = model(), []
    net[3].register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
    rows = fit(ClassificationTask(net), batch_at, 40, torch.optim.SGD(net.parameters(), lr=0.2, momentum=0.9),
               mixed_precision='fp16', clip_grad_norm=1.0, log_every=10)
    assert set(dtypes) == {torch.float16}
    assert rows[-1]['loss'] < rows[0]['loss']


def test_precision_and_accelerator_arguments_are_checked():
    net = model()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.raises(ValueError, match='Unknown mixed_precision'):
        fit(ClassificationTask(net), batch_at, 1, optimizer, mixed_precision='fp8')
    with pytest.raises(ValueError, match='accelerator decides'):
        fit(ClassificationTask(net), batch_at, 1, optimizer, accelerator=object(), mixed_precision='bf16')


def reset_accelerate_state():
    """Accelerate keeps one state per process: each run here starts from none (conftest's fixture cleans up)."""
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def test_with_an_accelerator_fit_equals_accelerates_own_accumulation_loop(fresh_accelerate):
    from accelerate import Accelerator
    runs = []
    for use_fit in (True, False):
        reset_accelerate_state()
        accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
        net = model()
        task, (optimizer, scheduler) = ClassificationTask(net), sgd(net)
        task, optimizer, scheduler = accelerator.prepare(task, optimizer, scheduler)
        clipped = []
        if use_fit:
            fit(task, batch_at, STEPS, optimizer, scheduler, accelerator=accelerator, clip_grad_norm=0.5,
                before_optimizer_step=lambda step: clipped.append(accelerator.sync_gradients))
        else:
            for step in range(STEPS):
                with accelerator.accumulate(task):
                    accelerator.backward(task(batch_at(step))['loss'])
                    if accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(list(net.parameters()), 0.5)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
        runs.append((net, clipped))
    assert_same_weights(runs[0][0], runs[1][0])
    assert runs[0][1] == [False, True] * (STEPS // 2)  # an update every second step


def test_call_frozen_passes_gradients_to_inputs_only():
    head = nn.Linear(4, 2)
    before = copy.deepcopy(head.state_dict())
    x = torch.randn(3, 4, requires_grad=True)
    call_frozen(head, x).sum().backward()
    assert x.grad is not None and all(p.grad is None for p in head.parameters())
    assert all(p.requires_grad for p in head.parameters())
    assert all(torch.equal(v, before[k]) for k, v in head.state_dict().items())
    with torch.no_grad():
        assert torch.equal(call_frozen(head, x), head(x))


@pytest.mark.parametrize('schedule, networks, accumulation, expected', [
    ('sum', 2, 1, 15), ('alternate', 2, 1, 30), ('sum', 2, 4, 16), ('alternate', 2, 4, 32), ('alternate', 3, 4, 48)])
def test_epochs_make_whole_optimiser_updates(schedule, networks, accumulation, expected):
    """1.5 epochs of 10 steps: under accumulation the last update gets all its micro-batches (15 micro-batch steps
    under accumulation 4 made 3 updates and 3 stragglers never applied), and alternating networks each get theirs."""
    from timm_compat.config import load_config
    from timm_compat.optim import phase_steps
    cfg = load_config(None, ['steps=null', 'epochs=1.5', f'joint_schedule={schedule}',
                             f'gradient_accumulation_steps={accumulation}'])
    assert phase_steps(cfg, 10, networks) == expected


@pytest.mark.parametrize('epochs, steps_per_epoch, accumulation, expected', [
    (1.1, 50, 1, 55), (2.2, 50, 2, 110), (0.7, 10, 1, 7), (9.9, 48, 1, 476), (9.9, 48, 4, 476), (1.15, 10, 1, 12)])
def test_epochs_round_up_to_whole_steps_only_past_float_rounding(epochs, steps_per_epoch, accumulation, expected):
    """1.1 x 50 is 55.00000000000001 in floats: its ceil made a 56th step; 9.9 epochs of 48 stay 476 (475.2)."""
    from timm_compat.config import load_config
    from timm_compat.optim import phase_steps
    cfg = load_config(None, ['steps=null', f'epochs={epochs}', f'gradient_accumulation_steps={accumulation}'])
    assert phase_steps(cfg, steps_per_epoch, 1) == expected


def test_a_gradient_the_hook_drops_does_not_count_in_the_clipped_norm():
    a, b = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.SGD([a, b], lr=1.0)

    def task(_):
        return {'loss': (a * torch.tensor([3.0, 0.0, 4.0])).sum() + (b * torch.tensor([30.0, 0.0, 40.0])).sum()}

    def freeze_b(step):
        b.grad = None

    fit(task, lambda step: None, 1, optimizer, clip_grad_norm=1.0, before_optimizer_step=freeze_b)
    assert torch.equal(b, torch.zeros(3))
    assert a.norm().item() == pytest.approx(1.0)  # a's gradient (norm 5) clipped to 1, not to 5 / 50.2


def test_a_lookahead_run_ends_on_its_slow_weights_when_an_fp16_update_was_skipped():
    from timm_compat.optim import make_optimizer, make_scheduler

    class TicksWithTheOptimizer:
        """As Accelerate's AcceleratedScheduler: no tick for an update the fp16 scaler skipped."""

        def __init__(self, scheduler, optimizer):
            self.scheduler, self.updates = scheduler, 0
            optimizer.register_step_post_hook(lambda *_: setattr(self, 'updates', self.updates + 1))

        def step(self):
            while self.scheduler.ticks < self.updates:
                self.scheduler.step()

    net = model()
    inner = ClassificationTask(net)

    def task(step_and_batch):
        step, batch = step_and_batch
        losses = inner(batch)
        return {'loss': losses['loss'] * (float('inf') if step == 0 else 1.0)}  # update 0 overflows

    optimizer = make_optimizer(list(net.parameters()), 'lookahead_sgd', 0.1, 0.9, 5e-4)
    schedule = make_scheduler(optimizer, 'cosine', 8, lookahead_schedule='airbench')
    fit(task, lambda step: (step, batch_at(step)), 8, optimizer, TicksWithTheOptimizer(schedule, optimizer),
        mixed_precision='fp16')
    state = optimizer._base_optimizer.state
    assert schedule.updates == 7  # one update skipped: the schedule's last update never came
    assert all(torch.equal(p, state[p]['lookahead_slow_buff']) for p in net.parameters())
