"""Sec. 5.3 of Gygli et al. 2021: faster transfer learning by reusing a compatible target head, and stitching.

    python recipes/transfer.py --setting cifar10_halves --budget cpu     # uoft-cs/cifar10 from the Hub
    python recipes/transfer.py --setting cifar10_halves --budget cpu --data-dir ../shared/data   # local copy
    python recipes/transfer.py --setting synthetic --budget tiny         # smoke test, minutes on a CPU
    python recipes/transfer.py --setting cifar10_halves --budget fast --data-dir ../shared/data   # fast family

``--data-dir DIR`` reads CIFAR-10 from the local Parquet copy DIR/cifar10/{train,test}.parquet (the Hub schema)
instead of downloading ``uoft-cs/cifar10``, here and in the train.py runs (``../shared/data`` is this workspace's
JPEG copy).

Offline stand-in for the paper's ILSVRC-12 -> CIFAR/STL transfer: the target task is 5 CIFAR-10 classes on one half
of the training set; three candidate source tasks use the other 5 classes, in different subsets, on the other half.
Every network is one ``accelerate launch train.py`` run:

1. the target network, trained jointly with the interface's RP head (stage 1 of incremental training, Sec. 3.4);
2. each source network, trained against that frozen interface (stage 2), so all sources fit the target head;
3. the same target and sources trained independently, each with its own RP head (the paper's fair baseline).

Then timm_compat.transfer swaps each source extractor under the target head and fine-tunes (Fig. 5), against the
paper's two baselines, both on the independent sources: a re-initialised head, and the independent target head;
the step-0 accuracies rank the sources. Finally a
1x1-conv stitch (timm_compat.stitching) is fitted on a small labelled set from each source to the target head, with
both frozen, next to direct recombination. Every accuracy is measured with BN batch statistics (the paper's
evaluation) and with running statistics (what a deployed model gets). Writes OUTPUT/report.md, results.json, curves,
stitches and the runs.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

import timm_compat as tc
from timm_compat.deployment import BN_MODES, bn_accuracy_report
from timm_compat.evaluation import average_class_accuracy
from timm_compat.data import DATA_VERSION, EpochSampler, load_image_data, local_source
from timm_compat.plots import ReportFigure, ReportTable, plot_accuracy_curves, write_report
from timm_compat.stitching import fit_stitch
from timm_compat.transfer import transfer

from adaptation import launch_train  # the sibling recipe: a script's own folder is on sys.path
from common import (CIFAR10, DATA_DIR_HELP, RESUME_HELP, check_data_dir, check_positive, check_run_data, data_note,
                    fast_keys, fast_networks, finished_run, progress, write_json)

SETTINGS = {
    'cifar10_halves': dict(
        data=CIFAR10, target_shard=[1, 2], source_shard=[0, 2], source_data=None,
        target=['automobile', 'bird', 'cat', 'deer', 'ship'],
        sources={'animals': ['dog', 'frog', 'horse'], 'vehicles': ['airplane', 'truck'],
                 'mixed': ['airplane', 'dog', 'frog', 'horse', 'truck']}),
    # The two synthetic domains play the two halves: target classes from B, the other classes of A as sources.
    'synthetic': dict(
        data='synthetic:B', target_shard=None, source_shard=None, source_data='synthetic:A',
        target=['lamp', 'boat', 'bottle', 'letter_t', 'person'],
        sources={'house_tree_arrow': ['house', 'tree', 'arrow'], 'mushroom_star': ['mushroom', 'star'],
                 'all_five': ['house', 'tree', 'arrow', 'mushroom', 'star']}),
}
BUDGETS = {
    'tiny': dict(train={'networks.0.backbone': 'resnet8_cifar', 'interface.width': 32, 'steps': 30,
                        'batch_size': 32},
                 train_limit=800, test_limit=300, synthetic_per_class=30, curve_steps=[0, 1, 3, 5],
                 stitch_steps=10, stitch_images=100),
    'cpu': dict(train={'networks.0.backbone': 'resnet8_cifar', 'interface.width': 32, 'steps': 600,
                       'batch_size': 64},
                train_limit=None, test_limit=None, synthetic_per_class=400,
                curve_steps=[0, 1, 3, 10, 30, 100, 300], stitch_steps=300, stitch_images=1000),
    'gpu': dict(train={'networks.0.backbone': 'resnet56_cifar', 'interface.width': 32, 'epochs': 100,
                       'batch_size': 128, 'mixed_precision': 'bf16', 'optim.warmup_steps': 200},
                train_limit=None, test_limit=None, synthetic_per_class=400,
                curve_steps=[0, 1, 3, 10, 30, 100, 300, 1000], stitch_steps=500, stitch_images=1000),
    # The fast family's server member (airbench94) in place of ResNet-56, at the fast budget
    # (configs/fast/budget.yaml). Fine-tuning and stitching as the cpu budget's, in steps of batch 64 at --lr: the
    # curves are Fig. 5's measurement, comparable across budgets, and 300 steps are about 1.5 epochs of the ~12,400
    # target images of cifar10_halves. Not tuned for the fast family.
    'fast': dict(train={**fast_networks(1), **fast_keys()},
                 train_limit=None, test_limit=None, synthetic_per_class=400,
                 curve_steps=[0, 1, 3, 10, 30, 100, 300], stitch_steps=300, stitch_images=1000),
}
FINETUNE_BATCH = 64
SEED_STRIDE = 100  # init seeds of --seed S: 100 S + the network's own (0, 1 + i, 10 + i)
LABELS = {'recombined': 'target head (ours)', 'reinit_head': 're-initialised head',
          'independent': 'independent components'}


def dataset(args, setting, side: str, classes, budget) -> dict:
    data = setting['source_data'] if side == 'source' and setting['source_data'] else setting['data']
    spec = {'source': data, 'classes': classes,
            'train_limit': budget['train_limit'], 'test_limit': budget['test_limit'],
            'synthetic_per_class': budget['synthetic_per_class']}
    if setting[f'{side}_shard']:
        spec['train_shard'] = setting[f'{side}_shard']
    return spec


def train_network(args, budget, name: str, data: dict, init_seed: int, bar, interface=None) -> Path:
    """One network in its own run: against a new interface (its own RP head) or the frozen ``interface``; ``bar``
    counts it, also when ``--reuse`` keeps a finished run."""
    run = Path(args.output).resolve() / 'runs' / name
    config, overrides = network_config(args, budget, name, data, init_seed, interface)
    # A kept run is read back by train.py --resume, which refuses it if its config is not this one's.
    launch_train(config, run, overrides, args.threads, args.data_dir, bar,
                 args.resume or (args.reuse and finished_run(run)))
    return run / 'main' / 'components'


def network_config(args, budget, name: str, data: dict, init_seed: int, interface=None):
    """The config and overrides of one network's run (see :func:`train_network`), for ``launch_train``.

    ``init_seed`` tells the run's networks apart; ``--seed`` moves all of them to other initial weights.
    """
    config = {'seed': args.seed, 'init_seed': SEED_STRIDE * args.seed + init_seed, 'iiw': False, 'baseline': None,
              'checkpoint_every': 100000, 'log_every': 50, 'mixed_precision': 'no', 'channels_last': False,
              'interface': {'rp': True, 'dcc': False, 'load': str(interface) if interface else None},
              'networks': [{'name': name, 'split': 'layer2', 'dataset': data}]}
    # A frozen interface brings its own width.
    overrides = {**budget['train'], 'interface.width': None} if interface else budget['train']
    return config, overrides


def check_kept_runs(args, out: Path) -> None:
    """Refuses, before the first run trains, a run that ``--resume`` or ``--reuse`` would keep but that was trained
    on another ``--data-dir`` (:func:`common.check_run_data`; each run is checked again as it is launched)."""
    if not (args.resume or args.reuse) or not (out / 'runs').is_dir():
        return
    for run in sorted(p for p in (out / 'runs').iterdir() if p.is_dir()):
        if args.resume or finished_run(run):
            check_run_data(run, args.data_dir)


def training_seconds(components: list) -> float:
    """The networks' training time, every phase of each run, from the runs' own summaries (``components`` are
    their ``main/components`` folders): a run that --resume or --reuse reads back took no training here, and a
    resumed one counts each step once."""
    summaries = [json.loads((c.parent.parent / 'summary.json').read_text()) for c in components]
    return round(sum(phase['train_seconds'] for summary in summaries for phase in summary['phases'].values()), 1)


def load(components: Path, name: str, device):
    return tc.recombine(tc.Extractor.from_pretrained(components / name / 'extractor', map_location=device),
                        tc.Head.from_pretrained(components / name / 'head', map_location=device))


def parse_args(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--setting', default='cifar10_halves', choices=sorted(SETTINGS))
    parser.add_argument('--data-dir', default=None, help=DATA_DIR_HELP)
    parser.add_argument('--budget', default='cpu', choices=sorted(BUDGETS))
    parser.add_argument('--lr', type=float, default=0.01, help='fine-tuning learning rate (constant)')
    parser.add_argument('--reuse', action='store_true',
                        help='keep the runs that finished in OUTPUT/runs (refused if their config is not this one\'s)')
    parser.add_argument('--resume', action='store_true', help=RESUME_HELP)
    parser.add_argument('--threads', type=int, default=None, help='CPU threads (1 on a shared machine)')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--output', default='runs/transfer')
    parser.add_argument('--mixed-precision', default='no', choices=['no', 'bf16', 'fp16'],
                        help='autocast of fine-tuning and stitch fitting (the training runs take their '
                             'budget\'s mixed_precision: no at tiny and cpu, bf16 at gpu, auto at fast)')
    args = parser.parse_args(argv)
    check_positive(parser, args, ['threads', 'lr'])
    check_data_dir(parser, args.data_dir, [SETTINGS[args.setting]['data']])
    return args


def load_target(args, target_data: dict, budget: dict):
    """The target task's train and test data, from the Hub or the local copy in ``--data-dir``."""
    common = dict(classes=target_data['classes'], seed=args.seed, synthetic_per_class=budget['synthetic_per_class'])
    source = local_source(target_data['source'], args.data_dir)
    return (load_image_data(source, 'train', limit=budget['train_limit'], shard=target_data.get('train_shard'),
                            **common),
            load_image_data(source, 'test', limit=budget['test_limit'], **common))


def stitch_sources(args, budget, out: Path, head, sources: dict, sources_ind: dict, train, test) -> dict:
    """Per source: the target head on the compatible and on the independent extractor, directly and through a
    stitch fitted on a few labelled target images; average class accuracy under each BN mode."""
    small, stitching = train.take(budget['stitch_images'], seed=args.seed), {}
    with progress(2 * len(sources), 'stitching', unit='stitch') as bar:
        for name in sources:
            row = {}
            for kind, extractor in (('compatible', sources[name]), ('independent', sources_ind[name])):
                row[f'{kind}_direct'] = bn_accuracy_report(tc.CompatibleModel(extractor, head), test,
                                                           batch_size=250, metric=average_class_accuracy)
                stitched = fit_stitch(extractor, head, small, budget['stitch_steps'], seed=args.seed,
                                      mixed_precision=args.mixed_precision)
                stitched.stitch.save_pretrained(out / 'stitches' / f'{name}_{kind}')
                row[f'{kind}_stitched'] = bn_accuracy_report(stitched, test, batch_size=250,
                                                             metric=average_class_accuracy)
                bar.update(1)
            stitching[name] = row
    return stitching


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    setting, budget = SETTINGS[args.setting], BUDGETS[args.budget]
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    check_kept_runs(args, out)
    start = time.time()

    target_data = dataset(args, setting, 'target', setting['target'], budget)
    source_data = {name: dataset(args, setting, 'source', classes, budget)
                   for name, classes in setting['sources'].items()}
    # Every network is one train.py run: the target and each source, compatible and independent.
    with progress(2 * (1 + len(source_data)), 'transfer: train.py runs') as bar:
        compatible = train_network(args, budget, 'target', target_data, 0, bar)
        sources_dirs = {name: train_network(args, budget, name, data, 1 + i, bar, interface=compatible / 'interface')
                        for i, (name, data) in enumerate(source_data.items())}
        independent = {name: train_network(args, budget, f'{name}_independent', data, 10 + i, bar)
                       for i, (name, data) in enumerate({'target': target_data, **source_data}.items())}
    train_wall_seconds = time.time() - start  # this sitting's: a run read back or resumed counts only its part here
    train_seconds = training_seconds([compatible, *sources_dirs.values(), *independent.values()])

    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    target = load(compatible, 'target', device)
    sources = {name: load(d, name, device).extractor for name, d in sources_dirs.items()}
    target_ind = load(independent['target'], 'target_independent', device)
    sources_ind = {name: load(independent[name], f'{name}_independent', device).extractor for name in sources}
    train, test = load_target(args, target_data, budget)

    # Fig. 5 marks one epoch of the target's training set: the curve is measured there too. The sampler drops the
    # last partial batch, so an epoch is the whole batches.
    epoch = EpochSampler(len(train), FINETUNE_BATCH).steps_per_epoch
    steps = sorted({*budget['curve_steps'], epoch})
    options = dict(steps=steps, lr=args.lr, seed=args.seed, mixed_precision=args.mixed_precision,
                   batch_size=FINETUNE_BATCH)
    torch.manual_seed(args.seed)
    ours = transfer(target, sources, train, test, **options)
    # Both baselines start from the independently trained sources (Sec. 5.3: trained with RP too, "but initialize
    # the weights of its head randomly for each network"): the independent target head, and a new random head.
    baseline = transfer(target_ind, sources_ind, train, test, on_mismatch='force', reinit_head=True, **options)

    stitching = stitch_sources(args, budget, out, target.head, sources, sources_ind, train, test)
    results = {'args': vars(args), 'ours': ours.to_dict(), 'independent': baseline.to_dict(),
               'ranking_step0': ours.ranking(0), 'ranking_final': ours.ranking(steps[-1]),
               'stitching': stitching, 'train_seconds': train_seconds,
               'train_wall_seconds': round(train_wall_seconds, 1),
               'wall_seconds': round(time.time() - start, 1), 'target_train': len(train), 'target_test': len(test),
               'epoch_steps': epoch, 'data_version': DATA_VERSION}
    write_json(out / 'results.json', results)
    report(out, args, budget, ours, baseline, results, argv)
    print('ranking by step-0 accuracy:', ', '.join(f'{n} {100 * a:.1f} %' for n, a in results['ranking_step0']))


def _sources(setting: dict) -> list:
    return sorted({setting['data'], setting['source_data'] or setting['data']})


def report(out: Path, args, budget, ours, baseline, results: dict, argv) -> None:
    last, epoch = max(budget['curve_steps'][-1], results['epoch_steps']), results['epoch_steps']
    figures = []
    for name in SETTINGS[args.setting]['sources']:
        curves = {f'{LABELS[mode]}, BN={bn}': (c.steps, c.accuracy_by_bn[bn]) for mode, c in (
            ('recombined', ours.curve(name)), ('reinit_head', baseline.curve(name, 'reinit_head')),
            ('independent', baseline.curve(name))) for bn in BN_MODES}
        path = plot_accuracy_curves(curves, out / f'curve_{name}.png', annotate_steps=(0, epoch, last),
                                    marks={'1 epoch': epoch}, title=f'source {name} -> target', xlabel='fine-tuning steps on the target')
        figures.append(ReportFigure(path, f'Source {name}: average class accuracy on the target test set, BN batch '
                                          f'and running statistics.'))
    final = dict(results['ranking_final'])
    rows = []
    for i, (name, acc) in enumerate(results['ranking_step0']):
        ours_curve, reinit, independent = ours.curve(name), baseline.curve(name, 'reinit_head'), baseline.curve(name)
        rows.append([i + 1, name, 100 * acc, 100 * ours_curve.accuracy_by_bn['running'][0], 100 * final[name],
                     100 * ours_curve.accuracy_by_bn['running'][-1],
                     [n for n, _ in results['ranking_final']].index(name) + 1,
                     *(100 * c.accuracy_by_bn[bn][-1] for c in (reinit, independent) for bn in BN_MODES)])
    ranking = ReportTable(
        ['rank', 'source', 'step 0, BN=batch (%)', 'step 0, BN=running (%)', f'step {last}, BN=batch (%)',
         f'step {last}, BN=running (%)', f'rank at step {last}', f're-initialised head, step {last}, BN=batch (%)',
         f're-initialised head, step {last}, BN=running (%)', f'independent, step {last}, BN=batch (%)',
         f'independent, step {last}, BN=running (%)'], rows,
        caption='Sources ranked by accuracy with BN batch statistics directly after recombination with the target '
                f'head (no fine-tuning), next to their rank after {last} fine-tuning steps; running statistics: '
                f'what the same model gets when deployed.')
    stitch_rows = [[name, bn, *(100 * row[k][bn] for k in ('compatible_direct', 'compatible_stitched',
                                                           'independent_direct', 'independent_stitched'))]
                   for name, row in results['stitching'].items() for bn in BN_MODES]
    stitch_table = ReportTable(
        ['source', 'BN statistics', 'compatible: direct (%)', 'compatible: stitched (%)', 'independent: direct (%)',
         'independent: stitched (%)'], stitch_rows,
        caption=f'Source extractor + the target head, directly or through a 1x1-conv stitch fitted for '
                f'{budget["stitch_steps"]} steps on {min(budget["stitch_images"], results["target_train"])} '
                f'labelled target images with both components frozen. Stitches: stitches/.')
    setup = (f'Setting `{args.setting}`, budget `{args.budget}`. Target: {SETTINGS[args.setting]["target"]}, '
             f'{results["target_train"]} training and {results["target_test"]} test images. Sources: '
             + ', '.join(f'{n} {c}' for n, c in SETTINGS[args.setting]['sources'].items())
             + f'. Fine-tuning: all parameters, SGD with Nesterov momentum, constant lr {args.lr}, batch {FINETUNE_BATCH} '
             f'(one epoch: {epoch} steps); '
             f'accuracy is the average over classes, with BN batch statistics (test-time BN, the paper\'s '
             f'evaluation) and with running statistics (plain eval mode, what a deployed model gets). '
             f'{data_note(args.data_dir, _sources(SETTINGS[args.setting]))} '
             f'Training the networks took {results["train_seconds"]} s (their runs\' own time, summed), the whole '
             f'recipe {results["wall_seconds"]} s in this sitting.')
    write_report(out, f'Faster transfer learning with compatible components (Sec. 5.3): {args.setting}', {
        'Setup': setup,
        'Ranking of source extractors': ranking,
        'Accuracy along fine-tuning (Fig. 5)': figures,
        'Stitching versus direct recombination': stitch_table,
        'Reproduce': f'`python recipes/transfer.py {" ".join(argv)}`',
    })


if __name__ == '__main__':
    main()
