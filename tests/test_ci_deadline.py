""".ci/run's time budget for the slow suite (conftest.py's ``TIMM_COMPAT_TEST_DEADLINE``): tests that would start
after it are skipped with their reason, those before it run as usual."""
import os
import subprocess
import sys
import time

import pytest

from tests import conftest

TEST = 'tests/test_hardware.py::test_the_machine_line_tells_apart_cpus_that_share_a_model_name'


@pytest.mark.slow  # a pytest subprocess importing torch: about 10 s
def test_pytest_skips_a_test_past_the_deadline_and_says_why():
    env = dict(os.environ, TIMM_COMPAT_TEST_DEADLINE=str(time.time() - 1))
    out = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-rs', '-p', 'no:cacheprovider', TEST],
                         cwd=conftest.REPO, env=env, capture_output=True, text=True, timeout=300).stdout
    assert '1 skipped' in out and 'out of CI time: TIMM_COMPAT_TEST_DEADLINE has passed' in out


def test_a_test_before_the_deadline_or_without_one_runs(monkeypatch):
    monkeypatch.setenv('TIMM_COMPAT_TEST_DEADLINE', str(time.time() + 3600))
    assert conftest.pytest_runtest_setup(None) is None
    monkeypatch.delenv('TIMM_COMPAT_TEST_DEADLINE')
    assert conftest.pytest_runtest_setup(None) is None
