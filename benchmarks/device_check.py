"""One prepared check of what only a GPU can show (issue 15): one command, one markdown report.

    python benchmarks/device_check.py --data-dir DATA                  # on a GPU machine: at most about 8 minutes
    python benchmarks/device_check.py --dry-run --data-dir DATA        # CPU, tiny budgets: keeps the script working

Each step is its own process with a time limit, run in order; a step that fails or runs out of time is reported and
the next one runs:

1. ``tests``: the CUDA-marked tests (``pytest -m cuda``: the model, the on-device batch builder and train.py on the
   GPU against the CPU);
2. ``train_step``: benchmarks/train_step.py on the device, bf16 and channels_last, four-rotation and cheap RP: the
   compatibility step against a plain one, beside its FLOP-ideal ratio (target: at most 1.15 x);
3. ``loader_share``: benchmarks/loader_share.py on the device: the in-memory loader's share of a step (target:
   under 2 %);
4. ``stream_loader``: benchmarks/stream_loader.py on the device at 224 px: a streamed split's loader share with 4 and
   8 workers, and the workers a GPU step needs;
5. ``sec5_2``: recipes/head_transfer.py at the fast budget, Sec. 5.2 end to end (target: under 2 minutes on an H200).

``--dry-run`` runs the same steps on the CPU at the smallest sizes (the recipe at its ``tiny`` budget): the test
suite runs it so the script stays working. DATA is a folder of Hub dataset copies as every recipe takes it
(DATA/cifar10/{train,test}.parquet); without it the recipe downloads ``uoft-cs/cifar10``. Writes
OUTPUT/device_check.md (machine, versions, and each step's command, exit status, time and printed output) and
OUTPUT/device_check.json.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TAIL = 6000  # characters of each step's output kept in the report


def steps(args, out: Path) -> list:
    """``(name, command, time limit in seconds)`` of every step, at the GPU's sizes or the dry run's."""
    py, data = sys.executable, ['--data-dir', str(Path(args.data_dir).resolve())] if args.data_dir else []
    if args.dry_run:
        small = ['--device', 'cpu', '--backbones', 'resnet56_cifar', '--batch-size', '2', '--threads', '1']
        return [('tests', [py, '-m', 'pytest', '-q', '-m', 'cuda', 'tests/test_cuda.py'], 300),
                ('train_step', [py, 'benchmarks/train_step.py', *small, '--repeats', '1', '--warmup', '0',
                                '--rp-rotations', 'all', 'one'], 300),
                ('loader_share', [py, 'benchmarks/loader_share.py', *small, '--images', '64', '--repeats', '1',
                                  '--steps', '1'], 300),
                ('stream_loader', [py, 'benchmarks/stream_loader.py', '--device', 'cpu', '--backbone', 'resnet56_cifar',
                                   '--sizes', '64', '--batch-size', '4', '--images', '32', '--workers', '0',
                                   '--repeats', '1', '--steps', '1', '--threads', '1'], 300),
                ('sec5_2', [py, 'recipes/head_transfer.py', '--budget', 'tiny', *data, '--output',
                            str(out / 'head_transfer')], 900)]
    gpu = ['--device', 'cuda', '--channels-last', '--bf16', '--batch-size', '128']
    return [('tests', [py, '-m', 'pytest', '-q', '-m', 'cuda', 'tests/test_cuda.py'], 50),
            ('train_step', [py, 'benchmarks/train_step.py', *gpu, '--repeats', '5', '--steps', '5',
                            '--rp-rotations', 'all', 'one'], 90),
            ('loader_share', [py, 'benchmarks/loader_share.py', *gpu], 50),
            ('stream_loader', [py, 'benchmarks/stream_loader.py', '--device', 'cuda', '--bf16', '--sizes', '224',
                               '--batch-size', '128', '--images', '1024', '--workers', '4', '8', '--repeats', '2'], 60),
            ('sec5_2', [py, 'recipes/head_transfer.py', '--budget', 'fast', *data, '--output',
                        str(out / 'head_transfer')], 230)]


def run_step(name: str, command: list, limit: int) -> dict:
    """One step in its own process; never raises: a failure or a timeout is the step's result."""
    env = dict(os.environ, PYTHONUNBUFFERED='1')
    start = time.time()
    try:
        proc = subprocess.run(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, timeout=limit)
        status, output = ('ok' if proc.returncode == 0 else f'failed (exit {proc.returncode})'), proc.stdout
    except subprocess.TimeoutExpired as e:
        output = e.stdout.decode(errors='replace') if isinstance(e.stdout, bytes) else (e.stdout or '')
        status = f'timed out after {limit} s'
    return {'name': name, 'command': ' '.join(command), 'status': status, 'seconds': round(time.time() - start, 1),
            'output': output[-TAIL:]}


def machine() -> str:
    import torch
    from timm_compat._hardware import hardware
    gpu = (f'{torch.cuda.get_device_name(0)} ({torch.cuda.device_count()} visible), CUDA {torch.version.cuda}, '
           f'cuDNN {torch.backends.cudnn.version()}') if torch.cuda.is_available() else 'no CUDA device'
    return f'{hardware()}; {gpu}'


def write_report(out: Path, args, results: list, host: str) -> Path:
    lines = ['# Device check', '', f'Machine: {host}.', '',
             f'Command: `python benchmarks/device_check.py{" --dry-run" if args.dry_run else ""}'
             f'{f" --data-dir {args.data_dir}" if args.data_dir else ""}`, '
             f'{time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}.', '',
             '| step | status | seconds |', '|---|---|---|']
    lines += [f'| {r["name"]} | {r["status"]} | {r["seconds"]} |' for r in results]
    for r in results:
        lines += ['', f'## {r["name"]}', '', f'`{r["command"]}`: {r["status"]}, {r["seconds"]} s', '', '```',
                  r['output'].rstrip(), '```']
    (out / 'device_check.json').write_text(json.dumps({'machine': host, 'dry_run': args.dry_run, 'steps': results},
                                                      indent=2))
    path = out / 'device_check.md'
    path.write_text('\n'.join(lines) + '\n')
    return path


STEPS = ('tests', 'train_step', 'loader_share', 'stream_loader', 'sec5_2')


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--data-dir', default=None, help='folder of local Hub dataset copies (DIR/cifar10/...)')
    parser.add_argument('--output', default='runs/device_check')
    parser.add_argument('--dry-run', action='store_true', help='CPU, smallest sizes: check that every step runs')
    parser.add_argument('--steps', nargs='+', default=None, choices=STEPS, help='run only these steps')
    args = parser.parse_args(argv)
    if args.data_dir and not (Path(args.data_dir) / 'cifar10' / 'train.parquet').is_file():
        parser.error(f'--data-dir {args.data_dir}: no cifar10/train.parquet there; give the folder that holds '
                     f'cifar10/{{train,test}}.parquet, or leave --data-dir out to download uoft-cs/cifar10.')
    import torch
    if not args.dry_run and not torch.cuda.is_available():
        parser.error('No CUDA device here: run it on a GPU machine, or with --dry-run to check the steps on the CPU.')
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    host, results = machine(), []
    for name, command, limit in steps(args, out):
        if args.steps and name not in args.steps:
            continue
        print(f'[device check] {name}: {" ".join(command)} (limit {limit} s)', flush=True)
        results.append(run_step(name, command, limit))
        print(f'[device check] {name}: {results[-1]["status"]}, {results[-1]["seconds"]} s', flush=True)
    print(f'report: {write_report(out, args, results, host)}')
    return 0 if all(r['status'] == 'ok' for r in results) else 1


if __name__ == '__main__':
    sys.exit(main())
