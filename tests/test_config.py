from pathlib import Path

import pytest

from timm_compat.config import RunConfig, load_config

CONFIGS = sorted(p for p in (Path(__file__).resolve().parents[1] / 'configs').rglob('*.yaml') if p.stem != 'base')


def test_defaults_are_the_offline_demo():
    cfg = load_config()
    assert [n.dataset.source for n in cfg.networks] == ['synthetic:A', 'synthetic:B']
    assert cfg.iiw and cfg.interface.rp and cfg.interface.dcc and cfg.baseline == 'independent'
    independent = cfg.independent()
    assert not independent.iiw and not independent.interface.rp and not independent.interface.dcc


@pytest.mark.parametrize('path', CONFIGS, ids=[f'{p.parent.name}/{p.stem}' for p in CONFIGS])
def test_every_shipped_config_resolves(path):
    cfg = load_config(str(path), ['data_dir=/data'])
    assert cfg.output_dir.startswith('runs/') and len(cfg.networks) >= 1
    method = path.stem
    if method in ('independent', 'iiw', 'rp', 'dcc', 'iiw_rp_dcc'):
        assert cfg.iiw == ('iiw' in method)
        assert cfg.interface.rp == ('rp' in method) and cfg.interface.dcc == ('dcc' in method)
        assert cfg.output_dir.endswith(method)
    if method == 'incremental':
        assert cfg.scheme == 'incremental' and cfg.interface.load and cfg.networks[0].load


def test_base_inheritance_merges_mappings_and_replaces_lists(tmp_path):
    (tmp_path / 'base.yaml').write_text('batch_size: 32\ninterface: {width: 8, rp: true}\noptim: {lr: 0.5}\n')
    (tmp_path / 'child.yaml').write_text('base: base.yaml\ninterface: {dcc: false}\n')
    cfg = load_config(str(tmp_path / 'child.yaml'), ['optim.momentum=0.5', 'networks.1.backbone=resnet20_cifar'])
    assert cfg.batch_size == 32 and cfg.interface.width == 8 and cfg.interface.rp and not cfg.interface.dcc
    assert cfg.optim.lr == 0.5 and cfg.optim.momentum == 0.5
    assert cfg.networks[1].backbone == 'resnet20_cifar'


def test_bad_configs():
    with pytest.raises(ValueError, match=r"Unknown config key\(s\) \['widht'\] in config.interface"):
        load_config(None, ['interface.widht=3'])
    with pytest.raises(ValueError, match='must look like key.path=value'):
        load_config(None, ['epochs'])
    with pytest.raises(ValueError, match='interface.load'):
        load_config(None, ['scheme=incremental'])
    with pytest.raises(ValueError, match='pass --data-dir'):
        load_config(None, ['networks.0.dataset.source=parquet:{data_dir}/x'])
    with pytest.raises(ValueError, match='distinct names'):
        load_config(None, ['networks.1.name=a'])


def test_mixed_precision_no_survives_yaml():
    assert load_config(None, ['mixed_precision=no']).mixed_precision == 'no'


def test_loop_in_bases(tmp_path):
    (tmp_path / 'x.yaml').write_text('base: y.yaml\n')
    (tmp_path / 'y.yaml').write_text('base: x.yaml\n')
    with pytest.raises(ValueError, match='loop'):
        load_config(str(tmp_path / 'x.yaml'))


def test_round_trip_through_yaml(tmp_path):
    import yaml
    cfg = load_config(None, ['epochs=2'])
    (tmp_path / 'c.yaml').write_text(yaml.safe_dump(cfg.to_dict()))
    assert load_config(str(tmp_path / 'c.yaml')) == cfg
    assert isinstance(cfg, RunConfig)
