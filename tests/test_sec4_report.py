"""The Sec. 4 report (recipes/sec4_report.py and the records recipes/sec4_methods.py writes): own-accuracy pairing,
pooled machines, spreads, Fig. 3's ordering check and the upper bound's pair measures, from records alone."""
import pytest


def test_sec4_own_accuracy_cost_pairs_each_method_with_the_independent_run_of_its_seed(import_script):
    sec4_report = import_script('recipes', 'sec4_report')
    from scipy.stats import ttest_rel

    def runs(own_by_seed):
        return [{'seed': s, 'own': {'batch': v, 'running': v}} for s, v in own_by_seed.items()]

    # Seeds listed out of order: pairing by position instead of by seed would give other differences.
    results = {'independent': runs({0: 80.0, 1: 82.0, 2: 84.0}), 'iiw_rp_dcc': runs({2: 84.5, 0: 81.0, 1: 82.0}),
               'rp': runs({1: 80.0}), 'control': runs({0: 86.0, 1: 86.0})}
    rows = {row[0]: row for row in sec4_report.own_accuracy_cost(results)}
    # Independent is the baseline, not a row; the control's network b learns another task: nothing to pair.
    assert set(rows) == {'IIW+RP+DCC', 'RP'}
    _, own, independent, diff, p = rows['IIW+RP+DCC']
    assert (own, independent) == (pytest.approx(82.5), pytest.approx(82.0))
    assert diff == '+0.5 ± 0.5' and p == f'{ttest_rel([81.0, 82.0, 84.5], [80.0, 82.0, 84.0]).pvalue:.2g}'
    assert rows['RP'][3:] == ['-2.0', '–']  # one seed: no spread to show or test
    assert sec4_report.own_accuracy_cost({'rp': runs({0: 1.0})}) == []
    # A small but steady cost (like the Sec. 4 records' IIW+RP+DCC, p = 0.004) printed as p = 0.00.
    steady = {'independent': runs({0: 83.79, 1: 83.5, 2: 83.5}), 'iiw_rp_dcc': runs({0: 83.39, 1: 83.18, 2: 83.12})}
    assert float(sec4_report.own_accuracy_cost(steady)[0][4]) == pytest.approx(0.0043, abs=5e-5)


def test_sec4_report_marks_the_methods_whose_seeds_trained_on_different_machines(import_script):
    """DCC's seed 3 trained in fp32 on a Xeon without AMX, seeds 0-2 in bf16 on an AMX Xeon, and the report pooled
    them without a word: the table now marks such rows and says which seeds ran where."""
    sec4_report = import_script('recipes', 'sec4_report')
    amx, plain = 'Xeon (model 167, amx_bf16)', 'Xeon (model 207, avx512_bf16), in fp32'
    results = {'dcc': [{'seed': s, 'machine': amx if s < 3 else plain} for s in range(4)],
               'iiw': [{'seed': s, 'machine': amx} for s in range(3)]}
    note = sec4_report.mixed_machines(results)
    assert note.startswith('† ') and f'DCC: seeds 0, 1, 2 on {amx}; seed 3 on {plain}' in note
    assert 'IIW' not in note and sec4_report.mixed_machines({'iiw': results['iiw']}) == ''


def test_sec4_report_table_marks_pooled_machines_and_names_the_upper_bound_only_with_its_row(import_script,
                                                                                              tmp_path):
    sec4_report = import_script('recipes', 'sec4_report')

    def run(seed, machine):
        cell = {'batch': 50.0 + seed, 'running': 40.0}
        return {'seed': seed, 'recombination': cell, 'own': cell, 'train_seconds': 60.0, 'machine': machine,
                'matrix': {bn: [[0.8, 0.5], [0.5, 0.8]] for bn in ('batch', 'running')}}

    results = {'iiw': [run(0, 'm1'), run(1, 'm1')], 'dcc': [run(0, 'm1'), run(1, 'm2, in fp32')]}
    sec4_report.write_report(tmp_path, 'cifar10_halves', 'pretrained', 'setup', results)
    report = (tmp_path / 'report.md').read_text()
    assert '| DCC † |' in report and '| IIW |' in report and 'DCC: seed 0 on m1; seed 1 on m2, in fp32' in report
    # Fig. 2 right has no upper-bound row: its caption cited the paper's 85.6 % all the same.
    assert 'Upper bound: each network' not in report
    sec4_report.write_report(tmp_path, 'cifar10_halves', 'random', 'setup', {**results, 'upper_bound': results['iiw']})
    assert 'Upper bound: each network' in (tmp_path / 'report.md').read_text()


def test_reports_show_a_spread_only_where_there_are_seeds_to_spread(import_script):
    common = import_script('recipes', 'common')
    assert common.mean_std([70.0, 74.0, 72.0]) == '72.0 ± 2.0'
    assert common.mean_std([83.64]) == '83.6'  # one seed: its spread is unknown, not ± 0.0
    assert common.mean_std([-0.5, 1.5], signed=True) == '+0.5 ± 1.4' and common.mean_std([-2.0], signed=True) == '-2.0'
    assert common.mean_std([]) == '–'
    sec4_report = import_script('recipes', 'sec4_report')
    runs = {m: [{'recombination': {'batch': v}}] for m, v in [('iiw', 25.5), ('independent', 10.5),
                                                               ('upper_bound', 83.6)]}
    assert sec4_report.orderings(runs, sec4_report.PAPER) == (
        'Measured ordering (BN=batch): Independent < IIW. Paper ordering: Independent < IIW.')
    del runs['iiw']  # one method and the upper bound: nothing to order
    assert sec4_report.orderings(runs, sec4_report.PAPER) == ''


def test_sec4_names_the_methods_that_correlation_and_recombination_order_oppositely(import_script):
    sec4_report = import_script('recipes', 'sec4_report')
    # The paper's Fig. 3 numbers: RP correlates more than DCC but recombines worse; IIW+RP+DCC leads both.
    points = {'rp': (0.38, 50.1), 'dcc': (0.19, 65.8), 'iiw_rp_dcc': (0.6, 76.7)}
    assert sec4_report.correlation_vs_recombination(points) == (
        'Ordered oppositely by correlation and by recombination accuracy: RP (0.38, 50.1 %) and DCC (0.19, 65.8 %).')
    assert 'alike' in sec4_report.correlation_vs_recombination({'rp': (0.1, 50.0), 'dcc': (0.2, 60.0)})


def test_sec4_matrix_figures_name_the_seed_they_draw(import_script, tmp_path):
    """A method whose table holds seeds 2 and 3 only (seed 0 trained under another --output) draws seed 2's matrix,
    and says so."""
    sec4_report = import_script('recipes', 'sec4_report')
    matrix = [[0.8, 0.3], [0.2, 0.7]]
    runs = [{'seed': s, 'matrix': {'batch': matrix, 'running': matrix}, 'networks': ['a', 'b']} for s in (2, 3)]
    (tmp_path / 'figures').mkdir()
    captions = [f.caption for f in sec4_report.method_figures(tmp_path, 'iiw', runs)]
    assert captions == [f'IIW, seed 2: recombination accuracy (%), BN {bn} statistics' for bn in ('batch', 'running')]


def test_sec4_upper_bound_sides_start_from_the_weights_of_an_independent_pair(import_script, tmp_path):
    """Each side of the upper bound trains alone as its run's network 0, so both drew init seed ``seed + 1000``:
    the two "independent" networks started from identical weights, and their matrix and correlation were an IIW
    pair's. Side b now starts where network b of a non-IIW joint run does."""
    import argparse
    from timm_compat.config import load_config
    from timm_compat.methods.iiw import init_seed
    sec4 = import_script('recipes', 'sec4_methods')
    args = argparse.Namespace(budget='cpu', setting='cifar10_halves', epochs=None, init='random')
    for seed in (0, 3):
        (a, _, sets_a), (b, _, sets_b) = sec4.method_runs('upper_bound', seed, args, tmp_path)
        seeds = [init_seed(load_config(str(path), sets).init_seed, 0, False)  # each side is its run's network 0
                 for path, sets in ((a, sets_a), (b, sets_b))]
        assert seeds == [init_seed(seed, i, False) for i in (0, 1)]


def test_sec4_report_leaves_out_the_pair_measures_of_upper_bounds_from_identical_weights(import_script, tmp_path):
    """Upper-bound records from before the sides started apart keep their own accuracy; their matrix and
    correlation, an IIW pair's, are not shown as an independent pair's."""
    sec4_report = import_script('recipes', 'sec4_report')
    matrix = [[0.8, 0.6], [0.6, 0.8]]
    old = {'seed': 0, 'matrix': {'batch': matrix, 'running': matrix}, 'networks': ['a', 'b'],
           'recombination': {'batch': 80.0, 'running': 80.0}, 'correlation': {'direct': 0.5, 'permuted': 0.6,
                                                                               'cka': 0.7, 'kind': 'permuted'}}
    new = {**old, 'seed': 1, 'distinct_init': True, 'correlation': {'direct': 0.0, 'permuted': 0.2, 'cka': 0.3,
                                                                     'kind': 'permuted'}}
    (tmp_path / 'figures').mkdir()
    captions = [f.caption for f in sec4_report.method_figures(tmp_path, 'upper_bound', [old, new])]
    assert captions and all('seed 1' in c for c in captions)
    assert sec4_report.method_figures(tmp_path, 'upper_bound', [old]) == []
    assert sec4_report.method_figures(tmp_path, 'iiw', [old])  # other methods' records need no marker
    (tmp_path / 'figures' / 'correlation_upper_bound.png').write_bytes(b'')
    table, *blocks = sec4_report.correlation_section(tmp_path, {'upper_bound': [old, new]})
    assert table.rows == [['Upper bound', '0.00', '0.20', '0.30', 1]] and blocks == []


def test_sec4_upper_bound_records_say_their_sides_started_apart(import_script):
    sec4 = import_script('recipes', 'sec4_methods')
    m = [[0.8, 0.2], [0.3, 0.7]]
    summary = {'recombination_matrix': m, 'recombination_matrix_running': m, 'own_accuracy': {'a': 0.8, 'b': 0.7},
               'own_accuracy_running': {'a': 0.8, 'b': 0.7}}
    assert sec4.run_record(summary, upper_bound=True)['distinct_init'] is True
    assert sec4.run_record(summary, upper_bound=True)['recombination']['batch'] == pytest.approx(75.0)
    assert 'distinct_init' not in sec4.run_record(summary)
