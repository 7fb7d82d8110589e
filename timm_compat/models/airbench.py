"""The airbench family: fast CIFAR networks after Jordan, *94% on CIFAR-10 in 3.29 Seconds on a Single GPU*
(arXiv:2404.00498, 2024), registered in timm.

Every member is a frozen 2x2 patch-whitening conv (``whiten``, 3 -> 24 channels, no padding, so 32x32 -> 31x31)
with a trainable bias, GELU, then three groups (``stages.0``..``stages.2``) that each open with a conv, a 2x2
max-pool, BN and GELU, then global max-pooling and a bias-free linear layer whose logits are multiplied by
``logit_scale``. Every group halves the resolution (31 -> 15 -> 7 -> 3 at 32x32), so all members have the same
feature sizes at every level and an extractor of one recombines with a head of another.

* ``airbench94_cifar`` (server): airbench94's network exactly, groups conv3x3 -> pool -> BN -> GELU -> conv3x3 ->
  BN -> GELU of widths 64/256/256.
* ``airbench_desktop_cifar``: narrower (48/128/192); each group's second conv is a residual basic block (two
  3x3 convs).
* ``airbench_mobile_cifar``: narrow (32/96/192); depthwise-separable convs and a MobileNetV2 inverted residual
  block (expansion 4) per group.

As in airbench94, BN has eps 1e-12, a frozen scale of 1 and a trained bias; its running statistics keep 0.6 of
their old value per step (airbench's ``batchnorm_momentum=0.6``, which is ``momentum=0.4`` in torch's
convention). The frozen tensors (the whitening weight, BN scales) are buffers, not parameters: they stay in the
state dict, and every parameter is trainable, which timm's optimiser factories and model tests expect. Dense convs
after the whitening layer start as partial identities (airbench's dirac init). :func:`init_whitening` sets the
whitening weight from training images; until then it is timm's default conv init.
"""
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from timm.layers import SelectAdaptivePool2d, get_device_dtype
from timm.models import build_model_with_cfg, checkpoint, checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

from .airbench_groups import GROUPS, freeze_weight
from .cifar_resnet import CIFAR10_MEAN, CIFAR10_STD

__all__ = ['AirbenchNet', 'init_whitening', 'whitening_layers', 'whitening_weight', 'WHITEN']

WHITEN = 'whiten'
"""Name of the whitening conv in every member: its trainable bias is ``whiten.bias`` (airbench trains it for the
first 3 epochs only, then freezes it); :func:`whitening_layers` finds the layers in models and components."""


class AirbenchNet(nn.Module):
    """Patch-whitening conv, three conv groups, global max-pool, bias-free linear with scaled logits.

    Args:
        widths: Output channels of the three groups.
        group: Group type: ``'conv'`` (airbench94), ``'residual'`` or ``'mobile'``.
        num_classes: Classifier outputs; 0 for no classifier.
        in_chans: Input channels.
        global_pool: Pooling type of :class:`timm.layers.SelectAdaptivePool2d`; ``''`` keeps the NCHW map.
        logit_scale: Factor on the logits: airbench's fixed softmax temperature of 9 (``1/9``; hlb-CIFAR10's
            ``scaling_factor``). The bias-free classifier is initialised as a plain ``nn.Linear``, so unscaled
            logits would start larger; the published learning rate and label smoothing were tuned with this
            factor, which also divides the classifier's gradients by 9.
        drop_rate: Dropout before the classifier (not used by airbench94).
        device: Device the parameters are created on (timm's factory argument).
        dtype: Dtype of the parameters.

    Raises:
        ValueError: ``widths`` does not have three entries, or ``group`` is unknown.
    """

    def __init__(
            self,
            widths: Sequence[int] = (64, 256, 256),
            group: str = 'conv',
            num_classes: int = 10,
            in_chans: int = 3,
            global_pool: str = 'max',
            logit_scale: float = 1 / 9,
            drop_rate: float = 0.,
            device=None,
            dtype=None,
    ):
        super().__init__()
        if len(widths) != 3 or group not in GROUPS:
            raise ValueError(f'AirbenchNet takes three widths and a group in {sorted(GROUPS)}; got '
                             f'widths={tuple(widths)}, group={group!r}.')
        dd = {'device': device, 'dtype': dtype}
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.logit_scale = logit_scale
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        whiten_chs = 2 * in_chans * 2 * 2  # the eigenvectors of 2x2 patches and their negatives
        self.whiten = freeze_weight(nn.Conv2d(in_chans, whiten_chs, 2, padding=0, bias=True, **dd))
        nn.init.zeros_(self.whiten.bias)
        self.whiten_act = nn.GELU()
        self.feature_info: List[Dict[str, Any]] = [dict(num_chs=whiten_chs, reduction=1, module='whiten_act')]
        stages, in_chs = [], whiten_chs
        for i, width in enumerate(widths):
            stages.append(GROUPS[group](in_chs, width, **dd))
            self.feature_info.append(dict(num_chs=width, reduction=2 ** (i + 1), module=f'stages.{i}'))
            in_chs = width
        self.stages = nn.Sequential(*stages)
        self.num_stages = len(stages)
        self.num_features = self.head_hidden_size = in_chs
        self.reset_classifier(num_classes, global_pool)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(stem=r'^whiten', blocks=r'^stages\.(\d+)')

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Checkpoint every group (:func:`timm.models.checkpoint`) in the forward passes.

        Args:
            enable: Turn checkpointing on or off.
        """
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self, name_only: bool = False) -> Union[str, nn.Module]:
        return 'fc' if name_only else self.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replace the pooling and the bias-free classifier, as timm's ``reset_classifier``.

        Args:
            num_classes: Outputs of the new classifier; 0 for none (the pooled features are returned).
            global_pool: New pooling type; ``''`` for none: the NCHW map is returned, or with a classifier the
                logits at every position (a 1x1 conv, timm's ``use_conv`` classifier). None keeps the current one.
        """
        if global_pool is None:
            global_pool = self.global_pool.pool_type
        dd = get_device_dtype(self)
        self.num_classes = num_classes
        self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=bool(global_pool))
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()
        if not num_classes:
            self.fc = nn.Identity()
        elif global_pool:
            self.fc = nn.Linear(self.head_hidden_size, num_classes, bias=False, **dd)
        else:
            self.fc = nn.Conv2d(self.head_hidden_size, num_classes, 1, bias=False, **dd)
        self.global_pool.train(self.training)
        self.fc.train(self.training)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Forward features that also returns intermediates (level 0: the whitening output, 1..3: the groups).

        Args:
            x: Input images.
            indices: Take the last n feature levels if int, all if None, the listed levels if a sequence.
            norm: Accepted for timm's API; there is no final norm.
            stop_early: Stop after the last requested intermediate.
            output_fmt: Only ``'NCHW'``.
            intermediates_only: Return only the intermediates.

        Returns:
            The final features and the intermediates, or only the intermediates.
        """
        assert output_fmt == 'NCHW', 'Output shape must be NCHW.'
        take_indices, max_index = feature_take_indices(self.num_stages + 1, indices)
        intermediates = []
        x = self.whiten_act(self.whiten(x))
        if 0 in take_indices:
            intermediates.append(x)
        stages = self.stages[:max_index] if stop_early else self.stages
        for i, stage in enumerate(stages, start=1):
            x = checkpoint(stage, x) if self.grad_checkpointing else stage(x)
            if i in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Remove the groups (and head) that the requested feature levels do not need.

        Args:
            indices: Feature levels to keep, as in :meth:`forward_intermediates`.
            prune_norm: Accepted for timm's API; there is no final norm.
            prune_head: Remove the classifier and pooling.

        Returns:
            The kept feature levels.
        """
        take_indices, max_index = feature_take_indices(self.num_stages + 1, indices)
        self.stages = self.stages[:max_index]
        prune_end = max_index < self.num_stages
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
        if prune_head or prune_end:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.whiten_act(self.whiten(x))
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.stages, x)
        return self.stages(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate:
            x = F.dropout(x, p=float(self.drop_rate), training=self.training)
        if pre_logits or not self.num_classes:
            return x
        return self.fc(x) * self.logit_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def whitening_layers(module: nn.Module) -> List[nn.Conv2d]:
    """The whitening convs in ``module``: a member, or anything holding members' modules (components, pairs)."""
    return [m for name, m in module.named_modules()
            if name.rsplit('.', 1)[-1] == WHITEN and isinstance(m, nn.Conv2d)]


@torch.no_grad()
def whitening_weight(images: torch.Tensor, kernel_size: int = 2, eps: float = 5e-4) -> torch.Tensor:
    """Filters that whiten the ``kernel_size`` patches of ``images``, as airbench94 initialises its first conv.

    The patches' second-moment matrix (uncentred, as airbench; the images are normalised) has eigenvectors
    ``v_i`` and eigenvalues ``l_i`` (largest first); filter ``i`` is ``v_i / sqrt(l_i + eps)`` and filter
    ``C * k * k + i`` its negative, so that GELU passes both signs of every whitened direction.

    Args:
        images: Float images ``(N, C, H, W)`` as the network sees them.
        kernel_size: Patch side.
        eps: Added to the eigenvalues: directions with less variance than ``eps`` are not amplified.

    Returns:
        Conv weight ``(2 * C * k * k, C, k, k)``, float32.
    """
    c, dim = images.shape[1], images.shape[1] * kernel_size ** 2
    second_moment = torch.zeros(dim, dim, dtype=torch.float64, device=images.device)
    for chunk in images.split(256):  # bounds the memory of the unfolded patches
        patches = F.unfold(chunk.double(), kernel_size)  # (b, C*k*k, L), ordered as a conv weight's (C, k, k)
        second_moment += torch.einsum('bpl,bql->pq', patches, patches)
    second_moment /= len(images) * patches.shape[-1]
    eigenvalues, eigenvectors = torch.linalg.eigh(second_moment)
    filters = eigenvectors.T.flip(0) / (eigenvalues.flip(0) + eps).sqrt()[:, None]
    filters = filters.reshape(dim, c, kernel_size, kernel_size).float()
    return torch.cat([filters, -filters])


@torch.no_grad()
def init_whitening(model: nn.Module, images: torch.Tensor, eps: float = 5e-4,
                   mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None) -> None:
    """Set every whitening conv in ``model`` from training images (airbench94 uses the first 5000).

    Args:
        model: A member, or any module holding members' whitening convs (an extractor, a joint model).
        images: ``(N, C, H, W)``: ``uint8`` pixels, normalised here with ``mean``/``std``; or float images already
            normalised as the network's input.
        eps: Added to the patch covariance's eigenvalues (airbench: 5e-4).
        mean: Per-channel mean of ``uint8`` images in [0, 1]; default the model's ``pretrained_cfg`` (CIFAR-10).
        std: Per-channel standard deviation, likewise.

    Raises:
        ValueError: ``model`` has no whitening conv, ``images`` do not fit it, or ``eps`` is not positive.
    """
    layers = whitening_layers(model)
    if not layers:
        raise ValueError(f'{type(model).__name__} has no whitening conv (a module named {WHITEN!r}); '
                         f'init_whitening takes an airbench model (timm.create_model("airbench94_cifar")).')
    conv = layers[0]
    k = conv.kernel_size[0]
    if any(layer.weight.shape != conv.weight.shape for layer in layers):
        raise ValueError(f'Whitening convs of different shapes: {[tuple(m.weight.shape) for m in layers]}; '
                         f'initialise the networks one by one.')
    if images.ndim != 4 or images.shape[1] != conv.in_channels or min(images.shape[-2:]) < k or not len(images):
        raise ValueError(f'init_whitening needs images (N, {conv.in_channels}, H, W) with H, W >= {k}; got shape '
                         f'{tuple(images.shape)}. Pass channels-first training images.')
    if not eps > 0:
        raise ValueError(f'eps must be positive (airbench: 5e-4); got {eps}.')
    if images.dtype == torch.uint8:
        cfg = getattr(model, 'pretrained_cfg', None) or {}
        mean = torch.tensor(cfg.get('mean', CIFAR10_MEAN) if mean is None else mean, device=images.device)
        std = torch.tensor(cfg.get('std', CIFAR10_STD) if std is None else std, device=images.device)
        if {mean.numel(), std.numel()} - {1, images.shape[1]}:
            raise ValueError(f'init_whitening got mean/std of {mean.numel()} channels for images of '
                             f'{images.shape[1]}: pass mean= and std= with one value per channel.')
        images = (images.float() / 255 - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
    elif not images.is_floating_point():
        raise ValueError(f'images must be uint8 pixels or normalised floats; got {images.dtype}.')
    weight = whitening_weight(images, k, eps)
    for layer in layers:
        layer.weight.copy_(weight)


def _create(variant: str, pretrained: bool = False, **kwargs) -> AirbenchNet:
    out_indices = kwargs.pop('out_indices', (0, 1, 2, 3))
    return build_model_with_cfg(
        AirbenchNet, variant, pretrained,
        feature_cfg=dict(flatten_sequential=True, out_indices=out_indices),
        **kwargs,
    )


def _cfg(**kwargs) -> Dict[str, Any]:
    return {
        'url': '', 'num_classes': 10, 'input_size': (3, 32, 32), 'pool_size': (3, 3),
        'crop_pct': 1.0, 'interpolation': 'bilinear', 'mean': CIFAR10_MEAN, 'std': CIFAR10_STD,
        'first_conv': WHITEN, 'classifier': 'fc', 'license': 'apache-2.0',
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    'airbench94_cifar.untrained': _cfg(),
    'airbench_desktop_cifar.untrained': _cfg(),
    'airbench_mobile_cifar.untrained': _cfg(),
})


@register_model
def airbench94_cifar(pretrained: bool = False, **kwargs) -> AirbenchNet:
    """airbench94 (Jordan 2024), the family's server member: conv groups of widths 64/256/256."""
    return _create('airbench94_cifar', pretrained, **dict(dict(widths=(64, 256, 256), group='conv'), **kwargs))


@register_model
def airbench_desktop_cifar(pretrained: bool = False, **kwargs) -> AirbenchNet:
    """The desktop member: residual groups (conv, then a basic block) of widths 48/128/192."""
    return _create('airbench_desktop_cifar', pretrained,
                   **dict(dict(widths=(48, 128, 192), group='residual'), **kwargs))


@register_model
def airbench_mobile_cifar(pretrained: bool = False, **kwargs) -> AirbenchNet:
    """The mobile member: depthwise-separable groups with an inverted residual block, widths 32/96/192."""
    return _create('airbench_mobile_cifar', pretrained, **dict(dict(widths=(32, 96, 192), group='mobile'), **kwargs))
