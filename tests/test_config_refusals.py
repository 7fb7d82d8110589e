"""Configs that would run, but not as written: a key that silently changes the run or does nothing is refused
before anything runs, with a message naming the key and the fix."""
import re

import pytest

from tests.conftest import REPO
from timm_compat.config import ConfigError, load_config

TINY = str(REPO / 'tests' / 'tiny.yaml')


@pytest.mark.parametrize('override, key', [('interface.load=""', 'interface.load'),
                                           ("networks.0.load=''", 'networks.0.load')])
def test_an_empty_load_path_is_refused_naming_the_key(override, key):
    # "" was taken for no load: `--interface ""` (an unset shell variable) made an incremental run joint, and
    # networks.N.load: "" trained anew the network it should have loaded.
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)} must be at least 1 character\(s\) long, got ''"):
        load_config(TINY, [override])
