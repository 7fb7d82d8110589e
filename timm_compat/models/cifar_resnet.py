"""ResNets for 32x32 inputs, registered in timm.

* ``resnet8_cifar``, ``resnet20_cifar``, ``resnet56_cifar``: He et al., *Deep Residual Learning for Image Recognition*, CVPR 2016,
  Sec. 4.2: a 3x3 stem, three stages of ``n`` basic blocks with 16/32/64 channels, depth ``6n + 2``.
  Shortcuts that change shape use a 1x1 conv + BN projection (option B) rather than zero padding.
* ``wide_resnet56_cifar``: the same depth-56 network with every stage ``widen_factor`` times wider, the
  "Wide ResNet-56" used by Gygli et al. (AAAI 2021), Sec. 5.2.
* ``wrn28_10_cifar``: Zagoruyko & Komodakis, *Wide Residual Networks*, BMVC 2016: pre-activation blocks,
  depth 28, widen factor 10.
"""
from typing import Any, Dict, List, Optional, Tuple, Type, Union

import torch
import torch.nn as nn

from timm.layers import SelectAdaptivePool2d
from timm.models._features import feature_take_indices
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

__all__ = ['CifarResNet']

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


def _projection(in_chs: int, out_chs: int, stride: int) -> Optional[nn.Module]:
    if stride == 1 and in_chs == out_chs:
        return None
    return nn.Sequential(
        nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False),
        nn.BatchNorm2d(out_chs),
    )


class BasicBlock(nn.Module):
    """Post-activation basic block (He et al. 2016)."""

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1, drop_rate: float = 0.):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_chs)
        self.act1 = nn.ReLU(inplace=True)
        self.drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.downsample = _projection(in_chs, out_chs, stride)
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

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1, drop_rate: float = 0.):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_chs)
        self.act1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.act2 = nn.ReLU(inplace=True)
        self.drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, padding=1, bias=False)
        self.downsample = None if stride == 1 and in_chs == out_chs else \
            nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False)

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.conv2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(x))
        # The projection shortcut sees the normalised input, as in the reference WRN code.
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.conv1(x)
        x = self.conv2(self.drop(self.act2(self.bn2(x))))
        return x + shortcut


class CifarResNet(nn.Module):
    """Three-stage ResNet for 32x32 images.

    Args:
        layers: Blocks per stage.
        widths: Output channels per stage.
        preact: Use pre-activation blocks (Wide ResNet) instead of post-activation ones.
        stem_width: Channels of the 3x3 stem.
        num_classes: Classifier outputs; 0 for no classifier.
        in_chans: Input channels.
        global_pool: Pooling type for :class:`timm.layers.SelectAdaptivePool2d`.
        drop_rate: Dropout before the classifier.
        block_drop_rate: Dropout between the two convs of each block (WRN).
        zero_init_last: Zero-init the last BN / conv of each residual branch.
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
    ):
        super().__init__()
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.preact = preact
        self.grad_checkpointing = False

        self.conv1 = nn.Conv2d(in_chans, stem_width, 3, padding=1, bias=False)
        self.bn1 = nn.Identity() if preact else nn.BatchNorm2d(stem_width)
        self.act1 = nn.Identity() if preact else nn.ReLU(inplace=True)
        block_fn: Type[nn.Module] = PreActBlock if preact else BasicBlock

        self.feature_info: List[Dict[str, Any]] = [dict(num_chs=stem_width, reduction=1, module='act1')]
        in_chs, reduction = stem_width, 1
        for i, (depth, width) in enumerate(zip(layers, widths)):
            stride = 1 if i == 0 else 2
            reduction *= stride
            blocks = [block_fn(in_chs if d == 0 else width, width, stride if d == 0 else 1, block_drop_rate)
                      for d in range(depth)]
            self.add_module(f'layer{i + 1}', nn.Sequential(*blocks))
            self.feature_info.append(dict(num_chs=width, reduction=reduction, module=f'layer{i + 1}'))
            in_chs = width
        self.num_stages = len(layers)
        # Pre-activation nets end with BN + ReLU before pooling; post-activation ones already did.
        self.norm = nn.BatchNorm2d(in_chs) if preact else nn.Identity()
        self.act = nn.ReLU(inplace=True) if preact else nn.Identity()
        if preact:
            self.feature_info[-1]['module'] = 'act'
        self.num_features = self.head_hidden_size = in_chs

        self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=True)
        self.fc = nn.Linear(in_chs, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights(zero_init_last)

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
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self, name_only: bool = False) -> Union[str, nn.Module]:
        return 'fc' if name_only else self.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=True)
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def _stages(self) -> List[nn.Module]:
        return [getattr(self, f'layer{i + 1}') for i in range(self.num_stages)]

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
            norm: Apply the final norm to the last intermediate (pre-activation nets only).
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
        stages = self._stages()[:max_index] if stop_early else self._stages()
        for i, stage in enumerate(stages, start=1):
            x = stage(x)
            if i in take_indices:
                last = i == self.num_stages
                intermediates.append(self.act(self.norm(x)) if last and (norm or self.preact) else x)
        if intermediates_only:
            return intermediates
        if len(stages) == self.num_stages:
            x = self.act(self.norm(x))
        return x, intermediates

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        for stage in self._stages():
            x = stage(x)
        return self.act(self.norm(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate:
            x = nn.functional.dropout(x, p=self.drop_rate, training=self.training)
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
