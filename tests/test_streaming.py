"""Streamed splits (``timm_compat.streaming``): the in-memory path's pixels, batches and runs, from disk.

Data the tests write: Parquet shards in the Hub's ``train-0000N-of-0000M`` layout and an image folder, with
images that are not square and not at the decoded size, decoded at 64 to 224 px.
"""
import json
import os
import subprocess
import sys

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

import train
from timm_compat import streaming
from timm_compat.data import EpochSampler, evaluation_batches, iterate_batches, load_image_data, training_batch
from timm_compat.streaming import StreamedImages, choose_storage, materialize, stream_batches
from tests.conftest import REPO, crash_after_logging
from tests.datasets_util import write_imagefolder

CLASSES = ['airplane', 'automobile', 'bird']


def write_parquet_shards(root, n=(30, 12), shards=2, shape=(50, 70)):
    """``root/{split}-0000i-of-0000N.parquet``: non-square random images, a ClassLabel column."""
    rng = np.random.default_rng(0)
    features = datasets.Features({'img': datasets.Image(), 'label': datasets.ClassLabel(names=CLASSES)})
    root.mkdir(parents=True)
    for split, count in zip(('train', 'test'), n):
        images = [Image.fromarray(rng.integers(0, 255, (*shape, 3), dtype=np.uint8)) for _ in range(count)]
        ds = datasets.Dataset.from_dict({'img': images, 'label': [i % 3 for i in range(count)]}, features=features)
        for i in range(shards):
            ds.shard(shards, i, contiguous=True).to_parquet(str(root / f'{split}-{i:05d}-of-{shards:05d}.parquet'))
    return f'parquet:{root}'


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv('TIMM_COMPAT_CACHE', str(tmp_path / 'cache'))


@pytest.mark.parametrize('size', [64, 224])
@pytest.mark.parametrize('kind', ['parquet_shards', 'imagefolder'])
def test_streamed_rows_are_the_in_memory_rows_pixel_for_pixel(tmp_path, kind, size):
    if kind == 'parquet_shards':
        source = write_parquet_shards(tmp_path / 'data')
    else:
        source = write_imagefolder(tmp_path / 'data', CLASSES, per_class=5, size=40)
    memory = load_image_data(source, 'train', image_size=size)
    stream = load_image_data(source, 'train', image_size=size, storage='stream')
    assert isinstance(stream.images, StreamedImages) and isinstance(memory.images, torch.Tensor)
    assert stream.images.shape == memory.images.shape == (len(memory), 3, size, size)
    assert torch.equal(stream.labels, memory.labels)
    index = torch.tensor([7, 0, 3, 3, len(memory) - 1])
    assert torch.equal(materialize(stream.images[index]), memory.images[index])
    mask = memory.labels == 1  # views compose: a mask, then indices into it
    assert torch.equal(materialize(stream.images[mask][torch.tensor([2, 0])]), memory.images[mask][[2, 0]])


def write_bytes_parquet(root, count=9, shape=(30, 20)):
    """One Parquet file whose image column is raw PNG bytes and whose labels are plain ints (no HF metadata)."""
    import io
    import pyarrow as pa
    import pyarrow.parquet as pq
    rng = np.random.default_rng(1)
    pngs = []
    for _ in range(count):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (*shape, 3), dtype=np.uint8)).save(buf, format='PNG')
        pngs.append(buf.getvalue())
    root.mkdir(parents=True)
    pq.write_table(pa.table({'image': pngs, 'label': [i % 3 for i in range(count)]}), str(root / 'train.parquet'))
    return f'parquet:{root}', [Image.open(io.BytesIO(b)).convert('RGB') for b in pngs]


def test_a_column_of_image_bytes_is_cast_only_when_rows_are_decoded(tmp_path, monkeypatch):
    source, pil = write_bytes_parquet(tmp_path / 'data')
    expected = torch.stack([streaming.pixels(img, 32) for img in pil])
    memory = load_image_data(source, 'train', image_size=32, class_names=CLASSES)
    stream = load_image_data(source, 'train', image_size=32, class_names=CLASSES, storage='stream')
    assert torch.equal(memory.images, expected) and torch.equal(materialize(stream.images), expected)
    # A second in-memory load is a decode-cache hit: nothing to decode, so the column is never cast.
    monkeypatch.setattr(datasets.Dataset, 'cast_column', lambda *a, **k: pytest.fail('cast on a cache hit'))
    assert torch.equal(load_image_data(source, 'train', image_size=32, class_names=CLASSES).images, expected)


@pytest.mark.parametrize('workers', [0, 2])
def test_stream_batches_yields_each_index_batch_in_order(tmp_path, workers):
    stream = load_image_data(write_parquet_shards(tmp_path / 'data'), 'train', image_size=64, storage='stream',
                             workers=workers)
    memory = load_image_data(f'parquet:{tmp_path / "data"}', 'train', image_size=64)
    sampler = EpochSampler(len(stream), 8, seed=3)
    wanted = [sampler.batch(step) for step in range(7)]  # crosses two epochs
    got = list(stream_batches(stream.images, iter(wanted)))
    assert len(got) == 7
    for want, (index, images) in zip(wanted, got):
        assert torch.equal(index, want) and torch.equal(images, memory.images[want])


def test_training_and_evaluation_batches_match_the_in_memory_ones(tmp_path):
    source = write_parquet_shards(tmp_path / 'data')
    memory = load_image_data(source, 'test', image_size=64)
    stream = load_image_data(source, 'test', image_size=64, storage='stream', workers=1)
    index, stats = torch.tensor([5, 1, 9, 2]), ([0.5] * 3, [0.25] * 3)
    torch.manual_seed(0)
    expected = training_batch(memory, index, *stats, pad=4)
    torch.manual_seed(0)
    assert all(torch.equal(a, b) for a, b in zip(training_batch(stream, index, *stats, pad=4), expected))
    for shard in [(0, 1), (1, 2)]:
        pairs = zip(iterate_batches(stream, 5, seed=1, shard=shard), iterate_batches(memory, 5, seed=1, shard=shard))
        assert [torch.equal(s[0], m[0]) and torch.equal(s[1], m[1]) for s, m in pairs] == \
            [True] * len(evaluation_batches(len(memory), 5, 1)[shard[0]::shard[1]])


def test_auto_streams_only_a_split_above_the_memory_budget(tmp_path):
    source = write_parquet_shards(tmp_path / 'data')  # 30 training images: 30 * 3 * 64 * 64 bytes = 0.37 MB
    small = load_image_data(source, 'train', image_size=64, storage='auto', memory_budget_gb=0.0004)
    large = load_image_data(source, 'train', image_size=64, storage='auto', memory_budget_gb=0.0003)
    assert isinstance(small.images, torch.Tensor) and isinstance(large.images, StreamedImages)
    # The in-memory path decodes the whole split, then copies a shard out: a shard is held in memory only where the
    # whole split fits, and a limit (drawn before decoding) counts.
    half = load_image_data(source, 'train', image_size=64, storage='auto', memory_budget_gb=0.0003, shard=[0, 2])
    assert isinstance(half.images, StreamedImages) and len(half) == 15
    limited = load_image_data(source, 'train', image_size=64, storage='auto', memory_budget_gb=0.0003, limit=20)
    assert isinstance(limited.images, torch.Tensor) and len(limited) == 20
    assert choose_storage('memory', 10 ** 9, 224, 1) == 'memory' and choose_storage('stream', 1, 8, None) == 'stream'
    assert choose_storage('auto', 10 ** 6, 224, None) == ('stream' if 10 ** 6 * 3 * 224 ** 2 >
                                                          streaming._physical_memory() / 4 else 'memory')


def test_auto_never_decodes_more_than_the_memory_budget(tmp_path, monkeypatch):
    """A shard under the budget of a split above it was decoded whole into memory: the budget was not kept."""
    source = write_parquet_shards(tmp_path / 'data')  # 30 images at 64 px: 0.37 MB; a half shard 0.18 MB
    decoded, decode = [], streaming.decode_cached

    def spy(*args):
        decoded.append(decode(*args).nbytes)
        return decode(*args)
    monkeypatch.setattr(streaming, 'decode_cached', spy)
    for shard in ([0, 2], [1, 2], None):
        load_image_data(source, 'train', image_size=64, storage='auto', memory_budget_gb=0.0003, shard=shard)
    data = load_image_data(source, 'train', image_size=64, storage='auto', memory_budget_gb=0.0003, limit=20,
                           shard=[0, 2])
    assert isinstance(data.images, torch.Tensor) and len(data) == 10
    assert decoded == [20 * 3 * 64 * 64] and max(decoded) <= 0.0003e9


def test_the_default_budget_is_shared_by_this_machines_processes_and_bounded_by_the_gpu(monkeypatch):
    monkeypatch.setattr(streaming, '_physical_memory', lambda: 2 ** 40)  # a 1 TiB node with 8 x 80 GB GPUs
    assert streaming.memory_budget_gb(1) == pytest.approx(2 ** 40 / 4 / 1e9)
    assert streaming.memory_budget_gb(8) == pytest.approx(2 ** 40 / 32 / 1e9)

    class Properties:
        total_memory = 80 * 10 ** 9
    monkeypatch.setattr(torch.cuda, 'get_device_properties', lambda device: Properties())
    assert streaming.memory_budget_gb(8, torch.device('cuda', 3)) == pytest.approx(20)
    imagenet = 1_281_167  # ImageNet's training images, 193 GB at 224 px: streamed there, not copied 8 times
    assert choose_storage('auto', imagenet, 224, streaming.memory_budget_gb(8, torch.device('cuda'))) == 'stream'


def test_workers_and_threads_divide_this_machines_cores_not_the_whole_runs(monkeypatch):
    from timm_compat import _hardware, build
    from timm_compat.config import load_config
    monkeypatch.setattr(streaming, 'cpu_cores', lambda: 64)
    monkeypatch.setenv('LOCAL_WORLD_SIZE', '8')  # two machines of 8 processes each
    assert streaming.default_workers(_hardware.local_processes(16)) == 7
    monkeypatch.setattr(_hardware, 'cpu_cores', lambda: 64)
    threads = torch.get_num_threads()
    try:
        _hardware.configure_device(torch.device('cpu'), False, 16, None)
        assert torch.get_num_threads() == 8
    finally:
        torch.set_num_threads(threads)
    monkeypatch.delenv('LOCAL_WORLD_SIZE')
    assert _hardware.local_processes(4) == 4  # a single-machine launch without torchrun's variable


def test_the_stream_loader_benchmark_puts_its_labels_where_the_model_is(tmp_path, import_script):
    bench = import_script('benchmarks', 'stream_loader')
    source = bench.write_jpeg_parquet(tmp_path / 'jpeg', 8, (40, 30), shards=2)
    for data in bench.streamed_sets(source, 32, torch.device('meta')):  # a device other than the host's
        assert isinstance(data.images, StreamedImages) and data.labels.device.type == 'meta'


def test_a_shift_of_a_streamed_split_is_refused(tmp_path):
    with pytest.raises(ValueError, match='shift corrupts a split once, in memory.*storage: memory'):
        load_image_data(write_parquet_shards(tmp_path / 'data'), 'train', storage='stream',
                        shift=['defocus_blur:2'])


def test_a_shift_of_a_split_auto_streams_names_the_config_keys(tmp_path):
    """The message named load_image_data's arguments (storage, memory_budget_gb) as if they were config keys."""
    with pytest.raises(ValueError, match=r'\(data_storage: auto\)\. Set data_storage: memory, or raise '
                                         r'data_memory_gb to at least 0\.000369 GB'):
        load_image_data(write_parquet_shards(tmp_path / 'data'), 'train', image_size=64, storage='auto',
                        memory_budget_gb=0.0003, shift=['defocus_blur:2'])


def tiny_parquet_run(tmp_path, name, *args):
    source = write_parquet_shards(tmp_path / 'data', n=(48, 24)) if not (tmp_path / 'data').exists() else \
        f'parquet:{tmp_path / "data"}'
    return train.main(['-c', str(REPO / 'tests' / 'tiny.yaml'), '--output-dir', str(tmp_path / name),
                       '--set', f'networks.0.dataset.source={source}', '--set', f'networks.1.dataset.source={source}',
                       '--set', 'steps=6', '--set', 'log_every=1', '--set', 'checkpoint_every=3', *args])


def metrics(tmp_path, name):
    rows = (tmp_path / name / 'main' / 'metrics.csv').read_text().splitlines()
    header = rows[0].split(',')
    return [{k: v for k, v in zip(header, row.split(',')) if k != 'time'} for row in rows[1:]]


@pytest.mark.slow  # three tiny runs, one with a decoding worker
@pytest.mark.usefixtures('fresh_accelerate')
def test_a_streamed_run_trains_resumes_and_scores_as_the_in_memory_run(tmp_path, monkeypatch):
    memory = tiny_parquet_run(tmp_path, 'memory', '--set', 'data_storage=memory')
    stream = tiny_parquet_run(tmp_path, 'stream', '--set', 'data_storage=stream', '--set', 'loader_workers=1')
    assert metrics(tmp_path, 'stream') == metrics(tmp_path, 'memory') and len(metrics(tmp_path, 'memory')) == 6
    for key in ('own_accuracy', 'recombination_matrix'):
        assert stream['phases']['main'][key] == memory['phases']['main'][key]
    # Killed after step 4 in memory, resumed streamed from the checkpoint of step 3 (storage may change on a resume:
    # the batches are the same): the workers start at step 3, not at 0.
    crash_after_logging(monkeypatch, 4)
    with pytest.raises(KeyboardInterrupt):
        tiny_parquet_run(tmp_path, 'resumed', '--set', 'data_storage=memory')
    monkeypatch.undo()
    tiny_parquet_run(tmp_path, 'resumed', '--set', 'data_storage=stream', '--set', 'loader_workers=1', '--resume')
    assert metrics(tmp_path, 'resumed') == metrics(tmp_path, 'memory')
    summary = json.loads((tmp_path / 'resumed' / 'summary.json').read_text())
    assert summary['phases']['main']['own_accuracy'] == memory['phases']['main']['own_accuracy']


@pytest.mark.slow  # two 2-process launches
def test_a_two_process_streamed_run_is_the_in_memory_one(tmp_path):
    # Each process streams its own shard of every epoch and of the evaluation batches, as it gathers them in memory.
    source = write_parquet_shards(tmp_path / 'data', n=(64, 40))
    env = {**os.environ, 'CUDA_VISIBLE_DEVICES': '', 'ACCELERATE_USE_CPU': 'true', 'OMP_NUM_THREADS': '1'}

    def launch(storage):
        cmd = [sys.executable, '-m', 'accelerate.commands.launch', '--multi_gpu', '--num_processes', '2',
               '--num_machines', '1', '--mixed_precision', 'no', '--dynamo_backend', 'no',
               str(REPO / 'train.py'), '-c', str(REPO / 'tests' / 'tiny.yaml'), '--output-dir', str(tmp_path / storage),
               '--set', f'networks.0.dataset.source={source}', '--set', f'networks.1.dataset.source={source}',
               '--set', 'steps=6', '--set', 'log_every=1', '--set', 'cpu_threads=1', '--set', f'data_storage={storage}',
               '--set', 'loader_workers=1']
        proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads((tmp_path / storage / 'summary.json').read_text())['phases']['main']

    memory, stream = launch('memory'), launch('stream')
    assert metrics(tmp_path, 'stream') == metrics(tmp_path, 'memory') and len(metrics(tmp_path, 'memory')) == 6
    for key in ('own_accuracy', 'recombination_matrix', 'own_accuracy_running', 'recombination_matrix_running'):
        assert stream[key] == memory[key], key


def test_deploy_and_the_bn_report_take_a_streamed_split_as_its_in_memory_twin(tmp_path):
    """AdaBN on unlabelled images of a streamed split decodes them as evaluation does: the deployed model and the
    report are those of the same split held in memory."""
    import timm_compat as tc
    source = write_parquet_shards(tmp_path / 'data', n=(30, 12))
    memory = load_image_data(source, 'train', image_size=64)
    stream = load_image_data(source, 'train', image_size=64, storage='stream')
    model = tc.make_compatible('resnet8_cifar', split='layer2', interface=tc.Interface(width=16), num_classes=3,
                               class_names=CLASSES, init_seed=0)
    deployed = {kind: tc.deploy(model, data, batch_size=10) for kind, data in (('memory', memory), ('stream', stream))}
    for name, buffer in deployed['memory'].state_dict().items():
        assert torch.equal(buffer, deployed['stream'].state_dict()[name]), name
    assert (tc.bn_accuracy_report(model, memory, unlabeled=stream, batch_size=10)
            == tc.bn_accuracy_report(model, memory, unlabeled=memory, batch_size=10))


def test_features_of_a_streamed_split_are_those_of_its_in_memory_twin(tmp_path):
    """Fig. 3's correlations and CKA read features as evaluation reads images."""
    import timm_compat as tc
    from timm_compat.analysis import extract_features
    source = write_parquet_shards(tmp_path / 'data', n=(30, 12))
    memory = load_image_data(source, 'train', image_size=64)
    stream = load_image_data(source, 'train', image_size=64, storage='stream')
    model = tc.make_compatible('resnet8_cifar', split='layer2', interface=tc.Interface(width=16), num_classes=3,
                               class_names=CLASSES, init_seed=0)
    assert torch.equal(extract_features(model.extractor, stream, 7), extract_features(model.extractor, memory, 7))


def six_streamed_images(tmp_path):
    source = write_parquet_shards(tmp_path / 'data', n=(6, 3), shards=1, shape=(8, 8))
    return load_image_data(source, 'train', image_size=8, storage='stream').images


def test_decode_cached_decodes_the_whole_split_in_its_order_or_refuses(tmp_path):
    """Any view as long as the split, reordered or duplicated, decoded as the whole split in its stored order."""
    images = six_streamed_images(tmp_path)
    assert torch.equal(images.decode_cached(), images.decode())
    assert torch.equal(images[:].decode_cached(), images.decode())
    for rows in ([5, 4, 3, 2, 1, 0], [0] * 6, [0, 1, 2]):
        with pytest.raises(ValueError, match=r'whole split.*decode\(\)'):
            images[torch.tensor(rows)].decode_cached()


def test_an_integer_index_is_refused_naming_the_one_row_view(tmp_path):
    """streamed[2] gave a view whose rows were a scalar: len, shape and materialize then failed obscurely."""
    images = six_streamed_images(tmp_path)
    for key in (2, np.int64(2), torch.tensor(2)):
        with pytest.raises(TypeError, match=r'images\[\[2\]\]'):
            images[key]
    assert torch.equal(materialize(images[[2]]), images.decode()[[2]])
