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

# (overrides of tests/tiny.yaml, the key that would do nothing, the switch that turns it off)
UNUSED = [
    (['interface.dcc=false', 'interface.dcc_classes=[house]'], 'interface.dcc_classes', 'interface.dcc'),
    (['interface.dcc=false', 'interface.dcc_head={type: conv, hidden: 7}'], 'interface.dcc_head', 'interface.dcc'),
    (['interface.rp=false', 'interface.rp_head={type: conv, hidden: 7}'], 'interface.rp_head', 'interface.rp'),
    (['interface.rp=false', 'interface.rp_rotations=one'], 'interface.rp_rotations', 'interface.rp'),
    (['interface.rp=false', 'interface.rp_weight=0.5'], 'interface.rp_weight', 'interface.rp'),
    (['interface.rp=false', 'interface.rp_norm=shared'], 'interface.rp_norm', 'interface.rp'),
    (['interface.dcc=false', 'interface.dcc_weight=2'], 'interface.dcc_weight', 'interface.dcc'),
    (['validation.metric=own'], 'validation.metric', 'validation.every'),
    (['validation.examples=5'], 'validation.examples', 'validation.every'),
    (['validation.data=test'], 'validation.data', 'validation.every'),
    (['validation.every=2', 'validation.data=test', 'validation.examples=5'], 'validation.examples',
     'validation.data'),
]


@pytest.mark.parametrize('overrides, key, switch', UNUSED, ids=[u[1] for u in UNUSED])
def test_a_key_whose_method_is_off_is_refused(overrides, key, switch):
    # They were accepted and ignored: a DCC head spec with DCC off, a validation metric with validation off.
    with pytest.raises(ConfigError) as e:
        load_config(TINY, overrides)
    message = str(e.value)
    assert len(message.splitlines()) == 1, message
    assert re.match(rf'{re.escape(key)} is .*, but {re.escape(switch)} is .* so it would be ignored: drop '
                    rf'{re.escape(key)}, or set {re.escape(switch)}=', message), message
    fix = message.rsplit(' or set ', 1)[1].rstrip('.')
    assert load_config(TINY, overrides + [fix]), fix  # the suggested fix is itself valid


@pytest.mark.parametrize('overrides', [
    ['interface.rp=false', 'interface.rp_rotations=all', 'interface.dcc=false', 'interface.dcc_classes=null'],
    ['validation.metric=mean', 'validation.examples=1000', 'validation.data=holdout'],
    ['interface.rp_rotations=one', 'interface.rp_head=conv', 'interface.dcc_head=conv', 'interface.dcc_classes=[house]',
     'validation.every=2', 'validation.metric=own', 'validation.examples=5'],
    ['validation.every=2', 'validation.data=test', 'validation.metric=own'],  # logged with each measurement
])
def test_keys_at_their_default_or_with_their_method_on_are_accepted(overrides):
    assert load_config(TINY, overrides)


@pytest.mark.parametrize('base', ['5', '[a.yaml, b.yaml]', '{x: 1}', 'true', '""'])
def test_a_base_that_names_no_file_is_refused_naming_the_file(tmp_path, base):
    # base: 5 crashed with Python's TypeError (PosixPath / int); base: "" was taken for no base.
    path = tmp_path / 'run.yaml'
    path.write_text(f'base: {base}\n')
    with pytest.raises(ConfigError, match=rf'^{re.escape(str(path))}: base must be the path of a config file '
                                          rf'\(relative to this one\), e.g\. base: base\.yaml; got '):
        load_config(str(path))


@pytest.mark.parametrize('overrides, trained, measured', [
    (['networks.0.dataset.train_split=test'], 'networks.0', "network 'a'"),
    (['networks.1.dataset.source=synthetic:A', 'networks.1.dataset.train_split=test'], 'networks.1', "network 'a'"),
    # one split named two ways: a Hub id read from data_dir is its Parquet copy there
    (['data_dir=DATA', 'networks.0.dataset.source=org/x', 'networks.1.dataset.source=parquet:DATA/x',
      'networks.1.dataset.train_split=test'], 'networks.1', "network 'a'"),
])
def test_training_on_a_split_that_a_network_is_measured_on_is_refused(overrides, trained, measured):
    # Accepted before: every accuracy of the run was then measured on training images.
    with pytest.raises(ConfigError, match=rf"^{trained}\.dataset\.train_split is 'test' of .*, the split {measured} "
                                          rf"is measured on .*: every accuracy on it would be of training images"):
        load_config(TINY, overrides)


@pytest.mark.parametrize('overrides', [
    # swapped: disjoint still; network b is measured on split test, but of another source
    ['networks.0.dataset.train_split=test', 'networks.0.dataset.test_split=train'],
    ['networks.0.load=runs/x/main/components/a', 'networks.0.dataset.train_split=test'],  # a loaded one trains not
])
def test_a_training_split_measured_by_no_network_is_accepted(overrides):
    assert load_config(TINY, overrides)


@pytest.mark.parametrize('overrides', [['networks.-1.name=x'], ['networks.-2={name: c}'],
                                       ['trackers=[csv]', 'trackers.-1=tensorboard']])
def test_a_negative_index_in_an_override_is_refused(overrides):
    # networks.-1 edited the last network (Python's indexing), where an index past the end is refused.
    with pytest.raises(ConfigError, match=rf"^Override '{re.escape(overrides[-1])}': .*indices count from 0"):
        load_config(TINY, overrides)
    assert load_config(TINY, ['trackers=[csv]', 'trackers.0=tensorboard']).trackers == ['tensorboard']
