"""How similar are the features of two extractors? (Gygli et al. 2021, Sec. 4 "Feature cross-correlation".)

* Per-channel cross-correlation (Li et al. 2016, *Convergent Learning*): every spatial position of every image is a
  sample, and entry ``[i, j]`` is the Pearson correlation of channel ``i`` of extractor A with channel ``j`` of B.
  Compatibility methods are scored on the diagonal as is ("direct", no permutation); independent networks after
  the one-to-one channel matching that maximises total correlation ("permuted").
* Linear CKA (Kornblith et al. 2019), invariant to orthogonal transforms and isotropic scaling of the features.

Features of the full CIFAR-10 test set at 16 x 16 with 64 channels take 10000 * 256 * 64 * 4 B = 655 MB, so they
are kept in float32 and the statistics are accumulated in float64 over row chunks rather than on a float64 copy.
"""
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from .batchnorm import eval_mode
from .data import ImageData, evaluation_batches, normalize
from .streaming import materialize

__all__ = ['extract_features', 'feature_correlation', 'direct_correlation', 'permuted_correlation',
           'sort_correlation', 'linear_cka', 'FeatureComparison', 'compare_extractors']

CORRELATION_MODES = ('direct', 'permuted')


def _samples_by_channels(features: torch.Tensor) -> torch.Tensor:
    if features.dim() == 4:
        return features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])
    if features.dim() == 2:
        return features
    raise ValueError(f'Expected features of shape (N, C, H, W) or (N, C), got {tuple(features.shape)}.')


@torch.no_grad()
def extract_features(extractor: nn.Module, data: ImageData, batch_size: int = 256, bn: str = 'batch',
                     mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None) -> torch.Tensor:
    """Activations of ``extractor`` on ``data`` as a samples x channels matrix.

    Features ``(N, C, H, W)`` become ``(N * H * W, C)``: each spatial position is a sample (Li et al. 2016).
    With ``bn='batch'`` the features depend on how the images are batched, so compare extractors on the same
    data with the same ``batch_size``.

    Args:
        extractor: Module mapping normalised images to ``(N, C, H, W)`` (or ``(N, C)``) features, e.g. an
            :class:`~timm_compat.Extractor`; it runs on the device of its parameters.
        data: Images to feed, ``uint8`` ``(N, 3, S, S)``.
        batch_size: Evaluation batch size.
        bn: ``'batch'`` (BN with batch statistics, as the paper evaluates) or ``'running'``.
        mean: Normalisation mean (0-1 scale); default ``extractor.pretrained_cfg['mean']``.
        std: Normalisation std; default ``extractor.pretrained_cfg['std']``.

    Returns:
        float32 CPU tensor ``(N * H * W, C)``.
    """
    cfg = getattr(extractor, 'pretrained_cfg', None) or {}
    mean = cfg.get('mean') if mean is None else mean
    std = cfg.get('std') if std is None else std
    if mean is None or std is None:
        raise ValueError('The extractor has no pretrained_cfg mean/std to normalise images with: pass mean=... '
                         'and std=... (per-channel, 0-1 scale).')
    device = next(extractor.parameters()).device
    out = None
    with eval_mode(extractor, bn):
        for index in evaluation_batches(len(data), batch_size):
            images = materialize(data.images[index.to(data.images.device)], device)  # decodes a streamed split
            features = extractor(normalize(images, mean, std))
            per_image = _samples_by_channels(features).float().cpu().view(len(index), -1, features.shape[1])
            if out is None:
                out = per_image.new_empty((len(data), *per_image.shape[1:]))
            out[index] = per_image  # rows in data order, although batches are drawn in a seeded random order
    return out.view(-1, out.shape[-1])


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    for name, x in (('feats_a', a), ('feats_b', b)):
        if x.dim() != 2:
            raise ValueError(f'{name} must be samples x channels (2-D), got shape {tuple(x.shape)}: flatten '
                             f'(N, C, H, W) features with extract_features().')
    if a.shape[0] != b.shape[0]:
        raise ValueError(f'feats_a has {a.shape[0]} samples but feats_b has {b.shape[0]}: extract both from the '
                         f'same images with the same feature resolution.')
    if a.shape[0] < 2:
        raise ValueError('Correlation needs at least 2 samples.')


def _centered_products(a: torch.Tensor, b: torch.Tensor,
                       chunk_size: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Centered ``A^T A``, ``B^T B``, ``A^T B`` in float64, with the column means subtracted before the products.

    Two passes (means, then products of centered chunks) avoid the cancellation of the one-pass
    ``sum(xy) - n * mean_x * mean_y`` form when channel means are large compared to their spread.
    """
    n = a.shape[0]
    mean_a = sum(a[s:s + chunk_size].double().sum(0) for s in range(0, n, chunk_size)) / n
    mean_b = (sum(b[s:s + chunk_size].double().sum(0) for s in range(0, n, chunk_size)) / n).to(a.device)
    aa = a.new_zeros((a.shape[1], a.shape[1]), dtype=torch.float64)
    bb = a.new_zeros((b.shape[1], b.shape[1]), dtype=torch.float64)
    ab = a.new_zeros((a.shape[1], b.shape[1]), dtype=torch.float64)
    for s in range(0, n, chunk_size):
        ca = a[s:s + chunk_size].double() - mean_a
        cb = b[s:s + chunk_size].to(a.device).double() - mean_b
        aa += ca.T @ ca
        bb += cb.T @ cb
        ab += ca.T @ cb
    return aa, bb, ab


def _constant_channels(x: torch.Tensor) -> torch.Tensor:
    # Exact equality rather than a zero-variance test: the computed mean of a constant float64 column need not equal
    # the constant (1000 x 0.3), which leaves a tiny variance that would turn into a spurious correlation.
    return x.amax(0) == x.amin(0)


def feature_correlation(feats_a: torch.Tensor, feats_b: torch.Tensor, chunk_size: int = 65536) -> torch.Tensor:
    """Pearson correlation of every channel of A with every channel of B (Li et al. 2016).

    A channel that is constant over all samples (e.g. a dead ReLU) has no defined correlation; its row or column
    is set to 0 rather than NaN, so it counts as uncorrelated in the means below (also with itself).

    Args:
        feats_a: Samples x channels ``(S, C_a)``, e.g. from :func:`extract_features`.
        feats_b: ``(S, C_b)`` for the same samples in the same order.
        chunk_size: Rows accumulated at a time (bounds the float64 working memory).

    Returns:
        float64 ``(C_a, C_b)`` tensor of correlations in ``[-1, 1]``, on ``feats_a``'s device.
    """
    _check_pair(feats_a, feats_b)
    aa, bb, ab = _centered_products(feats_a, feats_b, chunk_size)
    std_a, std_b = aa.diagonal().sqrt(), bb.diagonal().sqrt()
    valid_a = ~_constant_channels(feats_a).to(ab.device)
    valid_b = ~_constant_channels(feats_b).to(ab.device)
    denom = torch.outer(torch.where(valid_a, std_a, 1.0), torch.where(valid_b, std_b, 1.0))
    corr = (ab / denom).clamp(-1.0, 1.0)  # rounding can overshoot 1 for identical channels
    return corr * torch.outer(valid_a, valid_b)


def direct_correlation(corr: torch.Tensor) -> float:
    """Mean correlation of channel ``i`` of A with channel ``i`` of B, without permutation.

    This is what the paper reports for compatible networks, whose channels should already correspond.
    """
    if corr.dim() != 2 or corr.shape[0] != corr.shape[1]:
        raise ValueError(f'Direct correlation pairs channel i with channel i and needs a square matrix, got shape '
                         f'{tuple(corr.shape)}; use permuted_correlation() for extractors of different widths.')
    return corr.diagonal().mean().item()


def permuted_correlation(corr: torch.Tensor) -> Tuple[float, torch.Tensor]:
    """Mean correlation under the one-to-one channel matching that maximises the total (signed) correlation.

    This is the paper's "permuted independent": the best post-hoc alignment of two networks' channels, found with
    the Hungarian algorithm.

    Args:
        corr: ``(C_a, C_b)`` correlations with ``C_a <= C_b``.

    Returns:
        ``(mean, assignment)``: ``assignment[i]`` is the channel of B matched to channel ``i`` of A (distinct for
        every ``i``), and ``mean`` is the mean of ``corr[i, assignment[i]]``.
    """
    if corr.dim() != 2 or corr.shape[0] > corr.shape[1]:
        raise ValueError(f'Expected a (C_a, C_b) matrix with C_a <= C_b so every channel of A gets a distinct match, '
                         f'got shape {tuple(corr.shape)}: swap the two extractors (or transpose the matrix).')
    # With C_a <= C_b every row is assigned and scipy returns the rows in order, so the columns are the matches.
    _, cols = linear_sum_assignment(corr.detach().cpu().double().numpy(), maximize=True)
    assignment = torch.as_tensor(cols, dtype=torch.long)
    return corr[torch.arange(corr.shape[0]), assignment.to(corr.device)].mean().item(), assignment


def sort_correlation(corr: torch.Tensor, mode: str = 'direct') -> Tuple[torch.Tensor, float]:
    """Reorder a correlation matrix for display as in the paper's Fig. 3, with its mean.

    ``'direct'``: rows and columns both reordered by decreasing diagonal value (channel ``i`` stays paired with
    channel ``i``). ``'permuted'``: the matrix is first cut to the optimal one-to-one matching, so that matched
    pairs lie on the diagonal (the wider extractor's unmatched channels dropped), then sorted likewise.

    Returns:
        ``(sorted_matrix, mean)``, ``mean`` being the direct or permuted correlation (the mean of the new diagonal).
    """
    if mode not in CORRELATION_MODES:
        raise ValueError(f'Unknown correlation mode {mode!r}: use one of {CORRELATION_MODES}.')
    if mode == 'direct':
        mean = direct_correlation(corr)
    elif corr.shape[0] <= corr.shape[1]:
        mean, assignment = permuted_correlation(corr)
        corr = corr[:, assignment.to(corr.device)]
    else:  # A wider: match every channel of B, as compare_extractors does, and keep A's matched rows
        mean, matched = permuted_correlation(corr.T)
        corr = corr[matched.to(corr.device)]
    order = corr.diagonal().argsort(descending=True)
    return corr[order][:, order], mean


def linear_cka(x: torch.Tensor, y: torch.Tensor, chunk_size: int = 65536) -> float:
    """Linear centered kernel alignment (Kornblith et al. 2019) of two representations of the same samples.

    Uses the feature-space form ``||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)`` on column-centered features in
    float64, which costs ``O(S * C^2)`` instead of the ``O(S^2)`` of the sample Gram matrices.

    Args:
        x: ``(S, C_x)`` features.
        y: ``(S, C_y)`` features of the same samples.
        chunk_size: Rows accumulated at a time.

    Returns:
        CKA in ``[0, 1]``.
    """
    _check_pair(x, y)
    xx, yy, xy = _centered_products(x, y, chunk_size)
    norm_x, norm_y = torch.linalg.matrix_norm(xx), torch.linalg.matrix_norm(yy)
    # The exact test, as in feature_correlation: a constant float64 column leaves a tiny centred residue.
    if bool(_constant_channels(x).all()) or bool(_constant_channels(y).all()):
        raise ValueError('CKA is undefined when a representation is constant over all samples (its centered '
                         'features are zero); check the features, e.g. for an all-dead ReLU layer.')
    return ((xy ** 2).sum() / (norm_x * norm_y)).item()


@dataclass
class FeatureComparison:
    """Similarity of two extractors' features on the same images.

    Attributes:
        correlation: ``(C_a, C_b)`` per-channel correlations.
        direct: Mean diagonal correlation (``None`` when the widths differ).
        permuted: Mean correlation under the optimal channel matching.
        assignment: Channel of B matched to each channel of A (-1 for the channels left unmatched when A is
            wider than B).
        cka: Linear CKA.
    """
    correlation: torch.Tensor
    direct: Optional[float]
    permuted: float
    assignment: torch.Tensor
    cka: float


def compare_extractors(extractor_a: nn.Module, extractor_b: nn.Module, data: ImageData, batch_size: int = 256,
                       bn: str = 'batch') -> FeatureComparison:
    """Per-channel correlation (direct and permuted) and linear CKA of two extractors on ``data``."""
    feats_a = extract_features(extractor_a, data, batch_size, bn)
    feats_b = extract_features(extractor_b, data, batch_size, bn)
    corr = feature_correlation(feats_a, feats_b)
    if corr.shape[0] <= corr.shape[1]:
        permuted, assignment = permuted_correlation(corr)
    else:  # every channel of the narrower B gets a distinct match in A
        permuted, matched = permuted_correlation(corr.T)
        assignment = torch.full((corr.shape[0],), -1, dtype=torch.long)
        assignment[matched] = torch.arange(corr.shape[1])
    direct = direct_correlation(corr) if corr.shape[0] == corr.shape[1] else None
    return FeatureComparison(corr, direct, permuted, assignment, linear_cka(feats_a, feats_b))
