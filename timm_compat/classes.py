"""Class-name vocabulary: which dataset classes are the same class, whatever each dataset calls them.

Evaluation, training, DCC, the recipes and the benchmarks all match classes by name, never by label index, so that
datasets may order and name their classes differently (``automobile`` in CIFAR-10 is ``car`` in STL-10). A name is
compared in its canonical form: lower case, spaces and dashes as ``_``, synonyms mapped to one name.
"""
import re
from typing import Dict, Iterable, List, Optional, Sequence

import torch

__all__ = ['SYNONYMS', 'IGNORE', 'canonical_class_name', 'same_classes', 'check_distinct', 'common_classes',
           'common_class_map']

IGNORE = -1  # the label of an example whose class is not a common class

# Names that datasets use for the same class; each maps to the name used in common-class lists.
SYNONYMS: Dict[str, str] = {
    'car': 'automobile', 'auto': 'automobile', 'plane': 'airplane', 'aeroplane': 'airplane',
    'boat': 'ship', 'lorry': 'truck',
}


def canonical_class_name(name: str, synonyms: Optional[Dict[str, str]] = None) -> str:
    """``name`` in the form that class lists are compared in, e.g. ``'Car'`` -> ``'automobile'``.

    Args:
        name: A class name as a dataset writes it.
        synonyms: Replaces :data:`SYNONYMS`; keys are canonical-form names.
    """
    key = re.sub(r'[\s\-]+', '_', name.strip().lower())
    return (SYNONYMS if synonyms is None else synonyms).get(key, key)


def same_classes(a: Sequence[str], b: Sequence[str]) -> bool:
    """Whether two class lists name the same classes in the same order, up to synonyms and case."""
    return [canonical_class_name(c) for c in a] == [canonical_class_name(c) for c in b]


def check_distinct(names: Sequence[str], what: str) -> None:
    """Refuse a class list naming a class twice, up to synonyms: one label would be left empty and two outputs
    would answer for one class.

    Raises:
        ValueError: Naming the class, the names given for it and ``what`` the list is.
    """
    seen: Dict[str, str] = {}
    for name in names:
        key = canonical_class_name(name)
        if key in seen:
            raise ValueError(f'{what} names the class {key!r} twice ({seen[key]!r} and {name!r}, synonyms or '
                             f'repeats): list each class once, got {list(names)}.')
        seen[key] = name


def common_classes(class_lists: Iterable[Sequence[str]], synonyms: Optional[Dict[str, str]] = None) -> List[str]:
    """Classes present, up to synonyms, in every list, canonical, in the order of the first list."""
    lists = [[canonical_class_name(c, synonyms) for c in names] for names in class_lists]
    if not lists:
        return []
    shared = set(lists[0]).intersection(*map(set, lists[1:]))
    return [c for c in lists[0] if c in shared]


def common_class_map(class_names: Sequence[str], common: Sequence[str],
                     synonyms: Optional[Dict[str, str]] = None) -> torch.Tensor:
    """Tensor mapping each dataset label to its index in ``common``, or :data:`IGNORE` for classes outside it."""
    index = {canonical_class_name(c, synonyms): i for i, c in enumerate(common)}
    return torch.tensor([index.get(canonical_class_name(c, synonyms), IGNORE) for c in class_names])
