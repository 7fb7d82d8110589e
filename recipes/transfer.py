"""Sec. 5.3 of Gygli et al. 2021: faster transfer learning by reusing a compatible target head, and stitching.

    python recipes/transfer.py --setting cifar10_halves --data-dir ../shared/data/cifar10 --budget cpu
    python recipes/transfer.py --setting synthetic --budget tiny         # smoke test, minutes on a CPU

Offline stand-in for the paper's ILSVRC-12 -> CIFAR/STL transfer: the target task is 5 CIFAR-10 classes on one half
of the training set; three candidate source tasks use the other 5 classes, in different subsets, on the other half.
Every network is one ``accelerate launch train.py`` run:

1. the target network, trained jointly with the interface's RP head (stage 1 of incremental training, Sec. 3.4);
2. each source network, trained against that frozen interface (stage 2), so all sources fit the target head;
3. the same target and sources trained independently, each with its own RP head (the paper's fair baseline).

Then timm_compat.transfer swaps each source extractor under the target head and fine-tunes (Fig. 5), against a
re-initialised head and against independently trained components; the step-0 accuracies rank the sources. Finally a
1x1-conv stitch (timm_compat.stitching) is fitted on a small labelled set from each source to the target head, with
both frozen, next to direct recombination. Writes OUTPUT/report.md, results.json, curves, stitches and the runs.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

import timm_compat as tc
from timm_compat.evaluation import average_class_accuracy
from timm_compat.data import load_image_data
from timm_compat.plots import ReportFigure, ReportTable, plot_accuracy_curves, write_report
from timm_compat.stitching import fit_stitch
from timm_compat.transfer import transfer

from adaptation import launch_train  # the sibling recipe: a script's own folder is on sys.path

SETTINGS = {
    'cifar10_halves': dict(
        data='parquet:{data_dir}', target_shard=[1, 2], source_shard=[0, 2], source_data=None,
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
                 train_limit=800, test_limit=300, synthetic_per_class=30, curve_steps=[0, 1, 3, 10],
                 stitch_steps=10, stitch_images=100),
    'cpu': dict(train={'networks.0.backbone': 'resnet8_cifar', 'interface.width': 32, 'steps': 600,
                       'batch_size': 64},
                train_limit=None, test_limit=None, synthetic_per_class=400,
                curve_steps=[0, 1, 3, 10, 30, 100, 300], stitch_steps=300, stitch_images=1000),
    'gpu': dict(train={'networks.0.backbone': 'resnet56_cifar', 'interface.width': 32, 'epochs': 100,
                       'batch_size': 128, 'mixed_precision': 'bf16', 'optim.warmup_steps': 200},
                train_limit=None, test_limit=None, synthetic_per_class=400,
                curve_steps=[0, 1, 3, 10, 30, 100, 300, 1000], stitch_steps=500, stitch_images=1000),
}
LABELS = {'recombined': 'target head (ours)', 'reinit_head': 're-initialised head',
          'independent': 'independent components'}


def dataset(args, setting, side: str, classes, budget) -> dict:
    data = setting['source_data'] if side == 'source' and setting['source_data'] else setting['data']
    spec = {'source': data.replace('{data_dir}', str(args.data_dir)), 'classes': classes,
            'train_limit': budget['train_limit'], 'test_limit': budget['test_limit'],
            'synthetic_per_class': budget['synthetic_per_class']}
    if setting[f'{side}_shard']:
        spec['train_shard'] = setting[f'{side}_shard']
    return spec


def train_network(args, budget, name: str, data: dict, init_seed: int, interface=None) -> Path:
    """One network in its own run: against a new interface (its own RP head) or the frozen ``interface``."""
    run = Path(args.output).resolve() / 'runs' / name
    if not (args.reuse and (run / 'summary.json').exists()):
        config = {'seed': args.seed, 'init_seed': init_seed, 'iiw': False, 'baseline': None,
                  'checkpoint_every': 100000, 'log_every': 50, 'mixed_precision': 'no', 'channels_last': False,
                  'interface': {'rp': True, 'dcc': False, 'load': str(interface) if interface else None},
                  'networks': [{'name': name, 'split': 'layer2', 'dataset': data}]}
        # A frozen interface brings its own width.
        overrides = {**budget['train'], 'interface.width': None} if interface else budget['train']
        launch_train(config, run, overrides, args.threads)
    return run / 'main' / 'components'


def load(components: Path, name: str, device):
    return tc.recombine(tc.Extractor.from_pretrained(components / name / 'extractor', map_location=device),
                        tc.Head.from_pretrained(components / name / 'head', map_location=device))


def parse_args(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--setting', default='cifar10_halves', choices=sorted(SETTINGS))
    parser.add_argument('--data-dir', default=None, help='CIFAR-10 Parquet folder (cifar10_halves)')
    parser.add_argument('--budget', default='cpu', choices=sorted(BUDGETS))
    parser.add_argument('--lr', type=float, default=0.01, help='fine-tuning learning rate (constant)')
    parser.add_argument('--reuse', action='store_true', help='keep the runs that finished in OUTPUT/runs')
    parser.add_argument('--threads', type=int, default=None, help='CPU threads (1 on a shared machine)')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--output', default='runs/transfer')
    parser.add_argument('--mixed-precision', default='no', choices=['no', 'bf16', 'fp16'],
                        help='autocast of fine-tuning and stitch fitting (the training runs keep mixed_precision=no)')
    args = parser.parse_args(argv)
    if '{data_dir}' in SETTINGS[args.setting]['data'] and not args.data_dir:
        parser.error(f'--setting {args.setting} reads the CIFAR-10 Parquet copy: pass --data-dir.')
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    setting, budget = SETTINGS[args.setting], BUDGETS[args.budget]
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()

    target_data = dataset(args, setting, 'target', setting['target'], budget)
    source_data = {name: dataset(args, setting, 'source', classes, budget)
                   for name, classes in setting['sources'].items()}
    compatible = train_network(args, budget, 'target', target_data, init_seed=0)
    sources_dirs = {name: train_network(args, budget, name, data, init_seed=1 + i,
                                        interface=compatible / 'interface')
                    for i, (name, data) in enumerate(source_data.items())}
    independent = {name: train_network(args, budget, f'{name}_independent', data, init_seed=10 + i)
                   for i, (name, data) in enumerate({'target': target_data, **source_data}.items())}
    train_seconds = time.time() - start

    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    target = load(compatible, 'target', device)
    sources = {name: load(d, name, device).extractor for name, d in sources_dirs.items()}
    target_ind = load(independent['target'], 'target_independent', device)
    sources_ind = {name: load(independent[name], f'{name}_independent', device).extractor for name in sources}
    common = dict(classes=setting['target'], seed=args.seed, synthetic_per_class=budget['synthetic_per_class'])
    train = load_image_data(target_data['source'], 'train', limit=budget['train_limit'],
                            shard=target_data.get('train_shard'), **common)
    test = load_image_data(target_data['source'], 'test', limit=budget['test_limit'], **common)

    options = dict(steps=budget['curve_steps'], lr=args.lr, seed=args.seed, mixed_precision=args.mixed_precision)
    torch.manual_seed(args.seed)
    ours = transfer(target, sources, train, test, reinit_head=True, **options)
    baseline = transfer(target_ind, sources_ind, train, test, on_mismatch='force', **options)

    small = train.take(budget['stitch_images'])
    stitching = {}
    for name in sources:
        row = {'compatible_direct': ours.curve(name).accuracy[0],
               'independent_direct': average_class_accuracy(tc.CompatibleModel(sources_ind[name], target.head),
                                                            test)}
        for kind, extractor in (('compatible', sources[name]), ('independent', sources_ind[name])):
            stitched = fit_stitch(extractor, target.head, small, budget['stitch_steps'], seed=args.seed,
                                  mixed_precision=args.mixed_precision)
            stitched.stitch.save_pretrained(out / 'stitches' / f'{name}_{kind}')
            row[f'{kind}_stitched'] = average_class_accuracy(stitched, test)
        stitching[name] = row

    results = {'args': vars(args), 'ours': ours.to_dict(), 'independent': baseline.to_dict(),
               'ranking_step0': ours.ranking(0), 'ranking_final': ours.ranking(budget['curve_steps'][-1]),
               'stitching': stitching, 'train_seconds': round(train_seconds, 1),
               'wall_seconds': round(time.time() - start, 1), 'target_train': len(train), 'target_test': len(test)}
    (out / 'results.json').write_text(json.dumps(results, indent=2))
    report(out, args, budget, ours, baseline, results, argv)
    print('ranking by step-0 accuracy:', ', '.join(f'{n} {100 * a:.1f} %' for n, a in results['ranking_step0']))


def report(out: Path, args, budget, ours, baseline, results: dict, argv) -> None:
    last = budget['curve_steps'][-1]
    figures = []
    for name in SETTINGS[args.setting]['sources']:
        curves = {LABELS[mode]: (c.steps, c.accuracy) for mode, c in (
            ('recombined', ours.curve(name)), ('reinit_head', ours.curve(name, 'reinit_head')),
            ('independent', baseline.curve(name)))}
        path = plot_accuracy_curves(curves, out / f'curve_{name}.png', annotate_steps=(0, last),
                                    title=f'source {name} -> target', xlabel='fine-tuning steps on the target')
        figures.append(ReportFigure(path, f'Source {name}: average class accuracy on the target test set.'))
    final = dict(results['ranking_final'])
    ranking = ReportTable(
        ['rank', 'source', 'step 0 (%)', f'step {last} (%)', f'rank at step {last}',
         f're-initialised head, step {last} (%)', f'independent, step {last} (%)'],
        [[i + 1, name, 100 * acc, 100 * final[name], [n for n, _ in results['ranking_final']].index(name) + 1,
          100 * ours.curve(name, 'reinit_head').accuracy[-1], 100 * baseline.curve(name).accuracy[-1]]
         for i, (name, acc) in enumerate(results['ranking_step0'])],
        caption='Sources ranked by accuracy directly after recombination with the target head (no fine-tuning), '
                f'next to their rank after {last} fine-tuning steps.')
    stitch_rows = [[name, *(100 * row[k] for k in ('compatible_direct', 'compatible_stitched',
                                                   'independent_direct', 'independent_stitched'))]
                   for name, row in results['stitching'].items()]
    stitch_table = ReportTable(
        ['source', 'compatible: direct (%)', 'compatible: stitched (%)', 'independent: direct (%)',
         'independent: stitched (%)'], stitch_rows,
        caption=f'Source extractor + the target head, directly or through a 1x1-conv stitch fitted for '
                f'{budget["stitch_steps"]} steps on {min(budget["stitch_images"], results["target_train"])} '
                f'labelled target images with both components frozen. Stitches: stitches/.')
    setup = (f'Setting `{args.setting}`, budget `{args.budget}`. Target: {SETTINGS[args.setting]["target"]}, '
             f'{results["target_train"]} training and {results["target_test"]} test images. Sources: '
             + ', '.join(f'{n} {c}' for n, c in SETTINGS[args.setting]['sources'].items())
             + f'. Fine-tuning: all parameters, SGD with Nesterov momentum, constant lr {args.lr}, batch 64; '
             f'accuracy is the average over classes with test-time BN. Training the networks took '
             f'{results["train_seconds"]} s, the whole recipe {results["wall_seconds"]} s.')
    write_report(out, f'Faster transfer learning with compatible components (Sec. 5.3): {args.setting}', {
        'Setup': setup,
        'Ranking of source extractors': ranking,
        'Accuracy along fine-tuning (Fig. 5)': figures,
        'Stitching versus direct recombination': stitch_table,
        'Reproduce': f'`python recipes/transfer.py {" ".join(argv)}`',
    })


if __name__ == '__main__':
    main()
