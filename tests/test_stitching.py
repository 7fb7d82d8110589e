"""Stitching beyond the applications' tests: a stitch fitted on independent components (no interface) is bound to
them, and streamed training data fits a stitch and fine-tunes a transfer as data in memory does."""
import datasets
import pytest
import torch
from PIL import Image

from timm_compat.data import load_image_data
from timm_compat.stitching import Stitch, StitchedModel, fit_stitch
from timm_compat.streaming import StreamedImages
from timm_compat.synthetic import make_synthetic
from timm_compat.transfer import transfer

from .test_applications import network, task_data


@pytest.fixture(scope='module')
def independent():
    torch.manual_seed(0)
    return [network(None, seed=s, width=16) for s in (4, 5)]


def test_a_stitch_between_independent_components_serves_only_those(independent, tmp_path):
    a, b = independent
    fitted = fit_stitch(a.extractor, a.head, task_data('train', 2), steps=1, batch_size=8)
    fitted.stitch.save_pretrained(tmp_path / 'stitch')
    loaded = Stitch.from_pretrained(tmp_path / 'stitch')
    for stitch in (fitted.stitch, loaded):
        StitchedModel(a.extractor, stitch, a.head)  # the components it was fitted on
        with pytest.raises(ValueError, match='fitted for another independent extractor'):
            StitchedModel(b.extractor, stitch, a.head)
        with pytest.raises(ValueError, match='fitted for another independent head'):
            StitchedModel(a.extractor, stitch, b.head)
        StitchedModel(b.extractor, stitch, a.head, force=True)  # asked for: e.g. an adapted extractor
    # Moved to another dtype, the extractor is still the one the stitch was fitted on.
    StitchedModel(a.extractor.to(torch.float64), fitted.stitch, a.head)
    a.extractor.to(torch.float32)



def streamed_and_in_memory(root):
    """The synthetic task's training images as Parquet (PNG, lossless), loaded streamed and in memory."""
    images, labels, names = make_synthetic('B', 'train', 16, 2, seed=1)
    features = datasets.Features({'img': datasets.Image(), 'label': datasets.ClassLabel(names=names)})
    rows = {'img': [Image.fromarray(i.permute(1, 2, 0).numpy()) for i in images], 'label': labels.tolist()}
    root.mkdir(parents=True)
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(root / 'train-00000-of-00001.parquet'))
    return [load_image_data(f'parquet:{root}', 'train', image_size=16, storage=s) for s in ('stream', 'memory')]


def test_streamed_training_data_fits_the_stitch_and_fine_tunes_as_in_memory(independent, tmp_path, monkeypatch):
    """fit_stitch and transfer indexed a streamed split as a tensor and crashed (transfer after step 0's work)."""
    monkeypatch.setenv('TIMM_COMPAT_CACHE', str(tmp_path / 'cache'))
    stream, memory = streamed_and_in_memory(tmp_path / 'data')
    assert isinstance(stream.images, StreamedImages)
    a, b = independent
    fitted = []
    for data in (stream, memory):
        torch.manual_seed(0)  # augmentation's draws
        fitted.append(fit_stitch(a.extractor, a.head, data, steps=2, batch_size=8).stitch.state_dict())
    assert all(torch.equal(fitted[0][k], fitted[1][k]) for k in fitted[1])
    curves = []
    for data in (stream, memory):
        torch.manual_seed(0)
        curves.append(transfer(a, {'b': b.extractor}, data, memory, steps=(0, 2), batch_size=8, on_mismatch='force',
                               eval_batch_size=16).curve('b').accuracy_by_bn)
    assert curves[0] == curves[1]
