"""The ablations of Sec. 4's supplementary material: recombination accuracy against what each method needs.

    python recipes/sec4_ablations.py --ablation common_classes --budget fast --data-dir ../shared/data --seeds 3
    python recipes/sec4_ablations.py --ablation split --budget fast --data-dir ../shared/data --seeds 3
    python recipes/sec4_ablations.py --ablation control --budget fast --data-dir ../shared/data --seeds 3
    python recipes/sec4_ablations.py --ablation rp_head --budget fast --data-dir ../shared/data --seeds 1

``common_classes``: DCC alone (configs/sec4/dcc.yaml) with its head on the first K of the nine common classes
(``interface.dcc_classes``, K from ``--counts``, default 1 to 9, in CIFAR-10's label order without frog); recombination
accuracy is always measured on all nine. With K = 1 the DCC loss is a one-class softmax, constant, so it trains
nothing: that point is the independent networks.
``split``: IIW+RP+DCC split after each of the backbone's last three ``feature_info`` stages, the interface as wide
as the trunk there (no adapter, as the paper's splits).
``control``: the paper's "both tasks CIFAR-10" control: network b on the other half of CIFAR-10, clean, all ten
classes; IIW+RP, IIW+DCC and IIW+RP+DCC should reach the upper bound (each network alone with its own RP head).
``rp_head`` (not in the paper): RP alone, as in Fig. 2, three ways: the default conv head at the budget's
interface width, the backbone's own layers after the split (the task head's architecture) as the RP head, and the
conv head on an interface of 32 channels, the paper's width (ResNet-56 after its second stage) where the budget's is
wider (the task head then reads 32 channels too). Does the shared RP head align the extractors less (RP far below
the paper's 50.1 %) because it is small, or because the interface is wide?

Every run is one ``accelerate launch train.py`` run of recipes/sec4_methods.py's method, with the variant's keys set
on top (``--budget``, ``--setting`` and ``--data-dir`` as there), in OUTPUT/VARIANT/; ``--variants`` picks some of
the ablation's. Each finished (variant, seed) adds its record to OUTPUT/results.json at once, and report.md is built
at the end from every record there, whichever variants this sitting's ``--counts`` and ``--variants`` picked.
``--resume`` keeps the records already there (an earlier sitting's, or committed ones copied into OUTPUT) and trains
only what they lack, continuing a killed run from its checkpoint, so a table is built over several sittings.
"""
import argparse
import json
import shlex
import statistics
import time
from pathlib import Path
from typing import List, NamedTuple

from timm_compat.deployment import BN_MODES

from common import (DATA_DIR_HELP, RECORDS_HELP, REPO, add_record, check_configs, check_counts, check_data_dir,
                    claim_output, data_note, load_results, mean_std, progress, recorded, save_results)
from sec4_methods import (BUDGETS, SETTINGS, check_recipe, check_run_folders, control_overrides, correlation_record,
                          fingerprinted_runs, method_fingerprint, method_machine, run_method, run_networks,
                          run_overrides, run_record, runs_of, setting_sources, trained_method_fingerprint,
                          training_seconds)
from sec4_report import comparable, machine_mark, mixed_machines

ABLATIONS = ('common_classes', 'split', 'control', 'rp_head')
# The classes CIFAR-10 shares with STL-10 (and with side b of the halves stand-ins), in CIFAR-10's label order.
COMMON = ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'horse', 'ship', 'truck']
PAPER_WIDTH = 32  # ResNet-56's channels after its second stage, the paper's split
# The arguments a record depends on: --resume adds to OUTPUT/results.json only under the same ones.
RECORD_KEYS = ('ablation', 'setting', 'data_dir', 'budget', 'epochs')
RECIPE = 'sec4_ablations'


class Variant(NamedTuple):
    name: str  # its folder under OUTPUT
    label: str  # its row and bar
    method: str  # a method of recipes/sec4_methods.py
    extra: List[str]  # train.py --set values on top of the method's


def common_class_variants(args) -> List[Variant]:
    return [Variant(f'dcc_{k}_classes', str(k), 'dcc', [f'interface.dcc_classes={json.dumps(COMMON[:k])}'])
            for k in args.counts]


def split_variants(args) -> List[Variant]:
    """IIW+RP+DCC at the last three ``feature_info`` stages of the budget's backbone, as wide as the trunk there."""
    import timm
    import torch
    import timm_compat  # noqa: F401  (registers the CIFAR backbones)
    from timm_compat.config import load_config
    cfg = load_config(str(REPO / 'configs' / 'sec4' / 'iiw_rp_dcc.yaml'), run_overrides(args, 0))
    with torch.device('meta'):
        info = timm.create_model(cfg.networks[0].backbone).feature_info[-3:]
    return [Variant(f'split_{i["module"]}', f'{i["module"]} ({i["num_chs"]} ch)', 'iiw_rp_dcc',
                    [f'networks.{n}.split={i["module"]}' for n in range(2)] + [f'interface.width={i["num_chs"]}'])
            for i in info]


def control_variants(args) -> List[Variant]:
    both_cifar10 = control_overrides(args.setting)
    return [Variant('iiw_rp', 'IIW+RP', 'rp', ['iiw=true'] + both_cifar10),
            Variant('iiw_dcc', 'IIW+DCC', 'dcc', ['iiw=true'] + both_cifar10),
            Variant('iiw_rp_dcc', 'IIW+RP+DCC', 'iiw_rp_dcc', both_cifar10),
            Variant('upper_bound', 'Upper bound', 'upper_bound', both_cifar10)]


def rp_head_variants(args) -> List[Variant]:
    """RP alone with the default conv head, with the backbone's tail as its head, and on the paper's width of 32."""
    from timm_compat.config import load_config
    cfg = load_config(str(REPO / 'configs' / 'sec4' / 'rp.yaml'), run_overrides(args, 0))
    net, width = cfg.networks[0], cfg.interface.width
    tail = json.dumps({'type': 'timm', 'backbone': net.backbone, 'split': net.split})
    variants = [Variant('rp_conv', f'conv head, width {width}', 'rp', []),
                Variant('rp_tail', f'{net.backbone} after {net.split} as head, width {width}', 'rp',
                        [f'interface.rp_head={tail}'])]
    if width != PAPER_WIDTH:
        variants.append(Variant('rp_narrow', f'conv head, width {PAPER_WIDTH}', 'rp',
                                [f'interface.width={PAPER_WIDTH}']))
    return variants


VARIANTS = {'common_classes': common_class_variants, 'split': split_variants, 'control': control_variants,
            'rp_head': rp_head_variants}
TITLES = {'common_classes': 'DCC: recombination accuracy against the number of common classes',
          'split': 'IIW+RP+DCC: recombination accuracy against the split point',
          'control': 'Both tasks CIFAR-10: each method against the upper bound',
          'rp_head': 'RP: recombination accuracy against the RP head and the interface width'}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--ablation', required=True, choices=ABLATIONS)
    parser.add_argument('--setting', default='cifar10_halves', choices=SETTINGS,
                        help='a data preset of configs/sec4/data/')
    parser.add_argument('--data-dir', default=None, help=DATA_DIR_HELP)
    parser.add_argument('--budget', default='cpu', choices=sorted(BUDGETS))
    parser.add_argument('--epochs', type=float, default=None, help='override the budget\'s epochs')
    parser.add_argument('--seeds', type=int, default=3)
    parser.add_argument('--counts', type=int, nargs='+', default=list(range(1, len(COMMON) + 1)),
                        help='common_classes: the numbers of DCC classes')
    parser.add_argument('--output', default=None, help='default: runs/sec4_ablations/ABLATION')
    parser.add_argument('--variants', nargs='+', default=None,
                        help='train only these of the ablation\'s variants (their folder names; default: all)')
    parser.add_argument('--resume', action='store_true', help=RECORDS_HELP)
    args = parser.parse_args(argv)
    check_counts(parser, args)
    args.counts = sorted(set(args.counts))  # a repeat would train and record one seed twice
    bad = [k for k in args.counts if not 1 <= k <= len(COMMON)]
    if bad:
        parser.error(f'--counts {bad}: the tasks share {len(COMMON)} classes, so give numbers from 1 to {len(COMMON)}.')
    if args.ablation == 'control':
        try:
            control_overrides(args.setting)
        except ValueError as e:
            parser.error(str(e))
    check_data_dir(parser, args.data_dir, setting_sources(args.setting))
    args.init = 'random'  # sec4_methods' run keys; the ablations start from random weights
    args.recipe = RECIPE  # saved with the records, which sec4_methods would otherwise take for its own
    args.output = args.output or f'runs/sec4_ablations/{args.ablation}'
    names = [v.name for v in VARIANTS[args.ablation](args)]
    unknown = [v for v in args.variants or [] if v not in names]
    if unknown:
        parser.error(f'--variants {" ".join(unknown)}: --ablation {args.ablation} has the variants {" ".join(names)}.')
    return args


def measure(variant: Variant, seed: int, args, out: Path, bar) -> dict:
    """Trains (or reads back) seed ``seed`` of ``variant``; returns its record (all the report needs), with Fig. 3's
    feature correlation of its two extractors (direct, permuted, linear CKA)."""
    start = time.time()
    summary, run_dirs, networks = run_method(variant.method, seed, args, out / variant.name, bar, variant.extra)
    _, models, tests = networks or run_networks(run_dirs)
    return dict(seed=seed, **run_record(summary, upper_bound=variant.method == 'upper_bound'),
                config=trained_method_fingerprint(variant.method, seed, args, out / variant.name, variant.extra),
                correlation=correlation_record(variant.method, models, tests, None),
                train_seconds=training_seconds(variant.method, seed, args, out / variant.name, variant.extra),
                machine=method_machine(variant.method, seed, args, out / variant.name, variant.extra),
                wall_seconds=round(time.time() - start, 1), run=[str(r) for r in run_dirs])


def train_missing(args, out: Path, results: dict) -> None:
    """Trains each (variant, seed) of ``args`` that ``results`` lacks, adding its record as it finishes."""
    variants = VARIANTS[args.ablation](args)
    todo = [(v, seed) for v in variants if v.name in (args.variants or [v.name]) for seed in range(args.seeds)
            if not recorded(results, v.name, seed)]
    for v, seed in todo if args.resume else ():
        check_run_folders(fingerprinted_runs(v.method, seed, args, out / v.name, v.extra), out / v.name, seed)
    by_name = {v.name: v for v in variants}
    if check_configs(out / 'results.json', results,
                     {(v.name, s): method_fingerprint(v.method, s, args, out / v.name, v.extra) for v, s in todo},
                     lambda name, s: trained_method_fingerprint(by_name[name].method, s, args, out / name,
                                                                by_name[name].extra) if name in by_name else None):
        save_results(out, args, results)
    with progress(sum(runs_of(v.method) for v, _ in todo), f'{args.ablation}: train.py runs') as bar:
        for variant, seed in todo:
            (out / variant.name).mkdir(exist_ok=True)
            record = measure(variant, seed, args, out, bar)
            add_record(results, variant.name, record)
            save_results(out, args, results)  # as each run finishes: a killed recipe keeps what it measured
            bar.write(f'{variant.label} seed {seed}: recombination {record["recombination"]["batch"]:.1f} % '
                      f'(BN=batch); own {record["own"]["batch"]:.1f} %')


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.output).resolve()
    if args.resume:
        check_recipe(out / 'results.json', RECIPE)
    results = load_results(out, args, RECORD_KEYS)
    with claim_output(out):  # one sitting at a time writes OUTPUT's records
        train_missing(args, out, results)
    write_report(out, args, recorded_variants(args, results), results)


def recorded_variants(args, results: dict) -> List[Variant]:
    """Every variant ``results`` holds records of, in the ablation's order, whatever this sitting's ``--counts``
    and ``--variants`` picked: the report is of OUTPUT's records, not of one sitting's. A record of a variant this
    code no longer has keeps its row, under its folder name."""
    every = VARIANTS[args.ablation](argparse.Namespace(**{**vars(args), 'counts': list(range(1, len(COMMON) + 1))}))
    known = [v for v in every if v.name in results]
    names = {v.name for v in every}
    return known + [Variant(name, name, '', []) for name in sorted(results) if name not in names]


CORRELATION_NOTE = ('Correlation: Fig. 3\'s mean per-channel correlation of the two extractors\' features, channel i '
                    'against channel i (direct), and against its Hungarian match (permuted: the one to compare for '
                    'networks that share no heads, whose channels need be in no common order), and linear CKA; on '
                    '1000 test images of each task, over the seeds whose records have it (paper: RP 0.38, DCC 0.19, '
                    'permuted independent 0.34). The upper bound\'s two networks, trained in two runs of one seed, '
                    'start from the weights of an independent pair; recorded before 2026-12-05 they started from '
                    'identical weights, an IIW pair\'s, and their correlation is left out.')


def write_report(out: Path, args, variants: List[Variant], results: dict) -> Path:
    from timm_compat.plots import ReportFigure, ReportTable, plot_bars, write_report as write
    rows, bars = [], {}
    for v in variants:
        runs = results[v.name]
        cells = [[r[k][bn] for r in runs] for k in ('recombination', 'own') for bn in BN_MODES]
        # Records before it lack it; upper-bound sides recorded before 2026-12-05 started from identical weights.
        measured = [r['correlation'] for r in runs if 'correlation' in r and comparable(v.method, r)]
        rows.append([v.label + machine_mark(runs), *map(mean_std, cells), *(mean_std([c[k] for c in measured], digits=2)
                                                       for k in ('direct', 'permuted', 'cka')),
                     len(runs), statistics.mean(r['train_seconds'] for r in runs)])
        bars[v.label] = [r['recombination']['batch'] for r in runs]
    figure = plot_bars(bars, out / 'figures' / f'{args.ablation}.png', title=TITLES[args.ablation])
    seeds = max(len(results[v.name]) for v in variants)
    machines = sorted({r.get('machine', 'a machine not recorded') for v in variants for r in results[v.name]})
    known = [v for v in variants if v.method]  # the command can name only variants this code has
    command = (f'python recipes/sec4_ablations.py --ablation {args.ablation} --setting {args.setting} --budget '
               f'{args.budget} --seeds {seeds}' + (f' --data-dir {args.data_dir}' if args.data_dir else '')
               + (f' --epochs {args.epochs}' if args.epochs else '')
               + (f' --counts {" ".join(v.label for v in known)}' if args.ablation == 'common_classes' else '')
               + f' --output {shlex.quote(args.output)} --variants {" ".join(v.name for v in known)} --resume')
    upper = ' The upper bound row is each network\'s own accuracy on the common classes.' * (args.ablation == 'control')
    return write(out, TITLES[args.ablation], {
        'Setup': (f'Command: `{command}` (`--resume` keeps the records of OUTPUT/results.json and trains only what '
                  f'they lack), trained on {"; ".join(machines)}. Recombination accuracy: mean of both directions on the '
                  f'common classes; BN batch statistics (the paper\'s evaluation) and running statistics.{upper} '
                  + data_note(args.data_dir, setting_sources(args.setting))),
        'Recombination accuracy (%)': [
            ReportTable(['variant', 'recombination, BN=batch', 'recombination, BN=running', 'own task, BN=batch',
                         'own task, BN=running', 'direct correlation', 'permuted correlation', 'linear CKA', 'seeds', 'training s / seed'],
                        rows, caption=mixed_machines({v.name: results[v.name] for v in variants},
                                                     {v.name: v.label for v in variants}) + CORRELATION_NOTE),
            ReportFigure(figure, 'Mean over seeds, one std as the error bar, each seed a dot (BN=batch).')],
    })


if __name__ == '__main__':
    main()
