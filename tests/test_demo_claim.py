"""The paper's central claim on the offline demo: compatible components recombine, independent ones do not."""
import pytest

import train

# The whole demo: about 3-4 minutes on an idle 2-core machine, far longer on a busy one.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400), pytest.mark.usefixtures('fresh_accelerate')]


def off_diagonal_mean(matrix):
    n = len(matrix)
    return sum(matrix[i][j] for i in range(n) for j in range(n) if i != j) / (n * (n - 1))


def test_demo_compatible_pair_recombines_far_above_the_independent_pair(tmp_path):
    summary = train.main(['--output-dir', str(tmp_path / 'demo')])  # exactly the demo: `accelerate launch train.py`
    main, independent = (summary['phases'][k] for k in ('main', 'independent'))
    compatible, baseline = (off_diagonal_mean(p['recombination_matrix']) for p in (main, independent))
    assert compatible >= baseline + 0.25, (compatible, baseline)
    # With no loss of own accuracy (Sec. 4): within 5 points of the independent networks, all classes.
    for name in main['own_accuracy']:
        assert main['own_accuracy'][name] >= independent['own_accuracy'][name] - 0.05
