"""Measure a finished run's saved components again: own accuracy and the recombination matrix, under any
test-time augmentation, BN mode or batch size (timm's ``validate.py``, for a ``train.py`` run).

    python validate.py runs/demo                                   # the run's own settings: its summary again
    python validate.py runs/fast/plain --tta none                  # without airbench's test-time augmentation
    python validate.py runs/fast/pair --bn running --batch-size 500 --data-dir ../shared/data
    python validate.py runs/fast/pair --results-file pair_tta.json --tta flip_translate

Each network of the phase (``main`` by default) is rebuilt from what the run saved, not from its checkpoint: the
``extractor`` and ``head`` components under the phase's ``components`` folder (``summary.json`` names it), a loaded
network's from its ``load:`` folder, and a ``head: dcc`` network's head from the saved (or loaded) interface. The
test sets are the run's own, rebuilt from its ``config.yaml``. Like ``train.py``, both BN modes are measured, the
asked one first. Nothing in the run folder is changed; ``--results-file`` writes the numbers as JSON.
"""
import argparse
import json
from pathlib import Path
from typing import Dict

from timm_compat.build import load_network, load_task_data
from timm_compat.config import RunConfig, load_config
from timm_compat.evaluation import evaluate_networks

TTA_MODES = ('none', 'flip', 'flip_translate')


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('run', help='output folder of a finished train.py run (holds config.yaml)')
    parser.add_argument('--phase', default='main', help='phase to measure: main (default) or independent')
    parser.add_argument('--tta', choices=TTA_MODES, default=None, help="test-time augmentation (default: the run's "
                        'eval_tta)')
    parser.add_argument('--bn', choices=('batch', 'running'), default=None,
                        help="BN statistics of the first table (default: the run's eval_bn); both are measured")
    parser.add_argument('--batch-size', type=int, default=None, help="evaluation batch size (default: the run's "
                        'eval_batch_size; it matters under BN batch statistics)')
    parser.add_argument('--data-dir', default=None, help="folder of local Parquet copies (default: the run's "
                        'data_dir)')
    parser.add_argument('--results-file', default=None, help='write the numbers to this JSON file')
    args = parser.parse_args(argv)
    if args.batch_size is not None and args.batch_size < 1:
        parser.error(f'--batch-size must be positive, got {args.batch_size}.')
    if args.results_file and Path(args.results_file).exists():
        parser.error(f'--results-file {args.results_file} exists; give another name or move it away first.')
    return args


def run_config(run: Path, data_dir=None) -> RunConfig:
    """The run's config as it trained, with ``data_dir`` replaced when given."""
    if not (run / 'config.yaml').is_file():
        raise SystemExit(f'{run} has no config.yaml: give the output folder of a train.py run.')
    return load_config(str(run / 'config.yaml'), [f'data_dir={data_dir}'] if data_dir else [])


def components_folder(run: Path, phase: str, cfg) -> Path:
    """Where the phase saved its components: inside the run folder, where train.py puts them unless
    ``save_components`` named another folder (then as its ``summary.json`` records), so that a run moved, copied
    or read from another directory is scored from its own components."""
    summary = run / phase / 'summary.json'
    if not summary.is_file():
        found = sorted(p.parent.name for p in run.glob('*/summary.json'))
        raise SystemExit(f'{run} has no finished phase {phase!r} ({summary} is missing); finished: {found or "none"}. '
                         f'Finish the run (train.py --resume) or pick another --phase.')
    if cfg.save_components is None:
        return run / phase / 'components'
    return Path(json.loads(summary.read_text())['components'])


def main(argv=None) -> Dict:
    args = parse_args(argv)
    run = Path(args.run)
    cfg = run_config(run, args.data_dir)
    phase_cfg = cfg.independent() if args.phase == 'independent' else cfg  # as build_phases makes the baseline
    components = components_folder(run, args.phase, cfg)
    models = {n.name: load_network(n, phase_cfg, components) for n in phase_cfg.networks}
    tests = {n.name: load_task_data(n, phase_cfg)[1] for n in phase_cfg.networks}
    settings = {'tta': args.tta or cfg.eval_tta, 'bn': args.bn or cfg.eval_bn,
                'batch_size': args.batch_size or cfg.eval_batch_size}
    measured = evaluate_networks(models, tests, settings['batch_size'], settings['bn'], title=f'[{args.phase}] ',
                                 tta=settings['tta'])
    print(measured['table'])
    result = {'run': str(run), 'phase': args.phase, **settings, 'networks': list(models),
              **{k: v for k, v in measured.items() if k != 'table'}}
    if args.results_file:
        Path(args.results_file).write_text(json.dumps(result, indent=2) + '\n')
    return result


if __name__ == '__main__':
    main()
