""".ci/run's time budget for the slow suite (conftest.py's ``TIMM_COMPAT_TEST_DEADLINE``): tests that would start
after it are skipped with their reason, those before it run as usual."""
import os
import subprocess
import sys
import time

from tests.conftest import REPO

TEST = 'tests/test_hardware.py::test_the_machine_line_tells_apart_cpus_that_share_a_model_name'


def run_with_deadline(deadline: float) -> str:
    env = dict(os.environ, TIMM_COMPAT_TEST_DEADLINE=str(deadline))
    return subprocess.run([sys.executable, '-m', 'pytest', '-q', '-rs', '-p', 'no:cacheprovider', TEST], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300).stdout


def test_a_test_past_the_deadline_is_skipped_with_its_reason_and_one_before_it_runs():
    past = run_with_deadline(time.time() - 1)
    assert '1 skipped' in past and 'out of CI time: TIMM_COMPAT_TEST_DEADLINE has passed' in past
    assert '1 passed' in run_with_deadline(time.time() + 3600)
