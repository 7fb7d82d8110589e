"""timm-compat: compatible network components for timm (Gygli, Uijlings & Ferrari, AAAI 2021)."""
from . import models  # registers the CIFAR models with timm
from ._hub import Component, ComponentError
from ._split import split_model, split_points
from .batchnorm import batch_statistics, eval_mode, recalibrate_bn
from .compatible import CompatibleModel, make_compatible, recombine
from .components import Adapter, Extractor, Head
from .interface import Interface
from .methods import CommonClassDiscrimination, RotationPrediction, compatibility_loss

__version__ = '0.1.0'
