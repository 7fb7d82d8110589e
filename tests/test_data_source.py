"""Hub-id dataset sources and their local Parquet copies (``data_dir``, ``--data-dir``)."""
import io
import os
import subprocess
import sys

import datasets
import numpy as np
import pytest
from PIL import Image

from timm_compat.build import load_task_data
from timm_compat.config import ConfigError, load_config
from timm_compat.data import local_source
from timm_compat.rundir import RunDir, RunDirError

from tests.conftest import REPO

SEC4 = REPO / 'configs' / 'sec4'
CIFAR10 = ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck']


def _png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format='PNG')
    return out.getvalue()


def write_cifar10_copy(folder, per_split=(40, 20)):
    """``folder/{train,test}.parquet`` in the schema of ``uoft-cs/cifar10``: ``img`` = {bytes, path}, ClassLabel.

    Labels come in pairs, so both halves of a ``train_shard`` hold every class.
    """
    folder.mkdir(parents=True)
    features = datasets.Features({'img': datasets.Image(), 'label': datasets.ClassLabel(names=CIFAR10)})
    for split, n in zip(('train', 'test'), per_split):
        rows = {'img': [{'bytes': _png(i), 'path': None} for i in range(n)], 'label': [i // 2 % 10 for i in range(n)]}
        datasets.Dataset.from_dict(rows, features=features).to_parquet(str(folder / f'{split}.parquet'))


def test_local_source_maps_a_hub_id_to_its_folder_in_data_dir(tmp_path):
    for name in ('train.parquet', 'test-00000-of-00002.parquet', 'test-00001-of-00002.parquet'):
        (tmp_path / 'cifar10').mkdir(exist_ok=True)
        (tmp_path / 'cifar10' / name).touch()
    assert local_source('uoft-cs/cifar10', str(tmp_path)) == f'parquet:{tmp_path / "cifar10"}'
    assert local_source('uoft-cs/cifar10', None) == 'uoft-cs/cifar10'
    for source in ('parquet:/x', 'imagefolder:/x', 'synthetic:A'):
        assert local_source(source, str(tmp_path)) == source


def test_local_source_refuses_a_data_dir_without_the_copy(tmp_path):
    (tmp_path / 'stl10').mkdir()
    (tmp_path / 'stl10' / 'train.parquet').touch()
    with pytest.raises(FileNotFoundError) as e:
        local_source('tanganke/stl10', str(tmp_path))
    message = str(e.value)
    assert str(tmp_path / 'stl10' / 'test.parquet') in message and 'train.parquet' not in message
    assert '--data-dir' in message and 'tanganke/stl10' in message
    with pytest.raises(FileNotFoundError, match='validation.parquet'):
        local_source('tanganke/stl10', str(tmp_path), splits=('validation',))


def test_cifar10_halves_reads_the_local_copy_of_uoft_cs_cifar10(tmp_path):
    write_cifar10_copy(tmp_path / 'cifar10')
    cfg = load_config(str(SEC4 / 'rp.yaml'), ['data=cifar10_halves', f'data_dir={tmp_path}'])
    assert [n.dataset.source for n in cfg.networks] == ['uoft-cs/cifar10'] * 2  # the data's identity, recorded
    a_train, a_test = load_task_data(cfg.networks[0], cfg)
    assert (len(a_train), len(a_test), a_train.class_names) == (20, 20, CIFAR10)
    b_train, _ = load_task_data(cfg.networks[1], cfg)
    assert 'frog' not in b_train.class_names and len(b_train) == 18  # the other half, less its 2 frogs


def test_the_stl10_sized_stand_in_gives_side_b_a_tenth_disjoint_from_side_a(tmp_path):
    write_cifar10_copy(tmp_path / 'cifar10', per_split=(200, 20))
    cfg = load_config(str(SEC4 / 'rp.yaml'), ['data=cifar10_halves_5k', f'data_dir={tmp_path}'])
    a_train, b_train = (load_task_data(n, cfg)[0] for n in cfg.networks)
    # a: the 100 even indices; b: indices 1, 11, ..., 191 (all odd), labels i // 2 % 10 = 0 or 5, never frog (6).
    assert (len(a_train), len(b_train)) == (100, 20)
    assert sorted(set(b_train.labels.tolist())) == [0, 5] and 'frog' not in b_train.class_names


def test_a_missing_copy_of_any_network_refuses_before_data_is_decoded(tmp_path):
    write_cifar10_copy(tmp_path / 'cifar10')
    cfg = load_config(str(SEC4 / 'rp.yaml'), [f'data_dir={tmp_path}'])  # cifar10_stl10: no stl10/ copy here
    with pytest.raises(FileNotFoundError, match='stl10'):
        load_task_data(cfg.networks[0], cfg)


def test_the_removed_parquet_preset_names_its_replacement(tmp_path):
    with pytest.raises(ConfigError, match=r'^data=parquet is no longer.*--set data=cifar10_stl10 --data-dir DATA'):
        load_config(str(SEC4 / 'rp.yaml'), ['data=parquet', 'data_dir=DATA'])
    (tmp_path / 'data').mkdir()  # a user's own preset of that name is theirs to use
    (tmp_path / 'data' / 'parquet.yaml').write_text('networks: [{name: x}]\n')
    (tmp_path / 'run.yaml').write_text('output_dir: runs/{data}\n')
    assert load_config(str(tmp_path / 'run.yaml'), ['data=parquet']).output_dir == 'runs/parquet'


def test_offline_without_data_dir_says_how_to_use_a_local_copy(tmp_path):
    script = ('from timm_compat.build import load_task_data; from timm_compat.config import load_config\n'
              f'cfg = load_config({str(SEC4 / "rp.yaml")!r}, ["data=cifar10_halves"])\n'
              'load_task_data(cfg.networks[0], cfg)')
    env = dict(os.environ, HF_HUB_OFFLINE='1', HF_DATASETS_OFFLINE='1', HF_HOME=str(tmp_path / 'hf'),
               HF_DATASETS_CACHE=str(tmp_path / 'hf' / 'datasets'))
    result = subprocess.run([sys.executable, '-c', script], cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode != 0
    assert 'put a local Parquet copy in DIR/cifar10/train.parquet and pass --data-dir DIR' in result.stderr


def test_resume_takes_the_same_copy_moved_or_named_by_its_hub_id(tmp_path):
    def config(data_dir, source):
        return {'steps': 4, 'data_dir': data_dir, 'networks': [{'name': 'a', 'dataset': {'source': source}}]}

    run = RunDir(tmp_path).acquire()
    # A run from before Hub-id sources: --data-dir was the CIFAR-10 folder itself.
    run.prepare(config('/old/cifar10', 'parquet:/old/cifar10'), resume=False, overwrite=False, finished=[])
    with pytest.raises(RunDirError, match=r'networks\.0\.dataset\.source'):
        run.prepare(config('/old', 'tanganke/stl10'), resume=True, overwrite=False, finished=[])
    run.prepare(config('/old', 'uoft-cs/cifar10'), resume=True, overwrite=False, finished=[])
    run.prepare(config('/new', 'uoft-cs/cifar10'), resume=True, overwrite=False, finished=[])  # the copies moved
    run.release()


def test_offline_train_py_prints_one_error_line_not_a_traceback(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE='1', HF_DATASETS_OFFLINE='1', HF_HOME=str(tmp_path / 'hf'),
               HF_DATASETS_CACHE=str(tmp_path / 'hf' / 'datasets'))
    result = subprocess.run([sys.executable, 'train.py', '-c', str(SEC4 / 'rp.yaml'), '--set', 'data=cifar10_halves',
                             '--output-dir', str(tmp_path / 'run')], cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 2 and 'Traceback' not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith('error: Could not load Hub dataset')
    assert not (tmp_path / 'run').exists()


def test_a_split_the_dataset_lacks_is_a_value_error_naming_its_splits(tmp_path):
    """datasets' "Unknown split" was re-raised as a ConnectionError with advice to work offline."""
    from timm_compat._hf_source import load_hf
    write_cifar10_copy(tmp_path / 'cifar10')  # a local folder that datasets loads as it would a Hub id
    with pytest.raises(ValueError) as error:
        load_hf(str(tmp_path / 'cifar10'), 'validation')
    message = str(error.value)
    assert not isinstance(error.value, ConnectionError) and 'Without network access' not in message
    assert "has no split 'validation'" in message and "['train', 'test']" in message and 'test_split' in message
