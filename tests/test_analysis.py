import copy

import numpy as np
import pytest
import torch
from PIL import Image

import timm_compat as tc
from timm_compat.analysis import (compare_extractors, direct_correlation, extract_features, feature_correlation,
                                  linear_cka, permuted_correlation, sort_correlation)
from timm_compat.batchnorm import eval_mode
from timm_compat.data import ImageData, normalize
from timm_compat.evaluation import accuracy, recombination_matrix
from timm_compat.plots import (ReportFigure, ReportTable, _bars_figure, matrix_table, plot_accuracy_curves, plot_bars,
                               plot_correlation_blocks, plot_recombination_matrix, write_report)

CIFAR10 = ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck']
PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'


@pytest.fixture(scope='module')
def interface():
    return tc.Interface(width=16)


@pytest.fixture(scope='module')
def model(interface):
    torch.manual_seed(1)
    return tc.make_compatible('resnet8_cifar', split='layer2', interface=interface, num_classes=10,
                              class_names=CIFAR10)


@pytest.fixture(scope='module')
def data():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8, generator=g)
    return ImageData(images, torch.randint(0, 10, (32,), generator=g), list(CIFAR10), 'random')


def _permute_adapter_outputs(extractor, perm):
    """A copy of ``extractor`` whose output channel ``j`` is the original's channel ``perm[j]``."""
    permuted = copy.deepcopy(extractor)
    conv, bn = permuted.adapter
    with torch.no_grad():
        conv.weight.copy_(conv.weight[perm])
        for tensor in (bn.weight, bn.bias, bn.running_mean, bn.running_var):
            tensor.copy_(tensor[perm])
    return permuted


def _random_features(rows=400, channels=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(rows, channels, generator=g, dtype=torch.float64)
    return base @ torch.randn(channels, channels, generator=g, dtype=torch.float64)


def test_extract_features_puts_every_position_in_a_row(model, data):
    feats = extract_features(model.extractor, data, batch_size=len(data))
    cfg = model.extractor.pretrained_cfg
    with torch.no_grad(), eval_mode(model.extractor, 'batch'):
        expected = model.extractor(normalize(data.images, cfg['mean'], cfg['std']))
    n, c, h, w = expected.shape
    assert feats.shape == (n * h * w, c) and feats.dtype == torch.float32
    # Row n * H * W + y * W + x holds image n's channels at position (y, x).
    assert torch.equal(feats[5 * h * w + 3 * w + 7], expected[5, :, 3, 7])
    assert torch.allclose(feats, expected.permute(0, 2, 3, 1).reshape(-1, c))


def test_extractor_correlates_perfectly_with_itself(model, data):
    result = compare_extractors(model.extractor, model.extractor, data, batch_size=16)
    assert result.correlation.shape == (16, 16)
    assert result.direct == pytest.approx(1.0, abs=1e-6)
    assert result.permuted == pytest.approx(1.0, abs=1e-6)
    assert torch.equal(result.assignment, torch.arange(16))
    assert result.cka == pytest.approx(1.0, abs=1e-6)


def test_extractors_of_two_widths_compare_in_either_order(model, data):
    """A wider A is matched as B against A: every channel of the narrower extractor gets a distinct match."""
    torch.manual_seed(2)
    narrow = tc.make_compatible('resnet8_cifar', split='layer2', interface=tc.Interface(width=8), num_classes=10,
                                class_names=CIFAR10).extractor
    wide_first = compare_extractors(model.extractor, narrow, data, batch_size=16)
    narrow_first = compare_extractors(narrow, model.extractor, data, batch_size=16)
    assert wide_first.correlation.shape == (16, 8) and wide_first.direct is None
    assert wide_first.permuted == pytest.approx(narrow_first.permuted, abs=1e-6)
    assert wide_first.cka == pytest.approx(narrow_first.cka, abs=1e-6)
    # The same pairs: A's channel matched to B's j is the one B's j was matched to; A's other 8 channels have none.
    assert torch.equal(wide_first.assignment[narrow_first.assignment], torch.arange(8))
    assert (wide_first.assignment == -1).sum() == 8


def test_channel_permutation_breaks_direct_but_not_permuted_correlation(model, data):
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(3))
    permuted = _permute_adapter_outputs(model.extractor, perm)
    feats_a = extract_features(model.extractor, data, batch_size=16)
    feats_b = extract_features(permuted, data, batch_size=16)
    assert torch.allclose(feats_b, feats_a[:, perm], atol=1e-5)  # the surgery permutes the output channels

    corr = feature_correlation(feats_a, feats_b)
    direct = direct_correlation(corr)
    mean, assignment = permuted_correlation(corr)
    self_corr = feature_correlation(feats_a, feats_a)
    # Direct pairs channel i of A with channel perm[i] of A: an ordinary cross-channel correlation, far below 1.
    assert direct == pytest.approx(self_corr[torch.arange(16), perm].mean().item(), abs=1e-6)
    assert direct < 0.5
    assert mean == pytest.approx(1.0, abs=1e-6)
    assert torch.equal(assignment, torch.argsort(perm))  # channel i of A is channel perm^-1[i] of B
    assert linear_cka(feats_a, feats_b) == pytest.approx(1.0, abs=1e-6)


def test_feature_correlation_matches_numpy_with_large_offsets():
    a, b = _random_features(seed=0), _random_features(channels=4, seed=1)
    a, b = a + 1e4, b - 3e3  # one-pass covariance formulas lose most digits here
    corr = feature_correlation(a.float(), b.float(), chunk_size=37)
    expected = np.corrcoef(a.float().double().numpy(), b.float().double().numpy(), rowvar=False)[:6, 6:]
    assert corr.shape == (6, 4) and corr.dtype == torch.float64
    np.testing.assert_allclose(corr.numpy(), expected, atol=1e-10)


def test_constant_channel_has_zero_correlation_not_nan():
    feats = _random_features(rows=1000)
    feats[:, 2] = 0.0  # a dead ReLU
    feats[:, 4] = 0.3  # the float64 mean of 1000 x 0.3 is not exactly 0.3: a zero-variance test would miss it
    corr = feature_correlation(feats, feats)
    assert torch.isfinite(corr).all()
    assert (corr[[2, 4]] == 0).all() and (corr[:, [2, 4]] == 0).all()
    assert direct_correlation(corr) == pytest.approx(4 / 6)


def test_permuted_correlation_matches_a_subset_of_wider_features():
    b = _random_features(channels=8)
    subset = torch.tensor([6, 1, 3, 0])
    mean, assignment = permuted_correlation(feature_correlation(b[:, subset], b))
    assert mean == pytest.approx(1.0) and torch.equal(assignment, subset)
    with pytest.raises(ValueError, match='swap'):
        permuted_correlation(feature_correlation(b, b[:, subset]))
    with pytest.raises(ValueError, match='square'):
        direct_correlation(feature_correlation(b[:, subset], b))


@pytest.mark.parametrize('mode', ['direct', 'permuted'])
def test_sort_correlation_puts_strongest_pairs_first(mode):
    a = _random_features(channels=8)
    b = a[:, torch.randperm(8, generator=torch.Generator().manual_seed(0))] + 0.5 * _random_features(channels=8, seed=2)
    corr = feature_correlation(a, b)
    ordered, mean = sort_correlation(corr, mode)
    diagonal = ordered.diagonal()
    assert torch.all(diagonal[:-1] >= diagonal[1:])
    assert mean == pytest.approx(diagonal.mean().item())
    if mode == 'direct':
        assert torch.equal(diagonal.sort().values, corr.diagonal().sort().values)
    else:
        assert mean == pytest.approx(permuted_correlation(corr)[0]) and mean > direct_correlation(corr) + 0.3
    assert torch.equal(ordered.flatten().sort().values, corr.flatten().sort().values)  # a reordering only


def _gram_cka(x, y):
    """Reference linear CKA through the n x n Gram matrices (Kornblith et al. 2019, eq. 4 with HSIC)."""
    h = torch.eye(x.shape[0], dtype=torch.float64) - 1.0 / x.shape[0]
    kx, ky = h @ x @ x.T @ h, h @ y @ y.T @ h
    return ((kx * ky).sum() / (kx.norm() * ky.norm())).item()


def test_linear_cka_invariances():
    x = _random_features(rows=300, channels=6)
    y = torch.tanh(x[:, :4]) + 0.3 * _random_features(rows=300, channels=4, seed=5)
    reference = linear_cka(x, y, chunk_size=64)
    assert reference == pytest.approx(_gram_cka(x, y), abs=1e-12)
    assert 0.1 < reference < 0.99

    q, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(7)))
    assert linear_cka(x @ q, y) == pytest.approx(reference, abs=1e-12)
    assert linear_cka(x * 37.5, y) == pytest.approx(reference, abs=1e-12)
    assert linear_cka(x + 1e3, y) == pytest.approx(reference, abs=1e-9)  # centering removes offsets
    # CKA is deliberately not invariant to arbitrary invertible maps: a check that the tests above could fail.
    stretch = torch.diag(torch.tensor([10.0, 1.0, 0.1, 1.0, 3.0, 0.3], dtype=torch.float64))
    assert abs(linear_cka(x @ stretch, y) - reference) > 1e-2


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_linear_cka_of_constant_features_is_an_error(dtype):
    # In float64 the computed mean of 1000 x 0.3 is not 0.3: the centred residue gave a CKA of 8e-34, not an error.
    with pytest.raises(ValueError, match='constant'):
        linear_cka(torch.full((1000, 3), 0.3, dtype=dtype), torch.randn(1000, 3, dtype=dtype))
    with pytest.raises(ValueError, match='constant'):
        linear_cka(torch.randn(1000, 3, dtype=dtype), torch.full((1000, 2), 0.3, dtype=dtype))


def test_sort_correlation_permutes_a_wider_a_as_compare_extractors_does():
    # compare_extractors takes a wider A, but the permuted Fig. 3 plot of its matrix refused it.
    b = _random_features(channels=5)
    a = torch.cat([b[:, [3, 0, 4, 1, 2]], _random_features(channels=3, seed=4)], 1) + 0.1 * _random_features(
        channels=8, seed=9)
    corr = feature_correlation(a, b)
    ordered, mean = sort_correlation(corr, 'permuted')
    assert ordered.shape == (5, 5) and mean == pytest.approx(permuted_correlation(corr.T)[0])
    assert mean == pytest.approx(ordered.diagonal().mean().item()) and mean > 0.9
    assert torch.all(ordered.diagonal()[:-1] >= ordered.diagonal()[1:])


def _labelled_by(model, data, batch_size):
    """``data`` relabelled with ``model``'s predictions, so that its own accuracy is 100 % and others' are not."""
    cfg = model.pretrained_cfg
    with torch.no_grad(), eval_mode(model, 'batch'):
        labels = torch.cat([model(normalize(x, cfg['mean'], cfg['std'])).argmax(1)
                            for x in data.images.split(batch_size)])
    return ImageData(data.images, labels, data.class_names, data.name)


def test_recombination_matrix_diagonal_is_own_accuracy(interface, model, data):
    torch.manual_seed(2)
    other = tc.make_compatible('resnet8_cifar', split='layer2', interface=interface, num_classes=10,
                               class_names=CIFAR10)
    data_a = _labelled_by(model, data, 16)
    data_b = _labelled_by(other, ImageData(data.images.flip(0), data.labels, list(CIFAR10)), 16)
    matrix = recombination_matrix([model, other], [data_a, data_b], batch_size=16)
    assert matrix[0, 0].item() == accuracy(model, data_a, batch_size=16) == 1.0
    assert matrix[1, 1].item() == accuracy(other, data_b, batch_size=16) == 1.0
    # Off the diagonal: extractor of row i with head of column j, on row i's data.
    mixed = accuracy(tc.recombine(model.extractor, other.head), data_a, batch_size=16)
    assert matrix[0, 1].item() == pytest.approx(mixed) and mixed < 0.9


def _assert_png(path):
    raw = path.read_bytes()
    assert raw[:8] == PNG_SIGNATURE and len(raw) > 5000
    with Image.open(path) as image:
        image.verify()


def test_plots_and_report(tmp_path):
    names = ['r56', 'wrn56', 'mnv2']
    matrix = torch.tensor([[0.91, 0.62, 0.55], [0.70, 0.93, 0.48], [0.40, 0.51, 0.89]])
    corr = feature_correlation(_random_features(channels=8), _random_features(channels=8, seed=1))
    figures = tmp_path / 'figures'
    paths = [
        plot_recombination_matrix(matrix, names, figures / 'recombination.png', title='recombination'),
        plot_correlation_blocks({'RP': (corr, 'direct'), 'permuted independent': (corr, 'permuted')},
                                figures / 'correlation.png'),
        plot_accuracy_curves({'RP': ([0, 10, 100, 1000], [0.6, 0.7, 0.8, 0.85]),
                              'independent': ([0, 10, 100, 1000], [0.1, 0.3, 0.7, 0.84])},
                             figures / 'finetune.png', annotate_steps=[0, 1000]),
    ]
    for path in paths:
        _assert_png(path)

    report = write_report(tmp_path, 'Compatibility', {
        'Recombination': [matrix_table(matrix, names, caption='accuracy (%)'),
                          ReportFigure(paths[0], 'recombination accuracy')],
        'Correlation': ReportFigure(paths[1]),
        'Fine-tuning': ['Accuracy against steps.', ReportFigure(paths[2]),
                        ReportTable(['method', 'step 0'], [['RP', 60.0], ['a|b', 10.0]])],
    })
    text = report.read_text()
    for name in ('recombination.png', 'correlation.png', 'finetune.png'):
        assert f'](figures/{name})' in text
        assert (report.parent / 'figures' / name).is_file()
    assert '| r56 | 91.0 | 62.0 | 55.0 |' in text
    assert '| a\\|b | 10.0 |' in text
    assert text.index('## Recombination') < text.index('## Correlation') < text.index('## Fine-tuning')
    with pytest.raises(FileNotFoundError, match='save the plot'):
        write_report(tmp_path, 'x', {'s': ReportFigure(tmp_path / 'missing.png')})


def test_bars_show_each_label_mean_over_seeds_its_std_and_the_papers_value(tmp_path):
    bars = {'IIW': [20.0, 30.0], 'RP': [50.0, 52.0, 54.0], 'DCC': [60.0]}
    fig = _bars_figure(bars, '', {'RP': 50.1, 'absent': 1.0}, 'recombination accuracy (%)')
    ax = fig.axes[0]
    assert [round(b.get_height(), 6) for b in ax.patches] == [25.0, 52.0, 60.0]
    caps = sorted(round(y, 6) for line in ax.lines if line.get_marker() == '_' for y in line.get_ydata())
    assert caps == sorted([25 - 7.071068, 25 + 7.071068, 50.0, 54.0, 60.0, 60.0])  # sample std, 0 for one seed
    paper = [line for line in ax.lines if line.get_label() == 'paper']
    assert len(paper) == 1 and list(paper[0].get_ydata()) == [50.1, 50.1] and list(paper[0].get_xdata()) == [0.6, 1.4]
    assert [t.get_text() for t in ax.get_xticklabels()] == list(bars)
    _assert_png(plot_bars(bars, tmp_path / 'bars.png'))
    with pytest.raises(ValueError, match='at least one value'):
        plot_bars({'RP': []}, tmp_path / 'empty.png')


def test_extract_features_keeps_data_order_across_shuffled_batches(model, data):
    # Running statistics make each image's features independent of its batch, so rows must match a full pass.
    feats = extract_features(model.extractor, data, batch_size=10, bn='running')
    cfg = model.extractor.pretrained_cfg
    with torch.no_grad(), eval_mode(model.extractor, 'running'):
        expected = model.extractor(normalize(data.images, cfg['mean'], cfg['std']))
    assert torch.allclose(feats, expected.permute(0, 2, 3, 1).reshape(-1, expected.shape[1]), atol=1e-5)


def test_accuracy_curves_give_step_0_to_1_the_width_of_a_decade(tmp_path, monkeypatch):
    # The docstring's layout; with linscale=1 matplotlib made the linear part 1.11 decades wide.
    import timm_compat.plots as plots
    figures = []
    monkeypatch.setattr(plots, '_save', lambda fig, path: figures.append(fig) or path)
    plot_accuracy_curves({'ours': ([0, 1, 10, 100], [0.5, 0.6, 0.7, 0.8])}, tmp_path / 'f.png')
    x = figures[0].axes[0].xaxis.get_transform().transform([0.0, 1.0, 10.0, 100.0])
    assert x[1] - x[0] == pytest.approx(x[2] - x[1]) and x[2] - x[1] == pytest.approx(x[3] - x[2])
