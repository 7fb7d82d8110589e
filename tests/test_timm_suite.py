"""timm's own model tests, unmodified, at the installed timm version, against the models this project registers.

timm's ``tests/test_models.py`` is the contract a timm model meets (default cfgs, forward/backward, TorchScript, fx,
``features_only``, ``forward_intermediates``, pruning, gradient checkpointing). This test gets that file for the
installed timm version, in this order:

1. ``TIMM_SDIST``: a ``timm-<version>.tar.gz`` sdist, or a folder holding timm's ``tests/`` and ``timm/version.py``
   (an unpacked sdist, or a checkout of github.com/huggingface/pytorch-image-models at ``v<version>``);
2. pytest's cache folder (``.pytest_cache/d/timm_sdist``), filled by an earlier download;
3. ``pip download timm==<version> --no-binary :all: --no-deps`` from the package registry.

Without the registry and without ``TIMM_SDIST`` it fails (never skips) and says how to provide the sdist. timm's
``tests/`` and ``pyproject.toml`` (its pytest markers) are copied to a temporary folder with
``tests/timm_suite/timm_conftest.py`` as ``conftest.py`` (it imports timm_compat first; see its docstring), and
``python -m pytest tests/test_models.py -k cifar`` runs there in a subprocess, as timm runs its tests. The run must
pass with no failure and cover every model the project registers. By hand, in that folder::

    python -m pytest tests/test_models.py -k cifar
"""
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Set

import pytest
import timm

import timm_compat  # noqa: F401  (registers the models)

HERE = Path(__file__).resolve().parent
# The tests every timm model runs; each must have run for each of the project's models.
CORE_TESTS = (
    'test_model_default_cfgs', 'test_model_forward', 'test_model_backward', 'test_model_forward_torchscript',
    'test_model_forward_features', 'test_model_forward_intermediates', 'test_model_forward_intermediates_features',
)


def _how_to_provide(version: str) -> str:
    return (
        f'Provide timm {version}\'s sdist: on a machine with the package registry run\n'
        f'    pip download timm=={version} --no-binary :all: --no-deps -d DIR\n'
        f'and set TIMM_SDIST=DIR/timm-{version}.tar.gz (or TIMM_SDIST=a checkout of '
        f'github.com/huggingface/pytorch-image-models at tag v{version}).')


def _version_of(text: str) -> str:
    """``__version__`` from the text of timm's ``timm/version.py``."""
    match = re.search(r'''__version__\s*=\s*['"]([^'"]+)['"]''', text)
    return match.group(1) if match else '?'


def _download_sdist(version: str, cache: Path) -> Path:
    """The sdist of ``timm==version``, from ``cache`` or the package registry (kept in ``cache``)."""
    sdist = cache / f'timm-{version}.tar.gz'
    if sdist.is_file():
        return sdist
    cmd = [sys.executable, '-m', 'pip', 'download', f'timm=={version}', '--no-binary', ':all:', '--no-deps',
           '--disable-pip-version-check', '--retries', '1', '--timeout', '30', '-d', str(cache)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        pytest.fail(f'`{" ".join(cmd)}` did not finish in 10 minutes.\n{_how_to_provide(version)}')
    if done.returncode != 0 or not sdist.is_file():
        pytest.fail(f'Could not download timm {version}\'s sdist (TIMM_SDIST is not set):\n'
                    f'{(done.stdout + done.stderr)[-2000:]}\n{_how_to_provide(version)}')
    return sdist


def _unpack(source: Path, version: str, dest: Path) -> Path:
    """Copy timm's ``tests/`` and ``pyproject.toml`` (not its ``timm/`` sources) from an sdist or folder to ``dest``.

    The installed timm is the one under test, so timm's sources stay out of the folder pytest runs in (its rootdir
    would otherwise shadow the installed package).
    """
    if source.is_dir():
        found = _version_of((source / 'timm' / 'version.py').read_text()) \
            if (source / 'timm' / 'version.py').is_file() else '?'
        if found != version:
            pytest.fail(f'TIMM_SDIST={source} holds timm {found}, the installed timm is {version}.\n'
                        f'{_how_to_provide(version)}')
        if (source / 'tests').is_dir():
            shutil.copytree(source / 'tests', dest / 'tests')
        if (source / 'pyproject.toml').is_file():
            shutil.copy2(source / 'pyproject.toml', dest / 'pyproject.toml')
        return dest
    with tarfile.open(source) as tar:
        top = tar.getnames()[0].split('/')[0]
        try:
            found = _version_of(tar.extractfile(f'{top}/timm/version.py').read().decode())
        except (KeyError, AttributeError):  # no such member, or not a regular file
            found = '?'
        if found != version:
            pytest.fail(f'{source} holds timm {found}, the installed timm is {version}.\n{_how_to_provide(version)}')
        wanted = [m for m in tar.getmembers()
                  if m.name == f'{top}/pyproject.toml' or m.name.startswith(f'{top}/tests/')]
        extra = {'filter': 'data'} if hasattr(tarfile, 'data_filter') else {}  # no links or paths out of dest
        tar.extractall(dest, members=wanted, **extra)
    return dest / top


def _timm_tests(request, tmp_path: Path) -> Path:
    """A folder with timm's tests for the installed timm and the project's conftest, ready to run pytest in."""
    version = timm.__version__
    given = os.environ.get('TIMM_SDIST')
    if given:
        source = Path(given).expanduser()
        if not source.exists():
            pytest.fail(f'TIMM_SDIST={given} does not exist.\n{_how_to_provide(version)}')
    else:
        # pytest's cache keeps the download between runs; without the cacheprovider plugin, this run's tmp_path.
        cache = getattr(request.config, 'cache', None)
        cache = cache.mkdir('timm_sdist') if cache is not None else tmp_path / 'sdist'
        cache.mkdir(parents=True, exist_ok=True)
        source = _download_sdist(version, Path(cache))
    root = _unpack(source, version, tmp_path / 'timm')
    if not (root / 'tests' / 'test_models.py').is_file():
        pytest.fail(f'{source} has no tests/test_models.py.\n{_how_to_provide(version)}')
    shutil.copy2(HERE / 'timm_suite' / 'timm_conftest.py', root / 'conftest.py')
    return root


def _project_models() -> Set[str]:
    return {n for n in timm.list_models() if timm.models.model_entrypoint(n).__module__.startswith('timm_compat.models.')}


def _results(report: Path) -> Dict[str, Dict[str, List[str]]]:
    """Outcome ('passed', 'failed', 'error', 'skipped') -> test function -> the parameter ids, from a JUnit report."""
    results: Dict[str, Dict[str, List[str]]] = defaultdict(lambda: defaultdict(list))
    for case in ET.parse(report).getroot().iter('testcase'):
        outcome = next((c.tag for c in case if c.tag in ('failure', 'error', 'skipped')), 'passed')
        name, _, params = case.get('name').partition('[')
        results[outcome.replace('failure', 'failed')][name].append(params.rstrip(']'))
    return results


def _models_in(params: List[str]) -> Set[str]:
    """Model names in parameter ids such as ``1-resnet56_cifar.untrained`` (pretrained tags dropped)."""
    return {p.split('.')[0] for ids in params for p in ids.split('-')}


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_timm_model_tests_pass_for_every_registered_model(request, tmp_path):
    root = _timm_tests(request, tmp_path)
    report = tmp_path / 'report.xml'
    cmd = [sys.executable, '-m', 'pytest', 'tests/test_models.py', '-k', 'cifar', '-q', '-rfE',
           '-p', 'no:cacheprovider', f'--junitxml={report}']
    env = {k: v for k, v in os.environ.items() if k != 'PYTEST_ADDOPTS'}  # timm's run, not this run's options
    start = time.monotonic()
    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=3300)
    output = done.stdout + done.stderr
    summary = output.strip().splitlines()[-1] if output.strip() else '(no output)'
    print(f'timm {timm.__version__} tests/test_models.py -k cifar: {summary} '
          f'(wall {time.monotonic() - start:.0f} s, in {root})')
    assert done.returncode == 0 and report.is_file(), f'timm\'s model tests failed:\n{output[-20000:]}'
    results = _results(report)
    assert not results['failed'] and not results['error'], output[-20000:]
    passed = sum(len(p) for p in results['passed'].values())
    assert passed > 0, output[-5000:]
    missing = {test: sorted(_project_models() - _models_in(results['passed'].get(test, [])))
               for test in CORE_TESTS}
    assert not any(missing.values()), f'project models that timm\'s core tests did not run: {missing}\n{summary}'
