import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from accelerate.utils import load as accelerate_load

from accelerate import Accelerator

import timm_compat as tc
import train
from timm_compat import build, engine
from timm_compat._hardware import hardware
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
    # The machine as the run had it (its torch threads), for records that outlive the run's folder.
    assert json.loads((out / 'summary.json').read_text())['hardware'] == hardware(torch.device('cpu'))
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
    # A loaded head scores its own classes, in its order: other dataset classes are refused before the folder is claimed
    # (they were refused only by the evaluation, after training).
    reordered = list(reversed(SYNTHETIC_CLASSES['A']))
    with pytest.raises(ValueError, match=r"Network 'a'.*head.*classes.*networks\.0\.dataset\.classes"):
        run(tmp_path, '--interface', str(interface_dir), '--set', 'interface.width=null',
            '--set', f'networks.0.load={tmp_path / "first" / "main" / "components" / "a"}',
            '--set', f'networks.0.dataset.classes={reordered}', name='third')
    assert not (tmp_path / 'third').exists()


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
    # Each rank crops and flips from its own RNG stream (seed + rank); with one shared seed, rank 1's i-th image of
    # every batch took rank 0's crop and flip. Accelerate checkpoints each rank's RNG state (read as it reads them).
    step = tmp_path / 'ddp' / 'main' / 'checkpoints' / 'step_00000002'
    states = [accelerate_load(step / f'random_states_{rank}.pkl') for rank in range(2)]  # weights_only
    assert not torch.equal(states[0]['torch_manual_seed'], states[1]['torch_manual_seed'])
    # accelerate steps a prepared scheduler once per process: the cosine must still advance once per update, so the
    # logged updates 2 and 4 (t = 1, 3 of 4) take 0.05 (1 + cos(pi t / 4)) / 2 (stepped twice: 0.025 and 0).
    rows = [r.split(',') for r in (tmp_path / 'ddp' / 'main' / 'metrics.csv').read_text().splitlines()[1:]]
    assert [r[0] for r in rows] == ['2', '4']
    assert [float(r[1]) for r in rows] == pytest.approx([0.05 * (1 + math.cos(math.pi * t / 4)) / 2 for t in (1, 3)])
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
def test_the_gpu_ddp_command_on_cpu_is_one_run_or_says_how_to_run_on_cpu(tmp_path):
    """``--multi_gpu`` on a machine without GPUs: accelerate before 1.13 makes the processes one gloo run on CPU;
    later versions give each process the CPU alone, which check_launch refuses. Either way, never two runs racing
    for one folder."""
    env = {k: v for k, v in os.environ.items() if k != 'ACCELERATE_USE_CPU'}
    cmd = [sys.executable, '-m', 'accelerate.commands.launch', '--multi_gpu', '--num_processes', '2',
           '--num_machines', '1', '--mixed_precision', 'no', '--dynamo_backend', 'no',
           str(REPO / 'train.py'), '-c', TINY, '--output-dir', str(tmp_path / 'ddp')]
    proc = subprocess.run(cmd, env={**env, 'OMP_NUM_THREADS': '1'}, cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert 'already holds' not in proc.stderr and 'in use by a live run' not in proc.stderr, proc.stderr[-2000:]
    if proc.returncode == 0:
        assert json.loads((tmp_path / 'ddp' / 'summary.json').read_text())['processes'] == 2
    else:
        assert 'set ACCELERATE_USE_CPU=true' in proc.stderr, proc.stderr[-2000:]
        assert not (tmp_path / 'ddp' / 'config.yaml').exists()


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
    # The cosine schedule runs over optimiser steps (every second micro-step): the two updates take the full lr, then
    # half of it (stepped per micro-step, the second would take 0).
    assert lrs == pytest.approx([0.05, 0.025])


@pytest.mark.slow  # end to end: several tiny runs
def test_a_resume_with_fewer_steps_than_its_checkpoint_is_refused(tmp_path):
    run(tmp_path)  # 4 steps, checkpoints every 2
    for summary in (tmp_path / 'run' / 'main' / 'summary.json', tmp_path / 'run' / 'summary.json'):
        summary.unlink()  # as if it crashed after its checkpoint of step 2
    # Before, it trained nothing and reported the step-2 weights as those of a 1-step run.
    with pytest.raises(ValueError, match=r'step_00000002, is at step 2, past the 1 steps .* set steps'):
        run(tmp_path, '--set', 'steps=1', '--resume')
    assert run(tmp_path, '--resume')['phases']['main']['steps'] == 4  # the run itself is intact


@pytest.mark.slow  # end to end: several tiny runs
def test_the_baseline_of_an_incremental_run_has_the_loaded_interfaces_width(tmp_path):
    first = run(tmp_path, name='first')  # width 16 (tests/tiny.yaml)
    summary = run(tmp_path, '--interface', str(Path(first['phases']['main']['components']) / 'interface'),
                  '--set', 'interface.width=null', '--set', 'baseline=independent')
    widths = {tag: tc.load_component(Path(summary['phases'][tag]['components']) / 'a' / 'extractor').width
              for tag in ('main', 'independent')}
    assert widths == {'main': 16, 'independent': 16}  # the baseline took the default, 64


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
@pytest.mark.slow  # a subprocess allocating large buffers: about 8 s on a 2-core Zen 1
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


def test_alternating_networks_each_see_whole_epochs_and_both_flips(tmp_path, monkeypatch):
    """Under the alternate schedule each network's epochs are permutations of its data, and airbench's alternating
    flip shows every image both ways over two epochs: indexing the data order by the run's step took every other
    batch of two permutations, seeing some images twice and others never."""
    seen = {}
    real = engine.training_batch

    def spy(data, index, *args, flips=None, **kwargs):
        seen.setdefault(id(data), []).append((index.tolist(), flips.tolist()))
        return real(data, index, *args, flips=flips, **kwargs)

    monkeypatch.setattr(engine, 'training_batch', spy)
    run(tmp_path, '--set', 'steps=null', '--set', 'epochs=2', '--set', 'joint_schedule=alternate',
        '--set', 'augment_flip=alternating', '--set', 'log_every=100', '--set', 'checkpoint_every=100')
    assert len(seen) == 2
    for batches in seen.values():
        assert len(batches) == 10  # 80 images, batch 16: 5 steps an epoch, 2 epochs
        epochs = [[(i, f) for index, flips in batches[e * 5:(e + 1) * 5] for i, f in zip(index, flips)]
                  for e in range(2)]
        assert [sorted(i for i, _ in epoch) for epoch in epochs] == [list(range(80))] * 2
        first, second = (dict(epoch) for epoch in epochs)
        assert all(first[i] != second[i] for i in range(80))


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


@pytest.mark.slow  # torch.compile of two networks: about 15 s on a 2-core Zen 1
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


def test_metrics_lr_is_the_lr_of_the_logged_update(tmp_path):
    run(tmp_path, '--set', 'log_every=1', '--set', 'optim.lr=0.05', '--set', 'optim.schedule=cosine')
    rows = (tmp_path / 'run' / 'main' / 'metrics.csv').read_text().splitlines()
    header = rows[0].split(',')
    logged = [float(r.split(',')[header.index('lr')]) for r in rows[1:]]
    # timm's cosine over 4 updates, no warmup: update t (from 0) takes 0.05 * (1 + cos(pi t / 4)) / 2, so the first
    # update is at the full lr and none at 0 (the lr after the last update, which the log showed before).
    assert logged == pytest.approx([0.05 * (1 + math.cos(math.pi * t / 4)) / 2 for t in range(4)], rel=1e-6)
