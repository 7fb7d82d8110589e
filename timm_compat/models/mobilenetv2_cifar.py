"""MobileNetV2 for 32x32 inputs, registered in timm as ``mobilenetv2_100_cifar``.

Sandler et al. 2018 with the usual CIFAR adaptation (as in kuangliu/pytorch-cifar): the stem and the first
inverted-residual stage keep stride 1, so the total stride is 8 instead of 32 and the 32x32 input ends at 4x4. The
blocks are timm's own (``EfficientNet`` with MobileNetV2's arch_def), so every timm API works; after the 11th of
its 17 inverted residual blocks (``blocks.4.0``, the split of Gygli et al. 2021, Sec. 5.2) features are 8x8.
"""
from functools import partial
from typing import Any, Dict

import torch.nn as nn

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._efficientnet_builder import decode_arch_def, resolve_act_layer, resolve_bn_args, round_channels
from timm.models.efficientnet import EfficientNet

from .cifar_resnet import CIFAR10_MEAN, CIFAR10_STD

__all__ = []

_ARCH_DEF = [
    ['ds_r1_k3_s1_c16'],
    ['ir_r2_k3_s1_e6_c24'],  # stride 2 in the ImageNet model
    ['ir_r3_k3_s2_e6_c32'],
    ['ir_r4_k3_s2_e6_c64'],
    ['ir_r3_k3_s1_e6_c96'],
    ['ir_r3_k3_s2_e6_c160'],
    ['ir_r1_k3_s1_e6_c320'],
]


def _cifar_efficientnet(**kwargs) -> EfficientNet:
    """timm's ``EfficientNet`` with a stride-1 stem, built before timm wraps it for ``features_only``.

    EfficientNet's stem always has stride 2; the CIFAR variant keeps the full 32x32 resolution there, so every
    ``feature_info`` reduction halves. Patching here (the ``model_cls`` of ``build_model_with_cfg``) rather than
    after the build keeps the feature wrappers (``FeatureListNet``, ``FeatureGetterNet``, ...) consistent.
    """
    if 'output_stride' in kwargs:
        # timm dilates once its stride count, which includes the stem's 2 removed below, would pass output_stride.
        kwargs['output_stride'] *= 2
    model = EfficientNet(**kwargs)
    model.conv_stem.stride = (1, 1)
    for info in model.feature_info:
        info['reduction'] = max(1, info['reduction'] // 2)
    return model


def _create(variant: str, pretrained: bool = False, channel_multiplier: float = 1.0, **kwargs) -> EfficientNet:
    model_args = dict(
        block_args=decode_arch_def(_ARCH_DEF),
        num_features=max(1280, round_channels(1280, channel_multiplier)),
        stem_size=32,
        round_chs_fn=partial(round_channels, multiplier=channel_multiplier),
        norm_layer=kwargs.pop('norm_layer', None) or partial(nn.BatchNorm2d, **resolve_bn_args(kwargs)),
        act_layer=resolve_act_layer(kwargs, 'relu6'),
        num_classes=kwargs.pop('num_classes', 10),
        **kwargs,
    )
    # With the stride-1 first stage there are four feature levels (strides 1, 2, 4, 8), not timm's default five.
    feature_cfg = dict(flatten_sequential=True, out_indices=(0, 1, 2, 3))
    return build_model_with_cfg(_cifar_efficientnet, variant, pretrained, feature_cfg=feature_cfg, **model_args)


def _cfg(**kwargs) -> Dict[str, Any]:
    return {
        'url': '', 'num_classes': 10, 'input_size': (3, 32, 32), 'pool_size': (4, 4), 'crop_pct': 1.0,
        'interpolation': 'bilinear', 'mean': CIFAR10_MEAN, 'std': CIFAR10_STD,
        'first_conv': 'conv_stem', 'classifier': 'classifier', 'license': 'apache-2.0', **kwargs,
    }


default_cfgs = generate_default_cfgs({'mobilenetv2_100_cifar.untrained': _cfg()})


@register_model
def mobilenetv2_100_cifar(pretrained: bool = False, **kwargs) -> EfficientNet:
    """MobileNetV2 1.0 for 32x32 inputs (total stride 8)."""
    return _create('mobilenetv2_100_cifar', pretrained, **kwargs)
