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
CIFAR-10 halves with IIW+RP (the paper's "both tasks CIFAR-10" control). As each (method, seed) finishes, its
record (recombination and own accuracy with BN batch statistics, the paper's evaluation, and with running
statistics, what a deployed model gets; the matrices; Fig. 3's feature correlation; training time and machine) goes
into OUTPUT/results.json, and at the end report.md (recipes/sec4_report.py) is built from the records alone.

A table grows over several sittings: ``--resume`` keeps the records already in OUTPUT/results.json (from an earlier
sitting, or committed ones copied there, e.g. docs/results/sec4_fast/results.json) and trains only the (method,
seed) pairs they lack, with the same ``--setting``, ``--budget``, ``--epochs`` and ``--init``.

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
from typing import Optional, Sequence

from timm_compat.rundir import MARKER

from common import (DATA_DIR_HELP, RECORDS_HELP, REPO, add_record, as_overrides, by_bn, check_configs, check_counts,
                    check_data_dir, claim_output, data_note, fast_keys, fast_networks, launch, load_results,
                    planned_fingerprint, progress, read_json, recorded, run_machine, save_results, trained_fingerprint)
from sec4_report import ALL_METHODS, LABELS, write_report

SETTINGS = sorted(p.stem for p in (REPO / 'configs' / 'sec4' / 'data').glob('*.yaml'))
METHODS = ['independent', 'iiw', 'rp', 'dcc', 'iiw_rp_dcc', 'incremental', 'control', 'upper_bound']
# Methods whose networks start from identical initial weights: with --init rp_pretrained, one pre-training.
IIW_METHODS = {'iiw', 'iiw_dcc', 'iiw_rp_dcc', 'incremental', 'control'}
INITS = ('random', 'rp_pretrained')
RECIPE = 'sec4_methods'  # the name its records keep (sec4_ablations' are 'sec4_ablations')
PRETRAINING_CONFIG = REPO / 'configs' / 'sec4' / 'rp_pretraining.yaml'
# The arguments a record depends on: --resume adds to OUTPUT/results.json only under the same ones.
RECORD_KEYS = ('setting', 'data_dir', 'budget', 'epochs', 'init')
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
    if args.init != 'rp_pretrained' or not methods:  # nothing left to train needs no pre-training
        return []
    count = 1 if set(methods) <= IIW_METHODS else 2
    return [(PRETRAINING_CONFIG, out / f'rp_pretraining{k}',
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
        # Each side trains as its run's network 0: side b would draw network a's init seed. It gets the one of
        # network b in a non-IIW joint run (init_seed + 1000 * (index + 1)), so the two start apart.
        return [(configs / f'upper_bound_{side}.yaml', out / f'upper_bound_{side}_seed{seed}',
                 single_network(budget, i) + [f'init_seed={seed + 1000 * i}']) for i, side in enumerate('ab')]
    return [(configs / f'{method}.yaml', run_dir, budget)]


def fingerprinted_runs(method: str, seed: int, args, out: Path, extra: Sequence[str] = ()) -> list:
    """The runs one seed of ``method``'s fingerprint covers: its own, after the RP pre-trainings its networks start
    from (their folder alone in its overrides would let seeds from another pre-training pool with it). Under
    ``--init random`` there are none, so those fingerprints stay the ones of the committed records."""
    return pretraining_runs([method], args, out) + method_runs(method, seed, args, out, extra)


def check_run_folders(runs: Sequence[tuple], out: Path, seed: int) -> None:
    """Refuse, before anything trains, a run folder of ``runs`` (one seed's, as :func:`fingerprinted_runs` gives them)
    that ``--resume`` would continue but that holds a run of another config: train.py would refuse it only when the
    loop reached it, after the runs before it had trained."""
    for run in runs:
        run_dir = run[1]
        if not (run_dir / MARKER).is_file():
            continue  # launch overwrites a folder that holds no run
        trained = trained_fingerprint([run_dir], out, seed)
        if trained is not None and trained != planned_fingerprint([run], out, seed):
            raise SystemExit(f'{run_dir} holds a run of another config than this sitting would resume (a budget key, '
                             f'config file or code default changed since it was started): move it away to train it '
                             f'afresh, give another --output, or restore that config.')


def method_fingerprint(method: str, seed: int, args, out: Path, extra: Sequence[str] = ()) -> str:
    """The config fingerprint of one seed of ``method`` (every run of it and its pre-trainings), before it trains."""
    return planned_fingerprint(fingerprinted_runs(method, seed, args, out, extra), out, seed)


def trained_method_fingerprint(method: str, seed: int, args, out: Path, extra: Sequence[str] = ()) -> Optional[str]:
    """The config fingerprint one seed of ``method`` was trained under, from its run folders; None if they are gone."""
    return trained_fingerprint([run_dir for _, run_dir, _ in fingerprinted_runs(method, seed, args, out, extra)], out,
                               seed)


def run_method(method: str, seed: int, args, out: Path, bar, extra: Sequence[str] = ()) -> tuple:
    """Trains ``method``'s runs one after the other; returns the last one's ``main`` phase summary, the run folders
    that hold the method's networks, and the networks if they were loaded (``(names, models, tests)``, else None).
    The upper bound's two networks, trained apart, are loaded and measured together."""
    runs = method_runs(method, seed, args, out, extra)
    for config, run_dir, overrides in runs:
        summary = launch(config, run_dir, overrides, args.data_dir, out / f'{run_dir.name}.log', bar, args.resume)
    if method != 'upper_bound':
        return summary, [runs[-1][1]], None
    from timm_compat.evaluation import evaluate_networks
    from timm_compat.config import load_config
    run_dirs = [run_dir for _, run_dir, _ in runs]
    networks = names, models, tests = run_networks(run_dirs)
    cfg = load_config(str(runs[0][1] / 'config.yaml'))
    return (evaluate_networks(dict(zip(names, models)), dict(zip(names, tests)), cfg.eval_batch_size, cfg.eval_bn,
                              tta=cfg.eval_tta), run_dirs, networks)


def method_machine(method: str, seed: int, args, out: Path, extra: Sequence[str] = ()) -> str:
    """The machine line(s) of every run of one seed of ``method`` (incremental's stage 1 too), from their summaries."""
    return run_machine([run_dir for _, run_dir, _ in method_runs(method, seed, args, out, extra)])


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
            'own': {bn: 100 * statistics.mean(o.values()) for bn, o in own.items()}, 'matrix': matrices,
            **({'distinct_init': True} if upper_bound else {})}  # its sides start apart (sec4_report.comparable)


def measure(method: str, seed: int, args, out: Path, bar) -> dict:
    """Trains (or reads back) seed ``seed`` of ``method`` and returns its record: recombination and own accuracy under
    each BN mode, the matrices, Fig. 3's feature correlation (seed 0 draws its block) and the training time. The
    record is all the report needs, so it outlives the run folders."""
    start = time.time()
    summary, run_dirs, networks = run_method(method, seed, args, out, bar)
    names, models, tests = networks or run_networks(run_dirs)
    figure = out / 'figures' / f'correlation_{method}.png' if seed == 0 else None
    return dict(seed=seed, **run_record(summary, upper_bound=method == 'upper_bound'), networks=names,
                config=trained_method_fingerprint(method, seed, args, out),
                correlation=correlation_record(method, models, tests, figure),
                train_seconds=training_seconds(method, seed, args, out),
                machine=method_machine(method, seed, args, out),
                wall_seconds=round(time.time() - start, 1), run=[str(r) for r in run_dirs])


def train_missing(args, out: Path, results: dict) -> None:
    """Trains each (method, seed) of ``args`` that ``results`` lacks, adding its record as it finishes."""
    todo = [(m, seed) for m in args.methods for seed in range(args.seeds) if not recorded(results, m, seed)]
    for m, seed in todo if args.resume else ():
        check_run_folders(fingerprinted_runs(m, seed, args, out), out, seed)
    if check_configs(out / 'results.json', results, {(m, s): method_fingerprint(m, s, args, out) for m, s in todo},
                     lambda m, s: trained_method_fingerprint(m, s, args, out)):
        save_results(out, args, results)
    pretraining = pretraining_runs([m for m, _ in todo], args, out)
    with progress(len(pretraining) + sum(runs_of(m) for m, _ in todo), 'sec4: train.py runs') as bar:
        for config, run_dir, overrides in pretraining:
            launch(config, run_dir, overrides, args.data_dir, out / f'{run_dir.name}.log', bar, args.resume)
        for method, seed in todo:
            record = measure(method, seed, args, out, bar)
            add_record(results, method, record)
            save_results(out, args, results)  # as each run finishes: a killed recipe keeps what it measured
            rec, own = record['recombination'], record['own']
            bar.write(f'{method} seed {seed}: recombination {rec["batch"]:.1f} % (BN=batch), '
                      f'{rec["running"]:.1f} % (BN=running); own {own["batch"]:.1f} % / {own["running"]:.1f} %; '
                      f'trained in {record["train_seconds"]} s')


def check_recipe(path: Path, recipe: str) -> None:
    """Refuse, before anything runs, OUTPUT/results.json (``path``) of the other Sec. 4 recipe than ``recipe``: its
    arguments match (the ablations run sec4_methods' keys), so its variants would be taken for methods, or the
    converse, and its report replaced. Records from before they named their recipe are the ablations' if their
    arguments have ``ablation``."""
    if not path.is_file():
        return
    saved = read_json(path, ('args',))['args']
    made = saved.get('recipe') or ('sec4_ablations' if 'ablation' in saved else 'sec4_methods')
    if made != recipe:
        raise SystemExit(f'{path} holds the records of recipes/{made}.py, not of recipes/{recipe}.py: give another '
                         f'--output for this recipe\'s table (or run recipes/{made}.py on it).')


def check_methods(parser, args) -> None:
    """``--seeds``, ``--epochs`` and ``--methods`` checked before anything runs; each method once, and the default
    methods without the control where the setting has no two parts of one dataset."""
    check_counts(parser, args)
    if args.methods is None:
        args.methods = [m for m in METHODS if m != 'control' or args.setting.startswith('cifar10_halves')]
    args.methods = list(dict.fromkeys(args.methods))  # a repeat would train and record one seed twice
    if 'control' in args.methods:
        try:
            control_overrides(args.setting)
        except ValueError as e:
            parser.error(f'--methods control: {e}')


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--setting', default='cifar10_halves', choices=SETTINGS,
                        help='a data preset of configs/sec4/data/')
    parser.add_argument('--data-dir', default=None, help=DATA_DIR_HELP)
    parser.add_argument('--budget', default='cpu', choices=sorted(BUDGETS))
    parser.add_argument('--epochs', type=float, default=None, help='override the budget\'s epochs')
    parser.add_argument('--seeds', type=int, default=2)
    parser.add_argument('--methods', nargs='+', default=None, choices=ALL_METHODS,
                        help=f'default: {" ".join(METHODS)} (without control on a setting of two datasets)')
    parser.add_argument('--init', default='random', choices=INITS,
                        help='random (Fig. 2 left) or rp_pretrained (Fig. 2 right: from RP pre-trainings)')
    parser.add_argument('--output', default=None, help='default: runs/sec4, or runs/sec4_rp_pretrained')
    parser.add_argument('--report-only', action='store_true', help='rebuild report.md from OUTPUT/results.json')
    parser.add_argument('--resume', action='store_true', help=RECORDS_HELP)
    args = parser.parse_args(argv)
    check_methods(parser, args)
    args.output = args.output or ('runs/sec4' if args.init == 'random' else 'runs/sec4_rp_pretrained')
    out = Path(args.output).resolve()
    if args.report_only and not (out / 'results.json').is_file():
        parser.error(f'--report-only: {out / "results.json"} does not exist; run without it first.')
    args.recipe = RECIPE  # saved with the records: the ablations' share every other key
    if args.resume or args.report_only:
        check_recipe(out / 'results.json', RECIPE)
    saved = (read_json(out / 'results.json', ('args', 'results')) if args.report_only
             else {'args': vars(args), 'results': load_results(out, args, RECORD_KEYS)})
    results = saved['results']
    if any(not isinstance(r['recombination'], dict) or 'train_seconds' not in r for rs in results.values() for r in rs):
        parser.error(f'{out / "results.json"} predates the running-statistics and training-time columns: train its '
                     f'runs again under another --output.')
    if args.report_only:
        return report(out, argparse.Namespace(**saved['args']), results)
    check_data_dir(parser, args.data_dir, setting_sources(args.setting))
    with claim_output(out):  # one sitting at a time writes OUTPUT's records
        train_missing(args, out, results)
    report(out, args, results)


def run_networks(runs):
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


def correlation_record(method: str, models, tests, figure: Optional[Path]) -> dict:
    """Fig. 3 / Li et al. 2016: both extractors on 1000 images of each test set. Returns the direct and permuted
    correlation, linear CKA and the kind of correlation the block shows; draws the block to ``figure`` if given."""
    import torch
    import timm_compat
    from timm_compat.data import ImageData
    from timm_compat.plots import plot_correlation_blocks
    images = ImageData(torch.cat([t.images[:1000] for t in tests]), torch.cat([t.labels[:1000] for t in tests]),
                       tests[0].class_names)
    cmp = timm_compat.compare_extractors(models[0].extractor, models[1].extractor, images)
    # No shared heads: channels match only up to a permutation.
    kind = 'permuted' if method in ('independent', 'upper_bound') else 'direct'
    if figure is not None:
        plot_correlation_blocks({f'{LABELS[method]}: {kind}': (cmp.correlation, kind)}, figure)
    return {'direct': cmp.direct, 'permuted': cmp.permuted, 'cka': cmp.cka, 'kind': kind}


def report(out: Path, args, results: dict) -> None:
    init = getattr(args, 'init', 'random')  # results.json of runs before --init lack it
    write_report(out, args.setting, init, _setup(args, init, results), results)


def _setup(args, init: str, results: dict) -> str:
    methods = [m for m in ALL_METHODS if m in results]
    seeds = max(len(runs) for runs in results.values())
    machines = sorted({r.get('machine', 'a machine not recorded') for runs in results.values() for r in runs})
    return (f'Command: `python recipes/sec4_methods.py --setting {args.setting}'
            f'{f" --data-dir {args.data_dir}" if args.data_dir else ""} '
            f'--budget {args.budget} --seeds {seeds}{f" --epochs {args.epochs}" if args.epochs else ""} '
            f'--init {init} --methods {" ".join(methods)} --output {args.output} --resume` (`--resume` keeps the '
            f'records of OUTPUT/results.json and trains only what they lack).  \n'
            f'Budget `{args.budget}` (config overrides: `{" ".join(BUDGETS[args.budget]) or "none"}`'
            f'{f", epochs={args.epochs}" if args.epochs else ""}), up to {seeds} seed(s) per method (column seeds), '
            f'trained on {"; ".join(machines)}. '
            f'Recombination accuracy: mean of both directions (extractor of one network + head of the other, on the '
            f'extractor\'s test set), common classes only. Every accuracy is given with BN batch statistics (the '
            f'paper\'s evaluation) and with the networks\' running statistics (plain eval mode, what a deployed model '
            f'gets). ' + ('' if init == 'random' else PRETRAINING_NOTE)
            + data_note(args.data_dir, setting_sources(args.setting)))


if __name__ == '__main__':
    main()
