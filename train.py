"""Train compatible networks with Accelerate.

    accelerate launch train.py                                  # offline demo: IIW+RP+DCC vs. independent
    accelerate launch train.py -c configs/cifar10_stl10/iiw_rp_dcc.yaml
    accelerate launch train.py -c CONFIG --set optim.lr=0.1 --set networks.1.backbone=resnet56_cifar
    accelerate launch --multi_gpu --num_processes 2 train.py -c CONFIG     # DDP
    accelerate launch train.py -c CONFIG --resume                # continue from the last checkpoint

A run trains N networks (timm backbone split into extractor + head, each on its own dataset) against one
interface: jointly, sharing its RP and DCC aux heads, or incrementally, against a frozen interface loaded from a
folder or the Hub. It ends by measuring each network's own accuracy and the N x N recombination matrix, and writes
config.yaml, metrics.csv, checkpoints, components and summary.json to the output directory.
"""
import argparse
import csv
import importlib.util
import json
import math
import os
import shutil
import time
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from tqdm.auto import tqdm

import timm_compat
from timm_compat.config import RunConfig, load_config
from timm_compat.data import EpochSampler, load_image_data, training_batch
from timm_compat.evaluation import accuracy, format_matrix, recombination_matrix
from timm_compat.methods import canonical_class_name, common_classes, methods_for
from timm_compat.training import JointModel, TrainState, keep_freed_memory, latest_checkpoint, make_optimizer, \
    make_scheduler, save_checkpoint


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('-c', '--config', default=None, help='YAML run config (default: the offline demo)')
    parser.add_argument('--set', dest='overrides', action='append', default=[], metavar='KEY=VALUE',
                        help='override a config key, e.g. --set interface.rp=false (repeatable)')
    parser.add_argument('--output-dir', default=None, help='output directory (config key output_dir)')
    parser.add_argument('--data-dir', default=None, help='fills {data_dir} in dataset sources')
    parser.add_argument('--interface', default=None, metavar='REPO_OR_DIR',
                        help='train incrementally against this frozen interface')
    parser.add_argument('--save-components', default=None, metavar='DIR', help='write every trained component here')
    parser.add_argument('--push-to-hub', default=None, metavar='ORG/PREFIX', help='push every component to the Hub')
    parser.add_argument('--resume', action='store_true', help='continue from the last checkpoint in the output dir')
    parser.add_argument('--overwrite', action='store_true', help='delete an earlier run in the output dir first')
    args = parser.parse_args(argv)
    flags = {'output_dir': args.output_dir, 'data_dir': args.data_dir, 'interface.load': args.interface,
             'save_components': args.save_components, 'push_to_hub': args.push_to_hub}
    overrides = [f'{k}={v}' for k, v in flags.items() if v is not None] + args.overrides
    if args.interface is not None:
        overrides.append('scheme=incremental')
    return args, load_config(args.config, overrides)


def prepare_output_dir(path: Path, resume: bool, overwrite: bool, accelerator: Accelerator) -> None:
    """Refuse to mix two runs in one folder: an earlier run is only resumed or, when asked, deleted."""
    earlier = path.exists() and any(path.iterdir())
    if resume and not (list(path.glob('*/checkpoints/latest')) or list(path.glob('*/summary.json'))):
        raise FileNotFoundError(f'--resume: {path} holds no checkpoint to resume from. Drop --resume to start '
                                f'the run (with --overwrite if the folder is not empty).')
    if earlier and not resume:
        if not overwrite:
            raise FileExistsError(f'{path} already holds a run. Pass --resume to continue it, --overwrite to '
                                  f'delete it, or --output-dir for a new folder.')
        if accelerator.is_main_process:
            shutil.rmtree(path)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        path.mkdir(parents=True, exist_ok=True)


def load_task_data(net, cfg: RunConfig):
    d = net.dataset
    common = dict(image_size=cfg.image_size, image_column=d.image_column, label_column=d.label_column,
                  class_names=d.class_names, classes=d.classes, shift=d.shift, seed=cfg.seed)
    train = load_image_data(d.source, d.train_split, limit=d.train_limit, shard=d.train_shard,
                            synthetic_per_class=d.synthetic_per_class, **common)
    test = load_image_data(d.source, d.test_split, limit=d.test_limit,
                           synthetic_per_class=d.synthetic_test_per_class, **common)
    return train, test


def build_interface(cfg: RunConfig, class_lists):
    """A new interface for joint training, or the frozen one that incremental training fits."""
    icfg = cfg.interface
    if icfg.load:
        interface = timm_compat.Interface.from_pretrained(icfg.load).freeze()
        if icfg.width is not None and icfg.width != interface.width:
            raise ValueError(f'The frozen interface {icfg.load} has width {interface.width}, but the config asks for '
                             f'width {icfg.width}. Set interface.width to {interface.width} (or drop it).')
        return interface
    dcc_classes = None
    if icfg.dcc:
        dcc_classes = icfg.dcc_classes or common_classes(class_lists)
        if not dcc_classes:
            raise ValueError(f'DCC needs common classes, but the datasets share none ({class_lists}). Give '
                             f'interface.dcc_classes or set interface.dcc=false.')
    return timm_compat.Interface(width=icfg.width or 64, rp=icfg.rp, dcc_classes=dcc_classes,
                                 aux_head=icfg.aux_head, rp_head=icfg.rp_head, dcc_head=icfg.dcc_head)


def build_network(net, index: int, cfg: RunConfig, interface, class_names):
    if net.load:
        extractor = timm_compat.Extractor.from_pretrained(f'{net.load}/extractor')
        head = timm_compat.Head.from_pretrained(f'{net.load}/head')
        if extractor.interface_id != interface.id:
            raise ValueError(f'Network {net.name!r} ({net.load}) fits interface {extractor.interface_id}, but this run '
                             f'uses interface {interface.id}.')
        return timm_compat.recombine(extractor, head)
    head = net.head
    if head == 'dcc':
        # The network's own head is the shared DCC head (Sec. 5.2): one classifier for every extractor.
        canonical = [canonical_class_name(c) for c in class_names]
        if interface.dcc is None or canonical != [canonical_class_name(c) for c in interface.dcc_classes]:
            raise ValueError(f'Network {net.name!r} has head: dcc, so its classes {class_names} must be the '
                             f'interface\'s DCC classes {interface.dcc_classes}, in that order.')
        head = interface.dcc
    return timm_compat.make_compatible(
        net.backbone, split=net.split, interface=interface, num_classes=len(class_names), head=head,
        head_split=net.head_split, class_names=class_names, pretrained=net.pretrained,
        init_seed=cfg.init_seed if cfg.iiw else cfg.init_seed + 1000 * (index + 1), **net.model_args)


def train_phase(cfg: RunConfig, accelerator: Accelerator, out: Path, resume: bool, tag: str) -> dict:
    if (out / 'summary.json').exists():
        accelerator.print(f'[{tag}] already finished; summary in {out / "summary.json"}')
        return json.loads((out / 'summary.json').read_text())
    start = time.time()
    set_seed(cfg.seed)
    with accelerator.main_process_first():
        data = {n.name: load_task_data(n, cfg) for n in cfg.networks}
    interface = build_interface(cfg, [train.class_names for train, _ in data.values()])
    models = {n.name: build_network(n, i, cfg, interface, data[n.name][0].class_names)
              for i, n in enumerate(cfg.networks)}
    trained = [n.name for n in cfg.networks if not n.load]
    methods = methods_for(interface, cfg.interface.rp_weight, cfg.interface.dcc_weight)
    joint = JointModel({name: models[name] for name in trained}, interface, methods)
    if cfg.channels_last:
        joint = joint.to(memory_format=torch.channels_last)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format

    device = accelerator.device
    train_sets = {name: data[name][0].to(device) for name in trained}
    samplers = {name: EpochSampler(len(train_sets[name]), cfg.batch_size, cfg.seed + i, accelerator.process_index,
                                   accelerator.num_processes, device) for i, name in enumerate(trained)}
    stats = {name: [torch.tensor(models[name].pretrained_cfg[k], device=device) for k in ('mean', 'std')]
             for name in trained}
    steps_per_epoch = max(s.steps_per_epoch for s in samplers.values())
    total_steps = cfg.steps or math.ceil(cfg.epochs * steps_per_epoch)

    params = [p for p in joint.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, cfg.optim.optimizer, cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay)
    # Counted as accelerate's prepared scheduler steps: once per process for every optimizer step.
    per_step = accelerator.num_processes
    scheduler = make_scheduler(optimizer, cfg.optim.schedule,
                               math.ceil(total_steps / cfg.gradient_accumulation_steps) * per_step,
                               cfg.optim.warmup_steps * per_step)
    joint, optimizer, scheduler = accelerator.prepare(joint, optimizer, scheduler)
    if cfg.compile:
        joint = torch.compile(joint)
    state = TrainState()
    accelerator.register_for_checkpointing(state)

    ckpt_root, metrics_file = out / 'checkpoints', out / 'metrics.csv'
    if resume and (last := latest_checkpoint(ckpt_root)) is not None:
        accelerator.load_state(str(last))
        accelerator.print(f'[{tag}] resumed from {last} at step {state.step}')
    elif accelerator.is_main_process:  # a phase that never reached a checkpoint starts over
        metrics_file.unlink(missing_ok=True)
        out.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()

    loss_sums, logged_steps = None, 0
    # NaN tracking and the step live on the device: reading them costs a sync, done only at log/checkpoint steps.
    first_bad = torch.tensor(-1, device=device)
    device_step = torch.tensor(state.step, device=device)
    progress = tqdm(total=total_steps, initial=state.step, desc=tag, disable=not accelerator.is_local_main_process)
    joint.train()
    while state.step < total_steps:
        batches = [training_batch(train_sets[name], samplers[name].batch(state.step), *stats[name], cfg.augment,
                                  memory_format) for name in trained]
        with accelerator.accumulate(joint):
            losses = joint(batches)
            accelerator.backward(losses['loss'])
            if cfg.optim.clip_grad_norm and accelerator.sync_gradients:
                accelerator.clip_grad_norm_(params, cfg.optim.clip_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        state.step += 1
        device_step += 1
        detached = torch.stack([v.detach().float() for v in losses.values()])
        loss_sums = detached if loss_sums is None else loss_sums + detached
        logged_steps += 1
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(detached[-1]), device_step, first_bad)
        progress.update(1)
        log_now = state.step % cfg.log_every == 0 or state.step == total_steps
        ckpt_now = state.step % cfg.checkpoint_every == 0 and state.step < total_steps
        if log_now or ckpt_now:
            if (bad := int(first_bad)) >= 0:
                last = latest_checkpoint(ckpt_root)
                raise FloatingPointError(
                    f'[{tag}] the loss became NaN/inf at step {bad}; training stopped. Last good checkpoint: '
                    f'{last or "none yet"}. Lower optim.lr, or use mixed_precision=bf16 instead of fp16.')
        if log_now:
            row = {'step': state.step, 'lr': scheduler.get_last_lr()[0], 'time': round(time.time() - start, 2),
                   **{k: v for k, v in zip(losses, (loss_sums / logged_steps).tolist())}}
            accelerator.log({k: v for k, v in row.items() if k != 'step'}, step=state.step)
            if accelerator.is_main_process:
                new_file = not metrics_file.exists()
                with open(metrics_file, 'a', newline='') as f:
                    writer = csv.DictWriter(f, fieldnames=list(row))
                    if new_file:
                        writer.writeheader()
                    writer.writerow(row)
            progress.set_postfix(loss=f'{row["loss"]:.3f}')
            loss_sums, logged_steps = None, 0
        if ckpt_now:
            save_checkpoint(accelerator, ckpt_root, state.step, cfg.keep_checkpoints)
    progress.close()
    train_time = time.time() - start

    if accelerator.num_processes > 1:
        # DDP syncs BN buffers from rank 0 before each forward, so after the last one they differ by one update.
        for buffer in accelerator.unwrap_model(joint).buffers():
            torch.distributed.broadcast(buffer, src=0)
    # Every rank must end with the same shared aux heads; compare their hashes rather than trust it.
    ids = gather_object([interface.id])
    if len(set(ids)) > 1:
        raise RuntimeError(f'[{tag}] processes ended with different interfaces {ids}: the DDP setup is broken.')
    summary = {}
    if accelerator.is_main_process:
        summary = evaluate_and_save(cfg, models, interface, data, out, tag)
        summary.update(train_seconds=round(train_time, 1), wall_seconds=round(time.time() - start, 1),
                       steps=total_steps, processes=accelerator.num_processes, interface_id_per_rank=ids)
        (out / 'summary.json').write_text(json.dumps(summary, indent=2))
    accelerator.wait_for_everyone()
    return summary


def evaluate_and_save(cfg, models, interface, data, out: Path, tag: str) -> dict:
    """Own accuracy of each network and the recombination matrix; then write the trained components."""
    names = [n.name for n in cfg.networks]
    nets = [models[n] for n in names]
    tests = [data[n][1] for n in names]
    own = {n: accuracy(models[n], data[n][1], cfg.eval_batch_size, cfg.eval_bn) for n in names}
    matrix = recombination_matrix(nets, tests, cfg.eval_batch_size, cfg.eval_bn)
    table = format_matrix(matrix, names, title=f'[{tag}] recombination accuracy (%), common classes, '
                                                f'BN={cfg.eval_bn}')
    print(table)
    print(f'[{tag}] own-task accuracy: ' + ', '.join(f'{n} {100 * a:.1f} %' for n, a in own.items()))
    components = Path(cfg.save_components) / tag if cfg.save_components else out / 'components'
    if interface is not None and not cfg.interface.load:
        interface.save_pretrained(components / 'interface')
    for n in cfg.networks:
        if not n.load:
            models[n.name].extractor.save_pretrained(components / n.name / 'extractor')
            if n.head != 'dcc':  # a shared DCC head is saved with the interface
                models[n.name].head.save_pretrained(components / n.name / 'head')
    if cfg.push_to_hub:
        push_components(cfg, models, interface, tag)
    return {'phase': tag, 'networks': names, 'own_accuracy': own, 'recombination_matrix': matrix.tolist(),
            'interface_id': interface.id if interface is not None else None, 'components': str(components),
            'table': table}


def push_components(cfg: RunConfig, models, interface, tag: str) -> None:
    prefix = cfg.push_to_hub
    message = f'timm-compat {tag} run: interface {interface.id}'
    if not cfg.interface.load:
        interface.push_to_hub(f'{prefix}-interface', commit_message=message)
    for n in cfg.networks:
        if not n.load:
            models[n.name].extractor.push_to_hub(f'{prefix}-{n.name}-extractor', commit_message=message)
            if n.head != 'dcc':
                models[n.name].head.push_to_hub(f'{prefix}-{n.name}-head', commit_message=message)


def main(argv=None) -> dict:
    args, cfg = parse_args(argv)
    start = time.time()
    log_with = 'tensorboard' if _has_tensorboard() else None
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision,
                              gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                              log_with=log_with, project_dir=cfg.output_dir)
    if accelerator.device.type == 'cpu':
        # accelerate launch leaves OMP_NUM_THREADS=1 unless told otherwise; a CPU run should use its cores.
        cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
        torch.set_num_threads(cfg.cpu_threads or max(1, cores // accelerator.num_processes))
        keep_freed_memory()
    out = Path(cfg.output_dir)
    prepare_output_dir(out, args.resume, args.overwrite, accelerator)
    if accelerator.is_main_process:
        (out / 'config.yaml').write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    if log_with:
        accelerator.init_trackers('tensorboard', config=_scalars(cfg.to_dict()))

    phases = [('main', cfg)] + ([('independent', cfg.independent())] if cfg.baseline else [])
    results = {tag: train_phase(phase_cfg, accelerator, out / tag, args.resume, tag) for tag, phase_cfg in phases}
    accelerator.end_training()
    summary = {'config': cfg.to_dict(), 'wall_seconds': round(time.time() - start, 1),
               'device': str(accelerator.device), 'processes': accelerator.num_processes,
               'mixed_precision': accelerator.mixed_precision, 'phases': results}
    if accelerator.is_main_process:
        (out / 'summary.json').write_text(json.dumps(summary, indent=2))
        print('\n' + '\n\n'.join(r['table'] for r in results.values()))
        print(f'\nwall time {summary["wall_seconds"]} s on {accelerator.num_processes} process(es), '
              f'{accelerator.device}; results in {out / "summary.json"}')
    return summary


def _has_tensorboard() -> bool:
    return importlib.util.find_spec('tensorboard') is not None


def _scalars(tree, prefix=''):
    """Flatten a config into the scalar hparams TensorBoard accepts."""
    flat = {}
    items = tree.items() if isinstance(tree, dict) else enumerate(tree)
    for k, v in items:
        key = f'{prefix}{k}'
        if isinstance(v, (dict, list)):
            flat.update(_scalars(v, key + '.'))
        elif isinstance(v, (int, float, str, bool)):
            flat[key] = v
    return flat


if __name__ == '__main__':
    main()
