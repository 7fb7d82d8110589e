"""Compatibility through discriminating common classes (DCC), Gygli et al. 2021, Sec. 3.2.

METHOD CARD
    What: every network's extractor also feeds ONE shared auxiliary head that classifies the classes the tasks
        have in common; examples of other classes are left out of its loss. Networks whose features must serve
        the same classifier for the same classes become compatible; the tasks need common classes.
    Equation (eq. 2): for each task t and example x_i, the task loss plus the shared head Theta_c's loss on the
        examples whose class lies in the common classes C:
        sum_t sum_i [ l_t(h(f(x_i; Phi_t); Theta_t), y_i) + l_c(h(f(x_i; Phi_t); Theta_c), y_i) * 1[y_i in C] ]
    Hyperparameters (config key: default): weight ``interface.dcc_weight``: 1.0; reduction
        ``interface.dcc_reduction``: ``common`` (the mean over the batch's common-class examples) or ``batch``
        (eq. 2's form: the sum over them, divided by the batch size as the task loss is; what the Sec. 4
        reproduction configs use; the same when every class is common); common classes
        ``interface.dcc_classes``: the classes common to all networks' datasets, matched by name
        (:mod:`timm_compat.classes`); head ``interface.dcc_head`` / ``aux_head``: ``conv``. With ``head: dcc`` a
        network's classifier is the DCC head itself (Sec. 5.2), and its task loss is its DCC term, counted once.
    Paper's numbers (recombination accuracy, CIFAR-10 + STL-10, ResNet-56 split after stage 2, 10 runs, Fig. 2):
        DCC 65.8 % from different random weights, the best single method (independent: 10.6 %, upper bound
        85.6 %); IIW+RP+DCC 76.7 %. From pre-trained weights: DCC 52.3 % from different ones, IIW+DCC 82.7 %
        (Sec. 4). Feature cross-correlation DCC 0.19, below RP's 0.38 (Fig. 3). One MobileNetV2-tail DCC head
        shared by three architectures: 91.7 % (ResNet-56) and 91.6 % (MobileNetV2) on CIFAR-10 after extending it
        to 10 classes, upper bounds 94.6 % and 93.3 % (Fig. 4, Sec. 5.2).
    Functional form: :func:`~timm_compat.classes.common_class_map` then :func:`common_class_loss`.
    Class form: :class:`CommonClassDiscrimination`, for :func:`~timm_compat.methods.compatibility_loss`.

Dataset labels are mapped to common-class indices by class name, so the datasets may order and name their classes
differently (``automobile`` in CIFAR-10 is ``car`` in STL-10).
"""
from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F

from ..classes import common_class_map
from .base import CompatibilityMethod

__all__ = ['common_class_loss', 'CommonClassDiscrimination', 'REDUCTIONS']

REDUCTIONS = ('common', 'batch')


def common_class_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = 'common') -> torch.Tensor:
    """Cross-entropy of the examples whose target is a common class (``targets >= 0``); 0 if there are none.

    ``reduction='common'`` averages over those examples, which keeps the loss scale independent of how many
    examples of other classes a batch holds; ``'batch'`` divides their sum by the batch size, as eq. 2's indicator
    does within a batch mean, so that with few common classes DCC weighs less against the task loss.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f'reduction must be one of {REDUCTIONS}, got {reduction!r}.')
    keep = targets >= 0
    per_example = F.cross_entropy(logits, targets.clamp(min=0), reduction='none')
    count = keep.sum().clamp(min=1) if reduction == 'common' else len(targets)
    return (per_example * keep).sum() / count


class CommonClassDiscrimination(CompatibilityMethod):
    """DCC as a pluggable method: scores the interface's DCC head on the task batch's common-class examples.

    Labels are mapped through the head's ``class_names`` and the interface's ``dcc_classes``.

    Args:
        weight: Factor of the DCC loss.
        synonyms: Replaces :data:`~timm_compat.classes.SYNONYMS` when matching class names.
        reduction: ``'common'`` or ``'batch'`` (eq. 2), see :func:`common_class_loss`.
    """
    name = 'dcc'

    def __init__(self, weight: float = 1.0, synonyms: Optional[Dict[str, str]] = None, reduction: str = 'common'):
        super().__init__(weight)
        if reduction not in REDUCTIONS:
            raise ValueError(f'reduction must be one of {REDUCTIONS}, got {reduction!r}.')
        self.synonyms, self.reduction = synonyms, reduction
        self._maps: Dict[tuple, torch.Tensor] = {}

    def _label_map(self, class_names: Sequence[str], common: Sequence[str], device) -> torch.Tensor:
        key = (tuple(class_names), tuple(common), str(device))
        if key not in self._maps:
            mapping = common_class_map(class_names, common, self.synonyms)
            if (mapping < 0).all():
                raise ValueError(f'None of the classes {list(class_names)} is a common class {list(common)}: '
                                 f'DCC would have nothing to learn. Check class names or drop DCC.')
            self._maps[key] = mapping.to(device)
        return self._maps[key]

    def loss(self, features: torch.Tensor, labels: torch.Tensor, model) -> torch.Tensor:
        interface = model.interface
        if interface is None or interface.dcc is None:
            raise ValueError('CommonClassDiscrimination needs an interface with a DCC head: '
                             'Interface(..., dcc_classes=[...]).')
        if model.head.class_names is None:
            raise ValueError('DCC maps labels to common classes by name: build the model with class_names=[...].')
        if interface.dcc in (model.head, getattr(model.head, 'tail', None)):
            # The classifier is the DCC head (head: dcc, Sec. 5.2): the task loss already is this term. A conv DCC
            # head is wrapped in a Head; a timm-built one is a Head itself.
            return features.new_zeros(())
        mapping = self._label_map(model.head.class_names, interface.dcc_classes, labels.device)
        return common_class_loss(interface.dcc(features[:labels.shape[0]]), mapping[labels], self.reduction)
