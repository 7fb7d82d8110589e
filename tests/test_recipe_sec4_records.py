"""What the Sec. 4 recipes' records say they were made with: the RP pre-training a pre-trained method starts from is
part of its fingerprint, while a random-init method's fingerprint stays the one of its committed records."""
import argparse
import json

import pytest

from .test_recipe_records import FAST

REPO_RESULTS = __import__('pathlib').Path(__file__).resolve().parents[1] / 'docs' / 'results'


def write_configs(runs):
    """The config.yaml each of ``runs`` (``(config file, run folder, overrides)``) writes as train.py starts."""
    import yaml
    from timm_compat.config import load_config
    for config, run_dir, overrides in runs:
        run_dir.mkdir(parents=True, exist_ok=True)
        written = {**load_config(str(config), list(overrides)).to_dict(), 'output_dir': str(run_dir)}
        (run_dir / 'config.yaml').write_text(yaml.safe_dump(written, sort_keys=False))


def test_a_pretrained_methods_fingerprint_covers_the_rp_pretraining_it_starts_from(import_script, tmp_path,
                                                                                   monkeypatch):
    """A changed rp_pretraining.yaml changes what --init rp_pretrained networks start from, so seeds trained under it
    must not pool with older ones (the fingerprint named only the pre-training's folder); random init is untouched.
    The trained fingerprint, from the run folders, must match the planned one, or every new seed would be refused."""
    sec4 = import_script('recipes', 'sec4_methods')
    pretrained = argparse.Namespace(**{**FAST, 'init': 'rp_pretrained'})
    random = argparse.Namespace(**FAST)
    fingerprints = lambda: {(m, a.init): sec4.method_fingerprint(m, 1, a, tmp_path)  # noqa: E731
                            for m in ('iiw', 'dcc', 'upper_bound') for a in (pretrained, random)}
    before = fingerprints()
    changed = tmp_path / 'rp_pretraining.yaml'
    changed.write_text(f'base: {sec4.REPO / "configs" / "sec4" / "rp_pretraining.yaml"}\neval_batch_size: 100\n')
    monkeypatch.setattr(sec4, 'PRETRAINING_CONFIG', changed, raising=False)
    after = fingerprints()
    assert [k for k in before if before[k] == after[k]] == [(m, 'random') for m in ('iiw', 'dcc', 'upper_bound')]
    for method in ('iiw', 'dcc', 'incremental'):
        write_configs(sec4.pretraining_runs([method], pretrained, tmp_path)
                      + sec4.method_runs(method, 1, pretrained, tmp_path))
        assert sec4.trained_method_fingerprint(method, 1, pretrained, tmp_path) == (
            sec4.method_fingerprint(method, 1, pretrained, tmp_path)), method


@pytest.mark.parametrize('name', ['sec4_fast_5k_xeon', 'sec4_fast_dv2_xeon_amx'])
def test_committed_random_init_records_keep_their_fingerprints(import_script, tmp_path, name):
    """Committed records of --init random would be refused by --resume if their fingerprint moved: one seed of each
    method recomputed from the record's own arguments is the one recorded. A changed code default fails this too,
    rightly: those records were not trained under it."""
    sec4 = import_script('recipes', 'sec4_methods')
    saved = json.loads((REPO_RESULTS / name / 'results.json').read_text())
    args = argparse.Namespace(**saved['args'])
    assert args.init == 'random'
    for method, records in saved['results'].items():
        assert sec4.method_fingerprint(method, 5, args, tmp_path) == records[0]['config'], method


def test_a_pretrained_resume_with_nothing_left_to_train_runs_no_pretraining(import_script, tmp_path, monkeypatch):
    """Every (method, seed) asked is recorded: the sitting only rebuilds the report, so no RP pre-training runs (an
    empty method list counted as 'all IIW' and launched rp_pretraining0, a full training at the budget)."""
    from .test_recipe_records import fail_if_trained, record, write_results
    sec4 = import_script('recipes', 'sec4_methods')
    monkeypatch.setattr(sec4, 'launch', fail_if_trained)
    out = tmp_path / 'out'
    write_results(out, {'iiw': [record(0, 25.5)]}, methods=['iiw'], init='rp_pretrained')
    sec4.main(['--budget', 'fast', '--init', 'rp_pretrained', '--methods', 'iiw', '--seeds', '1', '--output', str(out),
               '--resume'])
    assert sec4.pretraining_runs([], argparse.Namespace(**{**FAST, 'init': 'rp_pretrained'}), out) == []
    assert (out / 'report.md').is_file()


def test_each_sec4_recipe_refuses_the_others_records_and_keeps_its_own(import_script, tmp_path, monkeypatch):
    """A control ablation's IIW+RP+DCC and upper bound (both tasks CIFAR-10) were taken for Fig. 2's methods, and its
    report replaced; records name their recipe now, and committed ones without the name are told apart by the
    ablation's --ablation argument."""
    from .test_recipe_records import fail_if_trained, record, write_results
    sec4 = import_script('recipes', 'sec4_methods')
    ablations = import_script('recipes', 'sec4_ablations')
    monkeypatch.setattr(sec4, 'launch', fail_if_trained)
    ablation = tmp_path / 'control'
    write_results(ablation, {'iiw_rp_dcc': [record(0, 81.0)]}, ablation='control')
    for argv in (['--resume'], ['--report-only']):
        with pytest.raises(SystemExit, match=r'records of recipes/sec4_ablations\.py, not of recipes/sec4_methods'):
            sec4.main(['--budget', 'fast', '--methods', 'iiw_rp_dcc', '--seeds', '1', '--output', str(ablation)] + argv)
    assert not (ablation / 'report.md').exists()
    methods = tmp_path / 'methods'
    monkeypatch.setattr(sec4, 'measure', lambda m, seed, args, out, bar: record(seed, 20.0))
    sec4.main(['--budget', 'fast', '--methods', 'iiw', '--seeds', '1', '--output', str(methods)])
    assert json.loads((methods / 'results.json').read_text())['args']['recipe'] == 'sec4_methods'
    with pytest.raises(SystemExit, match=r'records of recipes/sec4_methods\.py, not of recipes/sec4_ablations'):
        ablations.main(['--ablation', 'control', '--budget', 'fast', '--seeds', '1', '--output', str(methods),
                        '--resume'])


def test_a_killed_run_folder_of_another_config_is_refused_before_anything_trains(import_script, tmp_path,
                                                                                 monkeypatch):
    """rp seed 0 was killed under --budget cpu; a --budget fast --resume sitting trained and recorded iiw first, and
    only then did train.py refuse rp's folder. Both recipes now check the folders they would resume up front."""
    from timm_compat.rundir import MARKER
    from .test_recipe_records import record
    sec4 = import_script('recipes', 'sec4_methods')
    ablations = import_script('recipes', 'sec4_ablations')
    trained = []
    monkeypatch.setattr(sec4, 'measure', lambda m, seed, args, out, bar: trained.append(m) or record(seed, 20.0))
    monkeypatch.setattr(ablations, 'measure', lambda v, seed, args, out, bar: trained.append(v.name) or record(seed, 20.0))
    cpu = argparse.Namespace(**{**FAST, 'budget': 'cpu'})
    out = tmp_path / 'out'
    write_configs(sec4.method_runs('rp', 0, cpu, out))
    (out / 'rp_seed0' / MARKER).touch()
    with pytest.raises(SystemExit, match=r'rp_seed0 holds a run of another config .*move it away'):
        sec4.main(['--budget', 'fast', '--methods', 'iiw', 'rp', '--seeds', '1', '--output', str(out), '--resume'])
    write_configs(sec4.method_runs('rp', 0, cpu, out / 'abl' / 'rp_conv'))
    (out / 'abl' / 'rp_conv' / 'rp_seed0' / MARKER).touch()
    with pytest.raises(SystemExit, match=r'rp_conv/rp_seed0 holds a run of another config'):
        ablations.main(['--ablation', 'rp_head', '--budget', 'fast', '--seeds', '1', '--output', str(out / 'abl'),
                        '--variants', 'rp_tail', 'rp_conv', '--resume'])
    assert trained == []


def test_head_transfer_resumes_a_record_of_one_data_folder_under_another_spelling_of_it(import_script, tmp_path,
                                                                                         monkeypatch):
    """head_transfer compared --data-dir as typed: ``../data`` and its absolute path, one folder, were refused."""
    head_transfer = import_script('recipes', 'head_transfer')
    (tmp_path / 'data').mkdir()
    (tmp_path / 'run').mkdir()
    monkeypatch.chdir(tmp_path / 'run')
    path = tmp_path / 'results.json'
    path.write_text(json.dumps({'seed': 0, 'data_dir': '../data', 'budget': 'fast', 'epochs': None,
                                'data_version': __import__('timm_compat.data').data.DATA_VERSION}))
    args = argparse.Namespace(report_only=False, budget='fast', epochs=None, data_dir=str(tmp_path / 'data'))
    parser = argparse.ArgumentParser()
    assert head_transfer.saved_record(parser, args, path)['data_dir'] == '../data'
    with pytest.raises(SystemExit):
        head_transfer.saved_record(parser, argparse.Namespace(**{**vars(args), 'data_dir': str(tmp_path)}), path)


def test_head_transfer_records_the_machine_its_runs_trained_on(import_script, tmp_path, monkeypatch):
    """A stage 1 and upper bounds trained on a GPU and read back by --resume were recorded as trained on this
    process's machine, without their precision. Everything but run_seed's record is stubbed."""
    from unittest import mock
    import timm_compat
    import timm_compat.config
    head_transfer = import_script('recipes', 'head_transfer')
    summary = {'train_seconds': 3000.0, 'own_accuracy': {'net': 0.9}, 'own_accuracy_running': {'net': 0.88}}
    gpu = 'device cuda: NVIDIA H200; AMD EPYC x 16 cores, 16 torch threads'

    def launch(config, run_dir, *args, **kwargs):  # train.py --resume reading back a run made on the GPU machine
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / 'summary.json').write_text(json.dumps({'hardware': gpu, 'mixed_precision': 'bf16',
                                                          'phases': {'main': summary}}))
        return summary
    monkeypatch.setattr(head_transfer, 'launch', launch)
    for owner, name in ((timm_compat, 'Interface'), (timm_compat, 'Extractor'), (timm_compat, 'recombine'),
                        (timm_compat.config, 'load_config')):
        monkeypatch.setattr(owner, name, mock.MagicMock())
    monkeypatch.setattr(head_transfer, 'load_cifar10', lambda *a: (None, None))
    monkeypatch.setattr(head_transfer, 'finetune_head', lambda *a: [])
    monkeypatch.setattr(head_transfer, 'evaluate', lambda *a: {bn: {'recombined': 50.0} for bn in ('batch', 'running')})
    args = argparse.Namespace(data_dir=None, budget='fast', epochs=None, resume=True)
    record = head_transfer.run_seed(args, head_transfer.BUDGETS['fast'], 0, tmp_path / 'seed0', None)
    assert record['hardware'].startswith(f'{gpu}, in bf16 mixed precision'), record['hardware']
