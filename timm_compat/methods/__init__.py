"""Compatibility methods, each a plain function and a small class (composer-style)."""
from .base import CompatibilityMethod, compatibility_loss
from .chunked_norm import chunked_batch_norm
from .common_classes import (
    SYNONYMS, CommonClassDiscrimination, canonical_class_name, common_class_loss, common_class_map, common_classes)
from .rotation import RP_NORMS, RotationPrediction, rotate_batch, rotation_labels, rotation_loss


def methods_for(interface, rp_weight: float = 1.0, dcc_weight: float = 1.0, rp_norm: str = 'shared'):
    """The methods that train against ``interface``'s aux heads; a weight of 0 leaves a method out.

    ``rp_norm`` is how the extractor's BatchNorm treats the rotated copies (see :class:`RotationPrediction`).
    """
    if interface is None:
        return []
    methods = []
    if interface.rp is not None and rp_weight:
        methods.append(RotationPrediction(rp_weight, norm=rp_norm))
    if interface.dcc is not None and dcc_weight:
        methods.append(CommonClassDiscrimination(dcc_weight))
    return methods
