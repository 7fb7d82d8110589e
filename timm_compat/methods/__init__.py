"""Compatibility methods of Gygli et al. 2021, side by side, each a functional form, a class form and a method card.

* :mod:`.rp`: rotation prediction through a shared head (Sec. 3.1, eq. 1).
* :mod:`.dcc`: discriminating common classes through a shared head (Sec. 3.2, eq. 2).
* :mod:`.iiw`: identical initial weights (Sec. 3.3).

RP and DCC are losses (:class:`CompatibilityMethod`, summed by :func:`compatibility_loss`); IIW decides the
networks' initialisation seeds. The class vocabulary that DCC matches names with is :mod:`timm_compat.classes`.
"""
from .base import CompatibilityMethod, compatibility_loss
from .chunked_norm import chunked_batch_norm
from .dcc import CommonClassDiscrimination, common_class_loss
from .iiw import IdenticalInitialWeights, init_seed
from .rp import NUM_ROTATIONS, RP_NORMS, RotationPrediction, rotate_batch, rotation_labels, rotation_loss

__all__ = ['CompatibilityMethod', 'compatibility_loss', 'methods_for', 'chunked_batch_norm',
           'NUM_ROTATIONS', 'RP_NORMS', 'RotationPrediction', 'rotate_batch', 'rotation_labels', 'rotation_loss',
           'CommonClassDiscrimination', 'common_class_loss', 'IdenticalInitialWeights', 'init_seed']


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
