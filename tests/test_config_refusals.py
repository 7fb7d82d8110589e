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



@pytest.mark.parametrize('key, null', [('networks.0.dataset.classes', "all of the dataset's classes"),
                                       ('networks.0.dataset.class_names', "the dataset's own"),
                                       ('interface.dcc_classes', 'the classes common to all tasks')])
def test_an_empty_class_list_is_refused_saying_what_null_means(key, null):
    # [] was taken for null: all classes (dcc_classes: all common classes), not the no classes it says.
    with pytest.raises(ConfigError, match=rf'^{re.escape(key)} must be a list of at least one class name '
                                          rf'\(null: {null}\), got \[\] \(a list\); write {re.escape(key)}='):
        load_config(TINY, [f'{key}=[]'])
