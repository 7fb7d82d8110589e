"""The output folder of a training run: marked as a run, locked while one lives, never silently mixed or deleted.

A run folder holds ``run.json`` (the marker, and the record of every resume), ``config.yaml``, one folder per
phase and ``.lock``. While a run lives it holds an exclusive ``flock`` on ``.lock`` (released by the kernel even
after ``kill -9``), so a second run on the same folder, whether new, ``--resume`` or ``--overwrite``, refuses and
names the holder's pid. ``--overwrite`` deletes only a folder that ``run.json`` marks as a timm-compat run.
A ``save_components`` folder outside the run folder is locked the same way while the run lives (its ``.lock``
stays beside the components), so two live runs never save components to one folder.
"""
import fcntl
import json
import os
import shutil
import time
from pathlib import Path, PurePath
from typing import Any, Dict, List, Optional

import yaml

from ._integrity import atomic_write_text
from .checkpoint import latest_checkpoint, load_train_state
from ._config_resume import RESUME_MAY_SWITCH_KERNELS
from .config import RESUME_MAY_CHANGE, config_changes, resume_conflicts
from .data import DATA_VERSION, local_source

__all__ = ['RunDir', 'RunDirError', 'MARKER', 'check_writable_folder']

MARKER = 'run.json'
LOCK = '.lock'
CONFIG = 'config.yaml'


class RunDirError(ValueError):
    """The output folder cannot be used as asked; the message says what to do instead."""


def check_writable_folder(folder: Any, key: str) -> None:
    """Refuse a folder that neither is nor can be created as a folder this process writes into.

    Only looks: nothing is created. A run checks its folders with it before it trains, since a folder that cannot
    be written is otherwise found when the run first writes there (its components: after the last step).

    Args:
        folder: The folder, which may not exist yet.
        key: The config key that names it, for the message.

    Raises:
        RunDirError: ``folder`` or one of its parents is a file, or the folder (or, to create it, its first existing
            parent) is not writable.
    """
    path = Path(folder)
    # lexists: a dangling link is in the way too (mkdir would fail on it); ENOTDIR below a file reads as missing.
    existing = next(p for p in [path, *path.parents] if os.path.lexists(p))
    if not existing.is_dir():
        where = f'{path} is' if existing == path else f'{path} cannot be created: {existing} is'
        raise RunDirError(f'{key}: {where} not a folder. Choose another path.')
    if not os.access(existing, os.W_OK | os.X_OK):
        what = 'the folder' if existing == path else f'{path} would be created in'
        raise RunDirError(f'{key}: {what} {existing} is not writable by this user. Choose another path, or make it '
                          f'writable.')


def _check_component_folder(folder: Any, claimed: bool, resume: bool) -> None:
    # Components are saved when a run ends: a run started on another's folder would replace them hours later.
    # A lone .lock is a dead run's, which saved nothing there.
    if folder and not claimed and Path(folder).is_dir() and any(p.name != LOCK for p in Path(folder).iterdir()):
        instead = 'the one the run saved to before' if resume else 'pass --overwrite to replace them'
        raise RunDirError(f'save_components: {folder} already holds components (of another run?), which this run '
                          f'would replace when it ends. Choose another folder, or {instead}.')


class RunDir:
    """Claim ``path`` for a run: lock it, then check that it may be started, resumed or overwritten.

    Args:
        path: The run's output folder.
    """
    KEY = 'output_dir'  # the config key that names the folder, for messages

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock_file, self._created = None, None
        self._components: Optional[_ComponentFolder] = None  # locked by prepare() when outside the run folder

    def acquire(self) -> 'RunDir':
        """Take the folder's lock, creating the folder if needed.

        Raises:
            RunDirError: Another live process holds the lock, or the folder cannot be created or written.
        """
        check_writable_folder(self.path, self.KEY)  # a RunDirError that names the key, not an OSError
        # The first missing ancestor: what release() removes again if the run never started.
        self._created = next((p for p in [*reversed(self.path.parents), self.path] if not p.exists()), None)
        self.path.mkdir(parents=True, exist_ok=True)
        f = open(self.path / LOCK, 'a+')
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or 'unknown'
            f.close()
            raise RunDirError(self._busy(holder)) from None
        f.seek(0)
        f.truncate()
        f.write(f'{os.getpid()}\n')
        f.flush()
        self._lock_file = f
        return self

    def _busy(self, holder: str) -> str:
        return (f'{self.path} is in use by a live run (pid {holder}). Wait for it to finish, stop it, or pass '
                f'--output-dir for a new folder.')

    def release(self) -> None:
        """Drop the lock (and the ``save_components`` folder's); a folder that :meth:`acquire` created and that
        holds nothing else is removed, so that a run refused before it started leaves nothing behind."""
        if self._components is not None:
            self._components.release()
            self._components = None
        if self._lock_file is not None:
            self._lock_file.close()  # closing drops the flock
            self._lock_file = None
            if self._created is not None and not self._entries():
                (self.path / LOCK).unlink(missing_ok=True)
                for folder in [self.path, *self.path.parents]:
                    try:
                        folder.rmdir()
                    except OSError:  # something else was written there meanwhile: keep it
                        break
                    if folder == self._created:
                        break

    def abandon_untrained(self, *logs: str) -> bool:
        """Undo the claim of a new run that failed before its first step: delete what :meth:`prepare` and an
        empty phase start wrote, so that the same command may run again. Anything else in the folder is kept.

        Args:
            logs: Folders of the run's own logs (the trackers'), deleted with it.

        Returns:
            Whether the folder was given up.
        """
        written = {CONFIG, MARKER, *logs}
        for entry in self._entries():
            if entry.name in written:
                continue
            files = [f for f in entry.rglob('*')] if entry.is_dir() else [entry]
            if any(f.name != 'metrics.csv' and f.is_file() or f.is_dir() for f in files) or any(
                    len(f.read_text().splitlines()) > 1 for f in files):
                return False  # a step was logged or checkpointed, or the folder holds something else
        for entry in self._entries():
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        return True

    def _entries(self) -> List[Path]:
        return [p for p in self.path.iterdir() if p.name != LOCK]

    def is_run(self) -> bool:
        try:
            return json.loads((self.path / MARKER).read_text()).get('timm_compat_run') == 1
        except (OSError, ValueError, AttributeError):
            return False

    def prepare(self, config: Dict[str, Any], resume: bool, overwrite: bool, finished: List[str],
                lengths: Optional[Dict[str, int]] = None, precision: Optional[str] = None) -> None:
        """Start, resume or overwrite the run in the (locked) folder, then record ``config``.

        Args:
            config: The run's config as a dict (``RunConfig.to_dict()``).
            resume: Continue the run in the folder.
            overwrite: Delete the run in the folder first.
            finished: Phases whose summary already exists (a resume may not extend them).
            lengths: Each phase's steps under ``config``, by phase; a resume may not start from a later checkpoint.
            precision: The precision the run trains in as resolved (``Accelerator.mixed_precision``), recorded in
                ``run.json``; a resume in another is refused unless the config's ``mixed_precision`` is ``auto``,
                or every phase of ``lengths`` finished (it trains nothing). None: not known, neither checked nor
                recorded.

        Raises:
            RunDirError: Before anything is deleted or written, when the request does not fit the folder.
        """
        entries, old, folder = self._entries(), None, config.get('save_components')
        if lengths and set(lengths) <= set(finished):
            precision = None  # a resume of a finished run trains nothing: its precision is neither checked nor kept
        if folder:  # checked now, or found when the run ends: the last steps' weights are never checkpointed
            check_writable_folder(folder, 'save_components')
        if resume:
            if not self.is_run():
                raise RunDirError(f'--resume: {self.path} holds no timm-compat run to resume. Drop --resume to start '
                                  f'one (in an empty folder or with --output-dir).')
            old = self._check_resume(config, finished)
            self._check_precision(config, precision)
            self._check_checkpoints(lengths or {}, finished)
        elif entries:
            if not self.is_run():
                raise RunDirError(f'{self.path} is not empty and holds no timm-compat run ({MARKER} is missing), so it '
                                  f'is never deleted, not even with --overwrite. Pass --output-dir for a new folder.')
            if not overwrite:
                raise RunDirError(f'{self.path} already holds a run. Pass --resume to continue it, --overwrite to '
                                  f'delete it, or --output-dir for a new folder.')
        # A resume finds its own components in the folder it saved to (--overwrite replaces the run's); one that
        # moves them elsewhere must not replace another run's there, as a new run must not.
        _check_component_folder(folder, overwrite or resume and self._saved_to(old) == _absolute(folder), resume)
        self._lock_components(folder)
        if entries and not resume:  # --overwrite, now that nothing is refused any more
            for entry in entries:
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        self._record(config, old, precision)

    def _check_precision(self, config: Dict[str, Any], precision: Optional[str]) -> None:
        """Refuse a resume in another precision than the run trained in, unless the config asks for ``auto``."""
        # mixed_precision null takes the precision from `accelerate launch`, which config.yaml does not show; a
        # run partly trained in each would be reported (summary.json) in the last one's. `auto` chooses by machine,
        # and a run resumed on another machine may continue in its choice (docs/training.md); run.json records it.
        trained = self._read_marker().get('mixed_precision')
        if None in (trained, precision) or trained == precision or config.get('mixed_precision') == 'auto':
            return  # a run from before run.json recorded it is taken to have trained in this one
        raise RunDirError(f'--resume: {self.path} trained in {trained!r} precision, this launch asks for '
                          f'{precision!r} (config mixed_precision: {config.get("mixed_precision")!r}, so `accelerate '
                          f'launch --mixed_precision`, ACCELERATE_MIXED_PRECISION or `accelerate config` decides); '
                          f'its results would be reported in {precision!r}. Resume with `accelerate launch '
                          f'--mixed_precision {trained} train.py ...`, or start a new run (--output-dir).')

    def _saved_to(self, old: Optional[Dict[str, Any]]) -> Optional[str]:
        """The absolute ``save_components`` folder of the run being resumed (its config's ``old``), or None."""
        # run.json records it absolute (a relative one resumed from elsewhere names another folder); a run started
        # before it did falls back to its config's, taken from here.
        marker = self._read_marker()
        return marker['save_components'] if 'save_components' in marker else _absolute((old or {}).get(
            'save_components'))

    def _lock_components(self, folder: Optional[str]) -> None:
        """Hold ``folder`` while the run lives, so that no other live run saves components there."""
        if self._components is not None:  # prepare() again on this claim: its own lock would refuse it
            self._components.release()
            self._components = None
        # Inside the run folder it is the run's own; locking it would put a file in what --overwrite deletes and
        # keep a run that failed before its first step from being given up.
        if folder and self.path.resolve() not in [(p := Path(folder).resolve()), *p.parents]:
            self._components = _ComponentFolder(Path(folder)).acquire()

    def _check_resume(self, config: Dict[str, Any], finished: List[str]) -> Dict[str, Any]:
        """The run's recorded config, once ``config`` is known to be a resume it may take."""
        try:
            old = yaml.safe_load((self.path / CONFIG).read_text())
        except (OSError, yaml.YAMLError) as e:
            raise RunDirError(f'--resume: cannot read {self.path / CONFIG} ({e}); the run cannot be checked.') from e
        if not isinstance(old, dict):  # emptied (a full disk, a hand edit): the comparison below needs a mapping
            found = 'is empty' if old is None else f'holds a {type(old).__name__}'
            raise RunDirError(f'--resume: {self.path / CONFIG} holds no config (a YAML mapping): it {found}, so the '
                              f'run cannot be checked. Restore it (a finished run\'s summary.json holds it under '
                              f'"config"), or start a new run (--output-dir).')
        version = self._read_marker().get('data_version', 1)
        if version != DATA_VERSION:
            raise RunDirError(f'--resume: {self.path} was trained on data version {version}, this code makes '
                              f'version {DATA_VERSION} (timm_compat.data.DATA_VERSION says what changed); a resume '
                              f'would train on both. Start a new run (--output-dir), or resume with the code that '
                              f'started it.')
        changes = config_changes(old, config)
        refused = [k for k in resume_conflicts(old, config) if not _moved_data(old, config, k)]
        if refused:
            lines = '\n'.join(f'  {k}: {_at(old, k)!r} -> {_at(config, k)!r}' for k in refused)
            raise RunDirError(f'--resume with a config that differs from the run\'s in what was trained:\n{lines}\n'
                              f'A resume may change only '
                              f'{", ".join(sorted(RESUME_MAY_CHANGE | RESUME_MAY_SWITCH_KERNELS))}. Start a new run '
                              f'(--output-dir) to change the rest.')
        extended = [k for k in changes if k in ('steps', 'epochs')]
        if extended and finished:
            raise RunDirError(f'--resume changes {extended}, but phase(s) {finished} already finished; a finished '
                              f'phase is not extended. Start a new run (--output-dir) with the longer budget.')
        return old

    def _check_checkpoints(self, lengths: Dict[str, int], finished: List[str]) -> None:
        """Refuse, before the record is rewritten, a resume whose shortened ``steps``/``epochs`` end before a
        phase's newest checkpoint: it would train nothing and report a later step's weights as the last step's."""
        for tag, steps in lengths.items():
            last = None if tag in finished else latest_checkpoint(self.path / tag / 'checkpoints')
            if last is not None and (step := load_train_state(last).step) > steps:
                raise RunDirError(f'--resume: [{tag}] the newest checkpoint, {last}, is at step {step}, past the '
                                  f'{steps} steps the config now asks for: set steps (or epochs) to at least {step} '
                                  f'to resume it, or start a new run (--output-dir). Nothing in the folder changed.')

    def _record(self, config: Dict[str, Any], old: Optional[Dict[str, Any]], precision: Optional[str]) -> None:
        """Write ``config`` and the marker; ``old`` is the config a resume continues (None for a new run), and
        ``precision`` the one the run now trains in (kept as it was if None)."""
        resume = old is not None
        marker = self._read_marker() if resume else {
            'timm_compat_run': 1, 'created': time.time(), 'resumes': [], 'data_version': DATA_VERSION}
        marker['save_components'] = _absolute(config.get('save_components'))
        if resume:
            entry = {'time': time.time(),
                     'changes': {k: [_at(old, k), _at(config, k)] for k in config_changes(old, config)}}
            if precision is not None and marker.get('mixed_precision', precision) != precision:  # `auto` only
                entry['mixed_precision'] = [marker['mixed_precision'], precision]
            marker['resumes'].append(entry)
        if precision is not None:
            marker['mixed_precision'] = precision  # the precision it trains in from now on
        atomic_write_text(self.path / CONFIG, yaml.safe_dump(config, sort_keys=False))
        atomic_write_text(self.path / MARKER, json.dumps(marker, indent=2))

    def _read_marker(self) -> Dict[str, Any]:
        return json.loads((self.path / MARKER).read_text())


class _ComponentFolder(RunDir):
    """The ``save_components`` folder of a live run: locked as a run folder is, with its own message."""
    KEY = 'save_components'

    def _busy(self, holder: str) -> str:
        return (f'save_components: {self.path} is where a live run (pid {holder}) saves its components; the one of '
                f'the two runs that ends last would replace the other\'s. Choose another folder, or wait for that run '
                f'to end.')


def _absolute(folder: Optional[str]) -> Optional[str]:
    return os.path.abspath(folder) if folder else None


def _moved_data(old: Dict[str, Any], new: Dict[str, Any], dotted: str) -> bool:
    """A dataset source that differs only because ``data_dir`` (filled into it) moved: the same data.

    Runs from before Hub-id sources read their local copy by path (``parquet:DATA/cifar10``); the same folder
    named as the Hub id's local copy (``uoft-cs/cifar10`` with ``data_dir`` DATA) is the same data too.
    """
    if not dotted.endswith('.dataset.source') or not old.get('data_dir') or not new.get('data_dir'):
        return False
    before, after = _at(old, dotted), _at(new, dotted)
    if not isinstance(before, str) or not isinstance(after, str):
        return False
    # No splits to check: whether the copy is there is load_task_data's question, asked before the run starts.
    read = local_source(after, new['data_dir'], splits=())
    moved = _local_path(before, old['data_dir'], new['data_dir'])
    return (moved is not None and moved == _local_path(after)
            or _parquet_folder(before) is not None and _parquet_folder(before) == _parquet_folder(read))


def _local_path(source: str, old_dir: Optional[str] = None, new_dir: Optional[str] = None) -> Optional[str]:
    """A ``parquet:`` or ``imagefolder:`` source with its path normalised, and its leading folder ``old_dir``, if
    given, replaced by ``new_dir``; None for another source, or one whose path is not below ``old_dir``.

    Only the leading folders of the path: ``data_dir`` filled in ``{data_dir}/...``, not any text that spells it
    (``old`` in ``imagefolder:``, ``/data`` in ``/database``).
    """
    prefix = next((p for p in ('parquet:', 'imagefolder:') if source.startswith(p)), None)
    if prefix is None:
        return None
    path = os.path.normpath(source[len(prefix):])
    if old_dir is not None:
        parts, old = PurePath(path).parts, PurePath(os.path.normpath(old_dir)).parts
        if parts[:len(old)] != old:
            return None
        path = os.path.normpath(os.path.join(new_dir, *parts[len(old):]))
    return prefix + path


def _parquet_folder(source: str) -> Optional[str]:
    """The folder a ``parquet:`` source reads, normalised (``DATA/cifar10/`` and ``DATA/cifar10`` are one)."""
    return os.path.normpath(source[len('parquet:'):]) if source.startswith('parquet:') else None


def _at(tree: Any, dotted: str) -> Optional[Any]:
    for key in dotted.split('.'):
        try:
            tree = tree[int(key)] if isinstance(tree, list) else tree[key]
        except (KeyError, IndexError, ValueError, TypeError):
            return None
    return tree
