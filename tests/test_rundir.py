"""The run folder and checkpoint files: locks, markers, resume checks, atomic writes, the train state."""
import json
import os
import subprocess
import sys

import pytest
import yaml

from timm_compat._integrity import atomic_write_text
from timm_compat.checkpoint import TrainState, latest_checkpoint, load_train_state, save_checkpoint
from timm_compat.data import DATA_VERSION
from timm_compat.metrics_log import MetricsLog
from timm_compat.rundir import RunDir, RunDirError

from tests.conftest import REPO

CONFIG = {'steps': 4, 'optim': {'lr': 0.05}, 'networks': [{'name': 'a', 'backbone': 'resnet8_cifar'}]}


def started(path, config=CONFIG):
    run = RunDir(path).acquire()
    run.prepare(config, resume=False, overwrite=False, finished=[])
    run.release()
    return path


def test_lock_refuses_a_second_live_process_and_names_it(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, '-c', f'from timm_compat.rundir import RunDir; held = RunDir({str(tmp_path)!r}).acquire(); '
                               f'print("ready", flush=True); import time; time.sleep(60)'],
        cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == 'ready'
        with pytest.raises(RunDirError, match=rf'in use by a live run \(pid {holder.pid}\)'):
            RunDir(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    RunDir(tmp_path).acquire().release()  # the kernel dropped the dead holder's lock


def test_a_refused_claim_leaves_no_folder_it_created(tmp_path):
    # acquire() creates the folder to lock it; a run refused before it started left that folder behind, with .lock.
    run = RunDir(tmp_path / 'new' / 'run').acquire()
    with pytest.raises(RunDirError, match='holds no timm-compat run'):
        run.prepare(CONFIG, resume=True, overwrite=False, finished=[])
    run.release()
    assert not (tmp_path / 'new').exists()
    (tmp_path / 'kept').mkdir()
    RunDir(tmp_path / 'kept').acquire().release()  # a folder it did not create stays, and so does a started run
    assert (tmp_path / 'kept').is_dir() and (started(tmp_path / 'run') / 'run.json').is_file()


def test_overwrite_deletes_only_a_marked_run(tmp_path):
    (tmp_path / 'thesis.tex').write_text('years of work')
    run = RunDir(tmp_path).acquire()
    with pytest.raises(RunDirError, match='holds no timm-compat run .* never deleted, not even with --overwrite'):
        run.prepare(CONFIG, resume=False, overwrite=True, finished=[])
    assert (tmp_path / 'thesis.tex').read_text() == 'years of work'
    run.release()


def test_overwrite_replaces_a_run_and_keeps_the_lock(tmp_path):
    started(tmp_path)
    (tmp_path / 'main').mkdir()
    (tmp_path / 'main' / 'metrics.csv').write_text('step\n1\n')
    run = RunDir(tmp_path).acquire()
    with pytest.raises(RunDirError, match='already holds a run'):
        run.prepare(CONFIG, resume=False, overwrite=False, finished=[])
    run.prepare(CONFIG, resume=False, overwrite=True, finished=[])
    assert sorted(p.name for p in tmp_path.iterdir()) == ['.lock', 'config.yaml', 'run.json']
    run.release()


def test_resume_refuses_a_changed_config_and_names_the_keys(tmp_path):
    started(tmp_path)
    run = RunDir(tmp_path).acquire()
    changed = {**CONFIG, 'optim': {'lr': 0.1}}
    with pytest.raises(RunDirError, match=r'optim\.lr: 0\.05 -> 0\.1'):
        run.prepare(changed, resume=True, overwrite=False, finished=[])
    relabel = {**CONFIG, 'networks': [{'name': 'a', 'backbone': 'resnet20_cifar'}]}
    with pytest.raises(RunDirError, match=r"networks\.0\.backbone: 'resnet8_cifar' -> 'resnet20_cifar'"):
        run.prepare(relabel, resume=True, overwrite=False, finished=['main'])
    assert yaml.safe_load((tmp_path / 'config.yaml').read_text()) == CONFIG  # nothing was rewritten
    run.release()


def test_resume_may_extend_an_unfinished_run_and_records_it(tmp_path):
    started(tmp_path)
    run = RunDir(tmp_path).acquire()
    with pytest.raises(RunDirError, match=r"changes \['steps'\], but phase\(s\) \['main'\] already finished"):
        run.prepare({**CONFIG, 'steps': 8}, resume=True, overwrite=False, finished=['main'])
    run.prepare({**CONFIG, 'steps': 8}, resume=True, overwrite=False, finished=[])
    run.release()
    assert yaml.safe_load((tmp_path / 'config.yaml').read_text())['steps'] == 8
    resumes = json.loads((tmp_path / 'run.json').read_text())['resumes']
    assert [r['changes'] for r in resumes] == [{'steps': [4, 8]}]


def test_resume_refuses_a_run_of_another_data_version(tmp_path):
    """A run started before the data changed (its marker has no version) would train on both if resumed."""
    started(tmp_path)
    marker = json.loads((tmp_path / 'run.json').read_text())
    assert marker['data_version'] == DATA_VERSION
    del marker['data_version']
    (tmp_path / 'run.json').write_text(json.dumps(marker))
    run = RunDir(tmp_path).acquire()
    with pytest.raises(RunDirError, match=f'trained on data version 1, this code makes version {DATA_VERSION}'):
        run.prepare(CONFIG, resume=True, overwrite=False, finished=[])
    run.prepare(CONFIG, resume=False, overwrite=True, finished=[])  # a new run there is this version's
    run.release()
    assert json.loads((tmp_path / 'run.json').read_text())['data_version'] == DATA_VERSION


def test_resume_needs_a_run(tmp_path):
    run = RunDir(tmp_path).acquire()
    with pytest.raises(RunDirError, match='holds no timm-compat run to resume'):
        run.prepare(CONFIG, resume=True, overwrite=False, finished=[])
    run.release()


@pytest.mark.parametrize('keep, kept', [(1, ['step_00000006']), (2, ['step_00000004', 'step_00000006'])])
def test_pruning_keeps_the_checkpoint_latest_names_and_drops_an_abandoned_later_one(tmp_path, fresh_accelerate,
                                                                                   keep, kept):
    """A kill between renaming step 10 into place and pointing ``latest`` at it leaves step 10 behind, and the
    resumed run continues from step 4. Its next checkpoint (step 6) is the newest of its timeline: pruning by name
    alone kept the abandoned step 10 and deleted the checkpoint ``latest`` had just been pointed at."""
    from accelerate import Accelerator
    accelerator, root = Accelerator(cpu=True), tmp_path / 'checkpoints'
    for step in (4, 10):
        save_checkpoint(accelerator, root, TrainState(step=step), keep=2)
    (root / 'latest').write_text('step_00000004')  # the kill came before `latest` moved on to step 10
    save_checkpoint(accelerator, root, TrainState(step=6), keep=keep)
    assert sorted(p.name for p in root.glob('step_*')) == kept
    assert load_train_state(latest_checkpoint(root)).step == 6


@pytest.mark.parametrize('pointer', ['../../elsewhere', '/etc', 'step_1', 'step_00000002/..'])
def test_latest_must_name_a_checkpoint_of_this_run(tmp_path, pointer):
    (tmp_path / 'step_00000002').mkdir()
    (tmp_path / 'latest').write_text(pointer)
    with pytest.raises(ValueError, match='not a checkpoint folder'):
        latest_checkpoint(tmp_path)


def test_latest_refuses_a_link_out_of_the_run(tmp_path):
    (tmp_path / 'outside').mkdir()
    (tmp_path / 'run').mkdir()
    os.symlink(tmp_path / 'outside', tmp_path / 'run' / 'step_00000002')
    (tmp_path / 'run' / 'latest').write_text('step_00000002')
    with pytest.raises(ValueError, match='not a checkpoint folder'):
        latest_checkpoint(tmp_path / 'run')


def test_train_state_is_checked_json(tmp_path):
    ckpt = tmp_path / 'step_00000004'
    ckpt.mkdir()
    (ckpt / 'train_state.json').write_text(json.dumps({'step': 4, 'train_seconds': 2.5}))
    assert load_train_state(ckpt) == TrainState(step=4, train_seconds=2.5)
    (ckpt / 'train_state.json').write_text(json.dumps({'step': 6, 'train_seconds': 2.5}))
    with pytest.raises(ValueError, match='says step 6, but the folder is step_00000004'):
        load_train_state(ckpt)
    (ckpt / 'train_state.json').unlink()
    with pytest.raises(ValueError, match='missing or not a valid train state'):
        load_train_state(ckpt)


def test_atomic_write_keeps_the_old_file_on_failure_and_honours_the_umask(tmp_path, monkeypatch):
    path = tmp_path / 'summary.json'
    old = os.umask(0o022)
    try:
        atomic_write_text(path, '{"ok": 1}')
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644

    def disk_full(fd):
        raise OSError(28, 'No space left on device')

    monkeypatch.setattr(os, 'fsync', disk_full)
    with pytest.raises(OSError, match='No space left'):
        atomic_write_text(path, '{"ok": 2}')
    assert path.read_text() == '{"ok": 1}'
    assert [p.name for p in tmp_path.iterdir()] == ['summary.json']


def test_metrics_rewind_drops_rows_after_the_checkpoint(tmp_path):
    log = MetricsLog(tmp_path / 'metrics.csv')
    for step in range(1, 6):
        log.append({'step': step, 'loss': 1.0 / step})
    log.rewind(4)
    log.append({'step': 5, 'loss': 0.5})
    steps = [line.split(',')[0] for line in (tmp_path / 'metrics.csv').read_text().splitlines()]
    assert steps == ['step', '1', '2', '3', '4', '5']
    log.rewind(0)
    assert not (tmp_path / 'metrics.csv').exists()


def test_metrics_gain_a_column_when_a_network_first_logs(tmp_path):
    log = MetricsLog(tmp_path / 'metrics.csv')
    log.append({'step': 1, 'a/task': 2.0, 'loss': 2.0})  # alternate schedule: only a trained at step 1
    log.append({'step': 2, 'b/task': 3.0, 'loss': 3.0})
    log.append({'step': 3, 'a/task': 1.0, 'loss': 1.0})
    lines = (tmp_path / 'metrics.csv').read_text().splitlines()
    assert lines == ['step,a/task,loss,b/task', '1,2.0,2.0,', '2,,3.0,3.0', '3,1.0,1.0,']


def test_resume_accepts_a_moved_data_folder(tmp_path):
    def config(data_dir, source):
        return {**CONFIG, 'data_dir': data_dir, 'networks': [{'name': 'a', 'dataset': {'source': source}}]}

    started(tmp_path, config('/old/cifar', 'parquet:/old/cifar'))
    moved, other = config('/new/cifar', 'parquet:/new/cifar'), config('/new/cifar', 'parquet:/new/stl10')
    run = RunDir(tmp_path).acquire()
    with pytest.raises(RunDirError, match=r'networks\.0\.dataset\.source'):
        run.prepare(other, resume=True, overwrite=False, finished=[])
    run.prepare(moved, resume=True, overwrite=False, finished=[])
    run.release()


def test_abandon_untrained_removes_only_a_run_that_took_no_step(tmp_path):
    fresh = started(tmp_path / 'fresh')
    (fresh / 'main').mkdir()
    MetricsLog(fresh / 'main' / 'metrics.csv')._write(['step', 'loss'], [])  # a header, no row
    (fresh / 'trackers').mkdir()
    assert RunDir(fresh).abandon_untrained('trackers')
    assert [p.name for p in fresh.iterdir()] == ['.lock']
    started(fresh)  # the same command runs again

    logged = started(tmp_path / 'logged')
    (logged / 'main').mkdir()
    MetricsLog(logged / 'main' / 'metrics.csv').append({'step': 2, 'loss': 1.0})
    assert not RunDir(logged).abandon_untrained() and (logged / 'config.yaml').exists()
    kept = started(tmp_path / 'kept')
    (kept / 'notes.txt').write_text('mine')
    assert not RunDir(kept).abandon_untrained() and (kept / 'notes.txt').exists()


@pytest.mark.parametrize('where', ['file', 'below_file'])
def test_a_save_components_that_cannot_be_a_folder_is_refused_at_claim(tmp_path, where):
    """A file as save_components was found only when the components were saved, after training, with a traceback;
    the last steps' weights, never checkpointed, were lost. It is refused before anything is written."""
    (tmp_path / 'notes').write_text('mine')
    folder = tmp_path / 'notes' if where == 'file' else tmp_path / 'notes' / 'components'
    run = RunDir(tmp_path / 'run').acquire()
    with pytest.raises(RunDirError, match=rf'save_components: .*{tmp_path / "notes"} is not a folder'):
        run.prepare({**CONFIG, 'save_components': str(folder)}, resume=False, overwrite=False, finished=[])
    run.release()
    assert not (tmp_path / 'run').exists() and (tmp_path / 'notes').read_text() == 'mine'
    started(tmp_path / 'run')  # a resume that switches to it is refused too, and leaves the run as it was
    record = {f: (tmp_path / 'run' / f).read_bytes() for f in ('config.yaml', 'run.json')}
    run = RunDir(tmp_path / 'run').acquire()
    with pytest.raises(RunDirError, match='is not a folder'):
        run.prepare({**CONFIG, 'save_components': str(folder)}, resume=True, overwrite=False, finished=[])
    run.release()
    assert {f: (tmp_path / 'run' / f).read_bytes() for f in record} == record


def test_a_save_components_that_is_not_writable_is_refused_at_claim(tmp_path, monkeypatch):
    (tmp_path / 'locked').mkdir(mode=0o555)
    if os.geteuid() == 0:  # root writes anywhere: access() answers as for the folder's owner without root
        monkeypatch.setattr(os, 'access', lambda path, mode: not mode & os.W_OK or os.stat(path).st_mode & 0o200)
    run = RunDir(tmp_path / 'run').acquire()
    with pytest.raises(RunDirError, match='save_components: .*locked.* not writable'):
        run.prepare({**CONFIG, 'save_components': str(tmp_path / 'locked' / 'c')}, resume=False, overwrite=False,
                    finished=[])
    run.release()
    assert not (tmp_path / 'run').exists()


def test_an_output_folder_below_a_file_is_refused_by_name(tmp_path):
    (tmp_path / 'notes').write_text('mine')
    with pytest.raises(RunDirError, match=rf'output_dir: .* cannot be created: {tmp_path / "notes"} is not a folder'):
        RunDir(tmp_path / 'notes' / 'run').acquire()
    assert (tmp_path / 'notes').read_text() == 'mine'


def test_a_resume_that_moves_its_components_to_another_runs_folder_is_refused(tmp_path):
    """The check for another run's components was skipped on every resume, so a resume could switch
    save_components to a folder holding them, and replace them when it ended."""
    other = tmp_path / 'other' / 'main' / 'a' / 'extractor'
    other.mkdir(parents=True)
    (other / 'model.safetensors').write_text("another run's weights")
    started(tmp_path / 'run')
    record = {f: (tmp_path / 'run' / f).read_bytes() for f in ('config.yaml', 'run.json')}
    run = RunDir(tmp_path / 'run').acquire()
    with pytest.raises(RunDirError, match='save_components: .*other already holds .* or the one the run saved to'):
        run.prepare({**CONFIG, 'save_components': str(tmp_path / 'other')}, resume=True, overwrite=False,
                    finished=[])
    assert {f: (tmp_path / 'run' / f).read_bytes() for f in record} == record
    # Its own folder, which holds what it saved, it may resume with; and move to an empty one.
    own = {**CONFIG, 'save_components': str(tmp_path / 'own')}
    run.prepare(own, resume=True, overwrite=False, finished=[])
    run.release()
    (tmp_path / 'own' / 'main').mkdir(parents=True)  # what the run saved when it ended
    run = RunDir(tmp_path / 'run').acquire()
    run.prepare(own, resume=True, overwrite=False, finished=[])
    run.release()
    assert (other / 'model.safetensors').read_text() == "another run's weights"


def test_two_live_runs_never_save_components_to_one_folder(tmp_path):
    """Both found the folder empty when they started, and the one that ended last replaced the other's components."""
    shared = {**CONFIG, 'save_components': str(tmp_path / 'shared')}
    first = RunDir(tmp_path / 'first').acquire()
    first.prepare(shared, resume=False, overwrite=False, finished=[])
    second = RunDir(tmp_path / 'second').acquire()
    try:
        with pytest.raises(RunDirError, match=rf'save_components: .*shared is where a live run \(pid {os.getpid()}\)'):
            second.prepare(shared, resume=False, overwrite=False, finished=[])
    finally:
        second.release()
        first.release()
    assert not (tmp_path / 'second').exists()
    assert not (tmp_path / 'shared').exists()  # the first run saved nothing there: the folder it made is gone
    (tmp_path / 'shared').mkdir()
    (tmp_path / 'shared' / '.lock').write_text('123\n')  # a dead run's lock is no component
    started(tmp_path / 'second', shared)


def test_a_resume_in_another_precision_is_refused_unless_the_config_says_auto(tmp_path):
    """With mixed_precision null the launcher decides: a resume under another --mixed_precision was accepted
    without a word, and summary.json reported bf16 for a run partly trained in fp32."""
    first = RunDir(tmp_path / 'run').acquire()
    first.prepare(CONFIG, resume=False, overwrite=False, finished=[], precision='no')
    first.release()
    record = {f: (tmp_path / 'run' / f).read_bytes() for f in ('config.yaml', 'run.json')}
    assert json.loads(record['run.json'])['mixed_precision'] == 'no'
    run = RunDir(tmp_path / 'run').acquire()
    with pytest.raises(RunDirError, match=r"trained in 'no'.* asks for 'bf16'.*--mixed_precision no"):
        run.prepare(CONFIG, resume=True, overwrite=False, finished=[], precision='bf16')
    assert {f: (tmp_path / 'run' / f).read_bytes() for f in record} == record
    run.prepare(CONFIG, resume=True, overwrite=False, finished=[], precision='no')
    # A finished run's resume trains nothing, only reads its summary back: any launch may do that.
    run.prepare(CONFIG, resume=True, overwrite=False, finished=['main'], lengths={'main': 4}, precision='bf16')
    run.release()
    assert json.loads((tmp_path / 'run' / 'run.json').read_text())['mixed_precision'] == 'no'

    auto = {**CONFIG, 'mixed_precision': 'auto'}  # documented: resumed elsewhere, it takes that machine's choice
    run = RunDir(tmp_path / 'auto').acquire()
    run.prepare(auto, resume=False, overwrite=False, finished=[], precision='no')
    run.prepare(auto, resume=True, overwrite=False, finished=[], precision='bf16')
    run.release()
    marker = json.loads((tmp_path / 'auto' / 'run.json').read_text())
    assert marker['mixed_precision'] == 'bf16' and marker['resumes'][0]['mixed_precision'] == ['no', 'bf16']


@pytest.mark.parametrize('before, after, same', [
    (('old', 'imagefolder:old/x'), ('new', 'imagefolder:new/x'), True),  # 'old' is in 'imagefolder' too
    (('/data', 'parquet:/data/x'), ('/new/', 'parquet:/new//x'), True),
    (('/data', 'parquet:/database/x'), ('/new', 'parquet:/newbase/x'), False),  # other data: not below /data
    (('/data', 'imagefolder:/data/x'), ('/new', 'parquet:/new/x'), False)], ids=['prefix', 'spelling', 'name', 'kind'])
def test_a_moved_data_folder_is_its_leading_path(tmp_path, before, after, same):
    """data_dir was replaced as the first substring anywhere in the source, not as the path's leading folder."""
    def config(data_dir, source):
        return {**CONFIG, 'data_dir': data_dir, 'networks': [{'name': 'a', 'dataset': {'source': source}}]}

    started(tmp_path, config(*before))
    run = RunDir(tmp_path).acquire()
    if same:
        run.prepare(config(*after), resume=True, overwrite=False, finished=[])
    else:
        with pytest.raises(RunDirError, match=r'networks\.0\.dataset\.source'):
            run.prepare(config(*after), resume=True, overwrite=False, finished=[])
    run.release()


def test_a_resume_may_switch_compile_and_channels_last_but_not_deterministic(tmp_path):
    """compile and channels_last choose kernels, as cpu_threads does: a crashing compile could not be turned off.
    deterministic also switches CUDA's TF32 matmuls, a precision change, and promises bit-identical reruns."""
    started(tmp_path, {**CONFIG, 'compile': True, 'channels_last': True, 'deterministic': False})
    run = RunDir(tmp_path).acquire()
    off = {**CONFIG, 'compile': False, 'channels_last': False, 'deterministic': False}
    run.prepare(off, resume=True, overwrite=False, finished=[])
    with pytest.raises(RunDirError, match=r'deterministic: False -> True'):
        run.prepare({**off, 'deterministic': True}, resume=True, overwrite=False, finished=[])
    run.release()
    changes = [r['changes'] for r in json.loads((tmp_path / 'run.json').read_text())['resumes']]
    assert changes == [{'compile': [True, False], 'channels_last': [True, False]}]


@pytest.mark.parametrize('text', ['', '- 1\n- 2\n', 'steps\n'], ids=['empty', 'list', 'word'])
def test_a_recorded_config_that_is_not_a_mapping_is_refused_by_name(tmp_path, text):
    """An emptied config.yaml (a full disk, a hand edit) crashed --resume with an AttributeError."""
    started(tmp_path)
    (tmp_path / 'config.yaml').write_text(text)
    marker = (tmp_path / 'run.json').read_bytes()
    run = RunDir(tmp_path).acquire()
    with pytest.raises(RunDirError, match=rf'--resume: {tmp_path / "config.yaml"} holds no config'):
        run.prepare(CONFIG, resume=True, overwrite=False, finished=[])
    run.release()
    assert (tmp_path / 'config.yaml').read_text() == text and (tmp_path / 'run.json').read_bytes() == marker
