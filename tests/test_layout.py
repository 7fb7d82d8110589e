"""The shape the code keeps (docs/architecture.md): a thin train.py, small functions, no path hacks."""
import ast
import re

import pytest

from tests.conftest import REPO

LIBRARY = sorted((REPO / 'timm_compat').rglob('*.py'))
SCRIPTS = [REPO / 'train.py', *sorted((REPO / 'recipes').glob('*.py')), *sorted((REPO / 'benchmarks').glob('*.py')),
           *sorted((REPO / 'tests').rglob('*.py'))]


def _functions(path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node.name, node.end_lineno - node.lineno + 1


def test_train_py_reads_in_one_sitting():
    assert len((REPO / 'train.py').read_text().splitlines()) < 150


@pytest.mark.parametrize('path', LIBRARY, ids=lambda p: str(p.relative_to(REPO)))
def test_library_modules_and_functions_stay_small(path):
    assert len(path.read_text().splitlines()) <= 400
    long = [(name, n) for name, n in _functions(path) if n > 60]
    assert not long, f'functions over 60 lines: {long}'


def test_nothing_edits_sys_path():
    # Library code is imported as the installed package; scripts import their siblings from their own folder.
    edits = re.compile(r'sys\.path\.(insert|append|extend)|sys\.path\s*[+]?=|site\.addsitedir')
    offenders = [str(p.relative_to(REPO)) for p in LIBRARY + SCRIPTS
                 if p.name != 'test_layout.py' and edits.search(p.read_text())]
    assert not offenders


def test_nothing_imports_train_but_its_tests():
    imports = re.compile(r'^\s*(import train\b|from train import)', re.M)
    offenders = [str(p.relative_to(REPO)) for p in LIBRARY + SCRIPTS
                 if imports.search(p.read_text()) and not p.name.startswith('test_')]
    assert not offenders
