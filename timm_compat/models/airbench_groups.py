"""The conv groups of the airbench family (:mod:`timm_compat.models.airbench`) and their layers.

Each group opens with a conv, a 2x2 max-pool, BN and GELU (airbench94's layout, so every member halves the
resolution at the same places), then differs by member: airbench94's second conv, a residual basic block, or a
MobileNetV2 inverted residual block. BN layers are named ``norm*`` (airbench's optimiser finds them by that name).
"""
from typing import Type, Dict

import torch
import torch.nn as nn

__all__ = ['GROUPS', 'ConvGroup', 'ResidualGroup', 'MobileGroup', 'batch_norm', 'conv', 'freeze_weight']

BN_MOMENTUM = 0.4
"""airbench's ``batchnorm_momentum=0.6`` is the weight of the old running statistic; torch's ``momentum`` weighs
the new batch, so the same average is ``momentum=1 - 0.6``."""
BN_EPS = 1e-12


def freeze_weight(module: nn.Module) -> nn.Module:
    """Turn ``module.weight`` into a buffer: saved and moved with the module, never trained or decayed.

    A buffer rather than a parameter with ``requires_grad=False``: every parameter of a timm model gets a
    gradient (timm's ``test_model_backward``), and optimiser factories take all parameters.
    """
    weight = module.weight.detach()
    del module.weight
    module.register_buffer('weight', weight)
    return module


def batch_norm(num_features: int, device=None, dtype=None) -> nn.BatchNorm2d:
    """airbench's BN: scale frozen at 1, trained bias, eps 1e-12, running statistics keeping 0.6 per step."""
    return freeze_weight(nn.BatchNorm2d(num_features, eps=BN_EPS, momentum=BN_MOMENTUM, device=device, dtype=dtype))


def conv(in_chs: int, out_chs: int, kernel_size: int = 3, groups: int = 1, device=None, dtype=None) -> nn.Conv2d:
    """Bias-free ``same`` conv. A dense one that does not narrow starts with its first ``in_chs`` filters set to
    the identity (airbench's dirac init: an implicit residual at initialisation); the rest keep torch's init."""
    layer = nn.Conv2d(in_chs, out_chs, kernel_size, padding=kernel_size // 2, groups=groups, bias=False,
                      device=device, dtype=dtype)
    if groups == 1 and out_chs >= in_chs:
        with torch.no_grad():
            nn.init.dirac_(layer.weight[:in_chs])
    return layer


class ConvGroup(nn.Module):
    """airbench94's group: conv3x3 -> maxpool 2 -> BN -> GELU -> conv3x3 -> BN -> GELU."""

    def __init__(self, in_chs: int, out_chs: int, device=None, dtype=None):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.conv1 = conv(in_chs, out_chs, **dd)
        self.pool = nn.MaxPool2d(2)
        self.norm1 = batch_norm(out_chs, **dd)
        self.conv2 = conv(out_chs, out_chs, **dd)
        self.norm2 = batch_norm(out_chs, **dd)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.norm1(self.pool(self.conv1(x))))
        return self.act(self.norm2(self.conv2(x)))


class ResidualGroup(ConvGroup):
    """conv3x3 -> maxpool 2 -> BN -> GELU, then a post-activation basic block (two conv3x3, He et al. 2016): airbench's
    group with a third conv whose output is added back to the first's."""

    def __init__(self, in_chs: int, out_chs: int, device=None, dtype=None):
        super().__init__(in_chs, out_chs, device=device, dtype=dtype)
        dd = {'device': device, 'dtype': dtype}
        self.conv3 = conv(out_chs, out_chs, **dd)
        self.norm3 = batch_norm(out_chs, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.norm1(self.pool(self.conv1(x))))
        y = self.act(self.norm2(self.conv2(x)))
        return self.act(x + self.norm3(self.conv3(y)))


class MobileGroup(nn.Module):
    """Depthwise-separable conv3x3 -> maxpool 2 -> BN -> GELU, then an inverted residual block (Sandler et al.
    2018: 1x1 expansion by ``expansion``, BN, GELU, depthwise 3x3, BN, GELU, linear 1x1 projection, BN, skip)."""

    def __init__(self, in_chs: int, out_chs: int, expansion: int = 4, device=None, dtype=None):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        mid_chs = out_chs * expansion
        self.conv_dw = conv(in_chs, in_chs, groups=in_chs, **dd)
        self.conv_pw = conv(in_chs, out_chs, 1, **dd)
        self.pool = nn.MaxPool2d(2)
        self.norm1 = batch_norm(out_chs, **dd)
        self.conv_expand = conv(out_chs, mid_chs, 1, **dd)
        self.norm2 = batch_norm(mid_chs, **dd)
        self.conv_mid = conv(mid_chs, mid_chs, groups=mid_chs, **dd)
        self.norm3 = batch_norm(mid_chs, **dd)
        self.conv_project = conv(mid_chs, out_chs, 1, **dd)
        self.norm4 = batch_norm(out_chs, **dd)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.norm1(self.pool(self.conv_pw(self.conv_dw(x)))))
        y = self.act(self.norm2(self.conv_expand(x)))
        y = self.act(self.norm3(self.conv_mid(y)))
        return x + self.norm4(self.conv_project(y))


GROUPS: Dict[str, Type[nn.Module]] = {'conv': ConvGroup, 'residual': ResidualGroup, 'mobile': MobileGroup}
"""Group type (``AirbenchNet(group=...)``) -> class."""
