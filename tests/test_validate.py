"""validate.py: a finished run's saved components measured again, under the run's or other evaluation settings."""
import json
from pathlib import Path

import pytest
from accelerate.state import AcceleratorState, GradientState, PartialState

import timm_compat as tc
import train
import validate
from timm_compat.build import load_network, load_task_data
from timm_compat.config import load_config

from tests.conftest import REPO

TINY = str(REPO / 'tests' / 'tiny.yaml')
DCC_CLASSES = '[house, tree, arrow]'


@pytest.fixture(scope='module')
def finished_run(tmp_path_factory):
    """tests/tiny.yaml with network b classifying by the interface's DCC head (Sec. 5.2), so both head kinds load."""
    out = tmp_path_factory.mktemp('validate') / 'run'
    train.main(['-c', TINY, '--output-dir', str(out), '--set', f'interface.dcc_classes={DCC_CLASSES}',
                '--set', 'networks.1.head=dcc', '--set', f'networks.1.dataset.classes={DCC_CLASSES}'])
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()
    return out, json.loads((out / 'main' / 'summary.json').read_text())


def test_the_runs_own_settings_give_its_summary_again(finished_run):
    # Catches a swapped extractor or head, another test set, another BN mode or batch size than the run's.
    run, summary = finished_run
    result = validate.main([str(run)])
    assert (result['tta'], result['bn'], result['batch_size']) == ('none', 'batch', 20)
    for key in ('own_accuracy', 'recombination_matrix', 'own_accuracy_running', 'recombination_matrix_running'):
        assert result[key] == summary[key], key
    assert result['networks'] == ['a', 'b']


def test_bn_and_tta_are_the_asked_ones_and_the_results_file_holds_them(finished_run, tmp_path):
    run, summary = finished_run
    results = tmp_path / 'flip.json'
    result = validate.main([str(run), '--bn', 'running', '--tta', 'flip', '--results-file', str(results)])
    assert json.loads(results.read_text()) == json.loads(json.dumps(result))
    cfg = load_config(str(run / 'config.yaml'))
    for net in cfg.networks:  # b's head is the interface's DCC head
        model, test = load_network(net, cfg, run / 'main' / 'components'), load_task_data(net, cfg)[1]
        for bn, key in (('running', 'own_accuracy'), ('batch', 'own_accuracy_batch')):
            assert result[key][net.name] == tc.accuracy(model, test, batch_size=20, bn=bn, tta='flip'), (net.name, bn)


def test_bad_input_is_refused_before_anything_is_measured(finished_run, tmp_path):
    run, _ = finished_run
    with pytest.raises(SystemExit, match='no config.yaml'):
        validate.main([str(tmp_path)])
    with pytest.raises(SystemExit, match=r"no finished phase 'independent'.*finished: \['main'\]"):
        validate.main([str(run), '--phase', 'independent'])
    taken = tmp_path / 'taken.json'
    taken.write_text('{"kept": true}')
    with pytest.raises(SystemExit):  # argparse's error: exit status 2, message on stderr
        validate.main([str(run), '--results-file', str(taken)])
    assert taken.read_text() == '{"kept": true}'


def test_a_run_copied_elsewhere_is_scored_from_its_own_components(finished_run, tmp_path, monkeypatch):
    # train.py with a relative --output-dir recorded a relative components path: read from another directory, or
    # after the run was moved, it named nothing, or another run's components.
    import shutil
    run, summary = finished_run
    copy = Path(shutil.copytree(run, tmp_path / 'archive' / 'run'))
    recorded = json.loads((copy / 'main' / 'summary.json').read_text())
    (copy / 'main' / 'summary.json').write_text(json.dumps({**recorded, 'components': 'run/main/components'}))
    monkeypatch.chdir(tmp_path)
    result = validate.main([str(copy)])
    for key in ('own_accuracy', 'recombination_matrix'):
        assert result[key] == summary[key], key
