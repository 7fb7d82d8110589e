"""timm-compat: compatible network components for timm (Gygli, Uijlings & Ferrari, AAAI 2021)."""
from . import models  # registers the CIFAR models with timm
from ._split import split_model, split_points
from .adaptation import adapt, evaluate_adaptation
from .analysis import compare_extractors, direct_correlation, feature_correlation, linear_cka, permuted_correlation
from .batchnorm import batch_statistics, eval_mode, recalibrate_bn
from .component import Component, ComponentError, load_component
from .compatible import CompatibleModel, check_fit, fit_problems, make_compatible, recombine
from .components import Adapter, Extractor, Head
from .deployment import bn_accuracy_report, deploy
from .evaluation import accuracy, average_class_accuracy, recombination_matrix
from .hub import list_components
from .interface import Interface
from .recombined import RecombinedModel, load_recombined  # also registers timm's compatible_model
from . import _component_timm  # registers timm's compatible_extractor and compatible_head
from .methods import CommonClassDiscrimination, RotationPrediction, compatibility_loss
from .stitching import Stitch, StitchedModel, fit_stitch
from .transfer import transfer

# Figures and reports live in timm_compat.plots, imported on demand so that `import timm_compat` stays free of
# matplotlib.

__version__ = '0.1.0'
