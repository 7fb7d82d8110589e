import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from accelerate import Accelerator

import timm_compat as tc
import train
from timm_compat import build, engine
from timm_compat.classes import common_classes
from timm_compat.data import evaluation_batches
from timm_compat.evaluation import evaluate_networks
from timm_compat.methods import methods_for
from timm_compat.synthetic import SYNTHETIC_CLASSES
from timm_compat.joint import JointModel

from tests.conftest import REPO
from tests.datasets_util import write_parquet

TINY = str(REPO / 'tests' / 'tiny.yaml')
pytestmark = pytest.mark.usefixtures('fresh_accelerate')


def run(tmp_path, *args, name='run'):
    return train.main(['-c', TINY, '--output-dir', str(tmp_path / name), *args])


def test_one_joint_step_changes_shared_heads_and_every_network():
    names = {k: SYNTHETIC_CLASSES[k] for k in 'AB'}
    interface = tc.Interface(width=16, rp=True, dcc_classes=common_classes(names.values()))
    nets = {k: tc.make_compatible('resnet8_cifar', split='layer2', interface=interface, num_classes=10,
                                  class_names=v, init_seed=0) for k, v in names.items()}
    joint = JointModel(nets, interface, methods_for(interface))
    before = {k: v.detach().clone() for k, v in joint.named_parameters()}
    # The shared aux heads are one parameter set, not one per network.
    assert len(before) == len(set(p for p in joint.parameters()))
    optimizer = torch.optim.SGD(joint.parameters(), lr=0.1)
    batches = {name: (torch.randn(8, 3, 32, 32), torch.arange(8)) for name in nets}
    joint(batches)['loss'].backward()
    optimizer.step()
    changed = {k for k, v in joint.named_parameters() if not torch.equal(v, before[k])}
    for part in ('networks.A.extractor', 'networks.B.extractor', 'networks.A.head', 'networks.B.head'):
        assert any(k.startswith(part) for k in changed), part
    for aux in ('interface.aux_heads.rp', 'interface.aux_heads.dcc'):
        assert any(k.startswith(aux) for k in changed), aux


def test_demo_config_runs_and_writes_everything(tmp_path):
    summary = run(tmp_path)
    out = tmp_path / 'run'
    assert yaml.safe_load((out / 'config.yaml').read_text())['steps'] == 4
    assert json.loads((out / 'summary.json').read_text())['phases']['main']['networks'] == ['a', 'b']
    metrics = (out / 'main' / 'metrics.csv').read_text().splitlines()
    assert metrics[0].startswith('step,lr,time,a/task,a/rp,a/dcc') and len(metrics) == 3
    main = summary['phases']['main']
    assert len(main['recombination_matrix']) == 2 and set(main['own_accuracy']) == {'a', 'b'}
    for part in ('interface', 'a/extractor', 'a/head', 'b/extractor', 'b/head'):
        assert (out / 'main' / 'components' / part / 'model.safetensors').is_file()
    extractor = tc.Extractor.from_pretrained(out / 'main' / 'components' / 'a' / 'extractor')
    assert extractor.interface_id == main['interface_id']
    for figure in ('recombination.png', 'loss.png'):
        assert (out / 'main' / figure).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n', figure


def test_each_phase_logs_under_its_own_prefix_to_the_named_trackers(tmp_path, monkeypatch):
    logged = []
    monkeypatch.setattr(Accelerator, 'log', lambda self, values, step=None, **kw: logged.append(values))
    run(tmp_path, '--set', 'baseline=independent')
    tags = {k for values in logged for k in values}
    assert {'main/loss', 'main/lr', 'main/a/rp', 'independent/loss', 'independent/a/task'} <= tags
    assert not any(k.startswith(('loss', 'a/')) for k in tags)
    with pytest.raises(ValueError, match=r"trackers \['wandb'\] are not installed"):
        run(tmp_path, '--set', 'trackers=[wandb]', name='wandb')


def test_incremental_leaves_frozen_interface_bit_identical(tmp_path):
    first = run(tmp_path, name='first')['phases']['main']
    interface_dir = tmp_path / 'first' / 'main' / 'components' / 'interface'
    frozen = tc.Interface.from_pretrained(interface_dir)
    assert frozen.id == first['interface_id']
    second = run(tmp_path, '--interface', str(interface_dir), '--set', 'interface.width=null',
                 '--set', f'networks.0.load={tmp_path / "first" / "main" / "components" / "a"}',
                 name='second')['phases']['main']
    # The id hashes every aux-head weight and BN buffer, so equal ids mean a bit-identical interface.
    assert second['interface_id'] == first['interface_id']
    assert second['interface_id_per_rank'] == [first['interface_id']]
    new_extractor = tc.Extractor.from_pretrained(tmp_path / 'second' / 'main' / 'components' / 'b' / 'extractor')
    assert new_extractor.interface_id == frozen.id
    assert not (tmp_path / 'second' / 'main' / 'components' / 'a').exists()  # loaded, not retrained


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


def test_overwrite_validates_everything_before_deleting(tmp_path):
    run(tmp_path, '--set', 'steps=2')
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / 'run').rglob('*'))
    with pytest.raises(ValueError, match="Unknown split point 'no_such_layer'"):
        run(tmp_path, '--overwrite', '--set', 'steps=2', '--set', 'networks.1.split=no_such_layer')
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / 'run').rglob('*')) == before


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
    real_log = engine.TrainLoop.log

    def log_then_crash_at_5(self, step, means):
        real_log(self, step, means)
        if step == 5:
            raise KeyboardInterrupt('simulated kill after logging step 5')

    monkeypatch.setattr(engine.TrainLoop, 'log', log_then_crash_at_5)
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


def test_dcc_without_common_classes(tmp_path):
    a = write_parquet(tmp_path / 'a', ['cat', 'dog'])
    b = write_parquet(tmp_path / 'b', ['emu', 'yak'])
    with pytest.raises(ValueError, match='DCC needs common classes, but the datasets share none'):
        run(tmp_path, '--set', f'networks.0.dataset.source={a}', '--set', f'networks.1.dataset.source={b}')


def test_missing_columns_through_train(tmp_path):
    bad = write_parquet(tmp_path / 'bad', ['cat', 'dog'], image_column='picture')
    with pytest.raises(ValueError, match=r"columns \['picture', 'label'\]"):
        run(tmp_path, '--set', f'networks.0.dataset.source={bad}')


def test_frozen_interface_width_mismatch(tmp_path):
    tc.Interface(width=16, rp=True).save_pretrained(tmp_path / 'itf')
    with pytest.raises(ValueError, match='has width 16, but the config asks for width 32'):
        run(tmp_path, '--interface', str(tmp_path / 'itf'), '--set', 'interface.width=32')


def test_unknown_config_key(tmp_path):
    with pytest.raises(ValueError, match=r"Unknown config key\(s\) \['lr'\].*optim"):
        run(tmp_path, '--set', 'lr=0.1')


@pytest.mark.slow  # end to end: several full tiny runs
def test_two_process_ddp_on_cpu(tmp_path):
    env = {**os.environ, 'CUDA_VISIBLE_DEVICES': '', 'ACCELERATE_USE_CPU': 'true', 'OMP_NUM_THREADS': '1'}
    cmd = [sys.executable, '-m', 'accelerate.commands.launch', '--multi_gpu', '--num_processes', '2',
           '--num_machines', '1', '--mixed_precision', 'no', '--dynamo_backend', 'no',
           str(REPO / 'train.py'), '-c', TINY, '--output-dir', str(tmp_path / 'ddp'), '--set', 'cpu_threads=1']
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / 'ddp' / 'summary.json').read_text())
    assert summary['processes'] == 2
    ids = summary['phases']['main']['interface_id_per_rank']
    assert len(ids) == 2 and ids[0] == ids[1] == summary['phases']['main']['interface_id']
    # accelerate steps a prepared scheduler once per process: the cosine must still end exactly at the last step.
    last = (tmp_path / 'ddp' / 'main' / 'metrics.csv').read_text().splitlines()[-1].split(',')
    assert last[0] == '4' and float(last[1]) == 0.0
    # Each process scored its shard of the test batches: together, the numbers of one single-process pass.
    _, cfg = train.parse_args(['-c', TINY])
    components = tmp_path / 'ddp' / 'main' / 'components'
    models = {n.name: build.load_network(n, cfg, components) for n in cfg.networks}
    tests = {n.name: build.load_task_data(n, cfg)[1] for n in cfg.networks}
    assert all(len(evaluation_batches(len(t), cfg.eval_batch_size)) == 2 for t in tests.values())  # one a process
    measured = evaluate_networks(models, tests, cfg.eval_batch_size, cfg.eval_bn)
    for key in ('own_accuracy', 'recombination_matrix', 'own_accuracy_running', 'recombination_matrix_running'):
        assert summary['phases']['main'][key] == measured[key], key


@pytest.mark.slow  # two processes start
@pytest.mark.skipif(torch.cuda.is_available(), reason='with GPUs, --multi_gpu makes a real multi-process run')
def test_the_gpu_ddp_command_on_cpu_says_how_to_run_on_cpu(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != 'ACCELERATE_USE_CPU'}
    cmd = [sys.executable, '-m', 'accelerate.commands.launch', '--multi_gpu', '--num_processes', '2',
           '--num_machines', '1', '--mixed_precision', 'no', '--dynamo_backend', 'no',
           str(REPO / 'train.py'), '-c', TINY, '--output-dir', str(tmp_path / 'ddp')]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert 'set ACCELERATE_USE_CPU=true' in proc.stderr and 'already holds' not in proc.stderr
    assert 'in use by a live run' not in proc.stderr and not (tmp_path / 'ddp' / 'config.yaml').exists()


@pytest.mark.slow  # two processes start
def test_sync_batchnorm_on_several_cpu_processes_is_refused_before_the_folder_is_claimed(tmp_path):
    env = {**os.environ, 'CUDA_VISIBLE_DEVICES': '', 'ACCELERATE_USE_CPU': 'true', 'OMP_NUM_THREADS': '1'}
    cmd = [sys.executable, '-m', 'accelerate.commands.launch', '--multi_gpu', '--num_processes', '2',
           '--num_machines', '1', '--mixed_precision', 'no', '--dynamo_backend', 'no',
           str(REPO / 'train.py'), '-c', TINY, '--output-dir', str(tmp_path / 'ddp'), '--set', 'sync_batchnorm=true']
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    errors = {line for line in proc.stderr.splitlines() if line.startswith('error:')}
    assert len(errors) == 1 and 'set sync_batchnorm=false' in errors.pop(), proc.stderr[-2000:]
    # Refused by make_accelerator, not at the first step: no folder was claimed and abandoned.
    assert 'nothing of it was kept' not in proc.stderr + proc.stdout and not (tmp_path / 'ddp').exists()


@pytest.mark.slow  # end to end: several full tiny runs
def test_bf16_and_gradient_accumulation(tmp_path):
    summary = run(tmp_path, '--set', 'mixed_precision=bf16', '--set', 'gradient_accumulation_steps=2')
    assert summary['mixed_precision'] == 'bf16'
    metrics = (tmp_path / 'run' / 'main' / 'metrics.csv').read_text().splitlines()
    lrs = [float(line.split(',')[1]) for line in metrics[1:]]
    # The cosine schedule runs over optimiser steps (every second micro-step): half-way, then done.
    assert lrs == pytest.approx([0.025, 0.0])


def test_save_components_and_push_to_hub(tmp_path, monkeypatch):
    from huggingface_hub import HfApi, constants
    from huggingface_hub.hf_api import RepoUrl
    uploads = {}

    def create_repo(self, repo_id, **kwargs):
        return RepoUrl(f'{constants.ENDPOINT}/{repo_id}')

    def upload_folder(self, **kwargs):  # records what would go up; the folder itself is temporary
        uploads[kwargs['repo_id']] = (sorted(p.name for p in Path(kwargs['folder_path']).iterdir()),
                                      kwargs['commit_message'])
        # Pushes come last, after the run's last collective: under DDP no process waits in one during an upload.
        assert (tmp_path / 'run' / 'summary.json').is_file()

    monkeypatch.setattr(HfApi, 'create_repo', create_repo)
    monkeypatch.setattr(HfApi, 'upload_folder', upload_folder)
    logged_in(monkeypatch)
    summary = run(tmp_path, '--save-components', str(tmp_path / 'parts'), '--push-to-hub', 'org/demo')
    iid = summary['phases']['main']['interface_id']
    for part in ('interface', 'a/extractor', 'a/head', 'b/extractor', 'b/head'):
        assert tc.load_component(tmp_path / 'parts' / 'main' / part).interface_id == iid
    assert sorted(uploads) == ['org/demo-a-extractor', 'org/demo-a-head', 'org/demo-b-extractor',
                               'org/demo-b-head', 'org/demo-interface']
    files, message = uploads['org/demo-a-head']
    assert files == ['README.md', 'config.json', 'model.safetensors'] and iid in message


def logged_in(monkeypatch):
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, 'get_token', lambda: 'hf_test')
    monkeypatch.setattr(huggingface_hub, 'whoami', lambda: {'name': 'tester'})


def test_push_to_hub_without_a_login_refuses_before_training(tmp_path, monkeypatch):
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, 'get_token', lambda: None)
    with pytest.raises(ValueError, match='no Hugging Face token'):
        run(tmp_path, '--push-to-hub', 'org/demo')
    assert not (tmp_path / 'run' / 'config.yaml').exists()


def test_a_failed_push_loses_nothing(tmp_path, monkeypatch):
    from huggingface_hub import HfApi
    logged_in(monkeypatch)

    def create_repo(self, repo_id, **kwargs):
        raise OSError('the Hub is down')
    monkeypatch.setattr(HfApi, 'create_repo', create_repo)
    with pytest.raises(ValueError, match='the Hub is down.*Nothing is lost'):
        run(tmp_path, '--push-to-hub', 'org/demo')
    summary = json.loads((tmp_path / 'run' / 'main' / 'summary.json').read_text())
    assert (Path(summary['components']) / 'a' / 'head' / 'model.safetensors').is_file()


def test_a_run_that_fails_before_its_first_step_can_be_started_again(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError('out of memory')
    with monkeypatch.context() as m:
        m.setattr(engine.TrainLoop, 'run', fail)
        with pytest.raises(RuntimeError, match='out of memory'):
            run(tmp_path)
    assert not (tmp_path / 'run' / 'config.yaml').exists()
    assert run(tmp_path)['phases']['main']['networks'] == ['a', 'b']  # not "already holds a run"


@pytest.mark.slow  # end to end: several full tiny runs
def test_clip_grad_norm_bounds_the_update(tmp_path):
    def weights(name, *overrides):
        run(tmp_path, '--set', 'steps=1', '--set', 'optim.momentum=0', '--set', 'optim.weight_decay=0',
            '--set', 'optim.schedule=constant', *overrides, name=name)
        parts = [tc.Extractor.from_pretrained(tmp_path / name / 'main' / 'components' / 'a' / 'extractor'),
                 tc.Interface.from_pretrained(tmp_path / name / 'main' / 'components' / 'interface')]
        return torch.cat([p.detach().flatten() for part in parts for p in part.parameters()])

    start = weights('lr0', '--set', 'optim.lr=1e-30')  # lr must be > 0; this one leaves float32 weights as they are
    free = (weights('free', '--set', 'optim.lr=1') - start).norm()
    clipped = (weights('clip', '--set', 'optim.lr=1', '--set', 'optim.clip_grad_norm=0.001') - start).norm()
    assert free > 0.1 and 0 < clipped <= 0.001 * 1.01  # one SGD step of lr 1 moves by the clipped norm at most


KEPT_AFTER_FREE = """
import ctypes, os
from pathlib import Path
from timm_compat._cpu import keep_freed_memory
libc, page = ctypes.CDLL('libc.so.6'), os.sysconf('SC_PAGE_SIZE')
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]

def freed_but_kept(size=64 << 20):
    before = int(Path('/proc/self/statm').read_text().split()[1])
    buffer = libc.malloc(size)
    ctypes.memset(buffer, 1, size)
    libc.free(buffer)
    return (int(Path('/proc/self/statm').read_text().split()[1]) - before) * page

default = freed_but_kept()
print(default, keep_freed_memory(), freed_but_kept())
"""


@pytest.mark.skipif(not Path('/proc/self/statm').exists() or os.confstr('CS_GNU_LIBC_VERSION') is None,
                    reason='keep_freed_memory tunes glibc; resident memory is read from /proc')
def test_keep_freed_memory_keeps_large_buffers_in_the_process():
    # A fresh process: train.main, run in this one by other tests, has already called it.
    out = subprocess.run([sys.executable, '-c', KEPT_AFTER_FREE], capture_output=True, text=True, check=True,
                         cwd=REPO).stdout.split()
    default, applied, kept = int(out[0]), out[1], int(out[2])
    assert default < 16 << 20  # glibc's default: a freed 64 MiB buffer is unmapped at once
    assert applied == 'True' and kept > 48 << 20  # now it stays resident for the next step


def test_alternate_schedule_gives_each_network_its_epochs(tmp_path):
    common = ('--set', 'steps=null', '--set', 'epochs=1', '--set', 'log_every=100')
    summed = run(tmp_path, *common, name='sum')['phases']['main']
    alternate = run(tmp_path, *common, '--set', 'joint_schedule=alternate', name='alternate')['phases']['main']
    assert summed['steps'] == 5  # 80 images, batch 16
    assert alternate['steps'] == 10  # one network a step: each still sees its 5 batches
    rows = (tmp_path / 'alternate' / 'main' / 'metrics.csv').read_text().splitlines()
    assert {'a/task', 'a/rp', 'b/task', 'b/rp', 'loss'} <= set(rows[0].split(','))


def test_loaded_networks_and_interface_go_to_the_run_device(tmp_path):
    run(tmp_path, name='first')
    parts = tmp_path / 'first' / 'main' / 'components'
    _, cfg = train.parse_args(['-c', TINY, '--interface', str(parts / 'interface'), '--set', 'interface.width=null',
                               '--set', f'networks.0.load={parts / "a"}'])
    data = {n.name: build.load_task_data(n, cfg) for n in cfg.networks}
    # 'meta' stands in for a GPU: a loaded network left on the CPU would show up here.
    phase = build.build_phase('main', cfg, data, torch.device('meta'))
    tensors = [t for m in (*phase.models.values(), phase.interface) for t in (*m.parameters(), *m.buffers())]
    assert {t.device.type for t in tensors} == {'meta'}


def test_compile_compiles_each_extractor_and_head_in_place_not_the_task(tmp_path, monkeypatch):
    compiled, real = [], torch.compile

    def spy(target, **kwargs):
        compiled.append(getattr(target, '__self__', target))
        return real(target, **kwargs)

    monkeypatch.setattr(torch, 'compile', spy)
    run(tmp_path, name='eager')
    assert compiled == []
    torch._dynamo.reset()
    run(tmp_path, '--set', 'compile=eager', name='compiled')  # dynamo's eager backend: traced, no code generation
    # timm's task convention: the modules doing the tensor work, before DDP, not the task's loop over networks.
    assert len(compiled) == 4 and not any(isinstance(m, (JointModel, torch.nn.parallel.DistributedDataParallel))
                                          for m in compiled)
    def losses(name):  # every column of metrics.csv but the wall time
        header, *rows = [line.split(',') for line in (tmp_path / name / 'main' / 'metrics.csv').read_text().split()]
        return {f'{row[0]}/{k}': float(v) for row in rows for k, v in zip(header, row) if k != 'time'}

    assert len(losses('eager')) == 18 and losses('compiled') == pytest.approx(losses('eager'), rel=1e-5)
    # In place: the saved components keep their state-dict keys (no `_orig_mod.` prefix).
    keys = lambda name: sorted(p.relative_to(tmp_path / name) for p in (tmp_path / name).rglob('*.safetensors'))
    assert keys('compiled') == keys('eager')
    from safetensors import safe_open
    for path in keys('eager'):
        with safe_open(tmp_path / 'compiled' / path, 'pt') as c, safe_open(tmp_path / 'eager' / path, 'pt') as e:
            assert sorted(c.keys()) == sorted(e.keys())
