import copy
import json
from pathlib import Path

import pytest
import yaml

from timm_compat.config import RESUME_MAY_CHANGE, ConfigError, DatasetConfig, InterfaceConfig, NetworkConfig, \
    OptimConfig, RunConfig, config_changes, load_config, resume_conflicts

ROOT = Path(__file__).resolve().parents[1]
SEC4 = ROOT / 'configs' / 'sec4'
PRESETS = sorted(p.stem for p in (SEC4 / 'data').glob('*.yaml'))
CONFIGS = [(p, preset) for p in sorted(SEC4.glob('*.yaml')) if p.stem != 'base' for preset in PRESETS] + [
    (p, None) for p in sorted((ROOT / 'configs' / 'head_transfer').glob('*.yaml'))]
# Every shipped config as `load_config(..).to_dict()` resolved it before issue 14 (less the removed `scheme`), when
# configs/{cifar10_stl10,parquet,cifar10_halves}/ were three copies of the Sec. 4 method files.
BEFORE = json.loads((Path(__file__).parent / 'fixtures' / 'configs_before_issue14.json').read_text())


def _with_added_keys(before, now, default):
    """``before`` plus the keys that the schema gained since, at their defaults: a config that does not set them
    means what it meant."""
    if isinstance(before, list) and isinstance(now, list) and len(before) == len(now) and default:
        return [_with_added_keys(b, n, default[0]) for b, n in zip(before, now)]  # networks: one schema each
    if not (isinstance(before, dict) and isinstance(now, dict) and isinstance(default, dict)):
        return before
    return {k: _with_added_keys(before[k], now[k], default.get(k)) if k in before else default.get(k, _MISSING)
            for k in now}


_MISSING = object()  # a key added since with no default to compare with: never equal


def test_defaults_are_the_offline_demo():
    cfg = load_config()
    assert [n.dataset.source for n in cfg.networks] == ['synthetic:A', 'synthetic:B']
    assert cfg.iiw and cfg.interface.rp and cfg.interface.dcc and cfg.baseline == 'independent'
    assert cfg.joint_schedule == 'sum' and cfg.interface.rp_norm == 'separate'
    independent = cfg.independent()
    assert not independent.iiw and not independent.interface.rp and not independent.interface.dcc
    assert independent.interface.width == cfg.interface.width == 32


def _load(path: Path, preset):
    return load_config(str(path), ['data_dir=DATA'] + ([f'data={preset}'] if preset else []))


@pytest.mark.parametrize('path, preset', CONFIGS, ids=[f'{p.stem}-{d}' if d else p.stem for p, d in CONFIGS])
def test_every_shipped_config_resolves(path, preset):
    cfg = _load(path, preset)
    assert cfg.output_dir.startswith('runs/') and len(cfg.networks) >= 1
    assert not any('{' in n.dataset.source for n in cfg.networks) and '{' not in cfg.output_dir
    method = path.stem
    if method in ('independent', 'iiw', 'rp', 'dcc', 'iiw_rp_dcc'):
        assert cfg.iiw == ('iiw' in method)
        assert cfg.interface.rp == ('rp' in method) and cfg.interface.dcc == ('dcc' in method)
        assert cfg.output_dir == f'runs/{preset}/{method}'
    if method == 'incremental':
        assert cfg.interface.load and cfg.networks[0].load.endswith(f'components/{cfg.networks[0].name}')


# Issue 13 named the data by its Hub id; data_dir became a folder of local copies, DATA/NAME/ for the Hub id
# ORG/NAME. The one intended change to what the old configs resolved to, with data_dir=DATA in both:
# * `parquet:DATA` (cifar10_halves, head_transfer: data_dir was the CIFAR-10 folder) is now `uoft-cs/cifar10`
#   (read from DATA/cifar10/: with the same files, data_dir moves up one folder);
# * the `parquet` preset is `cifar10_stl10` with data_dir: `parquet:DATA/cifar10` and `parquet:DATA/stl10` are now
#   the Hub ids read from the same folders, and its runs go to runs/cifar10_stl10/.
ISSUE13_SOURCES = {'parquet:DATA': 'uoft-cs/cifar10', 'parquet:DATA/cifar10': 'uoft-cs/cifar10',
                   'parquet:DATA/stl10': 'tanganke/stl10'}
ISSUE13_PRESETS = {'parquet': 'cifar10_stl10'}
# 2026-12-04: `contrast` became CIFAR-10-C's per-channel contrast; the old one, which the Sec. 4 presets keep, is
# `gray_contrast` (timm_compat/shifts.py): the same pixels under a new name.
RENAMED_SHIFTS = {'contrast:2': 'gray_contrast:2'}


def _issue13(before):
    """A config as resolved before issue 13, translated by exactly the changes above."""
    if isinstance(before, dict):
        return {k: ISSUE13_SOURCES.get(v, v) if k == 'source' else
                [RENAMED_SHIFTS.get(x, x) for x in v] if k == 'shift' and v else _issue13(v) for k, v in before.items()}
    if isinstance(before, list):
        return [_issue13(v) for v in before]
    if isinstance(before, str):
        return before.replace('runs/parquet', 'runs/cifar10_stl10')
    return before


@pytest.mark.parametrize('old', sorted(BEFORE))
def test_one_config_set_reproduces_the_per_setting_copies(old):
    """configs/SETTING/METHOD.yaml of before is configs/sec4/METHOD.yaml with data=SETTING, to the last key."""
    _, setting, name = old.split('/')
    path = ROOT / old if setting == 'head_transfer' else SEC4 / name
    now = _load(path, None if setting == 'head_transfer' else ISSUE13_PRESETS.get(setting, setting)).to_dict()
    expected = _issue13(BEFORE[old])
    if setting != 'head_transfer':  # 2026-12-04: the Sec. 4 configs take eq. (2)'s DCC reduction, a key added then
        expected['interface'] = {**expected['interface'], 'dcc_reduction': 'batch'}
    assert now == _with_added_keys(expected, now, RunConfig().to_dict())


def test_the_issue13_translation_changes_only_sources_shift_names_and_parquet_run_folders():
    """The translation above must not hide any other difference: it touches sources, the renamed shift and
    runs/parquet paths only."""
    def changes(a, b, path=''):
        if isinstance(a, dict):
            return [c for k in a for c in changes(a[k], b[k], f'{path}.{k}')]
        if isinstance(a, list):
            return [c for i, (x, y) in enumerate(zip(a, b)) for c in changes(x, y, f'{path}.{i}')]
        return [] if a == b else [(path, a, b)]

    for old, before in BEFORE.items():
        for path, a, b in changes(before, _issue13(before)):
            renamed = '.dataset.shift.' in path and RENAMED_SHIFTS[a] == b
            assert path.endswith('.dataset.source') and ISSUE13_SOURCES[a] == b or renamed or 'runs/parquet' in a, (
                old, path)
    assert _issue13(BEFORE['configs/cifar10_stl10/rp.yaml']) == BEFORE['configs/cifar10_stl10/rp.yaml']


def test_the_default_data_preset_is_the_papers():
    assert load_config(str(SEC4 / 'rp.yaml'), ['data_dir=DATA']) == _load(SEC4 / 'rp.yaml', 'cifar10_stl10')
    assert load_config(str(SEC4 / 'rp.yaml')).networks[1].dataset.source == 'tanganke/stl10'


def test_base_inheritance_merges_mappings_and_replaces_lists(tmp_path):
    (tmp_path / 'base.yaml').write_text('batch_size: 32\ninterface: {width: 8, rp: true}\noptim: {lr: 0.5}\n')
    (tmp_path / 'child.yaml').write_text('base: base.yaml\ninterface: {dcc: false}\n')
    cfg = load_config(str(tmp_path / 'child.yaml'), ['optim.momentum=0.5', 'networks.1.backbone=resnet20_cifar',
                                                   'iiw=false'])
    assert cfg.batch_size == 32 and cfg.interface.width == 8 and cfg.interface.rp and not cfg.interface.dcc
    assert cfg.optim.lr == 0.5 and cfg.optim.momentum == 0.5
    assert cfg.networks[1].backbone == 'resnet20_cifar'


def test_edits_by_position_apply_in_order_down_a_base_chain(tmp_path):
    """The files of a chain were merged together before the preset, so a child's {0: ...} patched the preset's
    first network, which its base had removed, and a child's named list dropped its base's patch."""
    (tmp_path / 'child_b.yaml').write_text(f'base: {SEC4 / "upper_bound_b.yaml"}\n'
                                           'networks: {0: {backbone: resnet20_cifar}}\n')
    cfg = load_config(str(tmp_path / 'child_b.yaml'), ['data=cifar10_halves'])
    assert [(n.name, n.backbone) for n in cfg.networks] == [('b', 'resnet20_cifar')]
    (tmp_path / 'child_inc.yaml').write_text(f'base: {SEC4 / "incremental.yaml"}\n'
                                             'networks: [{name: b, backbone: resnet20_cifar}]\n')
    cfg = load_config(str(tmp_path / 'child_inc.yaml'), ['data=cifar10_halves'])
    assert cfg.networks[0].load == 'runs/cifar10_halves/incremental_stage1/main/components/a'
    assert [(n.name, n.backbone) for n in cfg.networks] == [('a', 'resnet56_cifar'), ('b', 'resnet20_cifar')]


def test_mixed_precision_no_survives_yaml():
    assert load_config(None, ['mixed_precision=no']).mixed_precision == 'no'


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config(None, ['epochs=2', 'networks.0.dataset.train_shard=[0, 2]', 'interface.rp_norm=per_rotation',
                             'networks.1.model_args={drop_rate: 0.1, layers: [1, 2]}', 'joint_schedule=alternate'])
    (tmp_path / 'c.yaml').write_text(yaml.safe_dump(cfg.to_dict()))
    assert load_config(str(tmp_path / 'c.yaml')) == cfg == copy.deepcopy(cfg)
    assert isinstance(cfg, RunConfig) and isinstance(cfg.epochs, float)


def test_yaml_1_1_exponent_strings_are_floats(tmp_path):
    (tmp_path / 'c.yaml').write_text('epochs: 1e2\noptim: {lr: 1e-3, weight_decay: 5e-4, clip_grad_norm: 1e0}\n')
    cfg = load_config(str(tmp_path / 'c.yaml'))
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.clip_grad_norm, cfg.epochs) == (1e-3, 5e-4, 1.0, 100.0)
    assert all(type(v) is float for v in (cfg.optim.lr, cfg.optim.weight_decay, cfg.epochs))
    assert type(load_config(None, ['optim.lr=1']).optim.lr) is float


def test_valid_new_keys_and_alternatives():
    cfg = load_config(None, ['joint_schedule=alternate', 'interface.rp_norm=separate', 'mixed_precision=bf16',
                             'networks.0.split=2', 'networks.0.head=resnet20_cifar', 'networks.0.head_split=-1',
                             'interface.width=null',
                             'steps=null', 'optim.momentum=0', 'interface.dcc_head={type: conv, hidden: 8}',
                             'networks.0.dataset.train_shard=[1, 2]', 'push_to_hub=my-org/compat_1.x'])
    assert cfg.joint_schedule == 'alternate' and cfg.interface.rp_norm == 'separate'
    assert cfg.networks[0].split == 2 and cfg.interface.width is None and cfg.steps is None
    assert cfg.interface.dcc_head == {'type': 'conv', 'hidden': 8}  # a plain dict, as Interface takes it


def test_config_changes():
    old = load_config(None, ['data_dir=d']).to_dict()
    assert config_changes(old, copy.deepcopy(old)) == []
    new = load_config(None, ['data_dir=d', 'optim.lr=0.1', 'networks.1.dataset.train_limit=5', 'steps=9']).to_dict()
    assert sorted(config_changes(old, new)) == ['networks.1.dataset.train_limit', 'optim.lr', 'steps']
    assert resume_conflicts(old, new) == ['networks.1.dataset.train_limit', 'optim.lr']
    three = load_config(None, ['networks=[{name: a}, {name: b, dataset: {source: "synthetic:B"}}, {name: c}]'])
    three = three.to_dict()
    assert config_changes(load_config().to_dict(), three) == ['networks.2']
    assert config_changes({'a': 1}, {'a': True}) == ['a'] and config_changes({'a': 1}, {}) == ['a']
    assert config_changes({}, {'b': {'c': [1, 2]}}) == ['b'] and config_changes({'l': [1, 2]}, {'l': [1, 3]}) == ['l.1']


def test_resume_may_change_only_what_leaves_weights_and_results_alone():
    assert RESUME_MAY_CHANGE == {'steps', 'epochs', 'log_every', 'checkpoint_every', 'keep_checkpoints',
                                 'cpu_threads', 'save_components', 'push_to_hub', 'output_dir', 'data_dir',
                                 'trackers', 'data_storage', 'data_memory_gb', 'loader_workers'}
    assert RESUME_MAY_CHANGE <= set(RunConfig.model_fields)
    old = load_config().to_dict()
    tracked = load_config(None, ['trackers=[tensorboard]']).to_dict()
    assert resume_conflicts(old, tracked) == [] and resume_conflicts(tracked, {**tracked, 'trackers': ['wandb']}) == []
    assert resume_conflicts(old, load_config(None, ['eval_batch_size=100']).to_dict()) == ['eval_batch_size']
    assert resume_conflicts(old, load_config(None, ['epochs=9', 'output_dir=runs/x']).to_dict()) == []


def _keys(section, prefix=''):
    for name, field in section.model_fields.items():
        inner = {'networks': NetworkConfig, 'dataset': DatasetConfig, 'interface': InterfaceConfig,
                 'optim': OptimConfig}.get(name)
        yield f'{prefix}{name}'
        if inner is not None:
            yield from _keys(inner, f'{prefix}{name}.0.' if name == 'networks' else f'{prefix}{name}.')


KEYS = list(_keys(RunConfig))


@pytest.mark.parametrize('key', KEYS)
def test_every_key_has_a_type(key):
    """No key takes anything at all: a nested list is no valid value anywhere."""
    with pytest.raises(ConfigError, match=rf'^{key}(\.0)* must be .*got \['):
        load_config(None, [f'{key}=[[[]]]'])


# --- config files: networks merge by name, patches by position, data presets ------------------------------------

BASE_AB = '''networks:
  - {name: a, backbone: resnet20_cifar, dataset: {source: "synthetic:A", train_limit: 10}}
  - {name: b, backbone: resnet20_cifar, dataset: {source: "synthetic:B"}}
batch_size: 32
baseline: null
'''


def test_networks_merge_by_name(tmp_path):
    (tmp_path / 'base.yaml').write_text(BASE_AB)
    (tmp_path / 'child.yaml').write_text('base: base.yaml\niiw: false\nnetworks:\n'
                                         '  - {name: b, dataset: {train_limit: 5}}\n'
                                         '  - {name: c, dataset: {source: "synthetic:A"}}\n')
    cfg = load_config(str(tmp_path / 'child.yaml'))
    base = load_config(str(tmp_path / 'base.yaml'))
    assert [n.name for n in cfg.networks] == ['a', 'b', 'c'] and cfg.batch_size == 32
    assert cfg.networks[0] == base.networks[0]  # not named by the child: untouched
    assert cfg.networks[1].dataset.train_limit == 5  # refined: the rest of b is the base's
    assert cfg.networks[1].backbone == 'resnet20_cifar' and cfg.networks[1].dataset.source == 'synthetic:B'
    assert cfg.networks[2].backbone == NetworkConfig().backbone  # new: appended, with the defaults


def test_a_change_in_the_base_reaches_the_child(tmp_path):
    (tmp_path / 'base.yaml').write_text(BASE_AB.replace('resnet20_cifar', 'resnet8_cifar'))
    (tmp_path / 'child.yaml').write_text('base: base.yaml\nnetworks: [{name: b, load: runs/x/b}]\n')
    assert [n.backbone for n in load_config(str(tmp_path / 'child.yaml')).networks] == ['resnet8_cifar'] * 2


def test_networks_patch_by_position(tmp_path):
    (tmp_path / 'base.yaml').write_text(BASE_AB)
    (tmp_path / 'drop.yaml').write_text('base: base.yaml\nnetworks: {1: null}\n')
    (tmp_path / 'load.yaml').write_text('base: base.yaml\nnetworks: {0: {load: "runs/s1/{name}"}}\n')
    assert [n.name for n in load_config(str(tmp_path / 'drop.yaml')).networks] == ['a']
    loaded = load_config(str(tmp_path / 'load.yaml')).networks
    assert loaded[0].load == 'runs/s1/a' and loaded[0].dataset.train_limit == 10 and loaded[1].load is None
    (tmp_path / 'bad.yaml').write_text('base: base.yaml\nnetworks: {2: null}\n')
    with pytest.raises(ConfigError, match=r'networks: \[2\] name no item of the 2'):
        load_config(str(tmp_path / 'bad.yaml'))


def test_data_presets(tmp_path):
    (tmp_path / 'data').mkdir()
    (tmp_path / 'data' / 'one.yaml').write_text('networks: [{name: x}]\n')
    (tmp_path / 'data' / 'two.yaml').write_text('networks: [{name: y}, {name: z}]\n')
    (tmp_path / 'run.yaml').write_text('data: one\noutput_dir: runs/{data}/m\nnetworks: [{name: x, split: layer1}]\n')
    one = load_config(str(tmp_path / 'run.yaml'))
    assert one.output_dir == 'runs/one/m' and [(n.name, n.split) for n in one.networks] == [('x', 'layer1')]
    two = load_config(str(tmp_path / 'run.yaml'), ['data=two'])
    assert two.output_dir == 'runs/two/m' and [n.name for n in two.networks] == ['y', 'z', 'x']
    with pytest.raises(ConfigError, match=r"'three' is no data preset; choose one of \['one', 'two'\]"):
        load_config(str(tmp_path / 'run.yaml'), ['data=three'])
    with pytest.raises(ConfigError, match='give the file too'):
        load_config(None, ['data=one'])
    (tmp_path / 'nopreset.yaml').write_text('output_dir: runs/{data}/m\n')
    with pytest.raises(ConfigError, match='chooses no data preset'):
        load_config(str(tmp_path / 'nopreset.yaml'))


def test_scheme_is_refused_in_old_files_but_no_resume_conflict(tmp_path):
    (tmp_path / 'old.yaml').write_text('scheme: joint\n')
    with pytest.raises(ConfigError, match='^scheme is no longer a config key') as e:
        load_config(str(tmp_path / 'old.yaml'))
    assert len(str(e.value).splitlines()) == 1
    new = load_config().to_dict()
    assert 'scheme' not in new and resume_conflicts({**new, 'scheme': 'joint'}, new) == []


def _leaves(model, prefix=''):
    from timm_compat._config_errors import _model_in
    for name, field in model.model_fields.items():
        section = _model_in(field.annotation)
        if section is None:
            yield f'{prefix}{name}'
        else:
            yield from _leaves(section, f'{prefix}{name}.N.' if name == 'networks' else f'{prefix}{name}.')


def test_help_lists_every_config_key_with_type_and_default(capsys):
    import train
    with pytest.raises(SystemExit):
        train.parse_args(['--help'])
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.startswith('  ')}
    leaves = list(_leaves(RunConfig))
    assert len(leaves) > 60 and 'optim.schedule_args' in leaves and 'networks.N.dataset.source' in leaves
    for key in leaves:
        assert key in lines and '(default: ' in lines[key], key
    assert "'sum' | 'alternate'" in lines['joint_schedule'] and '"synthetic:A"' in lines['networks.N.dataset.source']


def test_a_run_started_before_keys_were_added_resumes():
    """config.yaml of an older run lacks keys the schema gained since (at any depth, in every network): they
    mean their defaults, so the same command resumes it; a key set away from its default still conflicts."""
    new = load_config(None, []).to_dict()
    old = copy.deepcopy(new)
    for key in ('label_smoothing', 'lr_reference_batch', 'norm_bias_lr_scale', 'warmup_fraction'):
        del old['optim'][key]
    del old['interface']['rp_rotations'], old['validation']
    for network in old['networks']:
        del network['dataset']['shift']
    assert resume_conflicts(old, new) == []
    changed = load_config(None, ['optim.label_smoothing=0.1', 'interface.rp_rotations=one']).to_dict()
    assert sorted(resume_conflicts(old, changed)) == ['interface.rp_rotations', 'optim.label_smoothing']


def test_exponent_numbers_inside_argument_mappings_are_floats():
    """PyYAML reads 1e-5 as a string: top-level numbers were converted, the docs' own schedule_args/optimizer_args
    examples were refused with a type error, and an aux head's logit_scale passed and crashed the build."""
    cfg = load_config(None, ['optim.schedule_args={min_lr: 1e-5}', 'optim.optimizer=adamw',
                             'optim.optimizer_args={eps: 1e-6}', 'interface.aux_head={type: conv, logit_scale: 1e-1}',
                             'networks.0.model_args={drop_rate: 1e-1}'])
    assert cfg.optim.schedule_args == {'min_lr': 1e-5} and cfg.optim.optimizer_args == {'eps': 1e-6}
    assert cfg.interface.aux_head == {'type': 'conv', 'logit_scale': 0.1}
    assert cfg.networks[0].model_args == {'drop_rate': 0.1}
    assert load_config(None, ['networks.0.model_args={act_layer: 1e}']).networks[0].model_args == {'act_layer': '1e'}


def test_iiw_with_networks_of_different_architectures_is_refused():
    # The shared seed gives no identical weights to different architectures, yet the run would be recorded as IIW.
    for override in ('networks.1.backbone=resnet20_cifar', 'networks.1.backbone=airbench_mobile_cifar'):
        with pytest.raises(ConfigError, match=r'iiw is true, but the trained networks have different backbones'):
            load_config(str(ROOT / 'tests' / 'tiny.yaml'), [override])
        assert not load_config(str(ROOT / 'tests' / 'tiny.yaml'), [override, 'iiw=false']).iiw
