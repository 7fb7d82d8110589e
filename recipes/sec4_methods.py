"""Sec. 4 of Gygli et al. 2021: recombination accuracy of each compatibility method, mean +- std over seeds.

    python recipes/sec4_methods.py --setting cifar10_halves --budget cpu       # uoft-cs/cifar10 from the Hub
    python recipes/sec4_methods.py --setting cifar10_halves --budget cpu --data-dir ../shared/data  # local copy
    python recipes/sec4_methods.py --setting cifar10_stl10 --budget paper --seeds 10     # Hub data, a GPU
    python recipes/sec4_methods.py --setting cifar10_halves --budget fast --data-dir ../shared/data  # fast family
    python recipes/sec4_methods.py --setting cifar10_halves --init rp_pretrained --methods iiw iiw_dcc rp dcc
    python recipes/sec4_methods.py --setting cifar10_halves --methods upper_bound      # each network alone, own RP

``--data-dir DIR`` reads each Hub dataset ORG/NAME from the local Parquet copy DIR/NAME/{train,test}.parquet
instead of downloading it (``../shared/data`` is this workspace's CIFAR-10, a JPEG copy); train.py gets it too.

Each (method, seed) is one ``accelerate launch train.py -c configs/sec4/METHOD.yaml --set data=SETTING`` run
(SETTING: a data preset in configs/sec4/data/); incremental is its two stages; ``control`` trains both networks on
CIFAR-10 halves with IIW+RP (the paper's "both tasks CIFAR-10" control). The recipe gathers every run's
summary.json into OUTPUT/results.json and a report.md with the table (recombination and own accuracy with BN
batch statistics, the paper's evaluation, and with running statistics, what a deployed model gets), recombination
heatmaps and the per-channel feature correlation of Fig. 3.

``--init rp_pretrained`` is Fig. 2 right, the networks starting from pre-trained weights. The paper pre-trains by
rotation prediction on ILSVRC-12; the stand-in is ``configs/sec4/rp_pretraining.yaml``, RP alone with the labels
unused on all training images of the preset's first dataset (CIFAR-10), run once or twice before the methods
(``rp_pretraining0``, ``rp_pretraining1``, seeds 0 and 1). IIW methods start both networks from pre-training 0
(the paper's "identical initial weights" from one pre-trained network), the others network a from 0 and b from 1.
"""
import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Sequence

from timm_compat.deployment import BN_MODES

from common import (DATA_DIR_HELP, REPO, RESUME_HELP, as_overrides, by_bn, check_data_dir, data_note, fast_keys,
                    fast_networks, launch, mean_std, progress)

SETTINGS = sorted(p.stem for p in (REPO / 'configs' / 'sec4' / 'data').glob('*.yaml'))
METHODS = ['independent', 'iiw', 'rp', 'dcc', 'iiw_rp_dcc', 'incremental', 'control', 'upper_bound']
ALL_METHODS = METHODS + ['iiw_dcc']
# Methods whose networks start from identical initial weights: with --init rp_pretrained, one pre-training.
IIW_METHODS = {'iiw', 'iiw_dcc', 'iiw_rp_dcc', 'incremental', 'control'}
INITS = ('random', 'rp_pretrained')
# Fig. 2 (random initialisation) and the text of Sec. 4: recombination accuracy in %.
PAPER = {'independent': 10.6, 'iiw': 25.1, 'rp': 50.1, 'dcc': 65.8, 'iiw_rp_dcc': 76.7, 'incremental': 72.7,
         'upper_bound': 85.6}
# Fig. 2 right (ILSVRC-12 rotation pre-training) and its text, recombination accuracy in %.
PAPER_PRETRAINED = {'iiw': 74.3, 'iiw_dcc': 82.7, 'rp': 19.7, 'dcc': 52.3}
PRETRAINING_NOTE = ('Networks start from RP pre-trainings (stand-in for the paper\'s ILSVRC-12 rotation '
                    'pre-training): `configs/sec4/rp_pretraining.yaml`, labels unused, on all of the first '
                    'dataset\'s training images; IIW methods start both networks from pre-training 0, the others '
                    'network a from 0 and network b from 1. ')
# A budget is a list of config overrides; 'paper' keeps the configs as they are (ResNet-56, 160 epochs); 'fast'
# trains the fast family's server member in place of ResNet-56 at the fast budget (configs/fast/budget.yaml).
BUDGETS = {
    'cpu': ['networks.0.backbone=resnet8_cifar', 'networks.1.backbone=resnet8_cifar', 'epochs=3',
            'networks.0.dataset.train_limit=10000', 'networks.1.dataset.train_limit=10000',
            'networks.0.dataset.test_limit=2000', 'networks.1.dataset.test_limit=2000',
            'mixed_precision=no', 'channels_last=false', 'optim.warmup_steps=0', 'checkpoint_every=100000',
            'cpu_threads=1'],  # two threads on a shared 2-core machine run several times slower than one
    'paper': [],
    'fast': as_overrides({**fast_networks(2), **fast_keys()}),
}


def control_overrides(setting: str):
    """Both tasks CIFAR-10: the second network trains on the other half, clean, with all ten classes."""
    if not setting.startswith('cifar10_halves'):
        raise ValueError('The control needs two parts of one dataset: use --setting cifar10_halves or '
                         'cifar10_halves_5k.')
    return ['networks.1.dataset.classes=null', 'networks.1.dataset.shift=null']


def setting_sources(setting: str) -> list:
    """The dataset sources of a data preset, as its networks name them."""
    import yaml
    preset = yaml.safe_load((REPO / 'configs' / 'sec4' / 'data' / f'{setting}.yaml').read_text())
    return sorted({n['dataset']['source'] for n in preset['networks']})


def runs_of(method: str) -> int:
    """train.py runs of one seed of ``method``: incremental trains its two stages one after the other, the upper
    bound each network alone."""
    return 2 if method in ('incremental', 'upper_bound') else 1


def single_network(overrides: list, index: int) -> list:
    """``overrides`` for a run of network ``index`` alone: its keys as network 0's, the other network's dropped."""
    mine, other = f'networks.{index}.', f'networks.{1 - index}.'
    return [o.replace(mine, 'networks.0.', 1) for o in overrides if not o.startswith(other)]


def run_overrides(args, seed: int) -> list:
    """The overrides of every run of one seed: the budget's, the data preset, the seed and ``--epochs``."""
    return BUDGETS[args.budget] + [f'data={args.setting}', f'seed={seed}', f'init_seed={seed}'] + (
        [f'epochs={args.epochs}'] if args.epochs else [])


def first_network(setting: str) -> str:
    """The name of the data preset's first network (``a`` in the CIFAR-10 stand-ins, ``cifar10`` in the paper's)."""
    import yaml
    return yaml.safe_load((REPO / 'configs' / 'sec4' / 'data' / f'{setting}.yaml').read_text())['networks'][0]['name']


def pretraining_runs(methods, args, out: Path) -> list:
    """The RP pre-trainings that ``--init rp_pretrained`` needs: one, and a second for any non-IIW method."""
    if args.init != 'rp_pretrained':
        return []
    count = 1 if set(methods) <= IIW_METHODS else 2
    return [(REPO / 'configs' / 'sec4' / 'rp_pretraining.yaml', out / f'rp_pretraining{k}',
             [o for o in run_overrides(args, k) if not o.startswith('networks.1.')]
             + ['networks.0.dataset.train_shard=null']) for k in range(count)]


def init_overrides(method: str, args, out: Path) -> list:
    """``networks.N.init`` of a method's networks: both from pre-training 0 under IIW, else from 0 and 1."""
    if args.init != 'rp_pretrained':
        return []
    pre = [out / f'rp_pretraining{k}' / 'main' / 'components' / first_network(args.setting) / 'extractor'
           for k in range(2)]
    return [f'networks.0.init={pre[0]}', f'networks.1.init={pre[0] if method in IIW_METHODS else pre[1]}']


def method_runs(method: str, seed: int, args, out: Path, extra: Sequence[str] = ()) -> list:
    """The train.py runs of one seed of ``method``, in order, as (config file, run folder, overrides); ``extra``
    overrides go on top of every run's (an ablation's variant)."""
    configs = REPO / 'configs' / 'sec4'
    budget = run_overrides(args, seed) + init_overrides(method, args, out) + list(extra)
    run_dir = out / f'{method}_seed{seed}'
    if method == 'incremental':
        stage1 = out / f'incremental_stage1_seed{seed}'
        one_net = [o for o in budget if not o.startswith('networks.1.')]
        components = stage1 / 'main' / 'components'
        return [(configs / 'incremental_stage1.yaml', stage1, one_net),
                (configs / 'incremental.yaml', run_dir,
                 budget + [f'interface.load={components / "interface"}',
                           f'networks.0.load={components / first_network(args.setting)}',
                           'networks.0.init=null'])]
    if method == 'control':
        return [(configs / 'rp.yaml', run_dir, budget + ['iiw=true'] + control_overrides(args.setting))]
    if method == 'iiw_dcc':
        return [(configs / 'dcc.yaml', run_dir, budget + ['iiw=true'])]
    if method == 'upper_bound':
        return [(configs / f'upper_bound_{side}.yaml', out / f'upper_bound_{side}_seed{seed}',
                 single_network(budget, i)) for i, side in enumerate('ab')]
    return [(configs / f'{method}.yaml', run_dir, budget)]


def run_method(method: str, seed: int, args, out: Path, bar, extra: Sequence[str] = ()) -> tuple:
    """Trains ``method``'s runs one after the other; returns the last one's ``main`` phase summary and the run
    folders that hold the method's networks. The upper bound's two networks, trained apart, are measured together."""
    runs = method_runs(method, seed, args, out, extra)
    for config, run_dir, overrides in runs:
        summary = launch(config, run_dir, overrides, args.data_dir, out / f'{run_dir.name}.log', bar, args.resume)
    if method != 'upper_bound':
        return summary, [runs[-1][1]]
    from timm_compat.evaluation import evaluate_networks
    from timm_compat.config import load_config
    names, models, tests = _run_networks([run_dir for _, run_dir, _ in runs])
    cfg = load_config(str(runs[0][1] / 'config.yaml'))
    return (evaluate_networks(dict(zip(names, models)), dict(zip(names, tests)), cfg.eval_batch_size, cfg.eval_bn,
                              tta=cfg.eval_tta), [run_dir for _, run_dir, _ in runs])


def training_seconds(method: str, seed: int, args, out: Path, extra: Sequence[str] = ()) -> float:
    """Training time of one seed of ``method``, every run and phase of it, from the runs' own summaries: a run
    read back by --resume takes no time in this process, and a resumed run counts each step once."""
    return round(sum(phase['train_seconds'] for _, run_dir, _ in method_runs(method, seed, args, out, extra)
                     for phase in json.loads((run_dir / 'summary.json').read_text())['phases'].values()), 1)


def recombination(matrix) -> float:
    """Average of both directions: extractor a + head b on a's test set, and the converse."""
    return 100 * (matrix[0][1] + matrix[1][0]) / 2


def run_record(summary: dict, upper_bound: bool = False) -> dict:
    """Recombination (for the upper bound: own accuracy on the common classes, the matrix's diagonal) and own
    accuracy (%) of one run under each BN mode, and its matrices."""
    matrices, own = by_bn(summary, 'recombination_matrix'), by_bn(summary, 'own_accuracy')
    value = (lambda m: 100 * (m[0][0] + m[1][1]) / 2) if upper_bound else recombination
    return {'recombination': {bn: value(m) for bn, m in matrices.items()},
            'own': {bn: 100 * statistics.mean(o.values()) for bn, o in own.items()}, 'matrix': matrices}


def own_accuracy_cost(results: dict, bn: str = 'batch') -> list:
    """Does compatibility cost own accuracy (paper: 86.3 vs 85.6 %)? Each method's own accuracy against the
    independent networks' of the same seeds: ``[method, own, independent, difference mean ± std, paired t-test p]``
    (p from ``scipy.stats.ttest_rel``; '–' with fewer than two common seeds)."""
    from scipy.stats import ttest_rel
    if 'independent' not in results:
        return []
    base = {r['seed']: r['own'][bn] for r in results['independent']}
    rows = []
    for method, runs in results.items():
        pairs = [(r['own'][bn], base[r['seed']]) for r in runs if r['seed'] in base and method != 'independent']
        if not pairs:
            continue
        own, independent = zip(*pairs)
        p = ttest_rel(own, independent).pvalue if len(pairs) > 1 else float('nan')  # nan: no spread to test
        rows.append([LABELS[method], statistics.mean(own), statistics.mean(independent),
                     mean_std([a - b for a, b in pairs], signed=True), '–' if p != p else f'{p:.2f}'])
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--setting', default='cifar10_halves', choices=SETTINGS,
                        help='a data preset of configs/sec4/data/')
    parser.add_argument('--data-dir', default=None, help=DATA_DIR_HELP)
    parser.add_argument('--budget', default='cpu', choices=sorted(BUDGETS))
    parser.add_argument('--epochs', type=float, default=None, help='override the budget\'s epochs')
    parser.add_argument('--seeds', type=int, default=2)
    parser.add_argument('--methods', nargs='+', default=METHODS, choices=ALL_METHODS)
    parser.add_argument('--init', default='random', choices=INITS,
                        help='random (Fig. 2 left) or rp_pretrained (Fig. 2 right: from RP pre-trainings)')
    parser.add_argument('--output', default=None, help='default: runs/sec4, or runs/sec4_rp_pretrained')
    parser.add_argument('--report-only', action='store_true', help='rebuild report.md from OUTPUT/results.json')
    parser.add_argument('--resume', action='store_true', help=RESUME_HELP)
    args = parser.parse_args(argv)
    args.output = args.output or ('runs/sec4' if args.init == 'random' else 'runs/sec4_rp_pretrained')
    out = Path(args.output).resolve()
    if not args.report_only:
        check_data_dir(parser, args.data_dir, setting_sources(args.setting))
    if args.report_only:
        saved = json.loads((out / 'results.json').read_text())
        if any(not isinstance(r['recombination'], dict) or 'train_seconds' not in r
               for runs in saved['results'].values() for r in runs):
            parser.error(f'{out / "results.json"} predates the running-statistics and training-time columns: '
                         f'rerun with --resume instead of --report-only (finished runs are read back, not trained).')
        return write_report(out, argparse.Namespace(**saved['args']), saved['results'])
    out.mkdir(parents=True, exist_ok=True)

    results, pretraining = {}, pretraining_runs(args.methods, args, out)
    with progress(len(pretraining) + args.seeds * sum(runs_of(m) for m in args.methods), 'sec4: train.py runs') as bar:
        for config, run_dir, overrides in pretraining:
            launch(config, run_dir, overrides, args.data_dir, out / f'{run_dir.name}.log', bar, args.resume)
        for method in args.methods:
            for seed in range(args.seeds):
                start = time.time()
                summary, run_dirs = run_method(method, seed, args, out, bar)
                record = run_record(summary, upper_bound=method == 'upper_bound')
                results.setdefault(method, []).append(dict(
                    seed=seed, **record, train_seconds=training_seconds(method, seed, args, out),
                    wall_seconds=round(time.time() - start, 1), run=[str(r) for r in run_dirs]))
                rec, own = record['recombination'], record['own']
                bar.write(f'{method} seed {seed}: recombination {rec["batch"]:.1f} % (BN=batch), '
                          f'{rec["running"]:.1f} % (BN=running); own {own["batch"]:.1f} % / {own["running"]:.1f} %; '
                          f'trained in {results[method][-1]["train_seconds"]} s')
    (out / 'results.json').write_text(json.dumps({'args': vars(args), 'results': results}, indent=2))
    write_report(out, args, results)


LABELS = {'independent': 'Independent', 'iiw': 'IIW', 'rp': 'RP', 'dcc': 'DCC', 'iiw_dcc': 'IIW+DCC',
          'iiw_rp_dcc': 'IIW+RP+DCC', 'upper_bound': 'Upper bound',
          'incremental': 'Incremental (IIW+RP+DCC)', 'control': 'Control: both tasks CIFAR-10, IIW+RP'}


def correlation_vs_recombination(points: dict) -> str:
    """Fig. 3's point, that more feature correlation does not mean more recombination accuracy, checked: the pairs of
    methods ``{method: (correlation, recombination %)}`` that the two order oppositely."""
    names = list(points)
    flipped = [f'{LABELS[a]} ({points[a][0]:.2f}, {points[a][1]:.1f} %) and {LABELS[b]} ({points[b][0]:.2f}, '
               f'{points[b][1]:.1f} %)' for i, a in enumerate(names) for b in names[i + 1:]
               if (points[a][0] - points[b][0]) * (points[a][1] - points[b][1]) < 0]
    if not flipped:
        return 'Here correlation and recombination accuracy order the methods alike.'
    return 'Ordered oppositely by correlation and by recombination accuracy: ' + '; '.join(flipped) + '.'


def _run_networks(runs):
    """The networks of the run folders ``runs`` (extractor + head, loaded from disk), their names and test sets."""
    from timm_compat.build import load_network, load_task_data
    from timm_compat.config import load_config
    names, models, tests = [], [], []
    for run in map(Path, runs):
        cfg = load_config(str(run / 'config.yaml'))
        names += [n.name for n in cfg.networks]
        models += [load_network(net, cfg, run / 'main' / 'components') for net in cfg.networks]
        tests += [load_task_data(net, cfg)[1] for net in cfg.networks]
    return names, models, tests


def _method_figures(out: Path, method: str, runs: list, names) -> list:
    """Seed 0's recombination matrix of ``method`` under each BN mode."""
    import torch
    from timm_compat.plots import ReportFigure, plot_recombination_matrix
    return [ReportFigure(plot_recombination_matrix(torch.tensor(runs[0]['matrix'][bn]), names,
                                                   out / 'figures' / f'{method}_{bn}.png',
                                                   title=f'{LABELS[method]} (seed 0, BN={bn})'),
                         f'{LABELS[method]}, seed 0: recombination accuracy (%), BN {bn} statistics')
            for bn in BN_MODES]


def _correlation(method: str, models, tests):
    """Fig. 3 / Li et al. 2016 for seed 0 of ``method``: both extractors on 1000 images of each test set. Returns
    the table row, the correlation block and the correlation that the block shows."""
    import torch
    import timm_compat
    from timm_compat.data import ImageData
    images = ImageData(torch.cat([t.images[:1000] for t in tests]), torch.cat([t.labels[:1000] for t in tests]),
                       tests[0].class_names)
    cmp = timm_compat.compare_extractors(models[0].extractor, models[1].extractor, images)
    apart = method in ('independent', 'upper_bound')  # no shared heads: channels match only up to permutation
    kind = 'permuted' if apart else 'direct'
    return [LABELS[method], cmp.direct, cmp.permuted, cmp.cka], (cmp.correlation, kind), getattr(cmp, kind)


UPPER_BOUND_NOTE = (f'Upper bound: each network trained alone with its own RP head, its accuracy on the common classes '
                    f'(paper, batch statistics: {PAPER["upper_bound"]} %). ')


def _orderings(results: dict, paper: dict) -> str:
    """The methods ordered by measured (BN=batch) and by the paper's recombination accuracy; nothing for fewer than
    two methods."""
    measured = sorted((m for m in results if m not in ('control', 'upper_bound')),
                      key=lambda m: statistics.mean(r['recombination']['batch'] for r in results[m]))
    if len(measured) < 2:
        return ''
    ours = sorted((m for m in results if m in paper and m != 'upper_bound'), key=paper.get)
    return (f'Measured ordering (BN=batch): {" < ".join(LABELS[m] for m in measured)}. '
            f'Paper ordering: {" < ".join(LABELS[m] for m in ours)}.')


def _setup(args, init: str) -> str:
    from timm_compat._hardware import hardware
    return (f'Command: `python recipes/sec4_methods.py --setting {args.setting}'
            f'{f" --data-dir {args.data_dir}" if args.data_dir else ""} '
            f'--budget {args.budget} --seeds {args.seeds}{f" --epochs {args.epochs}" if args.epochs else ""} '
            f'--init {init} --output {args.output}`.  \n'
            f'Budget `{args.budget}` (config overrides: `{" ".join(BUDGETS[args.budget]) or "none"}`'
            f'{f", epochs={args.epochs}" if args.epochs else ""}), {args.seeds} seed(s), on {hardware()}. '
            f'Recombination accuracy: mean of both directions (extractor of one network + head of the other, on the '
            f'extractor\'s test set), common classes only. Every accuracy is given with BN batch statistics (the '
            f'paper\'s evaluation) and with the networks\' running statistics (plain eval mode, what a deployed model '
            f'gets). ' + ('' if init == 'random' else PRETRAINING_NOTE)
            + data_note(args.data_dir, setting_sources(args.setting)))


def write_report(out: Path, args, results) -> None:
    from timm_compat.plots import (ReportFigure, ReportTable, plot_bars, plot_correlation_blocks,
                                   write_report as write)
    rows, figures, correlation_rows, blocks, points = [], [], [], {}, {}
    init = getattr(args, 'init', 'random')  # results.json of runs before --init lack it
    paper, figure = (PAPER, 'Fig. 2') if init == 'random' else (PAPER_PRETRAINED, 'Fig. 2 right')
    for method, runs in results.items():
        cells = [[r[k][bn] for r in runs] for k in ('recombination', 'own') for bn in BN_MODES]
        rows.append([LABELS[method], *map(mean_std, cells), paper.get(method, '–'),
                     round(statistics.mean(r['train_seconds'] for r in runs) / 60, 1)])
        names, models, tests = _run_networks(runs[0]['run'] if isinstance(runs[0]['run'], list) else [runs[0]['run']])
        figures += _method_figures(out, method, runs, names)
        row, block, correlation = _correlation(method, models, tests)
        correlation_rows.append(row)
        blocks[f'{method}: {block[1]}'] = block
        if method not in ('control', 'upper_bound'):  # correlation as the blocks show it, recombination (batch)
            points[method] = (correlation, statistics.mean(cells[0]))
    bars = plot_bars({LABELS[m]: [r['recombination']['batch'] for r in runs] for m, runs in results.items()},
                     out / 'figures' / 'recombination_bars.png', title=f'{figure}: recombination accuracy',
                     paper={LABELS[m]: v for m, v in paper.items()})
    corr_path = plot_correlation_blocks(blocks, out / 'figures' / 'correlation.png', title='Feature cross-correlation')
    write(out, f'Sec. 4: compatibility methods on {args.setting}', {
        'Setup': _setup(args, init),
        'Recombination accuracy (%)': [ReportTable(
            ['method', 'recombination, BN=batch', 'recombination, BN=running', 'own task, BN=batch',
             'own task, BN=running', f'paper ({figure})', 'training min / seed'], rows,
            caption=UPPER_BOUND_NOTE + _orderings(results, paper)),
            ReportFigure(bars, f'{figure} style: mean over seeds, one std as the error bar, each seed a dot, the '
                               f'paper\'s value as a black tick (BN=batch).')],
        'Recombination matrices': figures,
        'Own accuracy (is it hurt?)': ReportTable(
            ['method', 'own task, BN=batch', 'independent, same seeds', 'difference', 'paired t-test p'],
            own_accuracy_cost(results), digits=1,
            caption='Paper: 86.3 % (IIW+RP+DCC) against 85.6 % (independent); a difference within the seeds\' spread '
                    'and a large p say compatibility costs no own accuracy.'),
        'Feature cross-correlation (Fig. 3)': [
            ReportTable(['method', 'direct', 'permuted', 'linear CKA'], correlation_rows, digits=2,
                        caption='Seed 0; 1000 test images of each task. Paper: permuted independent 0.34, '
                                'RP + random IIW 0.38, DCC 0.19, yet DCC recombines better than RP (65.8 against '
                                '50.1 %): higher correlation does not imply higher recombination accuracy. '
                                + correlation_vs_recombination(points)),
            ReportFigure(corr_path, 'Per-channel correlations, sorted (Fig. 3 style).')],
    })

if __name__ == '__main__':
    main()
