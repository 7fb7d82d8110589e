"""recipes/sec4_ablations.py, the supplementary ablations of Sec. 4: what each variant's train.py runs resolve to,
its refusals, and (slow) a run end to end that a re-run with --resume reads back instead of training again."""
import argparse
import json
import sys

import pytest
import timm
import torch

from tests.test_recipes import CIFAR10_CLASSES, run_recipe, write_cifar10_copy
from timm_compat.config import load_config


@pytest.fixture
def ablations(import_script):
    return import_script('recipes', 'sec4_ablations')


def resolved(ablations, name, budget, tmp_path, **kw):
    """``{variant label: [resolved config of each of its train.py runs]}`` of one ablation, seed 0."""
    args = argparse.Namespace(budget=budget, setting='cifar10_halves', epochs=None, init='random',
                              counts=list(range(1, 10)), **kw)
    sec4 = sys.modules['sec4_methods']  # imported by the ablations from their folder
    return {v.label: [load_config(str(config), sets) for config, _, sets in
                      sec4.method_runs(v.method, 0, args, tmp_path / v.name, v.extra)]
            for v in ablations.VARIANTS[name](args)}


def test_common_classes_gives_the_dcc_head_the_first_k_common_classes_and_nothing_else(ablations, tmp_path):
    runs = resolved(ablations, 'common_classes', 'fast', tmp_path)
    assert list(runs) == [str(k) for k in range(1, 10)]
    common = [c for c in CIFAR10_CLASSES if c != 'frog']
    for k in range(1, 10):
        (cfg,) = runs[str(k)]
        assert cfg.interface.dcc_classes == common[:k]
        assert cfg.interface.dcc and not cfg.interface.rp and not cfg.iiw  # DCC alone, as in Fig. 2
        assert cfg.networks[1].dataset.classes == common  # the tasks keep their nine common classes
        assert [n.backbone for n in cfg.networks] == ['airbench94_cifar'] * 2


@pytest.mark.parametrize('budget,splits', [('cpu', ['layer1', 'layer2', 'layer3']),
                                           ('fast', ['stages.0', 'stages.1', 'stages.2'])])
def test_split_trains_iiw_rp_dcc_after_each_of_the_last_three_stages_without_an_adapter(ablations, tmp_path, budget,
                                                                                     splits):
    runs = resolved(ablations, 'split', budget, tmp_path)
    assert len(runs) == 3
    for (label, (cfg,)), split in zip(runs.items(), splits):
        assert [n.split for n in cfg.networks] == [split] * 2
        assert cfg.iiw and cfg.interface.rp and cfg.interface.dcc
        model = timm.create_model(cfg.networks[0].backbone)
        trunk = timm.create_model(cfg.networks[0].backbone, features_only=True, out_indices=[
            [i['module'] for i in model.feature_info].index(split)])
        channels = trunk(torch.zeros(2, 3, 32, 32))[0].shape[1]
        assert cfg.interface.width == channels and label == f'{split} ({channels} ch)'


def test_control_trains_both_networks_on_clean_cifar10_halves_with_all_ten_classes(ablations, tmp_path):
    runs = resolved(ablations, 'control', 'cpu', tmp_path)
    assert list(runs) == ['IIW+RP', 'IIW+DCC', 'IIW+RP+DCC', 'Upper bound']
    flags = {label: [(c.iiw, c.interface.rp, c.interface.dcc) for c in cfgs] for label, cfgs in runs.items()}
    assert flags == {'IIW+RP': [(True, True, False)], 'IIW+DCC': [(True, False, True)],
                     'IIW+RP+DCC': [(True, True, True)], 'Upper bound': [(False, True, False)] * 2}
    for label, cfgs in runs.items():
        nets = [n for c in cfgs for n in c.networks]
        assert [n.dataset.train_shard for n in nets] == [[0, 2], [1, 2]], label  # the two halves
        assert all(n.dataset.classes is None and n.dataset.shift is None for n in nets[1:]), label


@pytest.mark.parametrize('budget', ['fast', 'cpu'])
def test_rp_head_trains_rp_alone_with_the_default_head_the_backbones_tail_and_the_papers_width(ablations, tmp_path,
                                                                                              budget):
    from timm_compat.build import build_interface, build_network
    runs = resolved(ablations, 'rp_head', budget, tmp_path)
    configs = [cfg for (cfg,) in runs.values()]
    assert all(c.interface.rp and not c.interface.dcc and not c.iiw for c in configs)  # Fig. 2's RP: no IIW
    default, tail = configs[:2]
    assert default.interface.rp_head is None and tail.interface.rp_head == {
        'type': 'timm', 'backbone': tail.networks[0].backbone, 'split': tail.networks[0].split}
    widths = [c.interface.width for c in configs]
    assert widths == ([256, 256, 32] if budget == 'fast' else [32, 32])  # cpu: already the paper's width
    for cfg in configs:
        interface = build_interface(cfg, [CIFAR10_CLASSES] * 2)
        model = build_network(cfg.networks[0], 0, cfg, interface, CIFAR10_CLASSES).eval()
        features = model.extractor(torch.zeros(2, 3, 32, 32))
        assert features.shape[1] == cfg.interface.width and interface.rp(features).shape == (2, 4)
        if cfg is tail:  # the RP head is the task head's architecture (the backbone after the split), not conv
            assert type(interface.rp).__name__ == type(model.head).__name__ != 'Sequential'


@pytest.mark.parametrize('argv,message', [
    (['--ablation', 'common_classes', '--counts', '0', '9'], '--counts [0]: the tasks share 9 classes'),
    (['--ablation', 'common_classes', '--counts', '10'], '--counts [10]'),
    (['--ablation', 'control', '--setting', 'cifar10_stl10'], 'The control needs two parts of one dataset'),
    (['--ablation', 'split', '--seeds', '0'], '--seeds 0: give at least one seed'),
    (['--ablation', 'split', '--data-dir', '{tmp}'],
     "is read from a local Parquet copy, but there is no {tmp}/cifar10/train.parquet"),
])
def test_bad_arguments_are_refused_before_anything_runs(ablations, tmp_path, capsys, argv, message):
    argv = [a.format(tmp=tmp_path) for a in argv]
    with pytest.raises(SystemExit) as exit_:
        ablations.main(argv + ['--output', str(tmp_path / 'out')])
    assert exit_.value.code == 2 and message.format(tmp=tmp_path) in capsys.readouterr().err
    assert not (tmp_path / 'out').exists()


@pytest.mark.slow  # two short train.py runs of ResNet-8, then the same command again
def test_common_classes_runs_end_to_end_and_a_resumed_rerun_trains_nothing(ablations, tmp_path):
    write_cifar10_copy(tmp_path / 'data', per_split=(400, 100), num_classes=10)
    out = tmp_path / 'out'
    argv = ('--ablation', 'common_classes', '--budget', 'cpu', '--counts', 2, 9, '--seeds', 1, '--epochs', 0.2,
            '--data-dir', tmp_path / 'data', '--output', out, '--resume')
    proc = run_recipe('sec4_ablations.py', *argv)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / 'results.json').read_text())['results']
    assert list(results) == ['dcc_2_classes', 'dcc_9_classes']
    cfg = load_config(str(out / 'dcc_2_classes' / 'dcc_seed0' / 'config.yaml'))
    assert cfg.interface.dcc_classes == ['airplane', 'automobile']
    for variant, runs in results.items():
        summary = json.loads((out / variant / 'dcc_seed0' / 'summary.json').read_text())['phases']['main']
        m = summary['recombination_matrix']
        assert runs[0]['recombination']['batch'] == pytest.approx(100 * (m[0][1] + m[1][0]) / 2)
        # Fig. 3's correlation of the variant's own two extractors, as measured again from the saved components
        _, models, tests = sys.modules['sec4_methods'].run_networks([out / variant / 'dcc_seed0'])
        again = sys.modules['sec4_methods'].correlation_record('dcc', models, tests, None)
        assert runs[0]['correlation']['kind'] == again.pop('kind') == 'direct'
        assert {k: runs[0]['correlation'][k] for k in again} == pytest.approx(again)
    report = (out / 'report.md').read_text()
    assert '| 2 |' in report and '| 9 |' in report and '--counts 2 9' in report
    assert (out / 'figures' / 'common_classes.png').is_file()
    weights = sorted(out.glob('*/dcc_seed0/main/components/*/extractor/model.safetensors'))
    before = [w.stat().st_mtime_ns for w in weights]
    assert len(weights) == 4
    proc = run_recipe('sec4_ablations.py', *argv)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [w.stat().st_mtime_ns for w in weights] == before
    again = json.loads((out / 'results.json').read_text())['results']
    def drop(res):
        return {v: [{k: x for k, x in r.items() if k != 'wall_seconds'} for r in runs] for v, runs in res.items()}
    assert all(r['train_seconds'] > 0 for runs in again.values() for r in runs)  # the runs' own, not the read-back's
    assert drop(again) == drop(results)


def test_a_sitting_on_some_counts_reports_every_recorded_variant_and_names_its_output(ablations, tmp_path,
                                                                                      monkeypatch):
    """`--counts 3 --resume` rewrote report.md and the figure with the K = 3 row alone while results.json kept all
    nine, and the report's command had no --output: run as printed, it resumed from the default folder."""
    import shlex
    from tests.test_recipe_records import fail_if_trained, record, write_results
    monkeypatch.setattr(sys.modules['sec4_methods'], 'launch', fail_if_trained)
    out = tmp_path / 'out'
    write_results(out, {f'dcc_{k}_classes': [record(0, 10.0 + k)] for k in (9, 2, 5, 1, 3, 4, 6, 8, 7)},
                  ablation='common_classes')
    ablations.main(['--ablation', 'common_classes', '--budget', 'fast', '--seeds', '1', '--counts', '3',
                    '--output', str(out), '--resume'])
    report = (out / 'report.md').read_text()
    rows = [line.split('|')[1].strip() for line in report.splitlines() if line.startswith('| ') and '|' in line[2:]]
    assert [r for r in rows if r.isdigit()] == [str(k) for k in range(1, 10)]
    command = shlex.split(report.split('Command: `')[1].split('`')[0])
    assert command[:2] == ['python', 'recipes/sec4_ablations.py']
    again = ablations.parse_args(command[2:])
    assert again.output == str(out) and again.counts == list(range(1, 10)) and again.resume
