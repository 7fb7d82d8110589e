"""conftest for timm's own ``tests/test_models.py`` run against the models timm_compat registers.

``tests/test_timm_suite.py`` copies this file, as ``conftest.py``, next to an unmodified copy of timm's ``tests/``
folder and its ``pyproject.toml`` (timm's pytest markers), then runs ``python -m pytest tests/test_models.py -k cifar``
there. It is not a conftest of this project's own test suite: it changes ``timm.list_models`` for the process.

Two things happen before pytest imports timm's test module, whose ``parametrize`` lists are built at import time:

* ``import timm_compat`` registers the CIFAR models, so ``timm.list_models()`` includes them.
* timm selects the models it runs its ``forward_intermediates`` / ``features_only=True, feature_cls='getter'`` /
  pruning tests on by *module* (``list_models(module=FEAT_INTER_FILTERS)``: the timm modules known to implement
  that API). The project's models implement it too, in modules timm cannot know, so every ``list_models`` call that
  filters by a list of modules also gets the project's model modules. Nothing else of timm's selection changes.
"""
from typing import Iterable, List, Union

import timm
import timm.models

import timm_compat  # noqa: F401  (registers the models before timm's test module lists them)


def _project_modules() -> List[str]:
    """Registry module names (the last part of the dotted module path, as timm records it) of timm_compat's models."""
    modules = {timm.models.model_entrypoint(name).__module__ for name in timm.list_models()}
    return sorted(m.rsplit('.', 1)[-1] for m in modules if m.split('.')[0] == 'timm_compat')


PROJECT_MODULES = _project_modules()
_list_models = timm.list_models


def list_models(
        filter: Union[str, Iterable[str]] = '',
        module: Union[str, Iterable[str]] = '',
        *args,
        **kwargs,
) -> List[str]:
    """``timm.list_models`` with the project's model modules added to every list of modules to select from."""
    if module and not isinstance(module, str):
        module = [*module, *PROJECT_MODULES]
    return _list_models(filter, module, *args, **kwargs)


# timm's test module does ``from timm import list_models``; the models package holds the same function.
timm.list_models = timm.models.list_models = list_models
