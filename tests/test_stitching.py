"""Stitching, the applications' fallback for components of another interface: only the stitch trains, a stitched
model saves as its parts, an unfitted stitch is direct recombination, a stitch fitted on independent components is
bound to them, and streamed training data fits a stitch as data in memory does."""
import sys

import datasets
import pytest
import torch
from PIL import Image

import timm_compat as tc

from timm_compat.adaptation import adapt
from timm_compat.data import load_image_data
from timm_compat.stitching import Stitch, StitchedModel, fit_stitch
from timm_compat.streaming import StreamedImages
from timm_compat.synthetic import SYNTHETIC_CLASSES, make_synthetic
from timm_compat.transfer import transfer

# The applications' models, data and fixtures; these tests use them as the applications' own tests do.
from .test_applications import (assert_unchanged, interface, narrow, network, one_thread, optimizer_steps,  # noqa: F401
                                snapshot, sources, target, task_data, test, train)

CLASSES = SYNTHETIC_CLASSES['B']


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


def test_stitching_accepts_the_heads_classes_up_to_synonyms(interface, train, test):
    """A head trained on data that says 'ship' and task data that says 'boat' (the same class to evaluation) fit
    a stitch and transfer; ``select_classes`` takes the head's names, synonyms and all. Another order is refused."""
    head_names = ['ship' if c == 'boat' else c for c in CLASSES]
    model = tc.make_compatible('resnet8_cifar', split='layer2', interface=interface, num_classes=len(CLASSES),
                               class_names=head_names, init_seed=0)
    fit_stitch(model.extractor, model.head, train, 1, batch_size=16)
    transfer(model, {'self': model.extractor}, train, test, steps=(0,), batch_size=16)
    assert train.select_classes(head_names).labels.tolist() == train.labels.tolist()
    with pytest.raises(ValueError, match='select_classes'):
        fit_stitch(model.extractor, model.head, train.select_classes(CLASSES[::-1]), 1, batch_size=16)


def test_fit_stitch_trains_only_the_stitch(interface, target, sources, narrow, train, optimizer_steps, tmp_path):
    head, extractor = target.head, narrow
    before = {'extractor': snapshot(extractor), 'head': snapshot(head)}
    with pytest.raises(ValueError, match='width'):
        tc.recombine(extractor, head, force=True)

    model = fit_stitch(extractor, head, train, steps=3, batch_size=16, batchnorm=True)
    stitch = model.stitch
    assert len(optimizer_steps) == 3
    assert all(ids == {id(p) for p in stitch.parameters()} for ids in optimizer_steps)
    assert_unchanged(extractor, before['extractor'])
    assert_unchanged(head, before['head'])
    assert all(p.grad is None for p in [*extractor.parameters(), *head.parameters()])
    assert (stitch.extractor_interface_id, stitch.interface_id) == (None, interface.id)

    stitch.save_pretrained(tmp_path / 'stitch')
    assert f'compat-interface-{interface.id}' in (tmp_path / 'stitch' / 'README.md').read_text()
    loaded = StitchedModel(extractor, Stitch.from_pretrained(tmp_path / 'stitch'), head)
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad(), tc.eval_mode(model, 'batch'), tc.eval_mode(loaded, 'batch'):
        assert torch.equal(loaded(x), model(x))
    with pytest.raises(ValueError, match='(?i)fit a stitch'):
        StitchedModel(sources['s1'], Stitch(16, 16, head_interface_id=interface.id), head)


def test_a_stitched_model_is_saved_as_its_parts_not_as_a_pair_that_cannot_load(interface, target, narrow, tmp_path):
    """The pair format has no place for a stitch: saving a StitchedModel is refused, naming how to save its parts,
    and nothing is written."""
    stitched = StitchedModel(narrow, Stitch(8, 16, False, None, interface.id), target.head)
    for save in (lambda: stitched.save_pretrained(tmp_path / 'pair'), lambda: stitched.push_to_hub('me/pair')):
        with pytest.raises(TypeError, match=r'model\.stitch\.save_pretrained'):
            save()
    assert not (tmp_path / 'pair').exists()


def test_adapt_keeps_the_stitch_of_a_stitched_model(target, train):
    """Adapting a stitched model (extractor of another interface -> stitch -> target head) adapts its extractor
    through its own interface's RP head; the stitch stays between it and the head."""
    other = tc.Interface(width=8, rp=True)
    source = fit_stitch(network(other, seed=5, width=8).extractor, target.head, train, 1, batch_size=16)
    adapted = adapt(source, train.images, steps=1, batch_size=16, interface=other).model
    assert isinstance(adapted, StitchedModel) and adapted.stitch is source.stitch and adapted.head is source.head
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad(), tc.eval_mode(adapted, 'batch'):
        expected = adapted.head(adapted.stitch(adapted.extractor(x)))
        assert torch.equal(adapted(x), expected)


def test_unfitted_stitch_is_direct_recombination(interface, target, sources):
    stitched = StitchedModel(sources['s1'], Stitch(16, 16, False, interface.id, interface.id), target.head)
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad(), tc.eval_mode(stitched, 'batch'):
        assert torch.allclose(stitched(x), tc.recombine(sources['s1'], target.head)(x), atol=1e-5)


def test_a_stitched_model_is_refused_by_the_recombination_matrix(interface, target, sources, test):
    # A stitch that is not the identity: a matrix that paired the bare extractor and head would score another model.
    stitch = Stitch(16, 16, False, interface.id, interface.id)
    with torch.no_grad():
        stitch.conv.weight.mul_(-1)
    stitched = StitchedModel(sources['s1'], stitch, target.head)
    bare = tc.recombine(sources['s1'], target.head)
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad(), tc.eval_mode(stitched, 'batch'), tc.eval_mode(bare, 'batch'):
        assert not torch.allclose(stitched(x), bare(x), atol=1e-3)
    with pytest.raises(ValueError, match=r'Models \[1\] pass features through a stitch.*accuracy\(\)'):
        tc.recombination_matrix([target, stitched], [test, test])


def test_fit_stitch_and_fine_tuning_refuse_components_not_in_float32_before_any_work(interface, train, test,
                                                                                      monkeypatch):
    """bf16 components (from_pretrained keeps them so) crashed fit_stitch and transfer with a raw dtype error,
    transfer only after the step-0 evaluation. Training bf16 weights with SGD loses the small updates, so both
    refuse, naming .float(); ranking at step 0 alone trains nothing and still takes them."""
    model = network(interface, seed=0).to(torch.bfloat16)
    with pytest.raises(ValueError, match=r"extractor.*torch\.bfloat16.*\.float\(\)"):
        fit_stitch(model.extractor, model.head, train, 1, batch_size=8)
    # timm_compat.transfer names the function in the package: the module is looked up where it is loaded
    module = sys.modules['timm_compat.transfer']
    monkeypatch.setattr(module, 'bn_accuracy_report', lambda *a, **k: pytest.fail('evaluated before refusing'))
    fp32 = network(interface, seed=1)
    for to, source in ((model, model.extractor), (fp32, model.extractor), (model, fp32.extractor)):
        with pytest.raises(ValueError, match=r"torch\.bfloat16.*\.float\(\)"):
            transfer(to, {'s': source}, train, test, steps=(0, 1), batch_size=8)
    monkeypatch.undo()
    assert len(transfer(model, {'s': model.extractor}, train, test, steps=(0,)).curve('s').accuracy) == 1
