"""The applications of Sec. 5: adaptation through RP, transfer with a reused head, and the stitching fallback.

Every model is a ResNet-8 split after layer2 at interface width 16, on a few synthetic images.
"""
import copy
import sys

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

import timm_compat as tc
from timm_compat.adaptation import adapt, evaluate_adaptation
from timm_compat.evaluation import average_class_accuracy, per_class_accuracy
from timm_compat.data import ImageData
from timm_compat.stitching import Stitch, fit_stitch
from timm_compat.synthetic import SYNTHETIC_CLASSES, make_synthetic
from timm_compat.transfer import TransferCurve, TransferResult, curve_seed, transfer

CLASSES = SYNTHETIC_CLASSES['B']


def network(interface, seed, width=None):
    return tc.make_compatible('resnet8_cifar', split='layer2', interface=interface, num_classes=len(CLASSES),
                              class_names=CLASSES, init_seed=seed, width=width)


def task_data(split, per_class):
    images, labels, names = make_synthetic('B', split, 16, per_class, seed=1)
    return ImageData(images, labels, names, f'synthetic:B[{split}]')


def snapshot(module):
    """Every parameter and buffer, so that BN running statistics count as changes too."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_unchanged(module, before):
    after = module.state_dict()
    assert after.keys() == before.keys()
    changed = [k for k in before if not torch.equal(after[k], before[k])]
    assert not changed, f'changed: {changed}'


def stale_running_stats(model, label=0):
    """A copy of ``model`` whose head, in plain eval mode, predicts ``label`` for every image: its BN running
    variances are huge, so each BN outputs its shift (0 at initialisation) and the logits are the classifier's bias,
    whose largest entry is ``label``. A small bias, so with batch statistics the features still decide."""
    stale = tc.CompatibleModel(model.extractor, copy.deepcopy(model.head))
    for module in stale.head.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.running_var.fill_(1e12)
    classifier = [m for m in stale.head.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        classifier.bias.zero_()
        classifier.bias[label] = 1e-3
    return stale


@pytest.fixture(scope='module', autouse=True)
def one_thread():
    """These tensors are tiny: a second thread only adds synchronisation, which on a loaded machine costs ten
    times the work itself."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope='module')
def interface():
    return tc.Interface(width=16, rp=True)


@pytest.fixture(scope='module')
def target(interface):
    return network(interface, seed=0)


@pytest.fixture(scope='module')
def source(target):
    """The source model of the adaptation tests; one network serves both roles."""
    return target


@pytest.fixture(scope='module')
def sources(interface):
    return {'s1': network(interface, seed=1).extractor, 's2': network(interface, seed=2).extractor}


@pytest.fixture(scope='module')
def narrow():
    """An independent extractor (no interface) of another width than the interface's."""
    return network(None, seed=3, width=8).extractor


@pytest.fixture(scope='module')
def train():
    return task_data('train', 4)


@pytest.fixture(scope='module')
def test():
    return task_data('test', 3)


@pytest.fixture
def optimizer_steps():
    """The ids of the parameters every optimiser step anywhere in the process updates, one set per step."""
    steps = []
    handle = register_optimizer_step_pre_hook(
        lambda opt, args, kwargs: steps.append({id(p) for g in opt.param_groups for p in g['params']}))
    yield steps
    handle.remove()


# Adaptation (Sec. 5.1)

def test_adapt_updates_only_a_copy_of_the_extractor(interface, source, train, optimizer_steps):
    before = {name: snapshot(m) for name, m in
              (('extractor', source.extractor), ('head', source.head), ('interface', interface))}
    interface_id = interface.id
    result = adapt(source, train.images, steps=3, batch_size=16, lr=0.05)
    adapted = result.model

    assert len(optimizer_steps) == 3
    assert all(ids == {id(p) for p in adapted.extractor.parameters()} for ids in optimizer_steps)
    assert_unchanged(source.extractor, before['extractor'])  # the caller's source model is left as it was
    assert_unchanged(source.head, before['head'])
    assert_unchanged(interface, before['interface'])  # RP weights and BN buffers alike
    assert interface.id == interface_id
    assert all(p.grad is None for p in [*interface.parameters(), *source.head.parameters()])
    assert adapted.head is source.head and adapted.extractor is not source.extractor
    moved = [k for k, v in adapted.extractor.state_dict().items() if not torch.equal(v, before['extractor'][k])]
    assert any(k.endswith('weight') for k in moved)
    # Still compatible: the adapted extractor claims the interface that its head and RP head belong to.
    assert tc.recombine(adapted.extractor, source.head).interface is interface
    assert result.history['step'] == [3]


def test_adapt_lowers_the_rotation_loss(source, train):
    history = adapt(source, train.images, steps=16, batch_size=40, lr=0.05, augment=False, log_every=4).history
    assert history['step'] == [4, 8, 12, 16]
    assert history['rp_loss'][-1] < history['rp_loss'][0]


class LabelsForbidden(ImageData):
    """Target data whose labels cannot be read without failing the test."""

    @property
    def labels(self):
        raise AssertionError('adapt() read the target labels')


def test_adapt_never_reads_target_labels(source, train):
    before = snapshot(source)
    guarded = object.__new__(LabelsForbidden)
    guarded.__dict__.update(images=train.images, class_names=train.class_names, name='target')
    # Refused by type, before anything is copied or trained: the AssertionError above never fires.
    with pytest.raises(ValueError, match='unsupervised.*Pass data.images'):
        adapt(source, guarded, steps=1, batch_size=16)
    assert_unchanged(source, before)
    # With the images and the RNG state fixed the adaptation is fixed: nothing else about the data enters it.
    torch.manual_seed(0)
    first = adapt(source, train.images, steps=2, batch_size=16).model.extractor
    torch.manual_seed(0)
    again = adapt(source, train.images.clone(), steps=2, batch_size=16).model.extractor
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values()))


def test_adapt_refuses_an_interface_without_rp_head(train):
    no_rp = tc.Interface(width=16, dcc_classes=CLASSES[:3])
    source = network(no_rp, seed=0)
    before = snapshot(source)
    with pytest.raises(ValueError, match='no RP head'):
        adapt(source, train.images, steps=1, batch_size=16)
    assert_unchanged(source, before)


def test_adapt_components_loaded_from_disk(interface, source, train, test, tmp_path):
    for name, component in (('interface', interface), ('extractor', source.extractor), ('head', source.head)):
        component.save_pretrained(tmp_path / name)
    loaded = tc.recombine(tc.Extractor.from_pretrained(tmp_path / 'extractor'),
                          tc.Head.from_pretrained(tmp_path / 'head'))
    with pytest.raises(ValueError, match='carries no interface'):
        adapt(loaded, train.images, steps=1, batch_size=16)
    with pytest.raises(ValueError, match='trained against interface'):
        adapt(loaded, train.images, steps=1, batch_size=16, interface=tc.Interface(width=16, rp=True))
    result = adapt(loaded, train.images, steps=1, batch_size=16,
                   interface=tc.Interface.from_pretrained(tmp_path / 'interface'))
    scores = evaluate_adaptation(loaded, result.model, test)
    assert set(scores) == {'source', 'source_test_bn', 'adapted', 'adapted_running_bn'}
    assert scores['source_test_bn'] == average_class_accuracy(loaded, test, bn='batch')


def test_average_class_accuracy_weighs_classes_equally(target):
    model = target
    images = torch.randint(0, 256, (11, 3, 16, 16), dtype=torch.uint8)
    cfg = model.pretrained_cfg
    with torch.no_grad(), tc.eval_mode(model, 'running'):
        predicted = model(tc.data.normalize(images, cfg['mean'], cfg['std'])).argmax(1)
    # Ten images predicted right, and one wrong that is the only image of its class: plain accuracy 10/11, but
    # that class scores 0 and weighs as much as all the others together.
    labels = predicted.clone()
    labels[10] = next(c for c in range(len(CLASSES)) if c not in predicted.tolist())
    data = ImageData(images, labels, CLASSES)
    expected = torch.stack([(predicted[labels == c] == c).float().mean() for c in labels.unique()]).mean().item()
    assert expected <= 0.9 < 10 / 11
    assert average_class_accuracy(model, data, bn='running') == pytest.approx(expected)
    per_class = per_class_accuracy(model, data, bn='running')
    assert per_class.shape == (len(CLASSES),) and per_class[labels[10]] == 0
    absent = [c for c in range(len(CLASSES)) if c not in labels.tolist()]
    assert per_class[absent].isnan().all() and per_class[labels.unique()].eq(torch.tensor(
        [(predicted[labels == c] == c).float().mean() for c in labels.unique()])).all()


# Transfer (Sec. 5.3)

def test_transfer_step_zero_does_no_optimizer_step(target, sources, train, test, optimizer_steps):
    before = {name: snapshot(e) for name, e in sources.items()}
    head_before = snapshot(target.head)

    result = transfer(target, sources, train, test, steps=(0,), reinit_head=True, batch_size=16)
    assert optimizer_steps == []
    assert [(c.source, c.mode, c.compatible) for c in result.curves] == [
        ('s1', 'recombined', True), ('s1', 'reinit_head', True), ('s2', 'recombined', True),
        ('s2', 'reinit_head', True)]
    for name, extractor in sources.items():
        direct = average_class_accuracy(tc.recombine(extractor, target.head), test)
        assert result.curve(name).accuracy == [direct]
    # Each curve is measured under both BN modes; a head whose running statistics are off tells them apart.
    stale = stale_running_stats(target)
    # Only images of class 0, which the stale head predicts with running statistics: 100 % in that mode alone.
    zeros = ImageData(test.images[test.labels == 0], test.labels[test.labels == 0], test.class_names)
    both = transfer(stale, sources, train, zeros, steps=(0,), batch_size=16)
    for name, extractor in sources.items():
        direct = {bn: [average_class_accuracy(tc.recombine(extractor, stale.head), zeros, bn=bn)]
                  for bn in ('batch', 'running')}
        assert direct['running'] == [1.0] and direct['batch'] != [1.0]
        assert both.curve(name).accuracy == direct['batch'] and both.curve(name).accuracy_by_bn == direct

    finetuned = transfer(target, {'s1': sources['s1']}, train, test, steps=(0, 2), reinit_head=True, batch_size=16)
    assert len(optimizer_steps) == 2 * 2  # two steps for each of the two curves
    assert finetuned.curve('s1').accuracy[0] == result.curve('s1').accuracy[0]
    for name, extractor in sources.items():
        assert_unchanged(extractor, before[name])
    assert_unchanged(target.head, head_before)


def test_transfer_curves_do_not_depend_on_the_sources_before_them(target, sources, train, test):
    """Augmentation and a fresh head's initialisation drew from the global RNG, which the curves of the sources
    before advanced: a source's curve changed with the sources listed before it."""
    kw = dict(steps=(0, 2), reinit_head=True, batch_size=16, eval_batch_size=30, lr=0.05)
    rng = torch.get_rng_state()
    alone = transfer(target, {'s2': sources['s2']}, train, test, **kw)
    after = transfer(target, {'s1': sources['s1'], 's2': sources['s2']}, train, test, **kw)
    for mode in ('recombined', 'reinit_head'):
        assert after.curve('s2', mode).accuracy_by_bn == alone.curve('s2', mode).accuracy_by_bn
    assert torch.equal(torch.get_rng_state(), rng)  # each curve seeds its own draws; the caller's RNG is left as is


def test_transfer_fine_tunes_components_the_caller_froze(target, sources, train, test):
    """The copies kept the caller's requires_grad=False: a frozen extractor was silently not fine-tuned, and with
    the head frozen too the optimiser had nothing to train."""
    untrained = []  # per optimiser step: how many of its parameters got no gradient, of how many
    handle = register_optimizer_step_pre_hook(lambda opt, args, kwargs: untrained.append(
        (sum(p.grad is None for g in opt.param_groups for p in g['params']),
         sum(len(g['params']) for g in opt.param_groups))))
    frozen, head_only = copy.deepcopy(sources['s1']).requires_grad_(False), copy.deepcopy(target)
    try:
        transfer(target, {'s1': frozen}, train, test, steps=(0, 1), reinit_head=True, batch_size=8)
        transfer(head_only.requires_grad_(False), {'s1': frozen}, train, test, steps=(0, 1), batch_size=8)
    finally:
        handle.remove()
    assert len(untrained) == 3 and all(none == 0 and total > 0 for none, total in untrained), untrained
    assert not any(p.requires_grad for p in [*frozen.parameters(), *head_only.parameters()])


def test_transfer_ranks_sources_by_step_zero_accuracy():
    curves = [TransferCurve('weak', 'recombined', True, [0, 10], [0.2, 0.9], 1.0),
              TransferCurve('weak', 'reinit_head', True, [0, 10], [0.95, 0.95], 1.0),
              TransferCurve('strong', 'recombined', True, [0, 10], [0.6, 0.7], 1.0),
              TransferCurve('stitched', 'stitched', False, [0, 10], [0.4, 0.8], 1.0)]
    result = TransferResult(curves)
    # Re-initialised heads do not rank sources: the ranking is about reusing the target head.
    assert result.ranking() == [('strong', 0.6), ('stitched', 0.4), ('weak', 0.2)]
    assert [name for name, _ in result.ranking(step=10)] == ['weak', 'stitched', 'strong']
    with pytest.raises(ValueError, match='not measured'):
        result.ranking(step=5)


def test_transfer_refuses_another_interface_unless_stitched_or_forced(target, sources, narrow, train, test,
                                                                      optimizer_steps):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)  # other weights than the module's interface, whatever ran before
        other_interface = tc.Interface(width=16, rp=True)
    assert other_interface.id != target.interface.id
    other = network(other_interface, seed=1).extractor
    with pytest.raises(ValueError, match=r"'other'.*on_mismatch=\"stitch\""):
        transfer(target, {'same': sources['s1'], 'other': other}, train, test, steps=(0,))
    forced = transfer(target, {'other': other}, train, test, steps=(0,), on_mismatch='force')
    assert forced.curve('other').compatible is False
    with pytest.raises(ValueError, match='width'):
        transfer(target, {'narrow': narrow}, train, test, steps=(0,), on_mismatch='force')
    assert optimizer_steps == []
    stitched = transfer(target, {'narrow': narrow}, train, test, steps=(0,), on_mismatch='stitch', stitch_steps=2,
                        batch_size=16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(curve_seed(0, 'narrow', 'stitched'))  # the stitch's initial weights and augmentation
        fitted = fit_stitch(narrow, target.head, train, 2, batch_size=16)
    # Step 0 of a stitched curve comes after fitting the stitch, and the fit trains the stitch alone.
    stitch_parameters = len(list(Stitch(narrow.width, target.head.width).parameters()))
    assert [len(ids) for ids in optimizer_steps] == [stitch_parameters] * 4
    curve = stitched.curve('narrow', 'stitched')
    assert (curve.compatible, curve.steps) == (False, [0])
    assert curve.accuracy == [average_class_accuracy(fitted, test)]


def test_transfer_reinitialises_a_stitched_sources_head_at_the_sources_width(target, narrow, train, test):
    """The re-initialised head of a source of another width reads that source's features directly: it is built at
    the source's width (not the target head's), so the stitched curve's work is not lost to a crash after it."""
    result = transfer(target, {'narrow': narrow}, train, test, steps=(0, 1), on_mismatch='stitch', stitch_steps=1,
                      batch_size=16, reinit_head=True)
    assert [(c.mode, c.steps) for c in result.curves] == [('stitched', [0, 1]), ('reinit_head', [0, 1])]


def test_applications_check_mixed_precision_before_any_work(target, sources, train, test, source):
    """An unknown precision is refused before the first evaluation, also when no step would train."""
    for steps in ((0,), (0, 1)):
        with pytest.raises(ValueError, match="Unknown mixed_precision 'fp8'"):
            transfer(target, sources, train, test, steps=steps, mixed_precision='fp8')
    with pytest.raises(ValueError, match="Unknown mixed_precision 'fp8'"):
        adapt(source, train.images, steps=1, batch_size=16, mixed_precision='fp8')


def test_transfer_refuses_a_training_set_below_one_batch_before_any_work(target, sources, narrow, train, test,
                                                                         monkeypatch):
    """Fewer training images than one batch were refused only after the first curve's step-0 evaluation (or, for
    a stitched source, after the curves before it)."""
    monkeypatch.setattr(sys.modules['timm_compat.transfer'], 'bn_accuracy_report',
                        lambda *a, **k: pytest.fail('evaluated before refusing'))
    for steps, more in (((0, 5), {}), ((0,), {'narrow': narrow})):
        with pytest.raises(ValueError, match=f'train_data: {len(train)} examples are fewer than one batch of 64'):
            transfer(target, {**sources, **more}, train, test, steps=steps, batch_size=64, on_mismatch='stitch')


def test_transfer_refuses_data_of_another_task(target, sources, train, test):
    shuffled = train.select_classes(CLASSES[::-1])
    with pytest.raises(ValueError, match='select_classes'):
        transfer(target, sources, shuffled, test, steps=(0,))


# Mixed precision: every application trains through timm_compat.fit.fit, so each takes mixed_precision.

def test_applications_train_in_bf16_and_keep_their_invariants(interface, target, narrow, train, test):
    before = {'head': snapshot(target.head), 'interface': snapshot(interface), 'narrow': snapshot(narrow)}
    extractor_dtypes = []
    handle = target.extractor.register_forward_hook(lambda m, args, out: extractor_dtypes.append(out.dtype))
    try:
        # adapt copies the extractor, hooks included: the copy's outputs are bf16 during the steps.
        result = adapt(target, train.images, steps=2, batch_size=16, mixed_precision='bf16')
    finally:
        handle.remove()
    assert set(extractor_dtypes) == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in result.model.extractor.parameters())
    assert all(0 < loss < 10 for loss in result.history['rp_loss'])
    stitched = fit_stitch(narrow, target.head, train, 2, batch_size=16, mixed_precision='bf16')
    assert stitched.stitch.conv.weight.dtype == torch.float32
    curve = transfer(target, {'s': target.extractor}, train, test, steps=(0, 2), batch_size=16,
                     mixed_precision='bf16').curve('s')
    assert len(curve.accuracy) == 2
    for name, module in (('head', target.head), ('interface', interface), ('narrow', narrow)):
        assert_unchanged(module, before[name])
    assert all(p.grad is None for p in [*interface.parameters(), *target.head.parameters(), *narrow.parameters()])
    with pytest.raises(ValueError, match='Unknown mixed_precision'):
        fit_stitch(narrow, target.head, train, 1, batch_size=16, mixed_precision='fp8')
