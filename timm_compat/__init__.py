"""timm-compat: compatible network components for timm (Gygli, Uijlings & Ferrari, AAAI 2021)."""
from . import models  # registers the CIFAR models with timm
from ._hub import Component, ComponentError
from ._split import split_model, split_points
from .analysis import compare_extractors, direct_correlation, feature_correlation, linear_cka, permuted_correlation
from .batchnorm import batch_statistics, eval_mode, recalibrate_bn
from .compatible import CompatibleModel, make_compatible, recombine
from .components import Adapter, Extractor, Head
from .hub import list_components, load_component
from .interface import Interface
from .evaluation import accuracy, recombination_matrix
from .methods import CommonClassDiscrimination, RotationPrediction, compatibility_loss

# Figures and reports live in timm_compat.plots, imported on demand so that `import timm_compat` stays free of
# matplotlib.

__version__ = '0.1.0'
