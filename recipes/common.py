"""What every recipe shares: running ``accelerate launch train.py`` as a user would, the ``fast`` budget's train.py
keys, a bar counting the runs, the data note, both BN modes of a run's summary and mean ± std for the reports."""
import fcntl
import hashlib
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import yaml
from tqdm.auto import tqdm

from timm_compat.config import load_config
from timm_compat.data import DATA_VERSION, local_source
from timm_compat.deployment import BN_MODES
from timm_compat.rundir import CONFIG, MARKER

REPO = Path(__file__).resolve().parents[1]
CIFAR10 = 'uoft-cs/cifar10'
RESUME_HELP = ('continue the train.py runs already in the output folder (a killed run from its last checkpoint, a '
               'finished one read back) instead of overwriting them; a changed config is refused')
RECORDS_HELP = ('keep the records of OUTPUT/results.json (what finished, in an earlier sitting or another clone: copy '
                'a committed results.json there; a seed is added to them only if its runs resolve to the config they '
                'were trained under) and ' + RESUME_HELP.replace('the output folder', 'OUTPUT'))
DATA_DIR_HELP = ('folder of local Parquet copies of Hub datasets: Hub id ORG/NAME is read from '
                 'DIR/NAME/{split}.parquet (this workspace\'s CIFAR-10 copy: --data-dir ../shared/data); default: '
                 'download from the Hub')
FAST_BUDGET = REPO / 'configs' / 'fast' / 'budget.yaml'
# Keys of a resolved train.py config that a record's fingerprint leaves out: they differ by design between the seeds
# of one record (seed, init_seed) or between copies of one table (output_dir; data_dir is a RECORD_KEYS argument), or
# change nothing a run computes.
UNFINGERPRINTED = ('output_dir', 'data_dir', 'seed', 'init_seed', 'log_every', 'checkpoint_every', 'keep_checkpoints',
                   'trackers', 'push_to_hub', 'cpu_threads')


def fast_networks(count: int) -> Dict[str, object]:
    """Overrides that make the first ``count`` networks of a run the fast family's server member (airbench94) at
    its default split, where the paper has ResNet-56 or a Wide ResNet, with an interface as wide as the trunk there
    (256 channels), so no adapter is added, and aux heads with airbench's 1/9 logit scale (the fast recipe's
    learning rate is set for heads with it: configs/fast/compatible_halves.yaml)."""
    nets = {f'networks.{i}.{key}': value for i in range(count)
            for key, value in (('backbone', 'airbench94_cifar'), ('split', 'stages.1'))}
    return {**nets, 'interface.width': 256, 'interface.aux_head': {'type': 'conv', 'logit_scale': 1 / 9}}


def fast_keys(path: Path = FAST_BUDGET) -> Dict[str, object]:
    """The keys ``path`` and its ``base:`` chain set, with their resolved values: the ``fast`` budget of a recipe,
    set over the config of each of its runs (a section such as ``optim`` replaces the run's whole)."""
    resolved, keys = load_config(str(path)).to_dict(), []
    while path is not None:
        data = yaml.safe_load(path.read_text())
        keys += [key for key in data if key != 'base' and key not in keys]
        path = path.parent / data['base'] if 'base' in data else None
    return {key: resolved[key] for key in keys}


def as_overrides(keys: Dict[str, object]) -> List[str]:
    """``{'optim.lr': 0.1}`` as train.py's ``--set`` values, ``['optim.lr=0.1']`` (JSON is YAML, as --set parses)."""
    return [f'{key}={json.dumps(value)}' for key, value in keys.items()]


def progress(total: int, desc: str, unit: str = 'run') -> tqdm:
    """The recipe's outer bar (on stderr, so logs on stdout stay readable); ``total`` is known up front for an ETA."""
    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True)


def launch_command(config: Path, out: Path, overrides: Sequence[str], data_dir: Optional[str],
                   resume: bool = False) -> List[str]:
    """The ``accelerate launch train.py`` command of one run (see :func:`launch`)."""
    # A killed run continues from its last checkpoint, a finished one is read back; a new folder starts afresh.
    claim = '--resume' if resume and (out / MARKER).is_file() else '--overwrite'
    cmd = [sys.executable, '-m', 'accelerate.commands.launch', str(REPO / 'train.py'), '-c', str(config),
           '--output-dir', str(out), claim]
    if data_dir:  # train.py runs in the repository: a path relative to the caller's folder keeps its meaning
        cmd += ['--data-dir', str(Path(data_dir).resolve())]
    for o in overrides:
        cmd += ['--set', o]
    return cmd


def launch(config: Path, out: Path, overrides: Sequence[str], data_dir: Optional[str], log: Path,
           bar: Optional[tqdm] = None, resume: bool = False) -> dict:
    """One training run in its own process (so it can use every GPU); returns its ``main`` phase summary.

    ``data_dir`` goes to train.py's ``--data-dir`` (made absolute): train.py reads Hub ids from the local copies
    there.
    ``bar``, the recipe's outer bar, shows the run's name while it trains and counts it when it is done.
    ``resume`` continues the run already in ``out`` (``--resume``) instead of overwriting it.
    """
    if resume:
        check_run_data(out, data_dir)
    cmd = launch_command(config, out, overrides, data_dir, resume)
    if bar is not None:
        bar.set_postfix_str(f'training {out.name} (log: {log})')
    with open(log, 'a' if resume else 'w') as f:
        proc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(f'{" ".join(cmd)} failed; see {log}')
    if bar is not None:
        bar.update(1)
    return json.loads((out / 'summary.json').read_text())['phases']['main']


def check_run_data(run: Path, data_dir: Optional[str]) -> None:
    """Refuses, before it is resumed, a run folder trained on another ``--data-dir`` than ``data_dir`` (None: the Hub).

    train.py lets ``data_dir`` change on ``--resume`` (a Hub id keeps its name wherever it is read from), and
    fingerprints leave it out, so the network trained on other data would be read back and recorded as this data's.
    """
    if not ((run / MARKER).is_file() and (run / CONFIG).is_file()):
        return  # a new run (train.py --overwrite), nothing to resume
    saved = (yaml.safe_load((run / CONFIG).read_text()) or {}).get('data_dir')
    if not same_argument('data_dir', saved or None, data_dir or None):
        was, now = (d or '(none: the Hub)' for d in (saved, data_dir))
        raise SystemExit(f'{run} was trained on --data-dir {was}, but this sitting reads --data-dir {now}: resuming '
                         f'it would record that network as trained on this data. Give --data-dir {was} to continue '
                         f'it, or another --output (or move {run} away) to train it on this data.')


def config_fingerprint(configs: Sequence[dict], out: Path, seed: int) -> str:
    """The fingerprint of one seed's train.py runs, from their resolved configs (``Config.to_dict()``): a hash of
    them less :data:`UNFINGERPRINTED`, the output folder ``out`` and the seed's run-folder suffix ``_seed<seed>``
    made generic. It is the same for every seed of a record trained under one configuration, and differs when
    anything else of it changed (a budget key, a config file, a code default), which ``--resume`` refuses to pool.
    """
    kept = [{k: v for k, v in c.items() if k not in UNFINGERPRINTED} for c in configs]
    text = json.dumps(kept, sort_keys=True, default=str).replace(str(out), 'OUTPUT')
    text = re.sub(rf'_seed{seed}(?![0-9])', '_seed*', text)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def planned_fingerprint(runs: Sequence[tuple], out: Path, seed: int, extra: Sequence[dict] = ()) -> str:
    """:func:`config_fingerprint` of runs not yet trained, ``(config file, run folder, overrides)`` as
    :func:`launch` takes them: the configs train.py will resolve, and ``extra`` keys of the recipe's own work."""
    return config_fingerprint([load_config(str(c), list(o)).to_dict() for c, _, o in runs] + list(extra), out, seed)


def trained_fingerprint(run_dirs: Sequence[Path], out: Path, seed: int, extra: Sequence[dict] = ()) -> Optional[str]:
    """:func:`config_fingerprint` of trained runs, from the config.yaml each wrote (and ``extra``, as
    :func:`planned_fingerprint`); None if one is gone."""
    paths = [Path(r) / 'config.yaml' for r in run_dirs]
    if not all(p.is_file() for p in paths):
        return None
    return config_fingerprint([load_config(str(p)).to_dict() for p in paths] + list(extra), out, seed)


def check_configs(path: Path, results: Dict[str, list], planned: Dict[tuple, str],
                  trained: Callable[[str, int], Optional[str]]) -> bool:
    """Refuses, before anything trains, to add a seed to a record trained under another config.

    ``planned`` maps each ``(name, seed)`` to be trained to its :func:`planned_fingerprint`. A record from before
    fingerprints were kept gets its fingerprint from its run folders (``trained(name, seed)``) while they are there,
    and is refused if a seed would join it after they are gone: the config it was trained under is unknown.

    Returns:
        Whether a record got its fingerprint here (save the records, so they keep it without their run folders).
    """
    filled = False
    for name, records in results.items():
        for r in records:
            if 'config' not in r and (found := trained(name, r['seed'])) is not None:
                r['config'], filled = found, True
    for (name, seed), fingerprint in planned.items():
        for r in results.get(name, []):
            if 'config' not in r:
                raise SystemExit(f'{path}: the record of {name} seed {r["seed"]} does not say which config it was '
                                 f'trained under (it predates config fingerprints, and its run folders, which would '
                                 f'say, are gone), so seed {seed} is not added to it: give another --output for a new '
                                 f'table.')
            if r['config'] != fingerprint:
                raise SystemExit(f'{path}: {name} seed {r["seed"]} was trained under another config than seed {seed} '
                                 f'would be (fingerprint {r["config"]}, now {fingerprint}): a config file, budget '
                                 f'key or code default changed since. Give another --output for a new table, or '
                                 f'restore that config to add to this one.')
    return filled


def by_bn(summary: dict, key: str) -> Dict[str, object]:
    """``summary[key]`` of a train.py phase under each BN mode, ``{'batch': ..., 'running': ...}``.

    train.py keeps its ``eval_bn`` mode under the plain key and the other under ``key_<mode>``
    (:func:`timm_compat.evaluation.evaluate_networks`).
    """
    other = [mode for mode in BN_MODES if f'{key}_{mode}' in summary]
    if len(other) != 1:
        raise ValueError(f'The summary has no {key} under a second BN mode ({sorted(summary)}): it was written '
                         f'before train.py measured both; rerun the run.')
    main = next(mode for mode in BN_MODES if mode != other[0])
    return {main: summary[key], other[0]: summary[f'{key}_{other[0]}']}


def mean_std(values: Sequence[float], signed: bool = False, digits: int = 1) -> str:
    """``'mean ± std'`` over seeds to ``digits`` decimals; the mean alone for one seed (its spread is unknown, not 0)
    and '–' for none. ``signed`` writes the mean with its sign, for differences."""
    if not values:
        return '–'
    spread = f' ± {statistics.stdev(values):.{digits}f}' if len(values) > 1 else ''
    return f'{statistics.mean(values):{"+" if signed else ""}.{digits}f}{spread}'


def check_data_dir(parser, data_dir: Optional[str], sources: Sequence[str]) -> None:
    """Refuse, before anything runs, a ``--data-dir`` without the local copy of one of ``sources``."""
    for source in sources:
        try:
            local_source(source, data_dir)
        except FileNotFoundError as e:
            parser.error(str(e))


def data_note(data_dir: Optional[str], sources: Sequence[str] = (CIFAR10,)) -> str:
    """The report's sentence on where the data came from: the Hub, or the local copies in ``data_dir``."""
    names = ', '.join(f'`{s}`' for s in sources)
    if all(':' in s for s in sources):  # parquet:, imagefolder:, synthetic: name local or generated data
        return f'Data: {names}.'
    if not data_dir:
        return f'Data: {names}, downloaded from the Hub.'
    return (f'Data: {names}, read from the local Parquet copies in `{data_dir}` (`--data-dir`), not from the Hub; '
            f'this workspace\'s copy (`../shared/data`) is CIFAR-10 (JPEG copy), re-encoded pixels whose accuracies '
            f'sit a little below the Hub data\'s.')


def load_results(out: Path, args, keys: Sequence[str]) -> Dict[str, list]:
    """The records that ``--resume`` keeps: OUTPUT/results.json's ``{name: [record per seed]}``, or none.

    The records alone make the report (no checkpoint is read back for them), so a table built over several sittings
    survives the loss of its run folders: copy the committed results.json into OUTPUT and resume. Records made
    with other ``keys`` (budget, setting, ...) than ``args`` are refused, as a changed config is.
    """
    saved = read_record(out / 'results.json', args, keys) if getattr(args, 'resume', False) else None
    return saved['results'] if saved else {}


def read_json(path: Path, required: Sequence[str] = ()) -> dict:
    """The JSON object at ``path`` with its ``required`` keys, or a refusal naming the file: an interrupted copy of a
    committed record would otherwise end in a traceback that names neither the file nor the fix."""
    try:
        saved = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        saved = e
    if not isinstance(saved, dict) or any(k not in saved for k in required):
        what = f'not valid JSON ({saved})' if isinstance(saved, Exception) else \
            f'not a record with {", ".join(required) or "an object"}'
        raise SystemExit(f'{path} is {what}: restore it (the committed copy under docs/results/, or git), or move it '
                         f'away to start the table afresh.')
    return saved


def read_record(path: Path, args=None, keys: Sequence[str] = ()) -> Optional[dict]:
    """The JSON record (or run summary) at ``path``, None if there is none; refused if it was made on another data
    version, or with other ``keys`` arguments than ``args``."""
    if not path.is_file():
        return None
    saved = read_json(path, ('args',) if keys else ())
    check_data_version(saved, path)
    changed = [f'--{k.replace("_", "-")} {saved["args"].get(k)} (now {getattr(args, k)})'
               for k in keys if not same_argument(k, saved['args'].get(k), getattr(args, k))]
    if changed:
        raise SystemExit(f'{path} holds records of {", ".join(changed)}: give the same arguments to add to it, or '
                         f'another --output for a new table.')
    return saved


def same_argument(key: str, saved, now) -> bool:
    """Whether a record's argument ``saved`` is ``now``. A record keeps ``--data-dir`` as it was typed, so a folder
    compares as the folder it names: ``../shared/data`` from the repository and ``/work/shared/data`` are one."""
    if key == 'data_dir' and saved and now:
        return Path(saved).resolve() == Path(now).resolve()
    return saved == now


def check_data_version(saved: dict, path: Path) -> None:
    """Refuse ``saved`` (a record or a run's summary, read from ``path``) if it was made on another data version
    than this code's: its numbers are not pooled with new ones, nor its run read back as finished."""
    version = saved.get('data_version', 1)
    if version != DATA_VERSION:
        raise SystemExit(f'{path} was made on data version {version}, this code makes version {DATA_VERSION} '
                         f'(timm_compat.data.DATA_VERSION says what changed), so it is not kept: give another '
                         f'--output, or move it away to train it again.')


def finished_run(run: Path) -> bool:
    """Whether ``run`` holds a finished train.py run (its summary.json); one of another data version is refused."""
    return read_record(run / 'summary.json') is not None


def recorded(results: Dict[str, list], name: str, seed: int) -> bool:
    return any(r['seed'] == seed for r in results.get(name, []))


def add_record(results: Dict[str, list], name: str, record: dict) -> None:
    """Adds ``record`` (one seed of ``name``) to ``results``, the seeds kept in order.

    Raises:
        ValueError: ``name`` has a record of that seed already: a second one would count as another seed.
    """
    if recorded(results, name, record['seed']):
        raise ValueError(f'{name} seed {record["seed"]} is recorded already; a second record of it would be counted '
                         f'as another seed.')
    results[name] = sorted(results.get(name, []) + [record], key=lambda r: r['seed'])


def claim_output(out: Path):
    """Creates OUTPUT and locks it for this sitting of a recipe; returns the lock, held until it is closed or the
    process ends (the kernel drops it even after a kill).

    Two sittings on one OUTPUT would each write results.json from their own records, and the last would drop the
    other's. train.py's runs lock their own folders, not OUTPUT.
    """
    out.mkdir(parents=True, exist_ok=True)
    lock = open(out / '.recipe.lock', 'a')
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise SystemExit(f'{out} is in use by another sitting of a recipe (it holds {out / ".recipe.lock"}): wait '
                         f'for it to end, or give another --output. Both would write its records, and one would '
                         f'lose the other\'s.') from None
    return lock


def check_counts(parser, args) -> None:
    """Refuse, before anything runs, ``--seeds`` below 1 and ``--epochs`` of 0 or less (train.py would run the
    budget's epochs while the record said 0)."""
    if getattr(args, 'seeds', 1) < 1:
        parser.error(f'--seeds {args.seeds}: give at least one seed.')
    if getattr(args, 'epochs', None) is not None and args.epochs <= 0:
        parser.error(f'--epochs {args.epochs}: give a positive number of epochs, or leave it out for the budget\'s.')


def check_positive(parser, args, keys: Sequence[str]) -> None:
    """Refuse, before anything runs, a ``keys`` argument (``threads``, ``lr``) given as 0 or less: ``--threads 0``
    would be ignored and a negative one crash torch after the arguments were accepted."""
    for key in keys:
        if getattr(args, key, None) is not None and getattr(args, key) <= 0:
            parser.error(f'--{key} {getattr(args, key)}: give a positive number, or leave it out for the default.')


PRECISION_NAMES = {'no': 'fp32', 'bf16': 'bf16 mixed precision', 'fp16': 'fp16 mixed precision'}


def run_machine(run_dirs: Sequence[Path]) -> str:
    """The machine line the runs' own summaries recorded (device, CPU, the run's torch threads, versions), with the
    precision they trained in (``mixed_precision: auto`` differs by CPU), each line once; this process's for runs from
    before summaries kept it."""
    from timm_compat._hardware import hardware
    summaries = [json.loads((Path(r) / 'summary.json').read_text()) for r in run_dirs]
    lines = [s['hardware'] + (f', in {PRECISION_NAMES.get(s["mixed_precision"], s["mixed_precision"])}'
                              if s.get('mixed_precision') else '') for s in summaries if s.get('hardware')]
    return '; '.join(dict.fromkeys(lines)) or hardware()


def write_json(path: Path, data) -> None:
    """Writes ``data`` to ``path`` atomically: a kill while writing leaves the previous file whole."""
    tmp = path.with_name(path.name + '.tmp')
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def save_results(out: Path, args, results: Dict[str, list]) -> None:
    """Writes OUTPUT/results.json, the recipe's arguments and records, atomically."""
    write_json(out / 'results.json', {'args': vars(args), 'data_version': DATA_VERSION, 'results': results})
