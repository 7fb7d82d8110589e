"""The records of the Sec. 4 recipes (recipes/common.py's load_results / save_results): a table built over several
sittings from OUTPUT/results.json alone, after the run folders are gone; each record saved as its run finishes;
records of other arguments refused before anything runs."""
import argparse
import json
import sys

import pytest

from timm_compat.data import DATA_VERSION

FAST = {'setting': 'cifar10_halves', 'data_dir': None, 'budget': 'fast', 'epochs': None, 'seeds': 1,
        'init': 'random', 'resume': True}


def record(seed, recombination, correlation=True):
    """One seed's record as the recipes write it, its run folders long gone."""
    matrix = [[0.83, recombination / 100], [recombination / 100, 0.83]]
    r = {'seed': seed, 'recombination': {'batch': recombination, 'running': recombination - 5},
         'own': {'batch': 83.0, 'running': 83.0}, 'matrix': {'batch': matrix, 'running': matrix},
         'networks': ['a', 'b'], 'train_seconds': 600.0, 'wall_seconds': 610.0, 'run': ['/gone/run'],
         'machine': 'device cpu: AMD EPYC (family 26 model 2, avx512_bf16) x 2 cores'}
    if correlation:  # records older than the correlation field lack it
        r['correlation'] = {'direct': 0.1, 'permuted': 0.3, 'cka': 0.4, 'kind': 'direct'}
    return r


def fail_if_trained(*args, **kwargs):
    raise AssertionError('a recorded run was trained again')


def write_results(out, results, data_version=DATA_VERSION, **args):
    out.mkdir(parents=True)
    (out / 'results.json').write_text(json.dumps({'args': {**FAST, 'output': str(out), **args}, 'results': results,
                                                  **({'data_version': data_version} if data_version else {})}))


@pytest.mark.parametrize('data_version', [None, DATA_VERSION - 1])
def test_sec4_resume_refuses_records_of_another_data_version_before_training(import_script, tmp_path, monkeypatch,
                                                                             data_version):
    """Records made before the data changed (no version: before versions were kept) are not pooled with new runs."""
    sec4 = import_script('recipes', 'sec4_methods')
    monkeypatch.setattr(sec4, 'launch', fail_if_trained)
    out = tmp_path / 'out'
    write_results(out, {'iiw': [record(0, 25.5)]}, data_version=data_version, methods=['iiw'])
    with pytest.raises(SystemExit, match=f'made on data version {data_version or 1}, this code makes version '
                                         f'{DATA_VERSION}'):
        sec4.main(['--budget', 'fast', '--methods', 'iiw', '--seeds', '2', '--output', str(out), '--resume'])
    assert json.loads((out / 'results.json').read_text())['results'] == {'iiw': [record(0, 25.5)]}


def test_sec4_resume_trains_nothing_recorded_and_reports_every_record(import_script, tmp_path, monkeypatch):
    """An earlier sitting recorded independent (seed 0) and IIW (seeds 1 and 0); this one asks for IIW's two seeds.
    Nothing trains, the run folders are not read, and the report has both methods with their seeds."""
    sec4 = import_script('recipes', 'sec4_methods')
    monkeypatch.setattr(sec4, 'launch', fail_if_trained)
    out = tmp_path / 'out'
    saved = {'independent': [record(0, 10.5, correlation=False)], 'iiw': [record(1, 26.0), record(0, 25.5)]}
    write_results(out, saved, methods=['independent', 'iiw'])
    sec4.main(['--budget', 'fast', '--methods', 'iiw', '--seeds', '2', '--output', str(out), '--resume'])
    report = (out / 'report.md').read_text()
    assert '| Independent | 10.5 | 5.5 | 83.0 | 83.0 | 10.6 | 1 |' in report  # not in --methods, still reported
    assert '| IIW | 25.8 ± 0.4 | 20.8 ± 0.4 | 83.0 ± 0.0 | 83.0 ± 0.0 | 25.1 | 2 |' in report
    assert '--seeds 2' in report and '--methods independent iiw ' in report
    assert 'trained on device cpu: AMD EPYC (family 26 model 2, avx512_bf16) x 2 cores.' in report
    assert '| IIW | 0.10 ± 0.00 | 0.30 ± 0.00 | 0.40 ± 0.00 | 2 |' in report  # correlation where recorded
    assert json.loads((out / 'results.json').read_text())['results'] == saved


def test_sec4_saves_each_record_as_its_run_finishes(import_script, tmp_path, monkeypatch):
    """Killed while training its second method, the recipe has already saved the first one's record."""
    sec4 = import_script('recipes', 'sec4_methods')

    def measure(method, seed, args, out, bar):
        if method == 'rp':
            raise KeyboardInterrupt
        return record(seed, 25.5)
    monkeypatch.setattr(sec4, 'measure', measure)
    out = tmp_path / 'out'
    with pytest.raises(KeyboardInterrupt):
        sec4.main(['--budget', 'fast', '--methods', 'iiw', 'rp', '--seeds', '1', '--output', str(out)])
    assert json.loads((out / 'results.json').read_text())['results'] == {'iiw': [record(0, 25.5)]}
    assert not (out / 'results.json.tmp').exists()


def test_records_of_other_arguments_are_refused_before_anything_runs(import_script, tmp_path, monkeypatch):
    sec4 = import_script('recipes', 'sec4_methods')
    monkeypatch.setattr(sec4, 'launch', fail_if_trained)
    out = tmp_path / 'out'
    write_results(out, {'iiw': [record(0, 25.5)]})
    before = (out / 'results.json').read_text()
    with pytest.raises(SystemExit) as refusal:
        sec4.main(['--budget', 'cpu', '--methods', 'iiw', 'rp', '--seeds', '1', '--output', str(out), '--resume'])
    assert '--budget fast (now cpu)' in str(refusal.value) and 'another --output' in str(refusal.value)
    assert (out / 'results.json').read_text() == before and sorted(p.name for p in out.iterdir()) == ['results.json']
    # Records of the Hub's CIFAR-10 are not pooled with runs on a local copy (here: a JPEG copy would be).
    for split in ('train', 'test'):
        (tmp_path / 'data' / 'cifar10').mkdir(parents=True, exist_ok=True)
        (tmp_path / 'data' / 'cifar10' / f'{split}.parquet').touch()
    with pytest.raises(SystemExit, match=r'--data-dir None \(now .*data\)'):
        sec4.main(['--budget', 'fast', '--methods', 'iiw', '--seeds', '1', '--output', str(out), '--resume',
                   '--data-dir', str(tmp_path / 'data')])


def test_an_ablation_resumes_from_its_records_and_trains_only_the_variants_asked(import_script, tmp_path,
                                                                                 monkeypatch, capsys):
    ablations = import_script('recipes', 'sec4_ablations')
    monkeypatch.setattr(sys.modules['sec4_methods'], 'launch', fail_if_trained)
    out = tmp_path / 'out'
    write_results(out, {'rp_conv': [record(0, 15.0)]}, ablation='rp_head')
    argv = ['--ablation', 'rp_head', '--budget', 'fast', '--seeds', '1', '--output', str(out), '--resume']
    ablations.main(argv + ['--variants', 'rp_conv'])
    report = (out / 'report.md').read_text()
    assert '| conv head, width 256 | 15.0 | 10.0 | 83.0 | 83.0 | 0.10 | 0.30 | 0.40 | 1 |' in report  # correlation too
    assert '--variants rp_conv --resume' in report and 'rp_tail' not in report
    with pytest.raises(SystemExit) as refusal:
        ablations.main(argv + ['--variants', 'rp_conv', 'rp_wide'])
    assert refusal.value.code == 2
    assert '--variants rp_wide: --ablation rp_head has the variants rp_conv rp_tail rp_narrow.' in capsys.readouterr().err


def test_ablation_reports_give_the_permuted_correlation_beside_the_direct_one(import_script, tmp_path, monkeypatch):
    """The upper bound's networks share no heads, so their channels need be in no common order: its row gives the
    Hungarian-permuted correlation its records measured beside the direct one, each in its named column."""
    ablations = import_script('recipes', 'sec4_ablations')
    monkeypatch.setattr(sys.modules['sec4_methods'], 'launch', fail_if_trained)
    upper = record(0, 80.0)
    upper['correlation'] = {'direct': 0.02, 'permuted': 0.31, 'cka': 0.5, 'kind': 'permuted'}
    upper['distinct_init'] = True  # sides that started apart (the correlation of older ones is left out)
    write_results(tmp_path / 'out', {'iiw_rp': [record(0, 70.0)], 'upper_bound': [upper]}, ablation='control')
    ablations.main(['--ablation', 'control', '--budget', 'fast', '--seeds', '1', '--output', str(tmp_path / 'out'),
                    '--resume', '--variants', 'iiw_rp', 'upper_bound'])
    report = (tmp_path / 'out' / 'report.md').read_text()
    assert '| Upper bound | 80.0 | 75.0 | 83.0 | 83.0 | 0.02 | 0.31 | 0.50 | 1 |' in report
    assert '| IIW+RP | 70.0 | 65.0 | 83.0 | 83.0 | 0.10 | 0.30 | 0.40 | 1 |' in report


def test_head_transfer_resume_keeps_recorded_seeds_and_refuses_another_budgets(import_script, tmp_path, capsys,
                                                                              monkeypatch):
    """Sec. 5.2's seed 0, recorded in an earlier sitting, is kept without its run folders; a record of another
    budget is refused before anything trains."""
    head_transfer = import_script('recipes', 'head_transfer')
    monkeypatch.setattr(head_transfer, 'run_seed', fail_if_trained)
    cells = {'recombined': 73.8, 'classes_0_4': 90.0, 'classes_5_9': 60.0, 'upper_bound': 88.2}
    saved = {'seed': 0, 'wall_seconds': 60.0, 'stage1_seconds': 30.0, 'hardware': 'device cpu: Zen 5',
             'data_dir': None, 'budget': 'fast', 'epochs': None, 'data_version': DATA_VERSION,
             'results': {'desktop': {bn: cells for bn in ('batch', 'running')}}}
    (tmp_path / 'seed0').mkdir()
    (tmp_path / 'seed0' / 'results.json').write_text(json.dumps(saved))
    head_transfer.main(['--budget', 'fast', '--seeds', '1', '--output', str(tmp_path), '--resume'])
    report = (tmp_path / 'report.md').read_text()
    assert '| desktop | batch | 73.8 |' in report and 'on device cpu: Zen 5;' in report
    with pytest.raises(SystemExit) as refusal:
        head_transfer.main(['--budget', 'cpu', '--seeds', '1', '--output', str(tmp_path), '--resume'])
    assert refusal.value.code == 2 and 'is a record of --budget fast --epochs None' in capsys.readouterr().err
    del saved['data_version']  # a record from before the data changed
    (tmp_path / 'seed0' / 'results.json').write_text(json.dumps(saved))
    with pytest.raises(SystemExit, match=f'made on data version 1, this code makes version {DATA_VERSION}'):
        head_transfer.main(['--budget', 'fast', '--seeds', '1', '--output', str(tmp_path), '--resume'])


def test_the_docs_add_no_seed_to_the_committed_fast_head_transfer_record(import_script, tmp_path, monkeypatch):
    """The docs said to copy the committed seed-0 record of Sec. 5.2's fast table into OUTPUT and --resume with
    --seeds 3; that record is of data version 1 and has no config fingerprint, so it is refused."""
    import shutil
    from tests.conftest import REPO
    head_transfer = import_script('recipes', 'head_transfer')
    monkeypatch.setattr(head_transfer, 'run_seed', fail_if_trained)
    committed = REPO / 'docs' / 'results' / 'head_transfer_fast' / 'results_seed0.json'
    (tmp_path / 'seed0').mkdir()
    shutil.copy(committed, tmp_path / 'seed0' / 'results.json')
    with pytest.raises(SystemExit, match='made on data version 1'):
        head_transfer.main(['--budget', 'fast', '--seeds', '3', '--output', str(tmp_path), '--resume'])
    for doc in (head_transfer.__doc__, (REPO / 'docs' / 'results.md').read_text()):
        for advice in ('cp docs/results/head_transfer_fast/results_seed0.json', 'e.g. docs/results/head_transfer_fast'):
            assert advice not in doc
    # Sec. 4's first fast table is data version 1 too (sec4_methods refuses it the same way): not to be extended.
    assert 'cp docs/results/sec4_fast/results.json' not in (REPO / 'docs' / 'results.md').read_text()


def test_a_record_names_the_machine_its_runs_recorded(import_script, tmp_path):
    """The machine line of a record is the one the runs' own summaries give (their threads, not the recipe's), with
    the precision each trained in (``auto`` is bf16 on one CPU and fp32 on another); each line once; this process's
    only for runs whose summaries predate the field."""
    common = import_script('recipes', 'common')
    from timm_compat._hardware import hardware
    lines = {'a': ('device cpu: AMD EPYC (family 23 model 1, avx2) x 2 cores, 1 torch threads', 'no'),
             'b': ('device cuda: NVIDIA H200; AMD EPYC x 16 cores, 16 torch threads', 'bf16'),
             'd': ('device cpu: AMD EPYC (family 23 model 1, avx2) x 2 cores, 1 torch threads', None), 'c': (None, None)}
    for name, (line, precision) in lines.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / 'summary.json').write_text(json.dumps(
            {'phases': {}, **({'hardware': line} if line else {}), **({'mixed_precision': precision} if precision else {})}))
    assert common.run_machine([tmp_path / 'a', tmp_path / 'b', tmp_path / 'a', tmp_path / 'c', tmp_path / 'd']) == \
        f'{lines["a"][0]}, in fp32; {lines["b"][0]}, in bf16 mixed precision; {lines["d"][0]}'
    assert common.run_machine([tmp_path / 'c']) == hardware()


def test_a_finished_run_of_another_data_version_is_not_read_back(import_script, tmp_path):
    """transfer.py --reuse and the adaptation sweep read a finished run back instead of training it: not one made
    before the data changed (its summary has no version), whose numbers would be pooled with new ones."""
    common = import_script('recipes', 'common')
    assert not common.finished_run(tmp_path)
    (tmp_path / 'summary.json').write_text(json.dumps({'phases': {}, 'data_version': DATA_VERSION}))
    assert common.finished_run(tmp_path)
    (tmp_path / 'summary.json').write_text(json.dumps({'phases': {}}))
    with pytest.raises(SystemExit, match=f'made on data version 1, this code makes version {DATA_VERSION}'):
        common.finished_run(tmp_path)


def test_adaptation_sweep_counts_each_source_once_and_pools_only_its_own_arguments(import_script, tmp_path):
    """Two sources x two adaptation seeds: the source model's score repeats across adaptation seeds, so its spread
    is over the two sources (std 7.1), not four rows (5.8); a record of another --adapt-lr is not pooled."""
    sweep = import_script('recipes', 'adaptation_sweep')
    args = sweep.parse_args(['--shifts', 'contrast:5', '--source-seeds', '2', '--adapt-seeds', '2', '--report-only',
                             '--output', str(tmp_path)])
    for s in range(2):
        for a in range(2):
            folder = sweep.adapt_folder(tmp_path, s, 'contrast:5', a)
            folder.mkdir(parents=True)
            scores = {'source': 50.0 + 10 * s, 'source_test_bn': 55.0 + 10 * s, 'adapted': 60.0 + 10 * s + a,
                      'adapted_running_bn': 58.0}
            (folder / 'results.json').write_text(json.dumps({
                'args': {'data_dir': None, 'budget': 'cpu', 'adapt_lr': 0.01, 'adapt_steps': None}, 'scores': scores,
                'data_version': DATA_VERSION}))
    runs = sweep.collect(args, tmp_path)['contrast:5']
    assert [sweep.column(runs, k) for k in sweep.SCORES.values()] == ['55.0 ± 7.1', '60.0 ± 7.1', '65.5 ± 5.8',
                                                                      '58.0 ± 0.0']
    args.adapt_lr = 0.1
    with pytest.raises(SystemExit, match=r'holds records of --adapt-lr 0.01 \(now 0.1\): give the same arguments'):
        sweep.collect(args, tmp_path)


def fingerprinted(sec4, out, seed, recombination, **args):
    """A record of IIW as the recipe writes it now: with the fingerprint of the config it was trained under."""
    namespace = sec4.argparse.Namespace(**{**FAST, 'data_dir': None, **args})
    return {**record(seed, recombination), 'config': sec4.method_fingerprint('iiw', seed, namespace, out)}


def test_sec4_adds_a_seed_only_to_records_trained_under_the_same_config(import_script, tmp_path, monkeypatch):
    """A seed is pooled with the records of its method only if its runs resolve to the same config, seed and output
    folder aside; a changed budget key is refused before anything trains, and the records are kept as they were."""
    sec4 = import_script('recipes', 'sec4_methods')
    trained = []
    monkeypatch.setattr(sec4, 'measure', lambda m, seed, args, out, bar: trained.append((m, seed))
                        or fingerprinted(sec4, out, seed, 30.0))
    monkeypatch.setattr(sec4, 'launch', fail_if_trained)
    out = tmp_path / 'out'
    write_results(out, {'iiw': [fingerprinted(sec4, out, 0, 25.5)]}, methods=['iiw'])
    argv = ['--budget', 'fast', '--methods', 'iiw', '--output', str(out), '--resume']
    sec4.main(argv + ['--seeds', '2'])
    assert trained == [('iiw', 1)]
    before = (out / 'results.json').read_text()
    monkeypatch.setitem(sec4.BUDGETS, 'fast', sec4.BUDGETS['fast'] + ['task_weight=0.5'])
    with pytest.raises(SystemExit, match=r'iiw seed 0 was trained under another config than seed 2 would be .*'
                                         r'another --output'):
        sec4.main(argv + ['--seeds', '3'])
    assert trained == [('iiw', 1)] and (out / 'results.json').read_text() == before


def test_sec4_reads_an_old_records_config_from_its_run_folder_and_refuses_one_whose_folder_is_gone(
        import_script, tmp_path, monkeypatch):
    """Records from before fingerprints were kept: the config.yaml of its run, as train.py wrote it, says what it was
    trained under; without its run folder, the record cannot be added to."""
    import yaml
    from timm_compat.config import load_config
    sec4 = import_script('recipes', 'sec4_methods')
    monkeypatch.setattr(sec4, 'measure', lambda m, seed, args, out, bar: fingerprinted(sec4, out, seed, 30.0))
    out = tmp_path / 'out'
    write_results(out, {'iiw': [record(0, 25.5)]}, methods=['iiw'])
    argv = ['--budget', 'fast', '--methods', 'iiw', '--seeds', '2', '--output', str(out), '--resume']
    with pytest.raises(SystemExit, match='the record of iiw seed 0 does not say which config it was trained under'):
        sec4.main(argv)
    args = sec4.argparse.Namespace(**FAST)
    (config, run_dir, overrides), = sec4.method_runs('iiw', 0, args, out)
    run_dir.mkdir()
    written = {**load_config(str(config), overrides).to_dict(), 'output_dir': str(run_dir), 'data_dir': '/data'}
    (run_dir / 'config.yaml').write_text(yaml.safe_dump(written, sort_keys=False))
    # With nothing to train, the record keeps the fingerprint its run folder gave it, for when the folder is gone.
    sec4.main(['--budget', 'fast', '--methods', 'iiw', '--seeds', '1', '--output', str(out), '--resume'])
    assert json.loads((out / 'results.json').read_text())['results']['iiw'][0]['config'] == (
        sec4.method_fingerprint('iiw', 0, args, out))
    sec4.main(argv)
    configs = [r['config'] for r in json.loads((out / 'results.json').read_text())['results']['iiw']]
    assert configs == [sec4.method_fingerprint('iiw', 1, args, out)] * 2


def test_each_methods_fingerprint_is_the_same_for_every_seed_and_output_and_changes_with_its_config(import_script,
                                                                                                  tmp_path):
    """Incremental's second run names its first one's folder (``..._seed<k>``), pre-trained inits name theirs: the
    fingerprint is the same for seeds 1 and 10 and for another output folder, and differs for any other key."""
    sec4 = import_script('recipes', 'sec4_methods')
    for init in ('random', 'rp_pretrained'):
        args = sec4.argparse.Namespace(**{**FAST, 'init': init})
        for method in sec4.ALL_METHODS:
            seen = {sec4.method_fingerprint(method, seed, args, tmp_path / out) for seed in (1, 10)
                    for out in ('a', 'b')}
            assert len(seen) == 1, method
            changed = sec4.method_fingerprint(method, 1, args, tmp_path / 'a', extra=['eval_batch_size=100'])
            assert changed not in seen, method


def test_adaptation_sweep_pools_an_adaptation_only_with_records_of_the_same_source_and_adaptation_config(
        import_script, tmp_path, monkeypatch):
    """Source seed 0's adaptation 0 is recorded; adaptation 1 is added under the same config, but not after the
    budget's adaptation batch changed, nor to a record that predates fingerprints and whose source is gone."""
    sweep = import_script('recipes', 'adaptation_sweep')
    calls = []
    monkeypatch.setattr(sweep, 'run_source', lambda args, out, seed: calls.append(('source', seed)) or [])
    monkeypatch.setattr(sweep, 'run_adaptation', lambda *a: calls.append(('adapt', a[4])))
    out = tmp_path / 'out'
    argv = ['--budget', 'tiny', '--shifts', 'contrast:5', '--source-seeds', '1', '--adapt-seeds', '2',
            '--output', str(out)]
    args = sweep.parse_args(argv)
    folder = sweep.adapt_folder(out, 0, 'contrast:5', 0)
    folder.mkdir(parents=True)
    scores = dict.fromkeys(sweep.SCORES.values(), 50.0)
    saved = {'args': vars(args), 'scores': scores, 'data_version': DATA_VERSION}
    (folder / 'results.json').write_text(json.dumps({**saved, 'config': sweep.source_fingerprint(args, out, 0)}))
    interface = out / 'source0' / 'main' / 'components' / 'interface'  # the source is there: it is read back
    interface.mkdir(parents=True)
    (interface / 'config.json').write_text(json.dumps({'interface_id': 'abc'}))
    sweep.main(argv)
    assert calls == [('source', 0), ('adapt', 1)]
    monkeypatch.setitem(sweep.adaptation.BUDGETS['tiny'], 'adapt_batch', 64)
    with pytest.raises(SystemExit, match='contrast:5 seed 0 was trained under another config than seed 0 would be'):
        sweep.main(argv)
    monkeypatch.undo()
    (folder / 'results.json').write_text(json.dumps(saved))
    with pytest.raises(SystemExit, match='the record of contrast:5 seed 0 does not say which config'):
        sweep.main(argv)
    assert calls == [('source', 0), ('adapt', 1)]
    # With its source's run folder there, the old record gets its fingerprint from it, and keeps it.
    import yaml
    from timm_compat.config import load_config
    monkeypatch.setattr(sweep, 'run_source', lambda args, out, seed: calls.append(('source', seed)) or [])
    monkeypatch.setattr(sweep, 'run_adaptation', lambda *a: calls.append(('adapt', a[4])))
    adaptation = sweep.adaptation
    source = adaptation.source_config(sweep.argparse.Namespace(seed=0), adaptation.SETTINGS['cifar10_shift'])
    path, sets = adaptation.write_run(source, tmp_path / 'plan' / 'source', adaptation.BUDGETS['tiny']['train'])
    written = {**load_config(str(path), sets).to_dict(), 'output_dir': str(out / 'source0')}
    (out / 'source0' / 'config.yaml').write_text(yaml.safe_dump(written, sort_keys=False))
    sweep.main(argv)
    assert calls[-2:] == [('source', 0), ('adapt', 1)]
    assert json.loads((folder / 'results.json').read_text())['config'] == sweep.source_fingerprint(args, out, 0)


def test_head_transfer_adds_a_seed_only_to_records_of_the_same_stage1_upper_bound_and_head_config(
        import_script, tmp_path, monkeypatch):
    """Seed 0 recorded: seed 1 trains under the same config; after the head's fine-tuning epochs or an upper bound's
    config changed, it is refused before it trains, as it is next to a record that predates fingerprints."""
    head_transfer = import_script('recipes', 'head_transfer')
    trained = []
    monkeypatch.setattr(head_transfer, 'run_seed', lambda args, budget, seed, out, bar: trained.append(seed) or saved)
    monkeypatch.setattr(head_transfer, 'write_report', lambda *a: None)
    argv = ['--budget', 'fast', '--seeds', '2', '--output', str(tmp_path), '--resume']
    args = head_transfer.argparse.Namespace(epochs=None)
    fast = head_transfer.BUDGETS['fast']
    saved = {'seed': 0, 'data_dir': None, 'budget': 'fast', 'epochs': None, 'data_version': DATA_VERSION,
             'config': head_transfer.seed_fingerprint(args, fast, 0, tmp_path / 'seed0')}
    (tmp_path / 'seed0').mkdir()
    (tmp_path / 'seed0' / 'results.json').write_text(json.dumps(saved))
    head_transfer.main(argv)
    assert trained == [1]
    for key, value in (('head_epochs', 2.0), ('upper', head_transfer.PAPER_CONFIGS['upper'])):
        monkeypatch.setitem(fast, key, value)
        with pytest.raises(SystemExit, match='head_transfer seed 0 was trained under another config than seed 1'):
            head_transfer.main(argv)
        monkeypatch.undo()
        monkeypatch.setattr(head_transfer, 'run_seed', fail_if_trained)
    del saved['config']
    (tmp_path / 'seed0' / 'results.json').write_text(json.dumps(saved))
    with pytest.raises(SystemExit, match='the record of head_transfer seed 0 does not say which config'):
        head_transfer.main(argv)


def test_a_record_of_one_data_folder_resumes_under_another_spelling_of_it(import_script, tmp_path, monkeypatch):
    """Records store --data-dir as given: ``../shared/data`` and ``/work/shared/data`` name one folder, so either
    resumes the other's records; another folder is still refused."""
    common = import_script('recipes', 'common')
    (tmp_path / 'data').mkdir()
    (tmp_path / 'other').mkdir()
    (tmp_path / 'run').mkdir()
    monkeypatch.chdir(tmp_path / 'run')
    path = tmp_path / 'results.json'
    path.write_text(json.dumps({'args': {'data_dir': '../data'}, 'data_version': DATA_VERSION, 'results': {}}))
    spelled = argparse.Namespace(data_dir=str(tmp_path / 'data'))
    assert common.read_record(path, spelled, ['data_dir'])['args'] == {'data_dir': '../data'}
    with pytest.raises(SystemExit, match=r'holds records of --data-dir \.\./data \(now .*other\)'):
        common.read_record(path, argparse.Namespace(data_dir=str(tmp_path / 'other')), ['data_dir'])
