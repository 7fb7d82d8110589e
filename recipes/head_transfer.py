"""Sec. 5.2 of Gygli et al. 2021: one classification head transferred across extractors of different architectures.

    python recipes/head_transfer.py --budget cpu                      # uoft-cs/cifar10 from the Hub
    python recipes/head_transfer.py --budget cpu --data-dir ../shared/data  # this workspace's local copy
    python recipes/head_transfer.py --budget tiny --data-dir ../shared/data  # smoke test, minutes
    python recipes/head_transfer.py --budget paper --seeds 3         # on a GPU
    python recipes/head_transfer.py --budget fast --data-dir ../shared/data  # the fast CIFAR family

``--data-dir DIR`` reads CIFAR-10 from the local Parquet copy DIR/cifar10/{train,test}.parquet (the Hub schema)
instead of downloading ``uoft-cs/cifar10``, here and in the train.py runs.

1. ResNet-56, Wide ResNet-56 and MobileNetV2 extractors (1x1 conv to 64 channels each) are trained jointly with one
   MobileNetV2-tail DCC head on CIFAR-10 classes 0-4 (``configs/head_transfer/stage1.yaml``).
2. The head's classifier is extended to 10 classes and fine-tuned on all of CIFAR-10 under the frozen Wide ResNet-56
   (the reference extractor). No extractor changes after stage 1.
3. The updated head is attached to each extractor and evaluated on the CIFAR-10 test set.
Upper bounds: each architecture trained normally on the 10 classes, with its own RP head in the paper budget
(``configs/head_transfer/upper_bound.yaml``). The ``fast`` budget does the same with the fast family's server,
desktop and mobile members (``configs/fast/head_transfer.yaml``, the server member as the reference, upper bounds
trained plainly: ``configs/fast/head_transfer_upper_bound.yaml``). Each seed's runs and results.json go to
OUTPUT/seed<k>/, the table (mean +- std over seeds) to OUTPUT/report.md, every accuracy with BN batch statistics
(the paper's evaluation) and with running statistics (what a deployed model gets).

``--resume`` keeps every seed whose OUTPUT/seed<k>/results.json exists (its record: an earlier sitting's, or a
committed one copied there) without its run folders, and continues the others' train.py runs, so seeds are added
one sitting at a time. A record is kept only if it was made on this code's data version and names the config it
was trained under: docs/results/head_transfer_fast/results_seed0.json is of data version 1 and predates config
records, so a multi-seed fast table retrains seed 0 too (``--seeds 3`` into a fresh OUTPUT).
"""
import argparse
import json
import statistics
import time
from pathlib import Path
from typing import NamedTuple, Optional

import torch

from timm_compat._hardware import hardware
from timm_compat.data import DATA_VERSION
from timm_compat.deployment import BN_MODES
from common import (CIFAR10 as CIFAR10_ID, DATA_DIR_HELP, RECORDS_HELP, REPO, by_bn, check_configs, check_counts,
                    check_data_dir, check_data_version, claim_output, data_note, launch, mean_std,
                    planned_fingerprint, progress, read_json, run_machine, same_argument, write_json)

CIFAR10 = ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck']
PAPER = {'resnet56': (91.7, 94.6), 'mobilenetv2': (91.6, 93.3)}  # (recombined, upper bound), Fig. 4


class Net(NamedTuple):
    """One architecture of a budget: timm backbone, split, the trunk's channels there (an upper bound's interface
    width, so that it adds no adapter) and the backbone's model_args."""
    backbone: str
    split: str
    width: int
    model_args: Optional[dict] = None


# The paper's architectures; the reference extractor is Wide ResNet-56 (widen factor 4: 128 channels at layer2).
PAPER_NETWORKS = {'resnet56': Net('resnet56_cifar', 'layer2', 32),
                  'wide_resnet56': Net('wide_resnet56_cifar', 'layer2', 128),
                  'mobilenetv2': Net('mobilenetv2_100_cifar', 'blocks.4.0', 96)}
# The fast family's members at their default split, in configs/fast/head_transfer.yaml's order; the server member
# is the reference, in place of Wide ResNet-56.
FAST_NETWORKS = {'server': Net('airbench94_cifar', 'stages.1', 256),
                 'desktop': Net('airbench_desktop_cifar', 'stages.1', 128),
                 'mobile': Net('airbench_mobile_cifar', 'stages.1', 96)}
PAPER_CONFIGS = dict(stage1=REPO / 'configs' / 'head_transfer' / 'stage1.yaml',
                     upper=REPO / 'configs' / 'head_transfer' / 'upper_bound.yaml', reference='wide_resnet56')


def narrow_wrn(widen_factor: int) -> dict:
    """The paper's architectures with a narrower Wide ResNet-56, for the CPU budgets."""
    return {**PAPER_NETWORKS, 'wide_resnet56': Net('wide_resnet56_cifar', 'layer2', 32 * widen_factor,
                                                   {'widen_factor': widen_factor})}


# The paper gives no optimiser for the head's fine-tuning; the paper and CPU budgets use SGD at lr 0.01, cosine.
PAPER_HEAD_OPTIM = dict(optimizer='sgd', lr=0.01, momentum=0.9, weight_decay=5e-4, schedule='cosine')
# A budget: its configs, architectures, overrides and the head's fine-tuning (head_optim None: stage 1's own
# optimisation). batch_size None keeps the configs' optimisation; rp None their RP setting; threads None every CPU
# thread.
BUDGETS = {
    # A smoke test of the whole pipeline in a few minutes; its numbers mean nothing.
    'tiny': dict(PAPER_CONFIGS, networks=narrow_wrn(1), epochs=1, head_epochs=1, head_batch=128,
                 head_optim=PAPER_HEAD_OPTIM, train_limit=600, test_limit=200, rp=False, threads=1, batch_size=64,
                 lr=0.05, warmup_steps=2, upper_bound=['resnet56']),
    # Three epochs on the first 10,000 training images, Wide ResNet-56 at widen factor 2, no RP head, batch 64 for
    # more updates in the same compute: about 45 minutes on one CPU core. One thread: two threads on a shared
    # 2-core machine run several times slower than one.
    'cpu': dict(PAPER_CONFIGS, networks=narrow_wrn(2), epochs=3, head_epochs=1, head_batch=128,
                head_optim=PAPER_HEAD_OPTIM, train_limit=10000, test_limit=2000, rp=False, threads=1, batch_size=64,
                lr=0.05, warmup_steps=30, upper_bound=['resnet56', 'mobilenetv2']),
    'paper': dict(PAPER_CONFIGS, networks=PAPER_NETWORKS, epochs=None, head_epochs=30, head_batch=128,
                  head_optim=PAPER_HEAD_OPTIM, train_limit=None, test_limit=None, rp=True, threads=None,
                  batch_size=None, upper_bound=['resnet56', 'wide_resnet56', 'mobilenetv2']),
    # The fast family at the fast budget (configs/fast/budget.yaml), full data. The head: stage 1's own optimisation
    # (the fast recipe's, batch-independent) at its batch size, for as many epochs as the budget trains a network.
    # SGD at lr 0.01 barely moves the fast family's head, whose logits are scaled by 1/9 (docs/results.md, Sec. 5.2).
    'fast': dict(stage1=REPO / 'configs' / 'fast' / 'head_transfer.yaml',
                 upper=REPO / 'configs' / 'fast' / 'head_transfer_upper_bound.yaml', reference='server',
                 networks=FAST_NETWORKS, epochs=None, head_epochs=9.9, head_batch=1024, head_optim=None,
                 train_limit=None, test_limit=None, rp=None, threads=None, batch_size=None,
                 upper_bound=list(FAST_NETWORKS)),
}


def run_overrides(budget: dict, networks, seed: int = 0, epochs=None) -> list:
    """Config overrides of a run whose networks are ``networks`` (names of budget['networks'], in config order)."""
    overrides = [] if budget['batch_size'] is None else [
        f'batch_size={budget["batch_size"]}', f'optim.lr={budget["lr"]}',
        f'optim.warmup_steps={budget["warmup_steps"]}',
        'mixed_precision=no', 'channels_last=false', 'checkpoint_every=100000', 'log_every=10']
    overrides += [f'cpu_threads={budget["threads"]}'] if budget['threads'] else []
    epochs = epochs or budget['epochs']
    overrides += [f'epochs={epochs}'] if epochs else []
    overrides += [] if budget['rp'] is None else [f'interface.rp={str(budget["rp"]).lower()}']
    overrides += [f'seed={seed}', f'init_seed={seed}']
    for i, name in enumerate(networks):
        if budget['train_limit']:
            overrides.append(f'networks.{i}.dataset.train_limit={budget["train_limit"]}')
        if budget['test_limit']:
            overrides.append(f'networks.{i}.dataset.test_limit={budget["test_limit"]}')
        if budget['networks'][name].model_args:
            overrides.append(f'networks.{i}.model_args={json.dumps(budget["networks"][name].model_args)}')
    return overrides


def upper_bound_overrides(budget: dict, name: str, seed: int = 0, epochs=None) -> list:
    """Config overrides of the upper bound of architecture ``name``: the plain architecture, with an interface as
    wide as the trunk's own output, so no adapter is added; with the budget's RP setting (the paper's upper bounds
    have an RP head, the CPU budgets drop it, the fast one trains plainly)."""
    net = budget['networks'][name]
    return run_overrides(budget, [name], seed, epochs) + [
        f'networks.0.backbone={net.backbone}', f'networks.0.split={net.split}', f'interface.width={net.width}']


def seed_runs(args, budget: dict, seed: int, out: Path) -> list:
    """The train.py runs of one seed, stage 1 then each upper bound, as (config file, run folder, overrides)."""
    stage1 = (budget['stage1'], out / 'stage1', run_overrides(budget, budget['networks'], seed, args.epochs))
    return [stage1] + [(budget['upper'], out / f'upper_{name}', upper_bound_overrides(budget, name, seed, args.epochs))
                       for name in budget['upper_bound']]


def seed_fingerprint(args, budget: dict, seed: int, out: Path) -> str:
    """The config fingerprint of one seed (``common.config_fingerprint``): its train.py runs' configs as they
    resolve, and the head's fine-tuning keys."""
    head = {k: budget[k] for k in ('head_epochs', 'head_batch', 'head_optim', 'reference')}
    return planned_fingerprint(seed_runs(args, budget, seed, out), out, seed, [head])


def head_optimizer(head, cfg, head_optim: Optional[dict], batch_size: int, steps: int) -> tuple:
    """``(optim, optimizer, schedule)`` of the head's fine-tuning: stage 1's ``optim`` section (``cfg.optim``), or
    ``head_optim`` (``OptimConfig`` keys) clipped as stage 1 was."""
    from timm_compat.config import OptimConfig
    from timm_compat.optim import optim_from_config
    optim = cfg.optim if head_optim is None else OptimConfig(**head_optim, clip_grad_norm=cfg.optim.clip_grad_norm)
    return (optim, *optim_from_config(head, optim, batch_size, steps))


def finetune_head(extractor, head, data, epochs: float, batch_size: int, cfg, head_optim: Optional[dict],
                  device, seed: int = 0) -> list:
    """Train only ``head`` on ``extractor``'s features; the extractor is frozen, its BN on batch statistics.
    ``seed`` draws the data order and alternating flips (the crops come from torch's global generator).

    Stage 1's augmentation, precision and memory format (``cfg``, its run config); its optimisation too, or
    ``head_optim`` (``OptimConfig`` keys) in its place, clipped as stage 1 was.
    """
    from timm_compat._hardware import resolve_precision
    from timm_compat.batchnorm import eval_mode
    from timm_compat.data import EpochSampler, training_batch
    from timm_compat.fit import ClassificationTask, fit
    sampler = EpochSampler(len(data), batch_size, seed, device=device)
    steps = int(epochs * sampler.steps_per_epoch)
    optim, optimizer, scheduler = head_optimizer(head, cfg, head_optim, batch_size, steps)
    data, losses = data.to(device), []
    stats = [torch.tensor(extractor.pretrained_cfg[k], device=device) for k in ('mean', 'std')]
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format

    def batch_at(step: int):
        flips = sampler.alternating_flips(step) if cfg.augment_flip == 'alternating' else None
        return training_batch(data, sampler.batch(step), *stats, cfg.augment, memory_format,
                              pad=cfg.augment_translate, pad_mode=cfg.augment_pad_mode, flips=flips)

    head.train()
    with eval_mode(extractor, 'batch'):
        extractor.requires_grad_(False)
        fit(ClassificationTask(head, frozen=extractor, label_smoothing=optim.label_smoothing), batch_at, steps,
            optimizer, scheduler, mixed_precision=resolve_precision(cfg.mixed_precision, device.type) or 'no',
            clip_grad_norm=optim.clip_grad_norm, on_step=lambda step, loss: losses.append(loss['loss']), desc='head')
    return torch.stack(losses).tolist() if losses else []


def evaluate(model, test) -> dict:
    """Under each BN mode: top-1 accuracy, and the mean class accuracy on the classes of stage 1 (0-4) and those
    added after it (5-9); ``{'batch': {...}, 'running': {...}}``."""
    from timm_compat.evaluation import per_class_accuracy
    counts = torch.bincount(test.labels, minlength=test.num_classes).float()
    scores = {}
    for bn in BN_MODES:
        per_class = per_class_accuracy(model, test, 250, bn)
        # One pass over the test set: top-1 is the per-class accuracies weighted by the class counts.
        scores[bn] = {'recombined': 100 * (per_class.nan_to_num() * counts).sum().item() / counts.sum().item(),
                      'classes_0_4': 100 * per_class[:5].nanmean().item(),
                      'classes_5_9': 100 * per_class[5:].nanmean().item()}
    return scores


def load_cifar10(data_dir, budget: dict, seed: int):
    """The CIFAR-10 train and test splits of the budget, from the Hub or the local copy in ``data_dir``: the subsets
    that the seed's train.py runs draw (with ``seed``), so that the head is fine-tuned on stage 1's images and the
    upper bounds and the recombined networks are scored on the same test images."""
    from timm_compat.data import load_image_data, local_source
    source = local_source(CIFAR10_ID, data_dir)
    return (load_image_data(source, 'train', limit=budget['train_limit'], seed=seed),
            load_image_data(source, 'test', limit=budget['test_limit'], seed=seed))


def run_seed(args, budget: dict, seed: int, out: Path, bar) -> dict:
    """Stages 1-3 and the upper bounds for one seed; everything goes to ``out``, the numbers to results.json."""
    import timm_compat
    from timm_compat.config import load_config

    out.mkdir(parents=True, exist_ok=True)
    (config, run_dir, overrides), *upper = seed_runs(args, budget, seed, out)
    stage1 = launch(config, run_dir, overrides, args.data_dir, out / 'stage1.log', bar, args.resume)
    components = out / 'stage1' / 'main' / 'components'
    interface = timm_compat.Interface.from_pretrained(components / 'interface')
    extractors = {n: timm_compat.Extractor.from_pretrained(components / n / 'extractor') for n in budget['networks']}

    start = time.time()
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    torch.manual_seed(seed)
    train, test = load_cifar10(args.data_dir, budget, seed)
    head = interface.dcc.extend_classes(CIFAR10).to(device)
    # The updated head still reads the interface's feature space: it belongs to the stage-1 interface.
    reference = extractors[budget['reference']].to(device)
    head.config['interface_id'] = reference.interface_id
    losses = finetune_head(reference, head, train, budget['head_epochs'], budget['head_batch'],
                           load_config(str(out / 'stage1' / 'config.yaml')), budget['head_optim'], device, seed)
    head.save_pretrained(out / 'updated_head')

    results = {name: evaluate(timm_compat.recombine(extractor.to(device), head), test)
               for name, extractor in extractors.items()}
    # Training time of each train.py run (kept across resumes, so a seed read back counts each run once).
    seconds = {'stage1': stage1['train_seconds'], 'head': round(time.time() - start, 1)}
    for name, (config, run_dir, overrides) in zip(budget['upper_bound'], upper):
        summary = launch(config, run_dir, overrides, args.data_dir, out / f'upper_{name}.log', bar, args.resume)
        for bn, own in by_bn(summary, 'own_accuracy').items():
            results[name][bn]['upper_bound'] = 100 * own['net']
        seconds[f'upper_{name}'] = summary['train_seconds']
    record = {'seed': seed, 'data_version': DATA_VERSION, 'results': results, 'head_losses': losses, 'seconds': seconds,
              'wall_seconds': round(sum(seconds.values()), 1), 'stage1_seconds': seconds['stage1'],
              'hardware': seed_machine([run_dir] + [r for _, r, _ in upper]), 'data_dir': args.data_dir,
              'budget': args.budget, 'epochs': args.epochs,
              'config': seed_fingerprint(args, budget, seed, out)}
    write_json(out / 'results.json', record)
    return record


def seed_machine(run_dirs) -> str:
    """The machine line(s) the train.py runs of a seed recorded (a run read back by --resume may have trained on
    another machine), and this process's, where the head was fine-tuned, if it differs."""
    runs, here = run_machine(run_dirs), hardware()
    return runs if here in runs else f'{runs}; head fine-tuned on {here}'


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--data-dir', default=None, help=DATA_DIR_HELP)
    parser.add_argument('--budget', default='cpu', choices=sorted(BUDGETS))
    parser.add_argument('--epochs', type=float, default=None, help="override the budget's stage-1/upper-bound epochs")
    parser.add_argument('--seeds', type=int, default=1, help='seeds 0..N-1, each a full run; mean +- std reported')
    parser.add_argument('--output', default='runs/head_transfer')
    parser.add_argument('--report-only', action='store_true', help='rebuild report.md from OUTPUT/seed*/results.json')
    parser.add_argument('--resume', action='store_true', help=RECORDS_HELP.replace('OUTPUT/results.json',
                                                                                    'OUTPUT/seed*/results.json'))
    args = parser.parse_args(argv)
    check_counts(parser, args)
    if not args.report_only:
        check_data_dir(parser, args.data_dir, [CIFAR10_ID])
    budget, out = BUDGETS[args.budget], Path(args.output).resolve()
    if args.report_only:
        return write_report(out, args, budget, list(saved_records(parser, args, out).values()))
    with claim_output(out):  # one sitting at a time writes OUTPUT's records
        records = saved_records(parser, args, out)
        train_missing(args, budget, out, records)
    write_report(out, args, budget, [records[seed] for seed in range(args.seeds)])


def saved_records(parser, args, out: Path) -> dict:
    """``{seed: its record, or None}`` of the seeds ``args`` asks for, as ``--resume`` or ``--report-only`` keep
    them: refused, before anything trains, if a record is missing for ``--report-only`` or their data versions
    differ."""
    records = {seed: saved_record(parser, args, out / f'seed{seed}' / 'results.json') if args.report_only or
               args.resume else None for seed in range(args.seeds)}
    missing = [seed for seed, r in records.items() if r is None]
    if args.report_only and missing:
        parser.error(f'--report-only: {out / f"seed{missing[0]}" / "results.json"} does not exist; run without it '
                     f'first.')
    versions = sorted({r.get('data_version', 1) for r in records.values() if r})
    if len(versions) > 1:
        parser.error(f'The seeds\' records in {out} were made on data versions {versions}: a table pools one.')
    return records


def train_missing(args, budget: dict, out: Path, records: dict) -> None:
    """Trains each seed that ``records`` lacks, adding its record; a record older than fingerprints cannot say its
    head's fine-tuning keys, so no seed is added to it."""
    if budget['threads'] and not torch.cuda.is_available():
        torch.set_num_threads(budget['threads'])  # as the training runs: cpu_threads
    todo = [seed for seed, r in records.items() if r is None]
    check_configs(out, {'head_transfer': [r for r in records.values() if r]},
                  {('head_transfer', s): seed_fingerprint(args, budget, s, out / f'seed{s}') for s in todo},
                  lambda name, s: None)
    with progress(len(todo) * (1 + len(budget['upper_bound'])), 'head transfer: train.py runs') as bar:
        for seed in todo:
            records[seed] = run_seed(args, budget, seed, out / f'seed{seed}', bar)


def saved_record(parser, args, path: Path) -> Optional[dict]:
    """The record of one seed at ``path`` (None if there is none), refused if it is of another budget, --epochs or
    --data-dir (as given), or older than the running-statistics columns; one of another data version is only
    reported (--report-only)."""
    if not path.is_file():
        return None
    record = read_json(path)
    if not args.report_only:
        check_data_version(record, path)
    if 'data_dir' not in record or 'budget' not in record:
        parser.error(f'{path} predates the running-statistics columns or the budget in records: train the seed again '
                     f'(move the file away).')
    # --data-dir is kept as typed: compared as the folder it names, as the other recipes do
    if (record['budget'], record['epochs']) != (args.budget, args.epochs) or not same_argument(
            'data_dir', record['data_dir'], args.data_dir):
        parser.error(f'{path} is a record of --budget {record["budget"]} --epochs {record["epochs"]} --data-dir '
                     f'{record["data_dir"]}: give the same arguments, or another --output.')
    return record


def figure_bars(records) -> tuple:
    """Fig. 4's bars: each extractor with the updated head and its upper bound, the seeds' values (BN=batch) by
    label, and the paper's values by the same labels."""
    bars, paper = {}, {}
    for name in records[0]['results']:
        for key, label in (('recombined', 'updated head'), ('upper_bound', 'upper bound')):
            values = [r['results'][name]['batch'][key] for r in records if key in r['results'][name]['batch']]
            if values:
                bars[f'{name}: {label}'] = values
            if name in PAPER:
                paper[f'{name}: {label}'] = PAPER[name][key == 'upper_bound']
    return bars, paper


def write_report(out: Path, args, budget, records) -> None:
    from timm_compat.plots import ReportFigure, ReportTable, plot_bars, write_report as write
    rows = []
    for name in records[0]['results']:
        for bn in BN_MODES:
            cells = [[r['results'][name][bn][k] for r in records if k in r['results'][name][bn]]
                     for k in ('recombined', 'classes_0_4', 'classes_5_9', 'upper_bound')]
            rows.append([name, bn, *(mean_std(c) for c in cells),
                         *(PAPER.get(name, ('–', '–')) if bn == 'batch' else ('–', '–'))])
    wall = statistics.mean(r['wall_seconds'] for r in records)
    stage1 = statistics.mean(r['stage1_seconds'] for r in records)
    epochs = f' --epochs {args.epochs}' if args.epochs else ''
    local = records[0]['data_dir']  # where the numbers' data came from, also under --report-only
    data_dir = f' --data-dir {local}' if local else ''
    bars, paper = figure_bars(records)
    figure = plot_bars(bars, out / 'figures' / 'head_transfer_bars.png', paper=paper,
                       ylabel='CIFAR-10 test accuracy (%)', title='Fig. 4: one head on every extractor')
    write(out, 'Sec. 5.2: one head across extractors of different architectures', {
        'Setup': (f'Command: `python recipes/head_transfer.py{data_dir} --budget {args.budget}{epochs} '
                  f'--seeds {args.seeds} --resume` on {"; ".join(sorted({r["hardware"] for r in records}))}; '
                  f'{wall / 60:.1f} min per seed end to end '
                  f'(the training time of its train.py runs, each counted once across resumes, and the head\'s '
                  f'fine-tuning and evaluation; stage 1: {stage1 / 60:.1f} min). {data_note(local)} '
                  f'Budget `{args.budget}`: stage 1 '
                  f'`{budget["stage1"].relative_to(REPO)}` with overrides '
                  f'`{" ".join(run_overrides(budget, budget["networks"], 0, args.epochs))}`, head fine-tuned '
                  f'{budget["head_epochs"]} epoch(s) at batch {budget["head_batch"]} on '
                  f'{budget["train_limit"] or "all"} training images under the frozen {budget["reference"]}; test on '
                  f'{budget["test_limit"] or "all 10,000"} test images, each accuracy with BN batch statistics '
                  f'(the paper\'s evaluation) and with running statistics (plain eval mode, what a deployed model '
                  f'gets). {len(records)} seed(s): mean'
                  + (' ± std.' if len(records) > 1 else '.')),
        'CIFAR-10 test accuracy (%)': [ReportTable(
            ['extractor', 'BN statistics', 'with the updated head', 'classes 0-4 (mean class acc.)',
             'classes 5-9 (mean class acc.)', 'upper bound (own training)', 'paper: recombined',
             'paper: upper bound'], rows,
            caption=f'The head never saw the non-reference extractors after stage 1, nor classes 5-9 with them; '
                    f'{budget["reference"]} is the reference it was fine-tuned on. Lower bound of the paper: 50 % '
                    f'(perfect on the first five classes).'),
            ReportFigure(figure, 'Fig. 4 style (BN=batch): mean over seeds, one std as the error bar, each seed a dot, '
                                 'the paper\'s value as a black tick.')],
    })


if __name__ == '__main__':
    main()
