"""Tab. 2 of Gygli et al. 2021 over several corruptions and seeds: adaptation through RP on CIFAR-10-C-style shifts.

    python recipes/adaptation_sweep.py --budget fast --data-dir ../shared/data       # 3 sources x 3 adaptations
    python recipes/adaptation_sweep.py --budget cpu --shifts gaussian_noise:5 contrast:5 --source-seeds 2
    python recipes/adaptation_sweep.py --budget fast --data-dir ../shared/data --report-only  # the first's report

The ``cifar10_shift`` setting of ``recipes/adaptation.py``: a source network (extractor + head + RP head) on one
half of CIFAR-10, and as target the other half and the test split under one corruption. Each source seed trains one
source (``OUTPUT/source<S>``, its corruption noise drawn with the same seed); every corruption of ``--shifts`` is
then a target of its own, adapted from that source with each adaptation seed
(``OUTPUT/source<S>/<shift>/adapt<A>``, one ``recipes/adaptation.py`` run with ``--interface/--extractor/--head``).
A finished adaptation (its ``results.json``, the record) is read back, not rerun, a source is trained only while
one of its adaptations is not recorded, and a killed source training continues from its checkpoint, so the sweep
can be built over several sittings, from committed ``results.json`` files copied into OUTPUT (records of another
data version or other ``RECORD_KEYS`` arguments are refused). A source with recorded adaptations is only read back
from its run folder, never trained again (another network; refused once the folder is gone): add adaptation seeds
or corruptions to it only while ``OUTPUT/source<S>`` is there. ``OUTPUT/report.md`` gives, for each corruption, the
source model (running BN statistics, Tab. 2's "source"), with test-time BN (batch statistics) and adapted through
RP, as mean ± std over every source x adaptation seed (the source model's columns over the source seeds).
``--report-only`` rebuilds it from the records: give it the run's arguments (its ``--budget``, ``--data-dir``,
``--shifts``, seeds, ``--adapt-lr``/``--adapt-steps`` and ``--output``), or records of others are refused.
"""
import argparse
import json
import re
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Optional

import torch

import adaptation
from timm_compat.shifts import apply_shift
from common import (DATA_DIR_HELP, check_configs, check_data_dir, check_run_data, claim_output, data_note,
                    mean_std, planned_fingerprint, progress, read_record, trained_fingerprint, write_json)

# CIFAR-10-C corruptions of timm_compat.shifts at its top severity, one per family: noise, blur, weather-free
# digital (contrast, pixelate, JPEG).
DEFAULT_SHIFTS = ['gaussian_noise:5', 'defocus_blur:5', 'contrast:5', 'pixelate:5', 'jpeg_compression:5']
# Columns of the table: results.json score keys of recipes/adaptation.py.
SCORES = {'source (BN=running)': 'source', 'test-time BN (BN=batch)': 'source_test_bn',
          'adapted through RP (BN=batch)': 'adapted', 'adapted (BN=running)': 'adapted_running_bn'}
# Scores of the source model alone: one value per source seed, whatever the adaptation seed.
SOURCE_SCORES = ('source', 'source_test_bn')
# The arguments an adaptation's record depends on: records of others are not pooled.
RECORD_KEYS = ('data_dir', 'budget', 'adapt_lr', 'adapt_steps')


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--budget', default='cpu', choices=sorted(adaptation.BUDGETS))
    parser.add_argument('--data-dir', default=None, help=DATA_DIR_HELP)
    parser.add_argument('--shifts', nargs='+', default=DEFAULT_SHIFTS, help='one target per corruption NAME:SEVERITY')
    parser.add_argument('--source-seeds', type=int, default=3)
    parser.add_argument('--adapt-seeds', type=int, default=3)
    parser.add_argument('--adapt-steps', type=int, default=None, help="override the budget's adaptation steps")
    parser.add_argument('--adapt-lr', type=float, default=0.01)
    parser.add_argument('--output', default='runs/adaptation_sweep')
    parser.add_argument('--report-only', action='store_true', help='rebuild report.md from the finished runs')
    args = parser.parse_args(argv)
    if min(args.source_seeds, args.adapt_seeds) < 1:
        parser.error('--source-seeds and --adapt-seeds must be at least 1.')
    adaptation.check_adapt_steps(parser, args)
    args.shifts = list(dict.fromkeys(args.shifts))
    for shift in args.shifts:  # before any source trains
        try:
            apply_shift(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), [shift])
        except ValueError as e:
            parser.error(f'--shifts: {e}')
    if not args.report_only:
        check_data_dir(parser, args.data_dir, [adaptation.CIFAR10])
    return args


def adapt_folder(out: Path, source_seed: int, shift: str, adapt_seed: int) -> Path:
    return out / f'source{source_seed}' / shift.replace(':', '_') / f'adapt{adapt_seed}'


def source_fingerprint(args, out: Path, seed: int, trained: bool = False) -> Optional[str]:
    """The config fingerprint of the adaptations of source ``seed``: its train.py config (as it will resolve, or as
    the run wrote it if ``trained``: None if it is gone) and the budget's adaptation keys (this code's, also for
    records older than fingerprints, whose source config is read from its run)."""
    budget, run = adaptation.BUDGETS[args.budget], out / f'source{seed}'
    adapt = [{k: v for k, v in budget.items() if k != 'train'}]
    if trained:
        return trained_fingerprint([run], run, seed, adapt)
    with tempfile.TemporaryDirectory() as tmp:  # the run's YAML, written only when it trains
        source = adaptation.source_config(argparse.Namespace(seed=seed), adaptation.SETTINGS['cifar10_shift'])
        path, sets = adaptation.write_run(source, Path(tmp) / 'source', budget['train'])
        return planned_fingerprint([(path, run, sets)], run, seed, adapt)


def check_sweep_configs(args, out: Path, pending: dict) -> None:
    """Refuses, before anything trains, to pool the ``pending`` adaptations (``{source seed: [(shift, adaptation
    seed)]}``) with recorded ones of any shift in OUTPUT, this sitting's or not, whose source or adaptation was
    configured otherwise: the fingerprint does not depend on the shift, and the report puts every corruption in one
    table. A record from before fingerprints that gets its fingerprint from its source's run keeps it."""
    names, recorded, views = {shift.replace(':', '_'): shift for shift in args.shifts}, {}, []
    for path in sorted(out.glob('source*/*/adapt*/results.json')):
        source = re.fullmatch(r'source(\d+)', path.parents[2].name)
        record = recorded_adaptation(args, path.parent) if source else None
        if record is not None:
            folder = path.parents[1].name  # a record names its shift (the sweep's own tests' records do not)
            shift = ' '.join(record.get('args', {}).get('shift') or []) or names.get(folder, folder)
            view = {'seed': int(source[1]), **({'config': record['config']} if 'config' in record else {})}
            recorded.setdefault(shift, []).append(view)
            views.append((path.parent, record, view))
    fingerprints = {s: source_fingerprint(args, out, s) for s, todo in pending.items() if todo}
    planned = {(shift, s): f for shift in recorded for s, f in fingerprints.items()}
    if check_configs(out, recorded, planned, lambda shift, s: source_fingerprint(args, out, s, trained=True)):
        for folder, record, view in views:
            if 'config' not in record and 'config' in view:
                write_json(folder / 'results.json', {**record, 'config': view['config']})


def source_interface(out: Path, seed: int) -> Optional[str]:
    """The interface id of the network in source ``seed``'s run folder, None while it holds no trained network."""
    path = out / f'source{seed}' / 'main' / 'components' / 'interface' / 'config.json'
    return json.loads(path.read_text()).get('interface_id') if path.is_file() else None


def recorded_interfaces(out: Path, seed: int) -> list:
    """The interface ids (None for a record without one) of every recorded adaptation of source ``seed``, of any
    corruption or adaptation seed: all of them were made from the network of its run folder."""
    records = sorted((out / f'source{seed}').glob('*/adapt*/results.json'))
    return [json.loads(path.read_text()).get('interface_id') for path in records]


def check_sources_kept(out: Path, pending: dict) -> None:
    """Refuses, before anything trains, to train a source again whose adaptations are recorded: its run folders are
    not committed with the records, and a second training makes another network, whose adaptations would be pooled
    under one source seed with those of the first."""
    for seed, todo in pending.items():
        ids, current = recorded_interfaces(out, seed), source_interface(out, seed)
        known = sorted({i for i in ids if i is not None})
        if not todo or not ids or (current is not None and (not known or current in known)):
            continue  # nothing to adapt, nothing recorded, or its recorded network is there to be read back
        state = ('is gone' if current is None else f'holds another network (interface {current})')
        raise SystemExit(f'{out / f"source{seed}"}: source seed {seed} would be trained again (its run folder '
                         f'{state}), but {len(ids)} adaptation(s) of it are recorded, made from interface '
                         f'{", ".join(known) or "(not recorded)"}; the new source would be another network, pooled '
                         f'with them under one seed. Add adaptation seeds or corruptions only while the source\'s run '
                         f'folder is there, or give a fresh --output to run the whole sweep anew.')


def check_source_trained(out: Path, seed: int, interface_id: Optional[str]) -> None:
    """Refuses, before its adaptations run, a source trained into another network than its recorded adaptations
    were made from (train.py reads a finished source back: this only happens if its folder was replaced)."""
    known = sorted({i for i in recorded_interfaces(out, seed) if i is not None})
    if known and interface_id not in known:
        raise SystemExit(f'{out / f"source{seed}"}: source seed {seed} was trained into interface {interface_id}, '
                         f'but its recorded adaptations were made from interface {", ".join(known)}: its run folder '
                         f'was replaced. Restore that run folder, or give a fresh --output to run the sweep anew.')


def run_source(args, out: Path, seed: int) -> list:
    """Train (or read back; a killed run continues) the source of ``seed``; the ``--interface/--extractor/--head``
    arguments of its adaptations."""
    run = out / f'source{seed}'
    config = adaptation.source_config(argparse.Namespace(seed=seed), adaptation.SETTINGS['cifar10_shift'])
    # Always through train.py --resume: it reads a finished source back only if it was trained with this config
    # (another --budget is refused by train.py, another --data-dir by common.launch), and continues a killed one.
    summary = adaptation.launch_train(config, run, adaptation.BUDGETS[args.budget]['train'], data_dir=args.data_dir,
                                      resume=True)
    check_source_trained(out, seed, summary.get('interface_id'))
    components = run / 'main' / 'components'
    return ['--interface', str(components / 'interface'), '--extractor', str(components / 'source' / 'extractor'),
            '--head', str(components / 'source' / 'head')]


def run_adaptation(args, source: list, seed: int, shift: str, adapt_seed: int, folder: Path, out: Path) -> None:
    argv = ['--setting', 'cifar10_shift', '--budget', args.budget, '--shift', shift, '--seed', str(seed),
            '--adapt-seed', str(adapt_seed), '--adapt-lr', str(args.adapt_lr), '--output', str(folder), *source]
    argv += ['--data-dir', args.data_dir] if args.data_dir else []
    argv += ['--adapt-steps', str(args.adapt_steps)] if args.adapt_steps is not None else []
    adaptation.main(argv)
    record = read_record(folder / 'results.json')
    write_json(folder / 'results.json', {**record, 'config': source_fingerprint(args, out, seed, trained=True)})


def recorded_adaptation(args, folder: Path) -> Optional[dict]:
    """The record of the adaptation in ``folder`` (its results.json), or None while it has not finished; one of
    another data version or other ``RECORD_KEYS`` arguments is refused."""
    return read_record(folder / 'results.json', args, RECORD_KEYS)


def collect(args, out: Path) -> dict:
    """``{shift: [(source seed, record) of each finished source x adaptation seed]}``."""
    found = {}
    for shift in args.shifts:
        records = [(s, recorded_adaptation(args, adapt_folder(out, s, shift, a)))
                   for s in range(args.source_seeds) for a in range(args.adapt_seeds)]
        found[shift] = [(s, r) for s, r in records if r is not None]
    return found


def check_one_source(runs: list) -> None:
    """Refuses runs of one source seed made from more than one source network: their interface ids differ, or,
    for records without one, their source scores do. One network scored on two machines (an adaptation seed added
    on another CPU) may differ in the last digits of its scores and is accepted."""
    for seed in sorted({s for s, _ in runs}):
        mine = [r for s, r in runs if s == seed]
        ids = sorted({str(r.get('interface_id')) for r in mine})
        scores = {k: sorted({r['scores'][k] for r in mine}) for k in SOURCE_SCORES}
        unknown = any(r.get('interface_id') is None for r in mine)
        if len(ids) > 1 or (unknown and any(len(v) > 1 for v in scores.values())):
            raise SystemExit(f'The adaptations of source seed {seed} were made from more than one source network '
                             f'(interfaces {", ".join(ids)}; source scores {scores}): its source was trained again '
                             f'after some were recorded. Move away the adaptations not made from the network in '
                             f'OUTPUT/source{seed}, or run the sweep anew in a fresh --output.')


def column(runs: list, key: str) -> str:
    """``mean ± std`` of score ``key`` over the runs; a source score once per source seed (its adaptation seeds
    repeat it, and would shrink the spread; the mean of its records where machines scored it differently). Runs of
    a source seed made from two networks are refused."""
    check_one_source(runs)
    if key in SOURCE_SCORES:
        seeds = sorted({seed for seed, _ in runs})
        return mean_std([statistics.fmean(r['scores'][key] for s, r in runs if s == seed) for seed in seeds])
    return mean_std([r['scores'][key] for _, r in runs])


def report(args, out: Path, found: dict) -> None:
    from timm_compat.plots import ReportTable, write_report
    rows = [[shift, len(runs), *(column(runs, k) if runs else '–' for k in SCORES.values())]
            for shift, runs in found.items()]
    records = [r for runs in found.values() for _, r in runs]
    machines = '; '.join(sorted({r.get('machine', 'a machine not recorded') for r in records})) or 'no run yet'
    steps = f' --adapt-steps {args.adapt_steps}' if args.adapt_steps is not None else ''
    write_report(out, 'Unsupervised domain adaptation through RP (Sec. 5.1, Tab. 2) over corruptions and seeds', {
        'Setup': (f'`python recipes/adaptation_sweep.py --budget {args.budget} --shifts {" ".join(args.shifts)} '
                  f'--source-seeds {args.source_seeds} --adapt-seeds {args.adapt_seeds} --adapt-lr {args.adapt_lr}'
                  f'{steps}{f" --data-dir {args.data_dir}" if args.data_dir else ""}`; adaptations run on '
                  f'{machines} (each source\'s training machine is in its run\'s summary.json). Average class '
                  f'accuracy (%) on the corrupted CIFAR-10 test split, mean ± std over every source seed x '
                  f'adaptation seed that finished (the source model\'s columns over its source seeds). Each '
                  f'adaptation\'s own report is in its folder. '
                  + data_note(args.data_dir)),
        'Target accuracy (%)': ReportTable(['corruption', 'runs', *SCORES], rows,
                                           caption='Paper (Tab. 2, CIFAR-10 -> STL-10 with a WRN-28): source 77.2, '
                                                   'test-time BN 82.0, adapted through RP 82.6.'),
    })


def run_sweep(args, out: Path) -> None:
    """Trains each source that has an adaptation to run, then runs its adaptations that are not recorded."""
    total = args.source_seeds * (1 + len(args.shifts) * args.adapt_seeds)
    with progress(total, 'adaptation sweep: runs') as bar:
        pending = {seed: [(shift, a) for shift in args.shifts for a in range(args.adapt_seeds)
                          if recorded_adaptation(args, adapt_folder(out, seed, shift, a)) is None]
                   for seed in range(args.source_seeds)}
        check_sources_kept(out, pending)
        check_sweep_configs(args, out, pending)
        for seed in (seed for seed, todo in pending.items() if todo):  # all before the first source trains
            check_run_data(out / f'source{seed}', args.data_dir)
        for seed, todo in pending.items():
            # A source whose adaptations are all recorded is not needed, nor trained again if its folder is gone.
            # One with some recorded is trained only to be read back (check_sources_kept).
            source = run_source(args, out, seed) if todo else None
            bar.update(1 + len(args.shifts) * args.adapt_seeds - len(todo))
            for shift, adapt_seed in todo:
                run_adaptation(args, source, seed, shift, adapt_seed, adapt_folder(out, seed, shift, adapt_seed), out)
                bar.update(1)


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = Path(args.output).resolve()
    if not args.report_only:
        with claim_output(out):  # one sitting at a time runs OUTPUT's adaptations
            run_sweep(args, out)
    found = collect(args, out)
    if args.report_only and not any(found.values()):  # a mistyped --output: no folder is made, no report written
        print(f'adaptation_sweep.py: error: --report-only: {out} holds no record of --shifts {" ".join(args.shifts)} '
              f'(source<S>/<shift>/adapt<A>/results.json); give the --output and --shifts of a sweep, or run it '
              f'without --report-only first.', file=sys.stderr)
        raise SystemExit(2)
    report(args, out, found)
    return found


if __name__ == '__main__':
    main()
