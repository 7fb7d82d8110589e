"""ResNets for 32x32 inputs, registered in timm.

* ``resnet8_cifar``, ``resnet20_cifar``, ``resnet56_cifar``: He et al., *Deep Residual Learning for Image Recognition*, CVPR 2016,
  Sec. 4.2: a 3x3 stem, three stages of ``n`` basic blocks with 16/32/64 channels, depth ``6n + 2``.
  Shortcuts that change shape use a 1x1 conv + BN projection (option B) rather than zero padding.
* ``wide_resnet56_cifar``: the same depth-56 network with every stage ``widen_factor`` times wider, the
  "Wide ResNet-56" used by Gygli et al. (AAAI 2021), Sec. 5.2.
* ``wrn28_10_cifar``: Zagoruyko & Komodakis, *Wide Residual Networks*, BMVC 2016: pre-activation blocks,
  depth 28, widen factor 10.

The models follow timm's ``ResNet`` API: ``device``/``dtype`` factory arguments, ``create_classifier`` heads
(``global_pool=''`` keeps the NCHW map), gradient checkpointing, ``forward_intermediates`` and
``prune_intermediate_layers`` (so ``features_only=True, feature_cls='getter'`` works), and TorchScript.
"""
from typing import Any, Dict, List, Optional, Tuple, Type, Union

import torch
import torch.nn as nn

from timm.layers import create_classifier, get_device_dtype
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

__all__ = ['CifarResNet']

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


def _projection(in_chs: int, out_chs: int, stride: int, **dd) -> Optional[nn.Module]:
    if stride == 1 and in_chs == out_chs:
        return None
    return nn.Sequential(
        nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False, **dd),
        nn.BatchNorm2d(out_chs, **dd),
    )


class BasicBlock(nn.Module):
    """Post-activation basic block (He et al. 2016)."""

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1, drop_rate: float = 0., device=None, dtype=None):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=False, **dd)
        self.bn1 = nn.BatchNorm2d(out_chs, **dd)
        self.act1 = nn.ReLU(inplace=True)
        self.drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, padding=1, bias=False, **dd)
        self.bn2 = nn.BatchNorm2d(out_chs, **dd)
        self.downsample = _projection(in_chs, out_chs, stride, **dd)
        self.act2 = nn.ReLU(inplace=True)

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.drop(self.act1(self.bn1(self.conv1(x))))
        x = self.bn2(self.conv2(x))
        return self.act2(x + shortcut)


class PreActBlock(nn.Module):
    """Pre-activation basic block (He et al., ECCV 2016), as used by Wide ResNets."""

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1, drop_rate: float = 0., device=None, dtype=None):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.bn1 = nn.BatchNorm2d(in_chs, **dd)
        self.act1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=False, **dd)
        self.bn2 = nn.BatchNorm2d(out_chs, **dd)
        self.act2 = nn.ReLU(inplace=True)
        self.drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, padding=1, bias=False, **dd)
        self.downsample = None if stride == 1 and in_chs == out_chs else \
            nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False, **dd)

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.conv2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.act1(self.bn1(x))
        # The identity shortcut carries the raw input; a projection shortcut sees the normalised one, as in the
        # reference WRN code.
        shortcut = x if self.downsample is None else self.downsample(pre)
        x = self.conv2(self.drop(self.act2(self.bn2(self.conv1(pre)))))
        return x + shortcut


_STAGES = ('layer1', 'layer2', 'layer3')


class CifarResNet(nn.Module):
    """Three-stage ResNet for 32x32 images.

    The stages are the attributes ``layer1``..``layer3`` (the names splits and checkpoints use), written out in
    :meth:`forward_features` as timm's ``ResNet`` does, so the model scripts with TorchScript.

    Args:
        layers: Blocks per stage (three stages).
        widths: Output channels per stage.
        preact: Use pre-activation blocks (Wide ResNet) instead of post-activation ones.
        stem_width: Channels of the 3x3 stem.
        num_classes: Classifier outputs; 0 for no classifier.
        in_chans: Input channels.
        global_pool: Pooling type for :func:`timm.layers.create_classifier`; ``''`` keeps the unpooled NCHW map.
        drop_rate: Dropout before the classifier.
        block_drop_rate: Dropout between the two convs of each block (WRN).
        zero_init_last: Zero-init the last BN / conv of each residual branch.
        device: Device the parameters are created on (timm's factory argument).
        dtype: Dtype of the parameters.

    Raises:
        ValueError: ``layers`` or ``widths`` do not describe three stages.
    """

    def __init__(
            self,
            layers: Tuple[int, ...] = (9, 9, 9),
            widths: Tuple[int, ...] = (16, 32, 64),
            preact: bool = False,
            stem_width: int = 16,
            num_classes: int = 10,
            in_chans: int = 3,
            global_pool: str = 'avg',
            drop_rate: float = 0.,
            block_drop_rate: float = 0.,
            zero_init_last: bool = False,
            device=None,
            dtype=None,
    ):
        super().__init__()
        if len(layers) != len(_STAGES) or len(widths) != len(_STAGES):
            raise ValueError(f'CifarResNet has {len(_STAGES)} stages; got layers={layers}, widths={widths}.')
        dd = {'device': device, 'dtype': dtype}
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.preact = preact
        self.grad_checkpointing = False

        self.conv1 = nn.Conv2d(in_chans, stem_width, 3, padding=1, bias=False, **dd)
        self.bn1 = nn.Identity() if preact else nn.BatchNorm2d(stem_width, **dd)
        self.act1 = nn.Identity() if preact else nn.ReLU(inplace=True)
        self.feature_info: List[Dict[str, Any]] = [dict(num_chs=stem_width, reduction=1, module='act1')]
        self._make_stages(layers, widths, stem_width, block_drop_rate, dd)
        self.num_stages = len(_STAGES)
        in_chs = widths[-1]
        # Pre-activation nets end with BN + ReLU before pooling; post-activation ones already did.
        self.norm = nn.BatchNorm2d(in_chs, **dd) if preact else nn.Identity()
        self.act = nn.ReLU(inplace=True) if preact else nn.Identity()
        if preact:
            self.feature_info[-1]['module'] = 'act'
        self.num_features = in_chs

        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=global_pool, **dd)
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()
        self._init_weights(zero_init_last)

    def _make_stages(
            self, layers: Tuple[int, ...], widths: Tuple[int, ...], in_chs: int, drop_rate: float,
            dd: Dict[str, Any],
    ) -> None:
        """Add ``layer1``..``layer3`` and their ``feature_info`` entries."""
        block_fn: Type[nn.Module] = PreActBlock if self.preact else BasicBlock
        reduction = 1
        for i, (name, depth, width) in enumerate(zip(_STAGES, layers, widths)):
            stride = 1 if i == 0 else 2
            reduction *= stride
            blocks = [block_fn(in_chs if d == 0 else width, width, stride if d == 0 else 1, drop_rate, **dd)
                      for d in range(depth)]
            self.add_module(name, nn.Sequential(*blocks))
            self.feature_info.append(dict(num_chs=width, reduction=reduction, module=name))
            in_chs = width

    def _init_weights(self, zero_init_last: bool) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_last:
            for m in self.modules():
                if hasattr(m, 'zero_init_last'):
                    m.zero_init_last()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, str]:
        return dict(stem=r'^conv1|bn1', blocks=r'^layer(\d+)' if coarse else r'^layer(\d+)\.(\d+)')

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Checkpoint every residual block (:func:`timm.models.checkpoint_seq`) in the forward passes.

        Args:
            enable: Turn checkpointing on or off.
        """
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self, name_only: bool = False) -> Union[str, nn.Module]:
        return 'fc' if name_only else self.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replace the classifier, as timm's ``ResNet.reset_classifier``.

        Args:
            num_classes: Outputs of the new classifier; 0 for none (the pooled features are returned).
            global_pool: New pooling type; ``''`` for none (the NCHW map is returned); None keeps the current one.
        """
        dd = get_device_dtype(self)
        self.num_classes = num_classes
        if global_pool is None:
            global_pool = self.global_pool.pool_type
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=global_pool, **dd)
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()
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
        """Forward features that also returns intermediates.

        Args:
            x: Input images.
            indices: Take the last n feature levels if int, all if None, the listed levels if a sequence.
            norm: Accepted for timm's API. A pre-activation net's last level always includes its final BN + ReLU
                (``feature_info`` names ``act``); post-activation nets have no final norm.
            stop_early: Stop after the last requested intermediate.
            output_fmt: Only ``'NCHW'``.
            intermediates_only: Return only the intermediates.

        Returns:
            The final features and the intermediates, or only the intermediates.
        """
        assert output_fmt == 'NCHW', 'Output shape must be NCHW.'
        take_indices, max_index = feature_take_indices(self.num_stages + 1, indices)
        intermediates = []
        x = self.act1(self.bn1(self.conv1(x)))
        if 0 in take_indices:
            intermediates.append(x)
        names, normed = _STAGES[:max_index] if stop_early else _STAGES, None
        for i, name in enumerate(names, start=1):
            stage = getattr(self, name)  # not scriptable, as in timm's ResNet; forward() does not use it
            x = checkpoint_seq(stage, x) if self.grad_checkpointing else stage(x)
            if i in take_indices:
                if i == self.num_stages and (norm or self.preact):
                    normed = self.act(self.norm(x))  # once: in train mode each call updates the BN statistics
                intermediates.append(x if normed is None else normed)
        if intermediates_only:
            return intermediates
        if len(names) == self.num_stages:
            x = self.act(self.norm(x)) if normed is None else normed
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Remove the stages (and head) that the requested feature levels do not need, as timm's ``ResNet``.

        Args:
            indices: Feature levels to keep, as in :meth:`forward_intermediates`.
            prune_norm: Accepted for timm's API. The final BN + ReLU of a pre-activation net is part of the last
                level, so it stays while that level is kept and goes with it otherwise.
            prune_head: Remove the classifier and pooling.

        Returns:
            The kept feature levels.
        """
        take_indices, max_index = feature_take_indices(self.num_stages + 1, indices)
        for name in _STAGES[max_index:]:
            setattr(self, name, nn.Sequential())  # empty, not Identity, so checkpoint_seq can iterate it
        prune_end = max_index < self.num_stages
        if prune_end:
            # The final norm is sized for the last stage; the features now end at the last kept level.
            self.norm, self.act = nn.Identity(), nn.Identity()
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
        if prune_head or prune_end:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq([self.layer1, self.layer2, self.layer3], x, flatten=True)
        else:
            x = self.layer1(x)
            x = self.layer2(x)
            x = self.layer3(x)
        return self.act(self.norm(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate:
            x = nn.functional.dropout(x, p=float(self.drop_rate), training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _create(variant: str, pretrained: bool = False, **kwargs) -> CifarResNet:
    out_indices = kwargs.pop('out_indices', (0, 1, 2, 3))
    return build_model_with_cfg(
        CifarResNet, variant, pretrained,
        feature_cfg=dict(out_indices=out_indices),
        **kwargs,
    )


def _cfg(**kwargs) -> Dict[str, Any]:
    return {
        'url': '', 'num_classes': 10, 'input_size': (3, 32, 32), 'pool_size': (8, 8),
        'crop_pct': 1.0, 'interpolation': 'bilinear', 'mean': CIFAR10_MEAN, 'std': CIFAR10_STD,
        'first_conv': 'conv1', 'classifier': 'fc', 'license': 'apache-2.0',
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    'resnet8_cifar.untrained': _cfg(),
    'resnet20_cifar.untrained': _cfg(),
    'resnet56_cifar.untrained': _cfg(),
    'wide_resnet56_cifar.untrained': _cfg(),
    'wrn28_10_cifar.untrained': _cfg(),
})


@register_model
def resnet8_cifar(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-8 for CIFAR (He et al. 2016, n=1): 3 stages of 1 basic block; small enough for CPU demos."""
    return _create('resnet8_cifar', pretrained, **dict(dict(layers=(1, 1, 1)), **kwargs))


@register_model
def resnet20_cifar(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-20 for CIFAR (He et al. 2016): 3 stages of 3 basic blocks, 16/32/64 channels."""
    return _create('resnet20_cifar', pretrained, **dict(dict(layers=(3, 3, 3)), **kwargs))


@register_model
def resnet56_cifar(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-56 for CIFAR (He et al. 2016): 3 stages of 9 basic blocks, 16/32/64 channels."""
    return _create('resnet56_cifar', pretrained, **dict(dict(layers=(9, 9, 9)), **kwargs))


@register_model
def wide_resnet56_cifar(pretrained: bool = False, widen_factor: int = 4, **kwargs) -> CifarResNet:
    """Wide ResNet-56: ResNet-56 with stages ``widen_factor`` times wider (default 4: 64/128/256)."""
    widths = tuple(w * widen_factor for w in (16, 32, 64))
    return _create('wide_resnet56_cifar', pretrained, **dict(dict(layers=(9, 9, 9), widths=widths), **kwargs))


@register_model
def wrn28_10_cifar(pretrained: bool = False, **kwargs) -> CifarResNet:
    """WRN-28-10 (Zagoruyko & Komodakis 2016): pre-activation, 4 blocks per stage, 160/320/640 channels."""
    model_args = dict(layers=(4, 4, 4), widths=(160, 320, 640), preact=True)
    return _create('wrn28_10_cifar', pretrained, **dict(model_args, **kwargs))
