"""A deployable recombined model: BN recalibrated on unlabelled target images (AdaBN), for single images.

Batch-statistics BN is how recombined components are evaluated (Gygli et al. 2021, Sec. 4), but then a prediction
depends on the rest of its batch, and one image alone has no statistics. The running statistics a network gathered
on its own training data do not describe another network's features (nor a shifted domain), so a recombined model in
plain eval mode loses accuracy. :func:`deploy` re-estimates the running statistics on unlabelled images of the target
data (Li et al. 2016, AdaBN) in a copy, which then classifies any batch size, one image included, alike.
:func:`bn_accuracy_report` gives the three numbers side by side.
"""
import copy
from typing import Callable, Dict, Iterable, Iterator, Optional, Union

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .batchnorm import BN_MODES, recalibrate_bn
from .compatible import shared_interfaces
from .data import ImageData, evaluation_batches, iterate_batches
from .evaluation import _device, _inputs, accuracy, input_dtype

__all__ = ['BN_MODES', 'deploy', 'bn_accuracy_report', 'format_bn_report']

Images = Union[ImageData, torch.Tensor, Iterable[torch.Tensor]]
Metric = Callable[[nn.Module, ImageData, int, str, int], float]
# BN_MODES (batchnorm's, exported here too): the paper's evaluation (test-time batch statistics) and what a
# deployed model uses (its running statistics).


def _batches(images: Images, model: nn.Module, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Model inputs from ``images``: ``uint8`` images are normalised with the extractor's mean and std, float
    tensors are taken as inputs already; both in the model's floating dtype (a bf16 model takes bf16 inputs). A
    tensor or :class:`ImageData` is cut into seeded shuffled batches (a class-sorted store would otherwise give
    batches of one class, whose variance is too small)."""
    device, dtype = _device(model), input_dtype(model.extractor)

    def prepare(x: torch.Tensor) -> torch.Tensor:
        x = x[0] if isinstance(x, (tuple, list)) else x  # a loader of (images, labels): the labels go unused
        x = _check_layout(x, model)
        return _inputs(x, model.extractor, device) if x.dtype == torch.uint8 else x.to(device, dtype)

    if isinstance(images, ImageData) and not isinstance(images.images, torch.Tensor):  # streamed: decode batches
        images = (x for x, _ in iterate_batches(images, batch_size, seed))
    elif isinstance(images, ImageData):
        images = images.images
    if isinstance(images, torch.Tensor):
        for index in evaluation_batches(images.shape[0], batch_size, seed):
            yield prepare(images[index.to(images.device)])
    else:
        for x in images:
            yield prepare(x)


def _check_layout(images: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """``images`` if laid out ``(N, C, H, W)`` with the model's ``C``; refuses channels-last images by name."""
    channels = len(model.extractor.pretrained_cfg['mean'])
    if images.dim() != 4 or images.shape[1] != channels:
        raise ValueError(f'deploy takes images laid out (N, {channels}, H, W), got {tuple(images.shape)}: permute '
                         f'channels-last images (as PIL and numpy give them) with images.permute(0, 3, 1, 2).')
    return images


def _counted(batches: Iterator[torch.Tensor], seen: Dict[str, int]) -> Iterator[torch.Tensor]:
    for x in batches:
        seen['images'] += x.shape[0]
        yield x


def deploy(model: nn.Module, unlabeled: Images, *, batch_size: int = 256, num_batches: Optional[int] = None,
           seed: int = 0) -> nn.Module:
    """A copy of ``model`` whose BN running statistics are re-estimated on ``unlabeled`` (AdaBN), in eval mode.

    The copy's predictions no longer depend on the batch: ``deployed(x[:1])`` equals ``deployed(x)[:1]``. The
    model given is not changed; an interface it or one of its parts references is shared, not copied. The copy
    records what it was calibrated on in ``bn_calibration``, which ``save_pretrained`` writes to the folder and its
    model card: ``{'method': 'adabn', 'images': n}``, or ``{'method': 'no_bn', 'images': 0}`` for a model without
    BN layers, whose predictions never depended on the batch (the copy is made all the same).

    Args:
        model: A :class:`~timm_compat.CompatibleModel` (anything with ``extractor.pretrained_cfg`` mean and std).
        unlabeled: Target-domain images without labels: an :class:`~timm_compat.data.ImageData`, a ``uint8``
            ``(N, 3, H, W)`` tensor (normalised with the model's mean/std), a float tensor of model inputs, or an
            iterable of such batches or of ``(images, labels)`` pairs (a ``DataLoader``'s; the labels go unused);
            all are cast to the dtype of the model's weights (bf16 for a bf16 model).
        batch_size: Images per recalibration batch, when ``unlabeled`` is not already batches.
        num_batches: Stop after this many batches.
        seed: Seed of the order in which a tensor of images is batched.

    Returns:
        The deployable copy, in eval mode.

    Raises:
        ValueError: A BN layer keeps no running statistics, so there is nothing to recalibrate; no images; or images
            not laid out ``(N, 3, H, W)`` (channels-last ones, say).
    """
    if isinstance(unlabeled, torch.Tensor):  # refused before the copy; batches of an iterable are checked one by one
        _check_layout(unlabeled, model)
    deployed = copy.deepcopy(model, shared_interfaces(model))
    layers = [(name, bn) for name, bn in deployed.named_modules() if isinstance(bn, _BatchNorm)]
    for name, bn in layers:
        if bn.running_mean is None:
            raise ValueError(f'BN layer {name!r} was built without running statistics (track_running_stats='
                             f'False), so it cannot classify single images: it always uses batch statistics.')
        bn.track_running_stats = True  # a model left in batch-statistics mode gathers statistics again
    seen = {'images': 0}
    recalibrate_bn(deployed, _counted(_batches(unlabeled, deployed, batch_size, seed), seen), num_batches)
    # Without BN nothing was recalibrated: an AdaBN record would claim images that were never used.
    calibration = {'method': 'adabn', 'images': seen['images']} if layers else {'method': 'no_bn', 'images': 0}
    deployed.bn_calibration = calibration
    return deployed.eval()


def bn_accuracy_report(model: nn.Module, data: ImageData, *, unlabeled: Optional[Images] = None,
                       batch_size: int = 256, seed: int = 0, metric: Metric = accuracy) -> Dict[str, float]:
    """Accuracy of ``model`` on ``data`` under each BN mode, side by side (top-1 unless ``metric`` says otherwise).

    Args:
        model: A :class:`~timm_compat.CompatibleModel`.
        data: Labelled test data.
        unlabeled: Target images to recalibrate on for the ``'adabn'`` entry (e.g. the test images themselves,
            their labels unused, or a held-out unlabelled split). Without it the entry is left out.
        batch_size: Evaluation (and recalibration) batch size.
        seed: Seed of the batch order.
        metric: ``metric(model, data, batch_size, bn, seed)``: :func:`~timm_compat.evaluation.accuracy` (top-1) or
            :func:`~timm_compat.evaluation.average_class_accuracy` (the metric of the paper's Tab. 2 and Fig. 5).

    Returns:
        ``{'batch': ..., 'running': ..., 'adabn': ...}``: batch statistics (the paper's protocol), the running
        statistics the model holds (plain eval mode), and running statistics after :func:`deploy`.
    """
    report = {bn: metric(model, data, batch_size, bn, seed) for bn in BN_MODES}
    if unlabeled is not None:
        report['adabn'] = metric(deploy(model, unlabeled, batch_size=batch_size, seed=seed), data, batch_size,
                                 'running', seed)
    return report


def format_bn_report(report: Dict[str, float]) -> str:
    """One line: ``batch stats 80.9 % | running stats 71.5 % | AdaBN running stats 79.0 %``."""
    words = {'batch': 'batch stats', 'running': 'running stats', 'adabn': 'AdaBN running stats'}
    return ' | '.join(f'{words[k]} {100 * v:.1f} %' for k, v in report.items())
