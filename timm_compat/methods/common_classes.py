"""Compatibility through discriminating common classes (DCC), Gygli et al. 2021, Sec. 3.2, eq. (2).

A shared head classifies the classes that the tasks have in common; examples of other classes are masked out.
Dataset labels are mapped to common-class indices by class name, so the datasets may order and name their classes
differently (``automobile`` in CIFAR-10 is ``car`` in STL-10).
"""
import re
from typing import Dict, Iterable, List, Optional, Sequence

import torch
import torch.nn.functional as F

from .base import CompatibilityMethod

__all__ = ['SYNONYMS', 'canonical_class_name', 'common_classes', 'common_class_map', 'common_class_loss',
           'CommonClassDiscrimination']

IGNORE = -1

# Names that datasets use for the same class; each maps to the name used in common-class lists.
SYNONYMS: Dict[str, str] = {
    'car': 'automobile', 'auto': 'automobile', 'plane': 'airplane', 'aeroplane': 'airplane',
    'boat': 'ship', 'lorry': 'truck',
}


def canonical_class_name(name: str, synonyms: Optional[Dict[str, str]] = None) -> str:
    key = re.sub(r'[\s\-]+', '_', name.strip().lower())
    return (SYNONYMS if synonyms is None else synonyms).get(key, key)


def common_classes(class_lists: Iterable[Sequence[str]], synonyms: Optional[Dict[str, str]] = None) -> List[str]:
    """Classes present, up to synonyms, in every list, in the order of the first list."""
    lists = [[canonical_class_name(c, synonyms) for c in names] for names in class_lists]
    if not lists:
        return []
    shared = set(lists[0]).intersection(*map(set, lists[1:]))
    return [c for c in lists[0] if c in shared]


def common_class_map(class_names: Sequence[str], common: Sequence[str],
                     synonyms: Optional[Dict[str, str]] = None) -> torch.Tensor:
    """Tensor mapping each dataset label to its common-class index, or -1 for classes outside ``common``."""
    index = {canonical_class_name(c, synonyms): i for i, c in enumerate(common)}
    return torch.tensor([index.get(canonical_class_name(c, synonyms), IGNORE) for c in class_names])


def common_class_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over examples whose target is a common class (``targets >= 0``); 0 if there are none.

    Averaging over the kept examples, not the batch, keeps the loss scale independent of how many examples of
    non-common classes a batch happens to hold.
    """
    keep = targets >= 0
    per_example = F.cross_entropy(logits, targets.clamp(min=0), reduction='none')
    return (per_example * keep).sum() / keep.sum().clamp(min=1)


class CommonClassDiscrimination(CompatibilityMethod):
    """DCC as a pluggable method: scores the interface's DCC head on the task batch's common-class examples.

    Labels are mapped through the head's ``class_names`` and the interface's ``dcc_classes``.
    """
    name = 'dcc'

    def __init__(self, weight: float = 1.0, synonyms: Optional[Dict[str, str]] = None):
        super().__init__(weight)
        self.synonyms = synonyms
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
        mapping = self._label_map(model.head.class_names, interface.dcc_classes, labels.device)
        return common_class_loss(interface.dcc(features[:labels.shape[0]]), mapping[labels])
