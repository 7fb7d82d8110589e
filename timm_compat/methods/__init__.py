"""Compatibility methods, each a plain function and a small class (composer-style)."""
from .base import CompatibilityMethod, compatibility_loss
from .common_classes import (
    SYNONYMS, CommonClassDiscrimination, canonical_class_name, common_class_loss, common_class_map, common_classes)
from .rotation import RotationPrediction, rotate_batch, rotation_labels, rotation_loss


def methods_for(interface, rp_weight: float = 1.0, dcc_weight: float = 1.0):
    """The methods that train against ``interface``'s aux heads; a weight of 0 leaves a method out."""
    if interface is None:
        return []
    methods = []
    if interface.rp is not None and rp_weight:
        methods.append(RotationPrediction(rp_weight))
    if interface.dcc is not None and dcc_weight:
        methods.append(CommonClassDiscrimination(dcc_weight))
    return methods
