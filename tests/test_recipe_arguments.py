"""The recipes' arguments and records, checked before anything trains: a repeat counted once, counts that would
train something other than what is recorded refused, one sitting per output folder, and a sweep report that names
what its numbers were made with."""
import json

import pytest

from timm_compat.data import DATA_VERSION

from .test_recipe_records import fail_if_trained, record


def test_a_repeated_method_is_trained_and_recorded_once(import_script, tmp_path, monkeypatch):
    """`--methods iiw iiw` recorded seed 0 twice, and the table showed one seed as two with a spread."""
    sec4 = import_script('recipes', 'sec4_methods')
    trained = []
    monkeypatch.setattr(sec4, 'measure',
                        lambda m, seed, args, out, bar: trained.append((m, seed)) or record(seed, 20.0))
    out = tmp_path / 'out'
    sec4.main(['--budget', 'fast', '--methods', 'iiw', 'iiw', '--seeds', '1', '--output', str(out)])
    assert trained == [('iiw', 0)]
    assert [r['seed'] for r in json.loads((out / 'results.json').read_text())['results']['iiw']] == [0]
    with pytest.raises(ValueError, match='iiw seed 0 is recorded already'):
        sec4.add_record({'iiw': [record(0, 20.0)]}, 'iiw', record(0, 30.0))


def test_an_ablation_trains_a_repeated_count_once(import_script):
    ablations = import_script('recipes', 'sec4_ablations')
    args = ablations.parse_args(['--ablation', 'common_classes', '--counts', '3', '1', '3'])
    assert args.counts == [1, 3]
    assert [v.name for v in ablations.VARIANTS['common_classes'](args)] == ['dcc_1_classes', 'dcc_3_classes']


@pytest.mark.parametrize('script, argv', [
    ('sec4_methods', ['--budget', 'fast', '--seeds', '0']),
    ('sec4_methods', ['--budget', 'fast', '--epochs', '0']),
    ('sec4_methods', ['--setting', 'cifar10_stl10', '--methods', 'control']),
    ('head_transfer', ['--seeds', '0']),
    ('head_transfer', ['--epochs', '-1']),
    ('sec4_ablations', ['--ablation', 'split', '--epochs', '0']),
    ('adaptation', ['--adapt-steps', '0']),
    ('adaptation_sweep', ['--adapt-steps', '-5']),
])
def test_counts_that_would_train_other_than_recorded_are_refused_before_anything_runs(import_script, tmp_path,
                                                                                      capsys, script, argv):
    """`--epochs 0` trained the budget's epochs and recorded 0; `--seeds 0` crashed at the report; `--adapt-steps 0`
    adapted the budget's steps; the control has no second half of a dataset in cifar10_stl10."""
    module = import_script('recipes', script)
    entry = module.main if script in ('sec4_methods', 'head_transfer') else module.parse_args
    with pytest.raises(SystemExit) as exit_:
        entry(argv + ['--output', str(tmp_path / 'out')])
    assert exit_.value.code == 2
    assert argv[-2] in capsys.readouterr().err
    assert not (tmp_path / 'out').exists()


def test_sec4s_default_methods_leave_out_the_control_where_the_setting_has_no_halves(import_script, tmp_path,
                                                                                     monkeypatch):
    """The documented `--setting cifar10_stl10` command crashed on the default methods' control."""
    sec4 = import_script('recipes', 'sec4_methods')
    trained = []
    monkeypatch.setattr(sec4, 'measure', lambda m, seed, args, out, bar: trained.append(m) or record(seed, 20.0))
    monkeypatch.setattr(sec4, 'pretraining_runs', lambda methods, args, out: [])
    sec4.main(['--setting', 'cifar10_stl10', '--seeds', '1', '--output', str(tmp_path / 'out')])
    assert trained == [m for m in sec4.METHODS if m != 'control']


def test_a_second_sitting_on_one_output_is_refused(import_script, tmp_path, monkeypatch):
    """Two sittings each wrote results.json from their own records: the last dropped the other's."""
    sec4 = import_script('recipes', 'sec4_methods')
    monkeypatch.setattr(sec4, 'launch', fail_if_trained)
    out = tmp_path / 'out'
    with sec4.claim_output(out):  # the other sitting, alive
        with pytest.raises(SystemExit, match='in use by another sitting of a recipe'):
            sec4.main(['--budget', 'fast', '--methods', 'iiw', '--seeds', '1', '--output', str(out)])
    assert not (out / 'results.json').exists()
    monkeypatch.setattr(sec4, 'measure', lambda m, seed, args, out, bar: record(seed, 20.0))
    sec4.main(['--budget', 'fast', '--methods', 'iiw', '--seeds', '1', '--output', str(out)])  # the lock is gone
    assert json.loads((out / 'results.json').read_text())['results']['iiw'] == [record(0, 20.0)]


def test_the_sweep_report_names_its_adaptation_arguments_and_machines_and_shows_an_unfinished_corruption(
        import_script, tmp_path):
    """The report's command left out --adapt-lr / --adapt-steps (rerunning it was refused), named the machine of the
    process writing the report, and --report-only crashed while a corruption had no finished run."""
    sweep = import_script('recipes', 'adaptation_sweep')
    argv = ['--shifts', 'contrast:5', 'pixelate:5', '--source-seeds', '1', '--adapt-seeds', '1', '--adapt-lr', '0.05',
            '--adapt-steps', '7', '--output', str(tmp_path), '--report-only']
    folder = sweep.adapt_folder(tmp_path, 0, 'contrast:5', 0)
    folder.mkdir(parents=True)
    scores = {'source': 50.0, 'source_test_bn': 55.0, 'adapted': 60.0, 'adapted_running_bn': 58.0}
    (folder / 'results.json').write_text(json.dumps({
        'args': {'data_dir': None, 'budget': 'cpu', 'adapt_lr': 0.05, 'adapt_steps': 7}, 'scores': scores,
        'data_version': DATA_VERSION, 'machine': 'device cpu: a recorded machine'}))
    sweep.main(argv)
    report = (tmp_path / 'report.md').read_text()
    assert '--adapt-lr 0.05 --adapt-steps 7' in report
    assert 'adaptations run on device cpu: a recorded machine' in report
    assert '| contrast:5 | 1 | 50.0 | 55.0 | 60.0 | 58.0 |' in report
    assert '| pixelate:5 | 0 | – | – | – | – |' in report



def sweep_record(sweep, args, out, seed, adapt_seed, interface_id, source=50.0):
    """The record of one adaptation of source ``seed`` as the sweep writes it, made from interface ``interface_id``."""
    folder = sweep.adapt_folder(out, seed, 'contrast:5', adapt_seed)
    folder.mkdir(parents=True)
    scores = {**dict.fromkeys(sweep.SCORES.values(), 60.0), 'source': source, 'source_test_bn': source + 5}
    (folder / 'results.json').write_text(json.dumps({
        'args': {**vars(args), 'adapt_seed': adapt_seed}, 'scores': scores, 'interface_id': interface_id,
        'data_version': DATA_VERSION, 'config': sweep.source_fingerprint(args, out, seed)}))


def trained_source(out, seed, interface_id):
    """Source ``seed``'s run folder as train.py leaves it: its interface component names its id."""
    folder = out / f'source{seed}' / 'main' / 'components' / 'interface'
    folder.mkdir(parents=True, exist_ok=True)
    (folder / 'config.json').write_text(json.dumps({'interface_id': interface_id}))
    return {'interface_id': interface_id}


def test_the_sweep_retrains_no_source_whose_adaptations_are_recorded(import_script, tmp_path, monkeypatch):
    """Adding an adaptation seed once the source's run folder was gone trained another source network and pooled its
    adaptations with those of the first one under one source seed; a source trained again into another network
    (its folder replaced) is refused too, before its adaptations run."""
    sweep = import_script('recipes', 'adaptation_sweep')
    calls = []
    monkeypatch.setattr(sweep.adaptation, 'launch_train', lambda config, out, *a, **k: calls.append('train')
                        or trained_source(out.parent, 0, 'NEW'))
    monkeypatch.setattr(sweep, 'run_adaptation', lambda *a: calls.append(('adapt', a[4])))
    out = tmp_path / 'out'
    argv = ['--budget', 'tiny', '--shifts', 'contrast:5', '--source-seeds', '1', '--adapt-seeds', '2',
            '--output', str(out)]
    args = sweep.parse_args(argv)
    sweep_record(sweep, args, out, 0, 0, 'OLD')
    with pytest.raises(SystemExit, match=r'source seed 0 .*gone.*1 adaptation.*fresh --output'):
        sweep.main(argv)
    trained_source(out, 0, 'OTHER')  # a folder that holds another network than the recorded one
    with pytest.raises(SystemExit, match=r'source seed 0 .*interface OTHER.*OLD'):
        sweep.main(argv)
    assert calls == []
    trained_source(out, 0, 'OLD')  # train.py would read it back; here it trains another one
    with pytest.raises(SystemExit, match=r'source seed 0 .*trained into interface NEW.*OLD'):
        sweep.main(argv)
    assert calls == ['train']
    trained_source(out, 0, 'OLD')  # the run folder restored: read back, and its adaptations run
    monkeypatch.setattr(sweep.adaptation, 'launch_train', lambda config, out, *a, **k: calls.append('read back')
                        or trained_source(out.parent, 0, 'OLD'))
    sweep.main(argv)
    assert calls == ['train', 'read back', ('adapt', 1)]


def test_the_sweep_report_refuses_one_source_seed_of_two_source_networks(import_script, tmp_path):
    """column() kept one of the two source scores of a source seed whose adaptations came from two networks."""
    sweep = import_script('recipes', 'adaptation_sweep')
    argv = ['--budget', 'tiny', '--shifts', 'contrast:5', '--source-seeds', '1', '--adapt-seeds', '2',
            '--output', str(tmp_path), '--report-only']
    args = sweep.parse_args(argv)
    sweep_record(sweep, args, tmp_path, 0, 0, 'OLD', source=50.0)
    sweep_record(sweep, args, tmp_path, 0, 1, 'NEW', source=60.0)
    with pytest.raises(SystemExit, match=r'source seed 0 .*interfaces? .*NEW.*OLD'):
        sweep.main(argv)
    record = tmp_path / 'source0' / 'contrast_5' / 'adapt1' / 'results.json'
    record.write_text(record.read_text().replace('"NEW"', 'null'))  # a record from before interface ids
    with pytest.raises(SystemExit, match=r'source seed 0 .*source scores? .*50.0.*60.0'):
        sweep.main(argv)


def test_the_sweep_report_takes_one_network_scored_on_two_machines(import_script, tmp_path):
    """An adaptation seed added on another CPU scores the same source network in other last digits: the exact
    score comparison refused it as a second network. The source column is that seed's mean, counted once."""
    sweep = import_script('recipes', 'adaptation_sweep')
    argv = ['--budget', 'tiny', '--shifts', 'contrast:5', '--source-seeds', '2', '--adapt-seeds', '2',
            '--output', str(tmp_path), '--report-only']
    args = sweep.parse_args(argv)
    sweep_record(sweep, args, tmp_path, 0, 0, 'OLD', source=50.0)
    sweep_record(sweep, args, tmp_path, 0, 1, 'OLD', source=50.2)
    sweep_record(sweep, args, tmp_path, 1, 0, 'OTHER', source=60.0)
    runs = sweep.main(argv)['contrast:5']
    assert sweep.column(runs, 'source') == sweep.mean_std([50.1, 60.0])
    assert sweep.column(runs, 'source_test_bn') == sweep.mean_std([55.1, 65.0])


@pytest.mark.parametrize('argv, error', [
    (['--shift', 'gaussian_noise:6'], "--shift: Unknown shift 'gaussian_noise:6'"),
    (['--shift', 'contrast:5', 'fog'], "--shift: Unknown shift 'fog'"),
    (['--setting', 'synthetic', '--shift', 'contrast:5'], '--shift contrast:5: setting synthetic has no corruption'),
    (['--setting', 'cifar10_stl10', '--shift', 'gaussian_noise:5'], 'setting cifar10_stl10 has no corruption'),
])
def test_adaptation_refuses_a_shift_it_cannot_apply_before_the_source_trains(import_script, tmp_path, monkeypatch,
                                                                             capsys, argv, error):
    """A bad --shift was refused only after the source network had trained (hours at the paper budget); one given
    to a setting without a corruption was ignored."""
    adaptation = import_script('recipes', 'adaptation')
    monkeypatch.setattr(adaptation, 'launch_train', fail_if_trained)
    with pytest.raises(SystemExit) as exit_:
        adaptation.main(argv + ['--output', str(tmp_path / 'out')])
    assert exit_.value.code == 2 and error in capsys.readouterr().err
    assert not (tmp_path / 'out').exists()
    assert adaptation.parse_args(['--shift', 'contrast:5', 'pixelate:2']).shift == ['contrast:5', 'pixelate:2']
    assert adaptation.parse_args([]).shift == ['gaussian_noise:5']
    assert adaptation.parse_args(['--setting', 'synthetic']).shift is None


def test_transfer_records_its_networks_training_time_from_their_runs_not_this_sittings_wall_time(
        import_script, tmp_path, monkeypatch):
    """`train_seconds` was the wall time around the train.py launches: a run that --resume read back counted the
    seconds of reading it, a resumed one only its remainder; the runs' summaries hold their own training time."""
    import types
    transfer = import_script('recipes', 'transfer')

    def read_back(config, run, overrides, threads, data_dir, bar, resume):  # train.py --resume on a finished run
        run.mkdir(parents=True, exist_ok=True)
        phases = {'pre': {'train_seconds': 100.0}, 'main': {'train_seconds': 3000.0}}
        (run / 'summary.json').write_text(json.dumps({'phases': phases, 'data_version': DATA_VERSION}))
        bar.update(1)
    fake = types.SimpleNamespace(to_dict=lambda: {}, ranking=lambda step=0: [])
    monkeypatch.setattr(transfer, 'launch_train', read_back)
    monkeypatch.setattr(transfer, 'load', lambda *a: types.SimpleNamespace(extractor=None, head=None))
    monkeypatch.setattr(transfer, 'load_target', lambda *a: (list(range(640)), list(range(100))))
    monkeypatch.setattr(transfer, 'transfer', lambda *a, **k: fake)
    monkeypatch.setattr(transfer, 'stitch_sources', lambda *a: {})
    monkeypatch.setattr(transfer, 'report', lambda *a: None)
    out = tmp_path / 'out'
    transfer.main(['--setting', 'synthetic', '--budget', 'tiny', '--output', str(out), '--resume'])
    results = json.loads((out / 'results.json').read_text())
    runs = sorted((out / 'runs').glob('*/summary.json'))
    assert len(runs) == 2 * (1 + len(transfer.SETTINGS['synthetic']['sources']))
    assert results['train_seconds'] == 3100.0 * len(runs)
    assert 0 <= results['train_wall_seconds'] < 3100.0  # this sitting's, kept apart


def test_the_sweeps_report_only_example_reads_the_records_of_its_run_example(import_script, tmp_path):
    """The docstring's `--output runs/adaptation_sweep --report-only` refused the records of its first example
    (`--budget fast --data-dir ../shared/data`): --budget and --data-dir default to cpu and none."""
    import shlex
    sweep = import_script('recipes', 'adaptation_sweep')
    examples = [shlex.split(line.split('#')[0])[2:] for line in sweep.__doc__.splitlines()
                if line.strip().startswith('python recipes/adaptation_sweep.py')]

    def elsewhere(argv):  # the example's arguments, writing into tmp_path
        i = argv.index('--output') if '--output' in argv else len(argv)
        return argv[:i] + argv[i + 2:] + ['--output', str(tmp_path)]
    report_only = [e for e in examples if '--report-only' in e]
    assert report_only
    for example in report_only:
        run = [a for a in elsewhere(example) if a != '--report-only']
        assert run in [elsewhere(e) for e in examples if e not in report_only], example
        args = sweep.parse_args(run + ['--report-only'])  # the run's arguments, as its records keep them
        folder = sweep.adapt_folder(tmp_path, 0, args.shifts[0], 0)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / 'results.json').write_text(json.dumps({
            'args': vars(args), 'scores': dict.fromkeys(sweep.SCORES.values(), 50.0), 'data_version': DATA_VERSION}))
        sweep.main(elsewhere(example))
        assert f'| {args.shifts[0]} | 1 | 50.0 |' in (tmp_path / 'report.md').read_text()
