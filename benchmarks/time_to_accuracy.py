"""Benchmark: minutes of training to 90 % / 93 % CIFAR-10 test accuracy, plain vs compatible (issue 16).

    python benchmarks/time_to_accuracy.py --data-dir ../shared/data          # the three runs: 1.5 h (bf16, Zen 5)
    python benchmarks/time_to_accuracy.py --data-dir ../shared/data --runs plain compatible_one --seed 1
    python benchmarks/time_to_accuracy.py --data-dir ../shared/data --set mixed_precision=bf16 --output runs/tta_bf16
    python benchmarks/time_to_accuracy.py --output runs/time_to_accuracy --report-only
    python benchmarks/time_to_accuracy.py --data-dir ../shared/data --flops-only     # the FLOP-ideal ratios, seconds

Three train.py runs of the fast family (``airbench94_cifar``, airbench94's recipe, channels_last, the configs'
``mixed_precision: auto``: bf16 where the machine multiplies it fast, else fp32; each record says which):

- ``plain``: ``configs/fast/plain.yaml``, one network on all of CIFAR-10;
- ``compatible_four``: ``configs/fast/compatible_halves.yaml``, a pair on the two halves of CIFAR-10 trained
  jointly with IIW + RP + DCC, RP on all four rotations (eq. 1);
- ``compatible_one``: the same with one random rotation beside the upright pass (``interface.rp_rotations=one``).

Each run measures its networks on the test set every ``--every`` epochs (``validation.data=test``; the measuring is
not training time) and its time to an accuracy is the training seconds at the first measurement at or above it
(DAWNBench's measure): for a pair, the first at which both networks' own accuracy reach it. Every run is measured
the same way, without test-time augmentation unless ``--tta`` asks for it (plain.yaml's airbench TTA included: a
pair's recombination matrix under TTA costs six passes per test image at every measurement). Runs are resumable one
by one: a finished run (``summary.json``) is read, not rerun, and a killed one continues from its last checkpoint.

The last lines compare each compatible run with the plain one: its training seconds per image and its time to 90 %
over the plain run's, beside the FLOP-ideal ratio, the training FLOPs per image (forward and backward, counted by
``torch.utils.flop_counter`` on the run's own model; convolutions and matmuls) over the plain run's. Both train on
50,000 images per epoch: the pair 25,000 per network. The runs are sequential, so the machine should be otherwise
idle: the load average is printed with each run's start.

A ratio is printed only for two records that agree in everything but their RP form (:func:`mismatch`): the other
settings, the measurement interval, the mixed precision the run trained in (what ``auto`` chose), the hardware
line and the data folder. Otherwise the line says what differs and gives no ratio, in a re-run and under
``--report-only`` alike, and a run that would be trained beside a record of another machine or precision is refused
before it starts. A record written before a field was recorded does not count as agreeing in it: its ratio is
refused and the line names the field, since a number that may compare two machines is worse than none. A
``data_dir`` recorded as given (before it was recorded resolved) is compared as written.
"""
import argparse
import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from timm_compat._hardware import hardware, resolve_precision
from timm_compat._integrity import atomic_write_text
from timm_compat.build import build_phases, load_task_data
from timm_compat.config import config_changes, load_config
from timm_compat.rundir import MARKER

from common import load_average

REPO = Path(__file__).resolve().parents[1]
FAST = REPO / 'configs' / 'fast'
RUNS = {
    'plain': (FAST / 'plain.yaml', []),
    'compatible_four': (FAST / 'compatible_halves.yaml', ['interface.rp_rotations=all']),
    'compatible_one': (FAST / 'compatible_halves.yaml', ['interface.rp_rotations=one']),
}
THRESHOLDS = (90.0, 93.0)
_UNKNOWN = object()  # a field that a record written before it was recorded does not hold


def run_overrides(args, name: str) -> list:
    """The run's config overrides (its RP form, seed, epochs); validation is added once the epoch length is known."""
    overrides = RUNS[name][1] + [f'seed={args.seed}', f'init_seed={args.seed}', f'eval_tta={args.tta}']
    return overrides + ([f'epochs={args.epochs}'] if args.epochs else []) + args.set


def data_dir_of(args):
    """``--data-dir`` resolved (None: the Hub): a relative path names another folder from another directory."""
    return str(Path(args.data_dir).resolve()) if args.data_dir else None


def flops_per_image(cfg, data, batch_size: int = 32) -> float:
    """Training FLOPs (forward + backward) per image of the run's model, averaged over its networks."""
    phase = build_phases(cfg, data, torch.device('cpu'))[0]
    total, images = 0, 0
    for step, name in enumerate(phase.joint.networks):
        classes = data[name][0].num_classes
        x, y = torch.randn(batch_size, 3, 32, 32), torch.randint(0, classes, (batch_size,))
        phase.joint.set_step(step)
        with FlopCounterMode(display=False) as counter:
            phase.joint({name: (x, y)})['loss'].backward()
        total, images = total + counter.get_total_flops(), images + batch_size
    return total / images


def prepare(args, name: str) -> dict:
    """Config, validation interval and FLOPs per image of run ``name`` (loads its data once)."""
    config, _ = RUNS[name]
    overrides = run_overrides(args, name) + ([f'data_dir={data_dir_of(args)}'] if args.data_dir else [])
    cfg = load_config(str(config), overrides)
    data = {n.name: load_task_data(n, cfg) for n in cfg.networks}
    turns = len(cfg.networks) if cfg.joint_schedule == 'alternate' else 1
    steps_per_epoch = turns * max(len(train) // cfg.batch_size for train, _ in data.values())
    every = max(1, round(args.every * steps_per_epoch))
    return {'overrides': run_overrides(args, name) + [f'validation.every={every}', 'validation.data=test'],
            'flops_per_image': flops_per_image(cfg, data), 'images_per_step': cfg.batch_size,
            'steps_per_epoch': steps_per_epoch}


def train(args, name: str, out: Path, overrides: list) -> None:
    """train.py on run ``name``, resuming a killed run from its last checkpoint."""
    cmd = [sys.executable, '-m', 'accelerate.commands.launch', '--num_processes', '1', str(REPO / 'train.py'),
           '-c', str(RUNS[name][0]), '--output-dir', str(out)]
    cmd += ['--resume'] if (out / MARKER).is_file() else []  # a run begun here, as the recipes' launch_command
    cmd += ['--data-dir', str(Path(args.data_dir).resolve())] if args.data_dir else []
    for o in overrides:
        cmd += ['--set', o]
    print(f'[{name}] training ({load_average()}); log: {out}.log', flush=True)
    with open(f'{out}.log', 'a') as log:
        if subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT).returncode != 0:
            raise SystemExit(f'[{name}] train.py failed; see {out}.log')


def curve(out: Path) -> list:
    """``(training seconds, own accuracy %)`` of each test measurement; a pair's accuracy is its worse network's."""
    with open(out / 'main' / 'validation.csv') as f:
        rows = list(csv.DictReader(f))
    nets = [k[:-len('/own')] for k in rows[0] if k.endswith('/own')]
    return [(float(r['time']), 100 * min(float(r[f'{n}/own']) for n in nets)) for r in rows]


def time_to(points: list, threshold: float):
    """Training seconds at the first measurement at or above ``threshold``, or None."""
    return next((t for t, acc in points if acc >= threshold), None)


def read_record(args, name: str, root: Path):
    """Run ``name``'s finished record in ``root`` (None if there is none), checked against this command's settings.

    Raises:
        SystemExit: The record was measured with other overrides, interval or data folder.
    """
    path = root / f'{name}.json'
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    # The last two overrides are the validation interval in steps; --every is compared as given, since how
    # often accuracy is measured decides when a threshold is seen (records before 2026-12-05 lack it). A data_dir
    # recorded before it was resolved is compared as it was given.
    data_dir = record.get('data_dir', 'not recorded')
    if (record['overrides'][:-2] != run_overrides(args, name) or record.get('every', args.every) != args.every
            or data_dir not in (args.data_dir, data_dir_of(args))):
        raise SystemExit(f'{path} was measured with other settings ({record["overrides"]}, every '
                         f'{record.get("every")} epochs, data_dir {data_dir}); give this one another --output.')
    return record


def check_finished_run(args, name: str, out: Path, overrides: list) -> None:
    """Refuse a finished train.py run in ``out`` that has no record and was not run ``name`` of this command.

    Raises:
        SystemExit: The config in ``out/summary.json`` differs from the one :func:`train` would give train.py.
    """
    flags = [f'output_dir={json.dumps(str(out))}'] + ([f'data_dir={json.dumps(data_dir_of(args))}']
                                                       if args.data_dir else [])
    expected = load_config(str(RUNS[name][0]), flags + overrides).to_dict()
    ran = json.loads((out / 'summary.json').read_text())['config']
    changes = [k for k in config_changes(ran, expected) if k != 'output_dir']  # the folder may have moved
    if changes:
        raise SystemExit(f'{out} is a finished run of other settings ({", ".join(changes)}) and has no {name}.json; '
                         f'give this one another --output, or move {out} away to measure it anew.')


def measure_run(args, name: str, root: Path) -> dict:
    """Train (or read) run ``name``; its curve, times to the thresholds and final accuracies."""
    out, record_path = root / name, root / f'{name}.json'
    record = read_record(args, name, root)
    if record is not None:
        return record
    setup = prepare(args, name)
    if (out / 'summary.json').is_file():  # finished, its record lost: read back only if it ran these settings
        check_finished_run(args, name, out, setup['overrides'])
    else:  # a new or killed run; train.py itself refuses to resume one of other settings
        train(args, name, out, setup['overrides'])
    main = json.loads((out / 'main' / 'summary.json').read_text())
    points = curve(out)
    matrix = main['recombination_matrix']
    off = [matrix[i][j] for i in range(len(matrix)) for j in range(len(matrix)) if i != j]
    own = list(main['own_accuracy'].values())
    record = {'run': name, 'seed': args.seed, 'tta': args.tta, 'every': args.every, 'overrides': setup['overrides'],
              'curve': points,
              'time_to': {str(t): time_to(points, t) for t in THRESHOLDS}, 'train_seconds': main['train_seconds'],
              'steps': main['steps'], 'images_per_step': setup['images_per_step'],
              'flops_per_image': setup['flops_per_image'], 'own_accuracy': main['own_accuracy'],
              'recombination_matrix': matrix,
              'recombination_over_own': (sum(off) / len(off)) / (sum(own) / len(own)) if off else None,
              'mixed_precision': json.loads((out / 'summary.json').read_text())['mixed_precision'],
              'hardware': hardware(), 'data_dir': data_dir_of(args)}
    atomic_write_text(record_path, json.dumps(record, indent=2))  # a killed write leaves no half record
    return record


def minutes(seconds) -> str:
    return 'not reached' if seconds is None else f'{seconds / 60:.1f} min'


def conditions(record: dict) -> dict:
    """What two records must share for a ratio of their times: all but the RP form, which tells the runs apart.

    A field the record does not hold is ``_UNKNOWN``, except where its overrides still say it: the precision a
    ``--set mixed_precision`` forced, and, for a record without ``every``, the measurement interval in steps.
    """
    overrides = record.get('overrides', [])
    given = {o.split('=', 1)[0]: o.split('=', 1)[1] for o in overrides}
    forced = given.get('mixed_precision', 'auto')
    hardware_line = record.get('hardware')
    return {
        'settings': [o for o in overrides if not o.startswith(('interface.rp_rotations=', 'validation.every='))],
        'measurement interval': (f'every {record["every"]} epochs' if 'every' in record
                                 else f'every {given.get("validation.every")} steps'),
        'mixed_precision': record.get('mixed_precision', _UNKNOWN if forced == 'auto' else forced),
        # The benchmark process's own torch threads, not the run's: train.py sets its own.
        'hardware': _UNKNOWN if hardware_line is None else re.sub(r', \d+ torch threads', '', hardware_line),
        'data_dir': record.get('data_dir', _UNKNOWN),
    }


def mismatch(records: dict) -> str:
    """Why ``records`` (label: record) cannot be compared with each other; '' when they can."""
    named, labels = {label: conditions(r) for label, r in records.items()}, list(records)
    problems = []
    for field in next(iter(named.values())):
        values = {label: c[field] for label, c in named.items()}
        unknown = [label for label, v in values.items() if v is _UNKNOWN]
        if unknown:
            problems.append(f'{field} is not recorded in {", ".join(unknown)} (a record older than the field)')
        elif field == 'settings' and len({json.dumps(v) for v in values.values()}) > 1:
            shared = [o for o in values[labels[0]] if all(o in v for v in values.values())]
            problems.append('settings differ: ' + ', '.join(
                f'{[o for o in v if o not in shared]} only in {label}' for label, v in values.items()))
        elif len({json.dumps(v) for v in values.values()}) > 1:
            problems.append(f'{field} differs: ' + ', '.join(f'{v!r} in {label}' for label, v in values.items()))
    return '; '.join(problems)


def check_before_training(args, found: dict) -> None:
    """Refuse, before anything trains, to add runs of this machine to records that a ratio could not use.

    Raises:
        SystemExit: A run of ``args.runs`` has no record yet, and the records ``found`` differ from what it
            would record here in hardware, mixed precision (what ``auto`` chooses here) or other conditions.
    """
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    planned = {}
    for name in [n for n in args.runs if n not in found]:
        precision = resolve_precision(load_config(str(RUNS[name][0]), run_overrides(args, name)).mixed_precision,
                                      device)
        planned[f'{name} (to run here)'] = {'overrides': run_overrides(args, name), 'every': args.every,
                                            'mixed_precision': precision or 'no', 'hardware': hardware(),
                                            'data_dir': data_dir_of(args)}
    problem = mismatch({**{f'{n}.json': r for n, r in found.items()}, **planned}) if found and planned else ''
    if problem:
        raise SystemExit(f'{problem}. Runs measured here could not be compared with these records: give this '
                         f'command another --output, or run it where the records were measured.')


def report(records: dict) -> None:
    """One line per run, then each compatible run against the plain one."""
    for name, r in records.items():
        own = ', '.join(f'{n} {100 * v:.2f} %' for n, v in r['own_accuracy'].items())
        recomb = '' if r['recombination_over_own'] is None else f'; recombination/own {r["recombination_over_own"]:.3f}'
        times = ', '.join(f'{t} % in {minutes(s)}' for t, s in r['time_to'].items())
        print(f'{name} (seed {r["seed"]}, TTA {r["tta"]}): {times}'
              + f'; final own accuracy {own}{recomb}; {r["train_seconds"] / 60:.1f} min training; '
              f'{r["flops_per_image"] / 1e9:.2f} GFLOP per training image')
    plain = records.get('plain')
    for name, r in records.items():
        if plain is None or name == 'plain':
            continue
        problem = mismatch({'plain': plain, name: r})
        if problem:
            print(f'{name} / plain: no ratio ({problem}); measure both alike, on one machine.')
            continue
        per_image = [x['train_seconds'] / (x['steps'] * x['images_per_step']) for x in (r, plain)]
        to90 = [x['time_to']['90.0'] for x in (r, plain)]
        ratio90 = f'{to90[0] / to90[1]:.2f}x' if None not in to90 else 'n/a (90 % not reached by both)'
        print(f'{name} / plain: seconds per training image {per_image[0] / per_image[1]:.2f}x, time to 90 % '
              f'{ratio90}; FLOP-ideal {r["flops_per_image"] / plain["flops_per_image"]:.2f}x')


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--data-dir', default=None, help='folder of local Parquet copies (DIR/cifar10/...); '
                        'default: uoft-cs/cifar10 from the Hub')
    parser.add_argument('--runs', nargs='+', default=list(RUNS), choices=list(RUNS))
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--epochs', type=float, default=None, help="override the configs' 9.9 epochs")
    parser.add_argument('--tta', default='none', choices=['none', 'flip', 'flip_translate'],
                        help='test-time augmentation of every measurement, in every run')
    parser.add_argument('--every', type=float, default=1.0, help='epochs between test measurements')
    parser.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                        help='train.py config override for every run, e.g. mixed_precision=bf16 (repeatable)')
    parser.add_argument('--output', default='runs/time_to_accuracy')
    parser.add_argument('--report-only', action='store_true', help='print the finished runs in OUTPUT, train none')
    parser.add_argument('--flops-only', action='store_true', help="print each run's FLOPs per training image and "
                        "their ratio to plain's, train none")
    args = parser.parse_args(argv)
    if args.every <= 0 or (args.epochs is not None and args.epochs <= 0):
        parser.error('--every and --epochs must be positive.')
    root = Path(args.output).resolve() / f'seed{args.seed}'
    root.mkdir(parents=True, exist_ok=True)
    print(hardware(), flush=True)
    if args.flops_only:
        flops = {name: prepare(args, name)['flops_per_image'] for name in args.runs}
        for name, value in flops.items():
            ratio = f' ({value / flops["plain"]:.2f}x plain)' if 'plain' in flops else ''
            print(f'{name}: {value / 1e9:.3f} GFLOP per training image{ratio}')
        return None
    if args.report_only:  # the records' own settings, whatever this command's: report() compares them
        found = {n: json.loads((root / f'{n}.json').read_text()) for n in args.runs if (root / f'{n}.json').is_file()}
        if not found:
            parser.error(f'--report-only: no finished run in {root}; run without it first.')
        return report(found)
    found = {n: r for n in args.runs if (r := read_record(args, n, root)) is not None}
    check_before_training(args, found)
    report({name: measure_run(args, name, root) for name in args.runs})


if __name__ == '__main__':
    main()
