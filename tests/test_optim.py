import math

import pytest
import torch
from timm.optim import list_optimizers

from tests.conftest import REPO
from timm_compat.config import ConfigError, load_config
from timm_compat.optim import (SCHEDULES, UpdateSchedule, airbench_lookahead_alpha, check_optim, make_optimizer,
                               make_scheduler, optim_from_config)


def optimizer(name='sgd', momentum=0.9, **kwargs):
    return make_optimizer([torch.nn.Parameter(torch.zeros(3))], name, 0.1, momentum, 5e-4, **kwargs)


def lrs(scheduler, steps):
    out = []
    for _ in range(steps):
        out.append(scheduler.get_last_lr()[0])
        scheduler.step()
    return out + [scheduler.get_last_lr()[0]]


def test_sgd_is_nesterov_with_momentum_and_plain_without():
    opt = optimizer()
    assert type(opt) is torch.optim.SGD and opt.defaults['nesterov'] and opt.defaults['weight_decay'] == 5e-4
    assert not optimizer(momentum=0.0).defaults['nesterov']
    assert not optimizer('momentum').defaults['nesterov']


def test_cosine_is_the_half_cosine_per_update_ending_at_zero():
    got = lrs(make_scheduler(optimizer(), 'cosine', 10), 10)
    assert got == pytest.approx([0.1 * 0.5 * (1 + math.cos(math.pi * t / 10)) for t in range(11)], abs=1e-15)
    assert got[-1] == 0.0


def test_accelerate_ticks_once_per_process_and_the_schedule_once_per_update():
    scheduler = make_scheduler(optimizer(), 'cosine', 4, ticks_per_step=2)
    assert lrs(scheduler, 8)[::2] == lrs(make_scheduler(optimizer(), 'cosine', 4), 4)


@pytest.mark.parametrize('schedule', SCHEDULES)
def test_every_schedule_by_name_steps_and_resumes(schedule):
    first = make_scheduler(optimizer(), schedule, 20, 2)
    before = lrs(first, 7)
    resumed = make_scheduler(optimizer(), schedule, 20, 2)
    resumed.load_state_dict(first.state_dict())
    assert resumed.get_last_lr() == first.get_last_lr() == before[-1:]
    assert lrs(resumed, 13) == lrs(first, 13)


@pytest.mark.parametrize('schedule', SCHEDULES)
def test_a_resume_with_more_steps_follows_the_longer_schedule(schedule):
    # A resume may change `steps`: as timm's train.py rebuilds its scheduler for the new length and steps it to the
    # resumed epoch, the restored schedule is the new one at the checkpoint's update, not the old one's tail at 0 lr.
    first = make_scheduler(optimizer(), schedule, 10, 2)
    lrs(first, 6)
    longer = make_scheduler(optimizer(), schedule, 40, 2)
    longer.load_state_dict(first.state_dict())
    fresh = make_scheduler(optimizer(), schedule, 40, 2)
    lrs(fresh, 5)
    assert lrs(longer, 34) == pytest.approx(lrs(fresh, 35)[1:])
    assert min(lrs(make_scheduler(optimizer(), schedule, 40, 2), 30)) > 0


def test_warmup_rises_linearly_then_the_schedule_runs_over_the_rest():
    got = lrs(make_scheduler(optimizer(), 'cosine', 12, 2, warmup_lr=0.0), 12)
    assert got[:3] == pytest.approx([0.0, 0.05, 0.1]) and got[-1] == 0.0
    assert got[7] == pytest.approx(0.05)  # halfway through the 10 cosine updates


def test_every_timm_optimizer_name_is_accepted():
    cfg = load_config(None, ['optim.optimizer=lamb', 'optim.schedule=step', 'optim.schedule_args={decay_epochs: 2}'])
    assert cfg.optim.optimizer == 'lamb'
    assert {'sgd', 'adamw', 'lamb', 'lion'} <= set(list_optimizers())


@pytest.mark.parametrize('override, named', [('optim.optimizer=nope', 'adamw, adamwlegacy'),
                                             ('optim.schedule=plateau', 'cosine, tanh, step'),
                                             ('optim.optimizer_args={bogus: 1}', 'bogus')])
def test_bad_optimizer_or_schedule_fails_at_config_time_naming_the_valid_ones(override, named):
    with pytest.raises(ConfigError, match=named):
        load_config(None, [override])
    with pytest.raises(ValueError):
        check_optim('sgd', 'nope')


def test_a_checkpoint_of_the_old_lambda_schedule_resumes_at_its_step():
    old = torch.optim.lr_scheduler.LambdaLR(optimizer(), lambda step: 1.0)
    for _ in range(3):
        old.step()
    scheduler = make_scheduler(optimizer(), 'cosine', 6)
    scheduler.load_state_dict(old.state_dict())
    assert scheduler.updates == 3 and scheduler.get_last_lr() == pytest.approx([0.05])


def test_a_resume_with_more_steps_ramps_the_lookahead_alpha_over_the_new_length():
    """airbench's lookahead alpha ramps over the run's updates: resumed with a longer run, the next update's alpha
    is the longer run's at that update, and the weights do not land on the slow weights at the old end."""
    def lookahead(total):
        opt = optimizer('lookahead_sgd')
        return opt, make_scheduler(opt, 'cosine', total, lookahead_schedule='airbench')

    first_opt, first = lookahead(10)
    lrs(first, 6)
    opt, longer = lookahead(40)
    longer.load_state_dict(first.state_dict())
    fresh_opt, fresh = lookahead(40)
    lrs(fresh, 6)
    assert opt.param_groups[0]['lookahead_alpha'] == fresh_opt.param_groups[0]['lookahead_alpha'] > 0
    assert opt.param_groups[0]['lookahead_alpha'] != first_opt.param_groups[0]['lookahead_alpha']
    assert set(first.state_dict()) == {'ticks', 'ticks_per_step'}  # the shape comes from the config, not the file


def test_a_resume_that_shortens_the_run_to_its_checkpoint_lands_on_the_slow_weights():
    """A run is never checkpointed after landing, so a resume whose new length is the checkpoint's step (steps is a
    key a resume may change) must land itself: else the run is evaluated and saved on the fast weights."""
    def lookahead(total):
        param = torch.nn.Parameter(torch.zeros(3))
        opt = make_optimizer([param], 'lookahead_sgd', 0.1, 0.9, 5e-4)
        return param, opt, make_scheduler(opt, 'cosine', total, lookahead_schedule='airbench')

    param, opt, schedule = lookahead(12)
    for i in range(7):
        param.grad = torch.tensor([1.0, -2.0, 0.5]) * (i + 1)
        opt.step()
        schedule.step()
    resumed_param, resumed_opt, resumed = lookahead(7)
    with torch.no_grad():
        resumed_param.copy_(param)
    resumed_opt.load_state_dict(opt.state_dict())
    resumed.load_state_dict(schedule.state_dict())
    slow = resumed_opt._base_optimizer.state[resumed_param]['lookahead_slow_buff']
    assert not torch.equal(param, slow)  # the checkpoint holds fast weights
    assert torch.equal(resumed_param, slow)


@pytest.mark.parametrize('name', ['sgd', 'adamw', 'lamb'])
def test_airbench_lookahead_starts_at_the_initial_weights_and_lands_on_the_slow_ones_for_any_base_optimizer(name):
    """The slow weights start as the initial weights (airbench's), not as the weights of the first sync (timm's),
    and an Adam-family base optimiser still makes its own state on its first step."""
    init = torch.tensor([1.0, -2.0, 0.5])
    param, fast = torch.nn.Parameter(init.clone()), torch.nn.Parameter(init.clone())
    opt = make_optimizer([param], f'lookahead_{name}', 0.1, 0.9, 5e-4, lookahead_k=2)
    schedule = make_scheduler(opt, 'constant', 7, lookahead_schedule='airbench')
    base, slow = make_optimizer([fast], name, 0.1, 0.9, 5e-4), init.clone()
    for t in range(1, 8):
        param.grad, fast.grad = torch.tensor([1.0, -2.0, 0.5]) * t, torch.tensor([1.0, -2.0, 0.5]) * t
        opt.step()
        schedule.step()
        base.step()
        if t % 2 == 0:
            with torch.no_grad():
                slow += airbench_lookahead_alpha(t, 7, 2) * (fast - slow)
                fast.copy_(slow)
    assert not torch.allclose(fast, slow)  # the last update was not a sync: the run lands on the slow weights
    assert torch.allclose(param, slow, rtol=1e-6, atol=0)


def test_an_optimizer_that_fails_at_its_first_update_is_refused_at_config_time(monkeypatch):
    """check_optim steps and resumes a dummy run: a slow buffer written into an Adam state before its first step
    (the old airbench start) built fine and failed only once the run folder was claimed."""
    sets = ['optim.optimizer=lookahead_adamw', 'optim.lookahead_schedule=airbench',
            'optim.optimizer_args={lookahead_k: 5}']
    assert load_config(None, sets).optim.optimizer == 'lookahead_adamw'

    def slow_buffers_at_build(self):
        for group in self.optimizer.param_groups:
            for p in group['params']:
                self.optimizer._base_optimizer.state[p]['lookahead_slow_buff'] = p.detach().clone()

    monkeypatch.setattr(UpdateSchedule, '_start_slow_weights', slow_buffers_at_build)
    with pytest.raises(ConfigError, match="first update.*exp_avg"):
        load_config(None, sets)


@pytest.mark.parametrize('overrides', [
    ['optim.schedule=wsd', 'optim.warmup_steps=20', 'steps=1000'],
    ['optim.schedule=wsd', 'optim.schedule_args={decay_epochs: 100}', 'steps=1000'],
    ['optim.schedule=rsqrt', 'optim.warmup_steps=50', 'steps=1000'],
    ['optim.schedule=wsd', 'optim.schedule_args={decay_epochs: 250}', 'steps=1000', 'gradient_accumulation_steps=4'],
    ['optim.schedule=wsd', 'optim.schedule_args={decay_epochs: 100}', 'steps=null', 'epochs=2']])
def test_a_schedule_is_checked_over_the_runs_length_not_a_dummy_one(overrides):
    load_config(None, overrides)


@pytest.mark.parametrize('overrides', [
    ['optim.schedule=wsd', 'optim.schedule_args={decay_epochs: 2000}', 'steps=1000'],
    ['optim.schedule=wsd', 'optim.schedule_args={decay_epochs: 300}', 'steps=1000', 'gradient_accumulation_steps=4']])
def test_a_schedule_longer_than_the_runs_known_updates_is_refused_at_config_time(overrides):
    with pytest.raises(ConfigError, match='decay_epochs'):
        load_config(None, overrides)


@pytest.mark.parametrize('key, value', [('cycle_limit', 2), ('cycle_mul', 2.0), ('cycle_decay', 0.5),
                                        ('cooldown_epochs', 30)])
def test_cycles_and_cooldown_that_would_act_past_the_runs_end_are_refused_naming_the_key(key, value):
    """make_scheduler hands timm one cycle as long as the run, so extra cycles and a cooldown never came."""
    with pytest.raises(ConfigError, match=f'{key}={value}.*steps or epochs'):
        load_config(None, [f'optim.schedule_args={{{key}: {value}}}'])


def test_cycle_and_cooldown_values_that_change_nothing_are_accepted():
    load_config(None, ['optim.schedule_args={cycle_limit: 1, cycle_mul: 1.0, cooldown_epochs: 0}'])


def test_a_resume_on_more_processes_takes_the_lr_scale_of_its_own_examples_per_update():
    """torch's optimizer load_state_dict restores each group's entries, lr_scale too, which lr_reference_batch
    derives from the examples per update: resumed on 2 processes, the run kept the 1-process step size."""
    optim = load_config(str(REPO / 'configs/fast/recipe.yaml')).optim

    def build(processes):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
        return optim_from_config(model, optim, 512 * processes, 100, ticks_per_step=processes)

    opt, schedule = build(1)
    lrs(schedule, 10)
    resumed_opt, resumed = build(2)
    resumed_opt.load_state_dict(opt.state_dict())  # Accelerate's order: the optimizer, then the schedule
    resumed.load_state_dict(schedule.state_dict())
    fresh_opt, fresh = build(2)
    lrs(fresh, 20)
    assert [g['lr_scale'] for g in resumed_opt.param_groups] == [g['lr_scale'] for g in fresh_opt.param_groups]
    assert resumed.get_last_lr() == fresh.get_last_lr()
    assert resumed_opt.param_groups[0]['lr_scale'] == 2 * opt.param_groups[0]['lr_scale']


@pytest.mark.parametrize('schedule, key, value', [('step', 'decay_epochs', '300'),
                                                   ('multistep', 'decay_milestones', '[300, 600]')])
def test_step_schedules_must_say_when_to_decay_in_updates(schedule, key, value):
    """timm's defaults (every 90; at 90, 180, 270) are epochs; stepped per update they left the lr near 0 early."""
    with pytest.raises(ConfigError, match=f'{key}.*e.g. optim.schedule_args='):
        load_config(None, [f'optim.schedule={schedule}'])
    load_config(None, [f'optim.schedule={schedule}', f'optim.schedule_args={{{key}: {value}}}'])


@pytest.mark.parametrize('name', ['lookahaed_sgd', 'adamw_sgd', 'lookahead_lookahead_sgd', 'lookahead_'])
def test_an_optimizer_is_a_timm_name_or_lookahead_of_one_and_nothing_else(name):
    """timm reads only what follows the last '_': a misspelt prefix silently trained plain SGD."""
    with pytest.raises(ConfigError, match=f"lookahead_<.*got '{name}'"):
        load_config(None, [f'optim.optimizer={name}'])
    with pytest.raises(ValueError, match='unknown optimizer'):
        check_optim(name, 'cosine')
    with pytest.raises(ValueError, match='unknown optimizer'):
        optimizer(name)
    assert type(optimizer('LookAhead_SGD')).__name__ == 'Lookahead'


# A warm-up as long as the run never reaches optim.lr; a step/multistep decay at or past the run's last update after
# warm-up never decays. Both were accepted: steps=4 with warmup_steps=100 trained the whole run in warm-up.
@pytest.mark.parametrize('overrides, named', [
    (['optim.warmup_steps=100'], 'warmup_steps 100'), (['optim.warmup_steps=4'], 'warmup_steps 4'),
    (['optim.schedule=step', 'optim.schedule_args={decay_epochs: 300}'], r'decay_epochs \[300\]'),
    (['optim.schedule=multistep', 'optim.schedule_args={decay_milestones: [1, 300]}'], r'decay_milestones \[300\]'),
    (['optim.warmup_steps=2', 'optim.schedule=step', 'optim.schedule_args={decay_epochs: 2}'], r'decay_epochs \[2\]'),
    (['steps=8', 'gradient_accumulation_steps=2', 'optim.warmup_steps=4'], 'warmup_steps 4')])
def test_a_schedule_longer_than_the_runs_steps_is_refused_at_config_time(overrides, named):
    with pytest.raises(ConfigError, match=rf'{named}.*4 updates'):
        load_config(None, ['steps=4', *overrides])


@pytest.mark.parametrize('overrides', [
    ['optim.warmup_steps=3'], ['optim.schedule=step', 'optim.schedule_args={decay_epochs: 3}'],
    ['optim.schedule=multistep', 'optim.schedule_args={decay_milestones: [1, 3]}'],
    ['optim.warmup_steps=2', 'optim.schedule=step', 'optim.schedule_args={decay_epochs: 1}']])
def test_a_schedule_that_acts_within_the_runs_steps_is_accepted(overrides):
    load_config(None, ['steps=4', *overrides])


@pytest.mark.usefixtures('fresh_accelerate')
def test_a_schedule_longer_than_a_run_in_epochs_is_refused_before_the_folder_is_claimed(tmp_path):
    import train
    # tests/tiny.yaml: 80 examples per task in batches of 16, so epochs=1 is 5 updates, known once data is loaded.
    with pytest.raises(ValueError, match=r'warmup_steps 5.*5 updates'):
        train.main(['-c', str(REPO / 'tests' / 'tiny.yaml'), '--output-dir', str(tmp_path / 'run'),
                    '--set', 'steps=null', '--set', 'epochs=1', '--set', 'optim.warmup_steps=5'])
    assert not (tmp_path / 'run').exists()
