"""Train compatible networks with Accelerate.

    accelerate launch train.py                                  # offline demo: IIW+RP+DCC vs. independent
    accelerate launch train.py -c configs/sec4/iiw_rp_dcc.yaml                 # CIFAR-10 + STL-10 from the Hub
    accelerate launch train.py -c configs/sec4/iiw_rp_dcc.yaml --data-dir DATA # ... from DATA/cifar10, DATA/stl10
    accelerate launch train.py -c CONFIG --set optim.lr=0.1 --set networks.1.backbone=resnet56_cifar
    accelerate launch --multi_gpu --num_processes 2 train.py -c CONFIG     # DDP (on CPU: ACCELERATE_USE_CPU=true ...)
    accelerate launch train.py -c CONFIG --resume                # continue from the last checkpoint

A run trains N networks (timm backbone split into extractor + head, each on its own dataset) against one
interface: jointly, sharing its RP and DCC aux heads, or incrementally, against a frozen interface loaded from a
folder or the Hub. It ends by measuring each network's own accuracy and the N x N recombination matrix, and writes
config.yaml, metrics.csv, checkpoints, components and summary.json to the output directory.
"""
import argparse
import json
import sys
import time
from pathlib import Path

from accelerate import Accelerator

from timm_compat._hardware import hardware, local_processes
from timm_compat.build import Phase, build_phases, load_task_data
from timm_compat.config import config_help, load_config
from timm_compat.data import DATA_VERSION
from timm_compat.engine import (PUSHED_NAME, check_hub_credentials, claim_run_dir, evaluate_phase, fit_phase,
                                make_accelerator, push_components, save_components, write_summary)
from timm_compat.metrics_log import MetricsLog
from timm_compat.plots import plot_phase
from timm_compat.rundir import check_writable_folder


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, epilog=config_help(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('-c', '--config', default=None, help='YAML run config (default: the offline demo)')
    parser.add_argument('--set', dest='overrides', action='append', default=[], metavar='KEY=VALUE',
                        help='override a config key, e.g. --set interface.rp=false (repeatable)')
    parser.add_argument('--output-dir', default=None, help='output directory (config key output_dir)')
    parser.add_argument('--data-dir', default=None, help='folder of local Parquet copies of Hub datasets: org/name is read '
                        'from DIR/name/{train,test}.parquet (config key data_dir)')
    parser.add_argument('--interface', default=None, metavar='REPO_OR_DIR',
                        help='train incrementally against this frozen interface')
    parser.add_argument('--save-components', default=None, metavar='DIR', help='write every trained component here')
    parser.add_argument('--push-to-hub', default=None, metavar='ORG/PREFIX', help='push every component to the Hub')
    claim = parser.add_mutually_exclusive_group()  # together, one of the two would be ignored without a word
    claim.add_argument('--resume', action='store_true', help='continue from the last checkpoint in the output dir')
    claim.add_argument('--overwrite', action='store_true', help='delete an earlier run in the output dir first')
    args = parser.parse_args(argv)
    flags = {'output_dir': args.output_dir, 'data_dir': args.data_dir, 'interface.load': args.interface,
             'save_components': args.save_components, 'push_to_hub': args.push_to_hub}
    # JSON is YAML: a flag value stays a string (--data-dir 2024 is a folder, not a number).
    overrides = [f'{k}={json.dumps(v)}' for k, v in flags.items() if v is not None] + args.overrides
    return args, load_config(args.config, overrides)


def main(argv=None) -> dict:
    args, cfg = parse_args(argv)
    # Before the data is loaded and the run trains: a folder that cannot be written was found only when first
    # written to (the output folder after the data was loaded, the components after the last step).
    check_writable_folder(cfg.output_dir, 'output_dir')
    if cfg.save_components:
        check_writable_folder(cfg.save_components, 'save_components')
    start = time.time()
    accelerator = make_accelerator(cfg)
    # Everything is built, and so validated, before the output folder is touched.
    with accelerator.main_process_first():
        processes = local_processes(accelerator.num_processes)
        data = {n.name: load_task_data(n, cfg, processes, accelerator.device) for n in cfg.networks}
    phases = build_phases(cfg, data, accelerator.device, accelerator.num_processes)
    if cfg.push_to_hub:
        check_hub_credentials(accelerator, cfg.push_to_hub)
    out = Path(cfg.output_dir)
    finished = [p.tag for p in phases if (out / p.tag / 'summary.json').exists()]
    # A resume of a finished run trains nothing: its summary (wall time, machine, threads) stays the training's.
    done = len(finished) == len(phases) and args.resume and (out / 'summary.json').exists()
    with claim_run_dir(accelerator, cfg, finished, args.resume, args.overwrite, {p.tag: p.steps for p in phases}):
        results = {p.tag: run_phase(p, accelerator, out / p.tag, args.resume) for p in phases}
        accelerator.end_training()
        # hardware: the run's own threads, which a recipe's line would not give
        summary = json.loads((out / 'summary.json').read_text()) if done else {
            'config': cfg.to_dict(), 'wall_seconds': round(time.time() - start, 1),
            'device': str(accelerator.device), 'processes': accelerator.num_processes,
            'mixed_precision': accelerator.mixed_precision, 'hardware': hardware(accelerator.device),
            'data_version': DATA_VERSION, 'phases': results}
        if accelerator.is_main_process:
            if not done:
                write_summary(out / 'summary.json', summary)
            print('\n' + '\n\n'.join(r['table'] for r in results.values()))
            print(f'\nwall time {summary["wall_seconds"]} s on {accelerator.num_processes} process(es), '
                  f'{accelerator.device}; results in {out / "summary.json"}')
            # Last, after every collective: the other processes are done, none waits during the upload.
            # Each phase that asks (the independent baseline never does) and has not pushed in an earlier
            # invocation: a resume pushes a phase finished before a later one crashed, an --overwrite pushes anew.
            for p in phases:
                if p.cfg.push_to_hub and not (out / p.tag / PUSHED_NAME).exists():
                    push_components(p, Path(results[p.tag]['components']), out / p.tag / PUSHED_NAME)
    return summary


def run_phase(phase: Phase, accelerator: Accelerator, out: Path, resume: bool) -> dict:
    """Fit one phase, evaluate it, save its components; a phase that already finished is only read back."""
    if (out / 'summary.json').exists():
        accelerator.print(f'[{phase.tag}] already finished; summary in {out / "summary.json"}')
        return json.loads((out / 'summary.json').read_text())
    fitted = fit_phase(phase, accelerator, out, resume)
    summary = evaluate_phase(phase, accelerator)
    cfg = phase.cfg
    components = Path(cfg.save_components) / phase.tag if cfg.save_components else out / 'components'
    if accelerator.is_main_process:
        save_components(phase, components)
        summary['components'] = str(components.resolve())  # a run read from another directory finds them
    summary.update(fitted)
    if accelerator.is_main_process:
        # Written before any push (main() pushes last): a failed push loses nothing; a resume skips the phase.
        write_summary(out / 'summary.json', summary)
        plot_phase(out, summary, MetricsLog(out / 'metrics.csv').rows())  # recombination.png, loss.png
    accelerator.free_memory()  # the next phase checkpoints only its own models
    accelerator.wait_for_everyone()
    return summary


def cli(argv=None) -> None:
    """``main`` for the command line: a refused run prints one clear message, not a traceback, and exits 2."""
    try:
        main(argv)
    # OSError: a file or folder the run could not read or write (FileNotFoundError, PermissionError, a full disk).
    except (ValueError, OSError, FloatingPointError) as e:
        print(f'error: {e}', file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == '__main__':
    cli()
