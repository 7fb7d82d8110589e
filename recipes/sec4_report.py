"""The report of recipes/sec4_methods.py, from its records alone: Fig. 2's table and bars, the recombination
matrices, the own-accuracy check and Fig. 3's feature correlation, each beside the paper's numbers."""
import statistics
from pathlib import Path

from timm_compat.deployment import BN_MODES

from common import mean_std

ALL_METHODS = ['independent', 'iiw', 'rp', 'dcc', 'iiw_rp_dcc', 'incremental', 'control', 'upper_bound', 'iiw_dcc']
# Fig. 2 (random initialisation) and the text of Sec. 4: recombination accuracy in %.
PAPER = {'independent': 10.6, 'iiw': 25.1, 'rp': 50.1, 'dcc': 65.8, 'iiw_rp_dcc': 76.7, 'incremental': 72.7,
         'upper_bound': 85.6}
# Fig. 2 right (ILSVRC-12 rotation pre-training) and its text, recombination accuracy in %.
PAPER_PRETRAINED = {'iiw': 74.3, 'iiw_dcc': 82.7, 'rp': 19.7, 'dcc': 52.3}

LABELS = {'independent': 'Independent', 'iiw': 'IIW', 'rp': 'RP', 'dcc': 'DCC', 'iiw_dcc': 'IIW+DCC',
          'iiw_rp_dcc': 'IIW+RP+DCC', 'upper_bound': 'Upper bound',
          'incremental': 'Incremental (IIW+RP+DCC)', 'control': 'Control: both tasks CIFAR-10, IIW+RP'}


def correlation_vs_recombination(points: dict) -> str:
    """Fig. 3's point, that more feature correlation does not mean more recombination accuracy, checked: the pairs of
    methods ``{method: (correlation, recombination %)}`` that the two order oppositely."""
    names = list(points)
    flipped = [f'{LABELS[a]} ({points[a][0]:.2f}, {points[a][1]:.1f} %) and {LABELS[b]} ({points[b][0]:.2f}, '
               f'{points[b][1]:.1f} %)' for i, a in enumerate(names) for b in names[i + 1:]
               if (points[a][0] - points[b][0]) * (points[a][1] - points[b][1]) < 0]
    if not flipped:
        return 'Here correlation and recombination accuracy order the methods alike.'
    return 'Ordered oppositely by correlation and by recombination accuracy: ' + '; '.join(flipped) + '.'


def own_accuracy_cost(results: dict, bn: str = 'batch') -> list:
    """Does compatibility cost own accuracy (paper: 86.3 % against its upper bound's 85.6 %)? Each method's own
    accuracy against the independent networks' of the same seeds: ``[method, own, independent, difference
    mean ± std, paired t-test p]`` (p from ``scipy.stats.ttest_rel``; '–' with fewer than two common seeds)."""
    from scipy.stats import ttest_rel
    if 'independent' not in results:
        return []
    base = {r['seed']: r['own'][bn] for r in results['independent']}
    rows = []
    for method, runs in results.items():
        # The control's network b learns another task (clean images, ten classes): no cost of compatibility to pair.
        pairs = [(r['own'][bn], base[r['seed']]) for r in runs
                 if r['seed'] in base and method not in ('independent', 'control')]
        if not pairs:
            continue
        own, independent = zip(*pairs)
        p = ttest_rel(own, independent).pvalue if len(pairs) > 1 else float('nan')  # nan: no spread to test
        rows.append([LABELS[method], statistics.mean(own), statistics.mean(independent),
                     mean_std([a - b for a, b in pairs], signed=True), '–' if p != p else f'{p:.2g}'])
    return rows


def machine_mark(runs: list) -> str:
    """' †' for a row whose seeds trained on different machine lines (:func:`mixed_machines` says which), else ''."""
    return ' †' if len({r.get('machine') for r in runs}) > 1 else ''


def mixed_machines(results: dict, labels: dict = LABELS) -> str:
    """Which seeds of each method trained where, for the methods whose seeds' machine lines differ (another CPU, or
    the precision ``mixed_precision: auto`` chose there): their means pool them, so the table marks them with †."""
    notes = []
    for method, runs in results.items():
        seeds = {}
        for r in runs:
            seeds.setdefault(r.get('machine', 'a machine not recorded'), []).append(str(r['seed']))
        if len(seeds) > 1:
            notes.append(f'{labels[method]}: ' + '; '.join(f'seed{"s" * (len(s) > 1)} {", ".join(s)} on {m}'
                                                             for m, s in seeds.items()))
    if not notes:
        return ''
    return ('† Seeds trained on different machines (a line without a precision is from before records kept it), '
            'pooled in the mean and in the training time: ' + ' | '.join(notes) + '. ')


def comparable(method: str, record: dict) -> bool:
    """Whether a record's matrix and correlation describe its method's pair: upper-bound sides recorded before
    2026-12-05 (no ``distinct_init``) started from identical weights, an IIW pair's; their own accuracy stands."""
    return method != 'upper_bound' or bool(record.get('distinct_init'))


def method_figures(out: Path, method: str, runs: list) -> list:
    """The recombination matrix of ``method``'s first recorded seed under each BN mode (from its record)."""
    import torch
    from timm_compat.plots import ReportFigure, plot_recombination_matrix
    runs = [r for r in runs if comparable(method, r)]
    if not runs:
        return []
    first = runs[0]  # the records are in seed order
    names = first.get('networks', ['a', 'b'])  # records before the names were kept: the configs' a and b
    return [ReportFigure(plot_recombination_matrix(torch.tensor(first['matrix'][bn]), names,
                                                   out / 'figures' / f'{method}_{bn}.png',
                                                   title=f'{LABELS[method]} (seed {first["seed"]}, BN={bn})'),
                         f'{LABELS[method]}, seed {first["seed"]}: recombination accuracy (%), BN {bn} statistics')
            for bn in BN_MODES]


def correlation_section(out: Path, results: dict) -> list:
    """Fig. 3's table (mean ± std over the seeds whose records have it), its check and the seed-0 blocks drawn."""
    from timm_compat.plots import ReportFigure, ReportTable
    rows, points = [], {}
    for method, runs in results.items():
        measured = [r['correlation'] for r in runs if 'correlation' in r and comparable(method, r)]
        if not measured:
            continue
        rows.append([LABELS[method], *(mean_std([c[k] for c in measured if c[k] is not None], digits=2)
                                       for k in ('direct', 'permuted', 'cka')), len(measured)])
        if method not in ('control', 'upper_bound'):  # the correlation its block shows, recombination (batch)
            points[method] = (statistics.mean(c[c['kind']] for c in measured),
                              statistics.mean(r['recombination']['batch'] for r in runs))
    blocks = [ReportFigure(out / 'figures' / f'correlation_{m}.png', f'{LABELS[m]}, seed 0: per-channel correlations, '
                           f'sorted (Fig. 3 style)') for m, runs in results.items()
              if (out / 'figures' / f'correlation_{m}.png').is_file()
              and runs[0]['seed'] == 0 and comparable(m, runs[0])]  # seed 0 draws the block
    return [ReportTable(['method', 'direct', 'permuted', 'linear CKA', 'seeds'], rows, digits=2,
                        caption='1000 test images of each task. Paper: permuted independent 0.34, RP + random IIW '
                                '0.38, DCC 0.19, yet DCC recombines better than RP (65.8 against 50.1 %): higher '
                                'correlation does not imply higher recombination accuracy. '
                                + correlation_vs_recombination(points)), *blocks]


UPPER_BOUND_NOTE = (f'Upper bound: each network trained alone with its own RP head, its accuracy on the common classes '
                    f'(paper, batch statistics: {PAPER["upper_bound"]} %); its two networks recorded before '
                    f'2026-12-05 started from identical weights, so only their own accuracy is shown. ')


def orderings(results: dict, paper: dict) -> str:
    """The methods ordered by measured (BN=batch) and by the paper's recombination accuracy; nothing for fewer than
    two methods."""
    measured = sorted((m for m in results if m not in ('control', 'upper_bound')),
                      key=lambda m: statistics.mean(r['recombination']['batch'] for r in results[m]))
    if len(measured) < 2:
        return ''
    ours = sorted((m for m in results if m in paper and m != 'upper_bound'), key=paper.get)
    return (f'Measured ordering (BN=batch): {" < ".join(LABELS[m] for m in measured)}. '
            f'Paper ordering: {" < ".join(LABELS[m] for m in ours)}.')


def write_report(out: Path, setting: str, init: str, setup: str, results: dict) -> None:
    """report.md from the records alone, every recorded method in Fig. 2's order (what other sittings added too)."""
    from timm_compat.plots import ReportFigure, ReportTable, plot_bars, write_report as write
    results = {m: results[m] for m in ALL_METHODS if m in results}
    paper, figure = (PAPER, 'Fig. 2') if init == 'random' else (PAPER_PRETRAINED, 'Fig. 2 right')
    rows, figures, mixed = [], [], mixed_machines(results)
    for method, runs in results.items():
        cells = [[r[k][bn] for r in runs] for k in ('recombination', 'own') for bn in BN_MODES]
        rows.append([LABELS[method] + machine_mark(runs), *map(mean_std, cells), paper.get(method, '–'), len(runs),
                     round(statistics.mean(r['train_seconds'] for r in runs) / 60, 1)])
        figures += method_figures(out, method, runs)
    bars = plot_bars({LABELS[m]: [r['recombination']['batch'] for r in runs] for m, runs in results.items()},
                     out / 'figures' / 'recombination_bars.png', title=f'{figure}: recombination accuracy',
                     paper={LABELS[m]: v for m, v in paper.items()})
    write(out, f'Sec. 4: compatibility methods on {setting}', {
        'Setup': setup,
        'Recombination accuracy (%)': [ReportTable(
            ['method', 'recombination, BN=batch', 'recombination, BN=running', 'own task, BN=batch',
             'own task, BN=running', f'paper ({figure})', 'seeds', 'training min / seed'], rows,
            caption=UPPER_BOUND_NOTE * ('upper_bound' in results) + mixed + orderings(results, paper)),
            ReportFigure(bars, f'{figure} style: mean over seeds, one std as the error bar, each seed a dot, the '
                               f'paper\'s value as a black tick (BN=batch).')],
        'Recombination matrices': figures,
        'Own accuracy (is it hurt?)': ReportTable(
            ['method', 'own task, BN=batch', 'independent, same seeds', 'difference', 'paired t-test p'],
            own_accuracy_cost(results), digits=1,
            caption='Paper: 86.3 % (IIW+RP+DCC, on its own tasks) against 85.6 %, its upper bound (each network '
                    'trained alone, with its own RP head); here the baseline is the independent pair of the same '
                    'seeds (not for the control, whose network b learns another task). A difference within the '
                    'seeds\' spread and a large p say compatibility costs no own accuracy.'),
        'Feature cross-correlation (Fig. 3)': correlation_section(out, results),
    })
