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
import importlib.util
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object, set_seed

import timm_compat
from timm_compat.config import RunConfig, load_config
from timm_compat.data import EpochSampler, load_image_data
from timm_compat.evaluation import accuracy, format_matrix, recombination_matrix
from timm_compat.methods import canonical_class_name, common_classes, methods_for
from timm_compat.checkpoint import TrainState, atomic_write_text, latest_checkpoint, load_train_state
from timm_compat.loop import TrainLoop
from timm_compat.metrics_log import MetricsLog
from timm_compat.rundir import RunDir, RunDirError
from timm_compat._cpu import keep_freed_memory
from timm_compat.joint import JointModel
from timm_compat.optim import make_optimizer, make_scheduler


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
    # JSON is YAML: a flag value stays a string (--data-dir 2024 is a folder, not a number).
    overrides = [f'{k}={json.dumps(v)}' for k, v in flags.items() if v is not None] + args.overrides
    if args.interface is not None:
        overrides.append('scheme=incremental')
    return args, load_config(args.config, overrides)


def load_task_data(net, cfg: RunConfig):
    d = net.dataset
    common = dict(image_size=cfg.image_size, image_column=d.image_column, label_column=d.label_column,
                  class_names=d.class_names, classes=d.classes, shift=d.shift, seed=cfg.seed)
    train = load_image_data(d.source, d.train_split, limit=d.train_limit, shard=d.train_shard,
                            synthetic_per_class=d.synthetic_per_class, **common)
    test = load_image_data(d.source, d.test_split, limit=d.test_limit,
                           synthetic_per_class=d.synthetic_test_per_class, **common)
    return train, test


def build_interface(cfg: RunConfig, class_lists) -> Optional[timm_compat.Interface]:
    """A new interface for joint training, the frozen one that incremental training fits, or None.

    None for networks that share nothing (no aux heads, no identical initial weights): independent networks must
    not claim an interface, or their components would be tagged as fitting each other.
    """
    icfg = cfg.interface
    if not (icfg.load or icfg.rp or icfg.dcc or cfg.iiw):
        return None
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
        init_seed=cfg.init_seed if cfg.iiw else cfg.init_seed + 1000 * (index + 1),
        width=None if interface is not None else cfg.interface.width or 64, **net.model_args)


@dataclass
class Phase:
    """One training phase (``main`` or its ``independent`` baseline), built and checked before anything runs."""
    tag: str
    cfg: RunConfig
    interface: Optional[timm_compat.Interface]
    models: Dict[str, timm_compat.CompatibleModel]
    joint: JointModel
    data: Dict[str, tuple]

    @property
    def trained(self) -> List[str]:
        return list(self.joint.networks)


def build_phase(tag: str, cfg: RunConfig, data: Dict[str, tuple], device) -> Phase:
    """Interface, networks and joint model of a phase; every backbone, split and head is built (and so checked)."""
    set_seed(cfg.seed)
    interface = build_interface(cfg, [train.class_names for train, _ in data.values()])
    models = {n.name: build_network(n, i, cfg, interface, data[n.name][0].class_names).to(device)
              for i, n in enumerate(cfg.networks)}
    if interface is not None:
        interface.to(device)  # a loaded, frozen interface is not prepared by Accelerate
    methods = methods_for(interface, cfg.interface.rp_weight, cfg.interface.dcc_weight, rp_norm=cfg.interface.rp_norm)
    joint = JointModel({n.name: models[n.name] for n in cfg.networks if not n.load}, interface, methods,
                       schedule=cfg.joint_schedule)
    if cfg.channels_last:
        joint = joint.to(memory_format=torch.channels_last)
    return Phase(tag, cfg, interface, models, joint, data)


def train_phase(phase: Phase, accelerator: Accelerator, out: Path, resume: bool) -> dict:
    """Train one phase to its last step (resuming from its newest checkpoint when asked), then evaluate it."""
    if (out / 'summary.json').exists():
        accelerator.print(f'[{phase.tag}] already finished; summary in {out / "summary.json"}')
        return json.loads((out / 'summary.json').read_text())
    cfg, device = phase.cfg, accelerator.device
    set_seed(cfg.seed)
    train_sets = {name: phase.data[name][0].to(device) for name in phase.trained}
    samplers = {name: EpochSampler(len(train_sets[name]), cfg.batch_size, cfg.seed + i, accelerator.process_index,
                                   accelerator.num_processes, device) for i, name in enumerate(phase.trained)}
    # Alternating, each step trains one network: `epochs` stays each network's number of epochs.
    turns = len(phase.trained) if cfg.joint_schedule == 'alternate' else 1
    total_steps = cfg.steps or math.ceil(cfg.epochs * max(s.steps_per_epoch for s in samplers.values()) * turns)
    params = [p for p in phase.joint.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, cfg.optim.optimizer, cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay)
    # Counted as accelerate's prepared scheduler steps: once per process for every optimizer step.
    per_step = accelerator.num_processes
    scheduler = make_scheduler(optimizer, cfg.optim.schedule,
                               math.ceil(total_steps / cfg.gradient_accumulation_steps) * per_step,
                               cfg.optim.warmup_steps * per_step)
    joint, optimizer, scheduler = accelerator.prepare(phase.joint, optimizer, scheduler)
    if cfg.compile:
        joint = torch.compile(joint)

    ckpt_root, metrics = out / 'checkpoints', MetricsLog(out / 'metrics.csv')
    state = TrainState()
    if resume and (last := latest_checkpoint(ckpt_root)) is not None:
        accelerator.load_state(str(last))
        state = load_train_state(last)
        accelerator.print(f'[{phase.tag}] resumed from {last} at step {state.step}')
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        metrics.rewind(state.step)  # rows logged after the checkpoint are logged again
    accelerator.wait_for_everyone()

    loop = TrainLoop(phase, accelerator, joint, optimizer, scheduler, params, state, metrics, ckpt_root)
    loop.run(total_steps, {name: (train_sets[name], samplers[name]) for name in phase.trained})
    summary = finish_phase(phase, accelerator, joint, out)
    summary.update(train_seconds=round(state.train_seconds, 1), steps=total_steps)
    if accelerator.is_main_process:
        atomic_write_text(out / 'summary.json', json.dumps(summary, indent=2))
    accelerator.free_memory()  # the next phase checkpoints only its own models
    accelerator.wait_for_everyone()
    return summary


def finish_phase(phase: Phase, accelerator: Accelerator, joint, out: Path) -> dict:
    """Check every rank ended with the same interface, then evaluate and save on the main process."""
    if accelerator.num_processes > 1:
        # DDP syncs BN buffers from rank 0 before each forward, so after the last one they differ by one update.
        for buffer in accelerator.unwrap_model(joint).buffers():
            torch.distributed.broadcast(buffer, src=0)
    ids = gather_object([phase.interface.id if phase.interface is not None else None])
    if len(set(ids)) > 1:
        raise RuntimeError(f'[{phase.tag}] processes ended with different interfaces {ids}: the DDP setup is broken.')
    summary = {'interface_id_per_rank': ids, 'processes': accelerator.num_processes}
    if accelerator.is_main_process:
        summary.update(evaluate_and_save(phase.cfg, phase.models, phase.interface, phase.data, out, phase.tag))
    return summary


def evaluate_and_save(cfg, models, interface, data, out: Path, tag: str) -> dict:
    """Own accuracy of each network and the recombination matrix; then write the trained components."""
    names = [n.name for n in cfg.networks]
    nets = [models[n] for n in names]
    tests = [data[n][1] for n in names]
    own = {n: accuracy(models[n], data[n][1], cfg.eval_batch_size, cfg.eval_bn) for n in names}
    matrix = recombination_matrix(nets, tests, cfg.eval_batch_size, cfg.eval_bn)
    table = format_matrix(matrix, names, title=f'[{tag}] recombination accuracy (%), common classes, '
                                                f'BN={cfg.eval_bn}', own=[own[n] for n in names])
    print(table)
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
    message = f'timm-compat {tag} run: interface {interface.id if interface is not None else "none"}'
    if interface is not None and not cfg.interface.load:
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
    # Everything is built, and so validated, before the output folder is touched.
    with accelerator.main_process_first():
        data = {n.name: load_task_data(n, cfg) for n in cfg.networks}
    phase_cfgs = [('main', cfg)] + ([('independent', cfg.independent())] if cfg.baseline else [])
    phases = [build_phase(tag, phase_cfg, data, accelerator.device) for tag, phase_cfg in phase_cfgs]
    out = Path(cfg.output_dir)
    run_dir = RunDir(out)
    finished = [p.tag for p in phases if (out / p.tag / 'summary.json').exists()]
    try:
        on_main_process(accelerator, lambda: run_dir.acquire().prepare(cfg.to_dict(), args.resume, args.overwrite,
                                                                       finished))
        if log_with:
            accelerator.init_trackers('tensorboard', config=_scalars(cfg.to_dict()))
        results = {p.tag: train_phase(p, accelerator, out / p.tag, args.resume) for p in phases}
        accelerator.end_training()
        summary = {'config': cfg.to_dict(), 'wall_seconds': round(time.time() - start, 1),
                   'device': str(accelerator.device), 'processes': accelerator.num_processes,
                   'mixed_precision': accelerator.mixed_precision, 'phases': results}
        if accelerator.is_main_process:
            atomic_write_text(out / 'summary.json', json.dumps(summary, indent=2))
            print('\n' + '\n\n'.join(r['table'] for r in results.values()))
            print(f'\nwall time {summary["wall_seconds"]} s on {accelerator.num_processes} process(es), '
                  f'{accelerator.device}; results in {out / "summary.json"}')
    finally:
        run_dir.release()
    return summary


def on_main_process(accelerator: Accelerator, fn) -> None:
    """Run ``fn`` on the main process; if it refuses, every process raises the same error instead of hanging."""
    error = None
    if accelerator.is_main_process:
        try:
            fn()
        except RunDirError as e:
            error = str(e)
    error = broadcast_object_list([error])[0]
    if error is not None:
        raise RunDirError(error)


def cli(argv=None) -> None:
    """``main`` for the command line: a refused run prints one clear message, not a traceback, and exits 2."""
    try:
        main(argv)
    except (ValueError, FileNotFoundError, FileExistsError, FloatingPointError) as e:
        print(f'error: {e}', file=sys.stderr)
        raise SystemExit(2) from None


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
    cli()
