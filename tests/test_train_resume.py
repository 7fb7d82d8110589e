"""train.py's run folder: checkpoints, kills and resumes, refused or live folders, never unpickling."""
import os
import subprocess
import sys
import time

import pytest
import torch

import timm_compat as tc
import train
from timm_compat import engine
from timm_compat.joint import JointModel

from tests.conftest import REPO, crash_after_logging

TINY = str(REPO / 'tests' / 'tiny.yaml')
pytestmark = pytest.mark.usefixtures('fresh_accelerate')


def run(tmp_path, *args, name='run'):
    return train.main(['-c', TINY, '--output-dir', str(tmp_path / name), *args])


@pytest.mark.slow  # end to end: several full tiny runs
# RP's one-rotation form draws its rotations from the step: a resume must draw the same ones.
@pytest.mark.parametrize('extra', [[], ['--set', 'interface.rp_rotations=one']], ids=['default', 'rp_one'])
def test_resume_continues_from_checkpoint_step(tmp_path, monkeypatch, extra):
    def run(tmp_path, *args, name='run'):
        return train.main(['-c', TINY, '--output-dir', str(tmp_path / name), *extra, *args])

    reference = run(tmp_path, '--set', 'steps=6', name='reference')['phases']['main']

    saved = []
    real_save = engine.save_checkpoint

    def crash_after_step_4(accelerator, root, state, keep):
        path = real_save(accelerator, root, state, keep)
        saved.append(state.step)
        if state.step == 4:
            raise KeyboardInterrupt('simulated crash')
        return path

    monkeypatch.setattr(engine, 'save_checkpoint', crash_after_step_4)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, '--set', 'steps=6', name='crashed')
    assert saved == [2, 4]
    monkeypatch.setattr(engine, 'save_checkpoint', real_save)
    resumed = run(tmp_path, '--set', 'steps=6', '--resume', name='crashed')['phases']['main']
    steps = [int(line.split(',')[0]) for line in
             (tmp_path / 'crashed' / 'main' / 'metrics.csv').read_text().splitlines()[1:]]
    assert steps == [2, 4, 6]  # the resumed run logged step 6 only, after the checkpoint at step 4
    # Same data order, augmentation and optimiser state: resuming reproduces the uninterrupted run. (Not the id:
    # each run's interface has its own random nonce.)
    aux = [tc.Interface.from_pretrained(tmp_path / name / 'main' / 'components' / 'interface').aux_heads.state_dict()
           for name in ('reference', 'crashed')]
    assert aux[0].keys() == aux[1].keys() and all(torch.equal(aux[0][k], aux[1][k]) for k in aux[0])
    assert resumed['recombination_matrix'] == reference['recombination_matrix']


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    real_forward = JointModel.forward
    calls = []

    def forward(self, batches):
        out = real_forward(self, batches)
        calls.append(1)
        if len(calls) >= 3:
            out['loss'] = out['loss'] * float('nan')
        return out

    monkeypatch.setattr(JointModel, 'forward', forward)
    with pytest.raises(FloatingPointError, match=r'NaN/inf at step 3.*Last good checkpoint: .*step_00000002'):
        run(tmp_path, '--set', 'log_every=4')
    ckpt = tmp_path / 'run' / 'main' / 'checkpoints'
    assert (ckpt / 'latest').read_text() == 'step_00000002'
    assert (ckpt / 'step_00000002' / 'model.safetensors').is_file()
    assert not list(ckpt.glob('step_00000004'))


def test_refuses_earlier_run_unless_resume_or_overwrite(tmp_path):
    (tmp_path / 'run').mkdir()
    (tmp_path / 'run' / 'thesis.tex').write_text('keep me')
    for flags in ((), ('--overwrite',), ('--resume',)):
        with pytest.raises(ValueError, match='holds no timm-compat run'):
            run(tmp_path, *flags)
    assert (tmp_path / 'run' / 'thesis.tex').read_text() == 'keep me'
    run(tmp_path, '--set', 'steps=2', name='done')
    with pytest.raises(ValueError, match='--resume to continue it, --overwrite'):
        run(tmp_path, '--set', 'steps=2', name='done')
    run(tmp_path, '--overwrite', '--set', 'steps=2', name='done')


def test_resume_of_a_finished_run_keeps_its_summary(tmp_path):
    first = run(tmp_path, '--set', 'steps=2')
    written = (tmp_path / 'run' / 'summary.json').read_text()
    # cpu_threads may change on resume; a run that trains nothing must not record it, nor its own wall time.
    again = run(tmp_path, '--set', 'steps=2', '--set', 'cpu_threads=1', '--resume')
    assert (tmp_path / 'run' / 'summary.json').read_text() == written
    assert again['wall_seconds'] == first['wall_seconds'] and again['config']['cpu_threads'] == 2


def test_a_new_run_refuses_a_component_folder_another_run_saved_to(tmp_path):
    shared = str(tmp_path / 'shared')
    run(tmp_path, '--set', 'steps=2', '--save-components', shared, name='first')
    saved = {p: p.read_bytes() for p in (tmp_path / 'shared').rglob('*') if p.is_file()}
    with pytest.raises(ValueError, match='save_components: .* already holds components'):
        run(tmp_path, '--set', 'steps=2', '--save-components', shared, name='second')
    assert {p: p.read_bytes() for p in (tmp_path / 'shared').rglob('*') if p.is_file()} == saved
    assert not (tmp_path / 'second').exists()  # refused before anything, even the locked folder, was written


def test_resume_and_overwrite_together_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        run(tmp_path, '--resume', '--overwrite')
    assert 'not allowed with argument' in capsys.readouterr().err and not (tmp_path / 'run').exists()


def test_overwrite_validates_everything_before_deleting(tmp_path):
    run(tmp_path, '--set', 'steps=2')
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / 'run').rglob('*'))
    with pytest.raises(ValueError, match="Unknown split point 'no_such_layer'"):
        run(tmp_path, '--overwrite', '--set', 'steps=2', '--set', 'networks.1.split=no_such_layer')
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / 'run').rglob('*')) == before


# A training set shorter than one batch (itself, or after the validation holdout) was refused only once training
# started: --overwrite had deleted the earlier run by then.
@pytest.mark.parametrize('sets', [['batch_size=100'], ['validation.every=2', 'validation.examples=70']],
                         ids=['batch', 'holdout'])
def test_overwrite_refuses_a_training_set_shorter_than_a_batch_before_deleting(tmp_path, sets):
    run(tmp_path, '--set', 'steps=2')
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / 'run').rglob('*'))
    with pytest.raises(ValueError, match=r"network 'a'.*fewer than one batch of \d+.*lower batch_size"):
        run(tmp_path, '--overwrite', '--set', 'steps=2', *[a for s in sets for a in ('--set', s)])
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / 'run').rglob('*')) == before


def test_a_resume_refused_for_a_checkpoint_past_its_steps_changes_nothing(tmp_path, monkeypatch):
    # fit_phase refused it only after claim_run_dir had recorded the new steps in config.yaml and run.json.
    crash_at_checkpoint(monkeypatch, 4)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, '--set', 'steps=6')
    monkeypatch.undo()
    record = {f: (tmp_path / 'run' / f).read_bytes() for f in ('config.yaml', 'run.json')}
    with pytest.raises(ValueError, match=r'\[main\].*step_00000004, is at step 4, past the 2 steps.*at least 4'):
        run(tmp_path, '--set', 'steps=2', '--resume')
    assert {f: (tmp_path / 'run' / f).read_bytes() for f in record} == record
    run(tmp_path, '--set', 'steps=6', '--resume')  # the run still resumes as it was


def test_a_live_run_blocks_resume_and_overwrite(tmp_path):
    from timm_compat.rundir import RunDir
    run(tmp_path, '--set', 'steps=2')
    held = RunDir(tmp_path / 'run').acquire()  # what a live run holds, released only when it ends
    try:
        for flags in (('--resume',), ('--overwrite',)):
            with pytest.raises(ValueError, match=rf'in use by a live run \(pid {os.getpid()}\)'):
                run(tmp_path, '--set', 'steps=2', *flags)
    finally:
        held.release()
    assert (tmp_path / 'run' / 'summary.json').is_file()


@pytest.mark.parametrize('flag', ['--output-dir', '--save-components'])
def test_a_folder_below_a_file_is_refused_before_the_data_is_loaded(tmp_path, monkeypatch, capsys, flag):
    """--output-dir below a file failed with a traceback once the data was loaded (--save-components: after
    training); both are refused with one message as soon as the config is read."""
    (tmp_path / 'notes').write_text('mine')
    monkeypatch.setattr(train, 'load_task_data', lambda *a: pytest.fail('the data was loaded first'))
    with pytest.raises(SystemExit) as exit_:
        train.cli(['-c', TINY, '--output-dir', str(tmp_path / 'run'), flag, str(tmp_path / 'notes' / 'run')])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith('error: ') and 'Traceback' not in err
    assert f'{tmp_path / "notes"} is not a folder' in err
    assert (tmp_path / 'notes').read_text() == 'mine' and not (tmp_path / 'run').exists()


def test_cli_reports_an_os_error_as_one_message(monkeypatch, capsys):
    def main(argv):
        raise PermissionError(13, 'Permission denied', '/runs/x')

    monkeypatch.setattr(train, 'main', main)
    with pytest.raises(SystemExit) as exit_:
        train.cli([])
    assert exit_.value.code == 2 and capsys.readouterr().err == "error: [Errno 13] Permission denied: '/runs/x'\n"


def test_a_resume_under_another_launch_precision_is_refused(tmp_path, monkeypatch):
    from accelerate.state import AcceleratorState, GradientState, PartialState
    monkeypatch.delenv('ACCELERATE_MIXED_PRECISION', raising=False)
    crash_at_checkpoint(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):  # in fp32: the config's mixed_precision is null, the launcher says none
        run(tmp_path)
    record = {f: (tmp_path / 'run' / f).read_bytes() for f in ('config.yaml', 'run.json', 'main/metrics.csv')}
    for state in (AcceleratorState, GradientState, PartialState):  # a new launch: its own Accelerator
        state._reset_state(*[True] * (state is AcceleratorState))
    monkeypatch.setenv('ACCELERATE_MIXED_PRECISION', 'bf16')  # accelerate launch --mixed_precision bf16
    with pytest.raises(ValueError, match=r"trained in 'no'.*--mixed_precision no"):
        run(tmp_path, '--resume')
    assert {f: (tmp_path / 'run' / f).read_bytes() for f in record} == record


@pytest.mark.slow  # end to end: a run, a kill, a resume, per key
@pytest.mark.parametrize('key', ['channels_last', 'compile'])
def test_a_resume_may_turn_off_compile_or_channels_last(tmp_path, monkeypatch, key):
    """Checkpoints of either kernel choice load into the other: a resume may turn off a crashing compile."""
    crash_at_checkpoint(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, '--set', f'{key}=' + ('true' if key == 'channels_last' else 'eager'))
    monkeypatch.undo()
    summary = run(tmp_path, '--resume')
    assert summary['config'][key] is False and summary['phases']['main']['steps'] == 4
    steps = [line.split(',')[0] for line in (tmp_path / 'run' / 'main' / 'metrics.csv').read_text().splitlines()]
    assert steps == ['step', '2', '4']


@pytest.mark.slow  # end to end: a run, a kill, a resume, per planted file
@pytest.mark.parametrize('planted', ['custom_checkpoint_0.pkl', 'optimizer.bin', 'random_states_0.pkl'])
def test_resume_never_unpickles_from_the_run_folder(tmp_path, monkeypatch, planted):
    import pickle
    marker = tmp_path / 'pwned'

    class Trap:
        def __reduce__(self):
            return (open, (str(marker), 'w'))

    crash_at_checkpoint(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path)
    ckpt = tmp_path / 'run' / 'main' / 'checkpoints' / 'step_00000002'
    (ckpt / planted).write_bytes(pickle.dumps(Trap()))
    monkeypatch.undo()
    try:
        run(tmp_path, '--resume')
    except Exception:  # refusing the planted file is fine; running it is not
        pass
    assert not marker.exists()


def crash_at_checkpoint(monkeypatch, step, phase='main'):
    """Make the run die right after writing the checkpoint of ``step`` in ``phase``, as a kill would."""
    real_save = engine.save_checkpoint

    def save_then_crash(accelerator, root, state, keep):
        path = real_save(accelerator, root, state, keep)
        if state.step == step and root.parent.name == phase:
            raise KeyboardInterrupt('simulated kill')
        return path

    monkeypatch.setattr(engine, 'save_checkpoint', save_then_crash)


@pytest.mark.slow  # end to end: several full tiny runs
def test_killed_in_the_baseline_phase_resumes(tmp_path, monkeypatch):
    crash_at_checkpoint(monkeypatch, 2, phase='independent')
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, '--set', 'baseline=independent')
    ckpt = tmp_path / 'run' / 'independent' / 'checkpoints' / 'step_00000002'
    assert sorted(p.name for p in ckpt.glob('model*.safetensors')) == ['model.safetensors']  # its own model only
    monkeypatch.undo()
    summary = run(tmp_path, '--set', 'baseline=independent', '--resume')
    assert set(summary['phases']) == {'main', 'independent'}
    assert summary['phases']['independent']['interface_id'] is None  # independent networks claim no interface


def test_inf_bn_statistics_are_never_checkpointed(tmp_path, monkeypatch):
    real_on_step = engine.TrainLoop.on_step

    def on_step(self, step, losses):
        if step == 3:  # the loss stays finite; a BN buffer does not
            self.phase.models['a'].extractor.trunk.get_submodule('bn1').running_var.fill_(float('inf'))
        real_on_step(self, step, losses)

    monkeypatch.setattr(engine.TrainLoop, 'on_step', on_step)
    with pytest.raises(FloatingPointError, match=r'running_var holds NaN/inf.*Last good checkpoint: .*step_00000002'):
        run(tmp_path, '--set', 'log_every=4')
    ckpt = tmp_path / 'run' / 'main' / 'checkpoints'
    assert (ckpt / 'latest').read_text() == 'step_00000002' and not (ckpt / 'step_00000004').exists()


@pytest.mark.slow  # end to end: several full tiny runs
def test_resume_logs_each_step_once_and_counts_all_training_time(tmp_path, monkeypatch):
    real_forward = JointModel.forward

    def slow_forward(self, *args, **kwargs):
        time.sleep(0.5)
        return real_forward(self, *args, **kwargs)

    monkeypatch.setattr(JointModel, 'forward', slow_forward)
    crash_after_logging(monkeypatch, 5)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, '--set', 'steps=6', '--set', 'log_every=1', '--set', 'checkpoint_every=4')
    monkeypatch.undo()
    summary = run(tmp_path, '--set', 'steps=6', '--set', 'log_every=1', '--set', 'checkpoint_every=4', '--resume')
    rows = (tmp_path / 'run' / 'main' / 'metrics.csv').read_text().splitlines()[1:]
    assert [int(r.split(',')[0]) for r in rows] == [1, 2, 3, 4, 5, 6]
    assert summary['phases']['main']['train_seconds'] >= 4 * 0.5  # the four slow steps before the kill count


@pytest.mark.slow  # end to end: several full tiny runs
def test_refused_launch_prints_one_message(tmp_path):
    (tmp_path / 'run').mkdir()
    (tmp_path / 'run' / 'thesis.tex').write_text('keep me')
    env = {**os.environ, 'CUDA_VISIBLE_DEVICES': '', 'ACCELERATE_USE_CPU': 'true'}
    cmd = [sys.executable, '-m', 'accelerate.commands.launch', '--quiet', '--num_processes', '1',
           '--num_machines', '1', '--mixed_precision', 'no', '--dynamo_backend', 'no',
           str(REPO / 'train.py'), '-c', TINY, '--output-dir', str(tmp_path / 'run')]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert 'Traceback' not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith('error:')]
    assert len(errors) == 1 and 'holds no timm-compat run' in errors[0], proc.stderr[-2000:]


@pytest.mark.slow  # end to end: three full tiny runs
def test_a_shared_dcc_head_resumes_as_if_never_killed(tmp_path, monkeypatch):
    # head: dcc registers the DCC head twice (interface.aux_heads.dcc, networks.a.head); its checkpoint has one name.
    from safetensors.torch import load_file
    classes = '["house","tree","arrow","mushroom"]'
    sets = ['--set', 'iiw=false', '--set', 'networks.0.head=dcc', '--set', 'networks.1.dataset.source=synthetic:A',
            '--set', f'networks.0.dataset.classes={classes}', '--set', f'networks.1.dataset.classes={classes}']
    reference = run(tmp_path, *sets, name='reference')['phases']['main']
    crash_at_checkpoint(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, *sets, name='killed')
    monkeypatch.undo()
    resumed = run(tmp_path, *sets, '--resume', name='killed')['phases']['main']
    weights = [{str(f.relative_to(tmp_path / name)): load_file(f)
                for f in (tmp_path / name / 'main' / 'components').rglob('model.safetensors')}
               for name in ('reference', 'killed')]
    assert weights[0].keys() == weights[1].keys() and 'main/components/interface/model.safetensors' in weights[0]
    # All but the interface's nonce: each run draws its own (its id), as test_resume_continues_from_checkpoint_step.
    assert all(torch.equal(t, weights[1][f][k]) for f in weights[0] for k, t in weights[0][f].items() if k != 'nonce')
    assert resumed['recombination_matrix'] == reference['recombination_matrix']
