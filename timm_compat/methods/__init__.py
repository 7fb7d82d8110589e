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
from .rp import (NUM_ROTATIONS, RP_NORMS, RP_ROTATIONS, RotationPrediction, draw_rotations, one_rotation_labels,
                 one_rotation_loss, rotate_batch, rotate_one_batch, rotation_generator, rotation_labels, rotation_loss)

__all__ = ['CompatibilityMethod', 'compatibility_loss', 'methods_for', 'chunked_batch_norm',
           'NUM_ROTATIONS', 'RP_NORMS', 'RP_ROTATIONS', 'RotationPrediction', 'rotate_batch', 'rotation_labels',
           'rotation_loss', 'rotation_generator', 'draw_rotations', 'rotate_one_batch', 'one_rotation_labels',
           'one_rotation_loss', 'CommonClassDiscrimination', 'common_class_loss', 'IdenticalInitialWeights',
           'init_seed']


def methods_for(interface, rp_weight: float = 1.0, dcc_weight: float = 1.0, rp_norm: str = 'separate',
                rp_rotations: str = 'all', seed: int = 0, dcc_reduction: str = 'common'):
    """The methods that train against ``interface``'s aux heads; a weight of 0 leaves a method out.

    ``rp_norm`` is how the extractor's BatchNorm treats the rotated copies, ``rp_rotations`` whether RP sees all four
    rotations or the upright image and one drawn with ``seed`` (see :class:`RotationPrediction`);
    ``dcc_reduction`` how DCC averages its loss (see :class:`CommonClassDiscrimination`).
    """
    if interface is None:
        return []
    methods = []
    if interface.rp is not None and rp_weight:
        methods.append(RotationPrediction(rp_weight, norm=rp_norm, rotations=rp_rotations, seed=seed))
    if interface.dcc is not None and dcc_weight:
        methods.append(CommonClassDiscrimination(dcc_weight, reduction=dcc_reduction))
    return methods
