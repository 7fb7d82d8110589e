"""What the recipes check before they resume runs or add to records: a run folder trained on another ``--data-dir``
is not read back as this data's, a new corruption of the sweep is not adapted under another config than the
recorded ones, bad counts are refused, and a report is not built from no record at all."""
import json
import subprocess

import pytest
import yaml

from timm_compat.data import DATA_VERSION
from timm_compat.rundir import MARKER

from .test_recipe_records import fail_if_trained


def data_folder(path):
    """A ``--data-dir`` that check_data_dir accepts: empty Parquet files of CIFAR-10's splits (never read here)."""
    for split in ('train', 'test'):
        (path / 'cifar10').mkdir(parents=True, exist_ok=True)
        (path / 'cifar10' / f'{split}.parquet').touch()
    return str(path)


def trained_run(run, data_dir):
    """A run folder as train.py leaves it: its marker, and its config naming the ``--data-dir`` it was trained on."""
    run.mkdir(parents=True)
    (run / MARKER).write_text('{}')
    (run / 'config.yaml').write_text(yaml.safe_dump({'data_dir': data_dir}))


@pytest.mark.parametrize('saved, now', [('a', 'b'), (None, 'b'), ('a', None)])
def test_a_run_trained_on_another_data_dir_is_not_resumed(import_script, tmp_path, monkeypatch, saved, now):
    """train.py lets data_dir change on --resume, so the run trained on A was read back and recorded as B's."""
    common = import_script('recipes', 'common')
    monkeypatch.setattr(subprocess, 'run', fail_if_trained)
    saved, now = (str(tmp_path / d) if d else None for d in (saved, now))
    trained_run(tmp_path / 'run', saved)
    with pytest.raises(SystemExit) as refused:
        common.launch(tmp_path / 'run.yaml', tmp_path / 'run', [], now, tmp_path / 'run.log', resume=True)
    message = str(refused.value.code)
    assert str(saved or 'the Hub') in message and str(now or 'the Hub') in message and '--output' in message


def test_a_run_of_the_same_data_dir_under_another_spelling_is_resumed(import_script, tmp_path, monkeypatch):
    common = import_script('recipes', 'common')
    (tmp_path / 'data').mkdir()
    (tmp_path / 'here').mkdir()
    monkeypatch.chdir(tmp_path / 'here')
    trained_run(tmp_path / 'run', str(tmp_path / 'data'))
    (tmp_path / 'run' / 'summary.json').write_text(json.dumps({'phases': {'main': {'acc': 1}}}))
    commands = []
    monkeypatch.setattr(subprocess, 'run',
                        lambda cmd, **kw: commands.append(cmd) or subprocess.CompletedProcess(cmd, 0))
    assert common.launch(tmp_path / 'run.yaml', tmp_path / 'run', [], '../data', tmp_path / 'run.log',
                         resume=True) == {'acc': 1}
    assert '--resume' in commands[0]


def test_the_sweep_refuses_a_source_of_another_data_dir_before_any_source_trains(import_script, tmp_path,
                                                                                 monkeypatch):
    """Source 1 was trained on A; a sitting on B with a new corruption would train source 0, then read source 1
    back as B's."""
    sweep = import_script('recipes', 'adaptation_sweep')
    monkeypatch.setattr(subprocess, 'run', fail_if_trained)
    out = tmp_path / 'out'
    trained_run(out / 'source1', data_folder(tmp_path / 'a'))
    with pytest.raises(SystemExit, match=f'{out / "source1"} was trained on --data-dir {tmp_path / "a"}'):
        sweep.main(['--budget', 'tiny', '--data-dir', data_folder(tmp_path / 'b'), '--shifts', 'contrast:5',
                    '--source-seeds', '2', '--adapt-seeds', '1', '--output', str(out)])
    assert not (out / 'source0').exists()


@pytest.mark.parametrize('flag', ['--resume', '--reuse'])
def test_transfer_refuses_a_kept_run_of_another_data_dir_before_any_run_trains(import_script, tmp_path,
                                                                               monkeypatch, flag):
    transfer = import_script('recipes', 'transfer')
    monkeypatch.setattr(subprocess, 'run', fail_if_trained)
    out = tmp_path / 'out'
    trained_run(out / 'runs' / 'mixed_independent', data_folder(tmp_path / 'a'))
    summary = {'data_version': DATA_VERSION}  # finished: --reuse keeps it
    (out / 'runs' / 'mixed_independent' / 'summary.json').write_text(json.dumps(summary))
    with pytest.raises(SystemExit, match='mixed_independent was trained on --data-dir'):
        transfer.main(['--budget', 'tiny', '--data-dir', data_folder(tmp_path / 'b'), flag, '--output', str(out)])
    assert not (out / 'runs' / 'target').exists()


def test_adaptation_refuses_to_resume_a_source_of_another_data_dir(import_script, tmp_path, monkeypatch):
    adaptation = import_script('recipes', 'adaptation')
    monkeypatch.setattr(subprocess, 'run', fail_if_trained)
    out = tmp_path / 'out'
    trained_run(out / 'source', None)
    with pytest.raises(SystemExit, match='trained on --data-dir \\(none: the Hub\\)'):
        adaptation.main(['--budget', 'tiny', '--data-dir', data_folder(tmp_path / 'b'), '--resume',
                         '--output', str(out)])


def test_the_sweep_adapts_a_new_corruption_only_under_the_config_of_the_recorded_ones(import_script, tmp_path,
                                                                                       monkeypatch):
    """The sweep compared only this sitting's --shifts with the records: after the budget's adaptation batch changed,
    a new corruption was adapted under it from the same source, and reported in one table with the old one."""
    from .test_recipe_arguments import sweep_record, trained_source
    sweep = import_script('recipes', 'adaptation_sweep')
    calls = []
    monkeypatch.setattr(sweep, 'run_source', lambda args, out, seed: calls.append(('source', seed)) or [])
    monkeypatch.setattr(sweep, 'run_adaptation', lambda *a: calls.append(('adapt', a[3])))
    out = tmp_path / 'out'
    argv = ['--budget', 'tiny', '--source-seeds', '1', '--adapt-seeds', '1', '--output', str(out)]
    sweep_record(sweep, sweep.parse_args(argv + ['--shifts', 'contrast:5']), out, 0, 0, 'abc')
    trained_source(out, 0, 'abc')
    monkeypatch.setitem(sweep.adaptation.BUDGETS['tiny'], 'adapt_batch', 64)
    with pytest.raises(SystemExit, match='contrast.5 seed 0 was trained under another config than seed 0 would be'):
        sweep.main(argv + ['--shifts', 'pixelate:5'])
    assert calls == []
    monkeypatch.setitem(sweep.adaptation.BUDGETS['tiny'], 'adapt_batch', 32)
    sweep.main(argv + ['--shifts', 'pixelate:5'])  # the recorded config: the new corruption joins the table
    assert calls == [('source', 0), ('adapt', 'pixelate:5')]


@pytest.mark.parametrize('script, argv', [
    ('transfer', ['--threads', '0']),
    ('transfer', ['--threads', '-1']),
    ('transfer', ['--lr', '-0.5']),
    ('transfer', ['--lr', '0']),
    ('adaptation', ['--threads', '0']),
    ('adaptation', ['--threads', '-1']),
])
def test_threads_and_learning_rates_that_are_not_positive_are_refused_before_anything_runs(
        import_script, tmp_path, capsys, script, argv):
    """`--threads 0` was ignored silently (every run took all threads), `--threads -1` crashed in torch after the
    arguments were accepted, and `--lr -0.5` was fine-tuned with and recorded."""
    module = import_script('recipes', script)
    with pytest.raises(SystemExit) as exit_:
        module.parse_args(argv + ['--output', str(tmp_path / 'out')])
    assert exit_.value.code == 2
    assert f'{argv[0]} {argv[1]}' in capsys.readouterr().err
    assert not (tmp_path / 'out').exists()


def test_the_sweeps_report_only_refuses_an_output_without_any_record(import_script, tmp_path, capsys):
    """A mistyped --output was created and given a report of '–' rows, where the other recipes refuse."""
    sweep = import_script('recipes', 'adaptation_sweep')
    with pytest.raises(SystemExit) as exit_:
        sweep.main(['--output', str(tmp_path / 'typo'), '--report-only', '--shifts', 'contrast:5'])
    assert exit_.value.code == 2
    assert 'no record' in capsys.readouterr().err
    assert not (tmp_path / 'typo').exists()


@pytest.mark.parametrize('content', ['', '{"args": {"budget": "fast"', '[]', '{}'],
                         ids=['empty', 'truncated', 'list', 'no_args'])
@pytest.mark.parametrize('recipe, argv', [
    ('sec4_methods', ['--budget', 'fast', '--methods', 'iiw', '--seeds', '1', '--resume']),
    ('sec4_methods', ['--report-only']),
    ('adaptation', ['--report-only']),
], ids=['sec4_resume', 'sec4_report', 'adaptation_report'])
def test_a_broken_results_json_is_refused_naming_the_file(import_script, tmp_path, monkeypatch, recipe, argv, content):
    """An interrupted copy of a committed record gave a raw JSONDecodeError or KeyError traceback naming no file."""
    main = import_script('recipes', recipe).main
    (tmp_path / 'results.json').write_text(content)
    with pytest.raises(SystemExit) as refused:
        main(argv + ['--output', str(tmp_path)])
    message = str(refused.value.code)
    assert str(tmp_path / 'results.json') in message and 'restore it' in message, message
    assert (tmp_path / 'results.json').read_text() == content  # nothing written over it
