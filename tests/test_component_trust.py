"""What loading and saving a component protect: no file but the component's own weights is read, a folder is loadable
at every instant of a save, and files are written as a plain open() would write them.

The crafted folders here are consistent (config.json and the config recorded in the weights changed alike), as the
publisher of a hostile repo would make them, so each refusal is the allow-list's and not the tamper check's.
"""
import json
import os
import pickle
import shutil
import stat
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import timm_compat as tc

CLASSES = ['cat', 'dog', 'frog', 'ship']


class _Trap:
    """Unpickling it creates ``marker``: proof that a file was unpickled."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


@pytest.fixture
def trap(tmp_path):
    """A pickled checkpoint that leaves ``marker`` behind if anything unpickles it."""
    marker, path = tmp_path / 'unpickled', tmp_path / 'trap.pth'
    path.write_bytes(pickle.dumps({'state_dict': {'conv1.weight': _Trap(marker)}}))
    yield path
    assert not marker.exists(), 'the pickle was unpickled'


@pytest.fixture(scope='module')
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp('trust')
    interface = tc.Interface(width=16, rp=True)
    model = tc.make_compatible('resnet8_cifar', split='layer2', interface=interface, num_classes=4,
                               class_names=CLASSES).eval()
    for role, component in (('interface', interface), ('extractor', model.extractor), ('head', model.head)):
        component.save_pretrained(root / role)
    return root


@pytest.fixture
def folder(saved, tmp_path):
    return lambda role: Path(shutil.copytree(saved / role, tmp_path / role))


def _forge(path: Path, **changes) -> None:
    config = {**json.loads((path / 'config.json').read_text()), **changes}
    (path / 'config.json').write_text(json.dumps(config))
    weights = path / 'model.safetensors'
    with safe_open(str(weights), framework='pt') as f:
        metadata = f.metadata()
    metadata['config'] = json.dumps(config, sort_keys=True, separators=(',', ':'))
    save_file(load_file(weights), weights, metadata=metadata)


@pytest.mark.parametrize('role', ['extractor', 'head'])
def test_checkpoint_path_in_model_args_is_refused_by_name(folder, trap, role):
    path = folder(role)
    _forge(path, model_args={'checkpoint_path': str(trap)})
    with pytest.raises(tc.ComponentError, match=r"model_args key 'checkpoint_path' is not allowed.*'drop_rate'"):
        tc.load_component(path)


def test_timm_aux_head_spec_with_checkpoint_path_is_refused_by_name(folder, trap):
    path = folder('interface')
    spec = {'type': 'timm', 'backbone': 'resnet8_cifar', 'split': 'layer2',
            'model_args': {'checkpoint_path': str(trap)}}
    _forge(path, rp_head=spec)
    with pytest.raises(tc.ComponentError, match="model_args key 'checkpoint_path' is not allowed"):
        tc.load_component(path)
    with pytest.raises(tc.ComponentError, match="model_args key 'checkpoint_path' is not allowed"):
        tc.Interface(width=16, rp=True, rp_head=spec)


REFUSED = {
    'pretrained': ({'pretrained': True}, "key 'pretrained' is not allowed"),
    'pretrained_cfg': ({'pretrained_cfg': {'file': '/etc/passwd'}}, "key 'pretrained_cfg' is not allowed"),
    'overlay in a config': ({'pretrained_cfg_overlay': {'file': '/etc/passwd'}},
                            "key 'pretrained_cfg_overlay' is not allowed"),
    'nested dict': ({'block_args': {'file': 'x'}}, "key 'block_args' is not allowed"),
    'string for a rate': ({'drop_rate': '0.1'}, "drop_rate='0.1' is invalid: it must be a float in"),
    'bool for a count': ({'in_chans': True}, 'in_chans=True is invalid: it must be a positive integer'),
}


@pytest.mark.parametrize('model_args,message', REFUSED.values(), ids=list(REFUSED))
def test_model_args_outside_the_allow_list_are_refused_on_load(folder, model_args, message):
    path = folder('extractor')
    _forge(path, model_args=model_args)
    with pytest.raises(tc.ComponentError, match=message):
        tc.load_component(path)


def test_make_compatible_refuses_what_could_not_be_loaded_back(trap, tmp_path):
    with pytest.raises(tc.ComponentError, match="'checkpoint_path' is not allowed.*pretrained_cfg_overlay=dict"):
        tc.make_compatible('resnet8_cifar', split='layer2', interface=None, width=16, num_classes=4,
                           checkpoint_path=str(trap))
    model = tc.make_compatible('resnet8_cifar', split='layer2', interface=None, width=16, num_classes=4,
                               drop_rate=0.25)
    model.head.save_pretrained(tmp_path / 'head')
    assert tc.load_component(tmp_path / 'head').config['model_args'] == {'drop_rate': 0.25}
    model.extractor.config['model_args'] = {'checkpoint_path': str(trap)}
    with pytest.raises(tc.ComponentError, match="'checkpoint_path' is not allowed"):
        model.extractor.save_pretrained(tmp_path / 'extractor')
    assert not (tmp_path / 'extractor').exists()


@pytest.mark.parametrize('umask,mode', [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_component_files_get_the_mode_a_plain_open_gives(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        tc.Interface(width=8).save_pretrained(tmp_path / 'itf')
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / 'itf').iterdir()}
    assert modes == {'README.md': mode, 'config.json': mode, 'model.safetensors': mode}


def test_save_that_fails_on_the_config_leaves_the_old_component(folder):
    path = folder('head')
    before = (path / 'model.safetensors').read_bytes()
    head = tc.load_component(path)
    torch.nn.init.normal_(head.tail.get_submodule('fc').weight)
    head.config['pretrained_cfg']['mean'] = torch.tensor([0.5, 0.5, 0.5])  # e.g. statistics computed with torch
    with pytest.raises(tc.ComponentError, match=r'config.pretrained_cfg.mean = tensor.*\(Tensor\) is not plain JSON'):
        head.save_pretrained(path)
    assert (path / 'model.safetensors').read_bytes() == before
    assert isinstance(tc.load_component(path), tc.Head)


def _outputs(head):
    with torch.no_grad():
        return head(torch.ones(2, 16, 8, 8))


def test_a_save_stopped_between_weights_and_config_loads_as_the_new_component(folder):
    path = folder('head')
    heads = [tc.load_component(path)]
    configs = [(path / 'config.json').read_bytes()]
    for _ in range(2):
        head = tc.load_component(path)
        torch.nn.init.normal_(head.tail.get_submodule('fc').weight)
        head.save_pretrained(path)
        heads.append(head)
        configs.append((path / 'config.json').read_bytes())
    # Weights of the last save with the config it replaced: what a crash between the two renames leaves.
    (path / 'config.json').write_bytes(configs[1])
    assert torch.equal(_outputs(tc.load_component(path)), _outputs(heads[2].eval()))
    # A config older than the one the save replaced is an edit, not an interrupted save.
    (path / 'config.json').write_bytes(configs[0])
    with pytest.raises(tc.ComponentError, match=r'config.json was changed after saving \(weights_sha256\)'):
        tc.load_component(path)


@pytest.mark.parametrize('role', ['interface', 'extractor', 'head'])
@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_half_precision_components_load_back_in_their_dtype(saved, tmp_path, role, dtype):
    component = tc.load_component(saved / role).to(dtype)
    component.save_pretrained(tmp_path / role)
    loaded = tc.load_component(tmp_path / role)
    assert {p.dtype for p in loaded.state_dict().values() if p.is_floating_point()} == {dtype}
    assert all(torch.equal(a, b) for a, b in zip(component.state_dict().values(), loaded.state_dict().values()))
    if role == 'interface':
        assert loaded.id == component.id


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_half_precision_components_with_non_persistent_buffers_run_after_loading(tmp_path, dtype):
    """Non-persistent float buffers (timm's BlurPool2d filter) are rebuilt, not loaded: they stayed float32 beside the
    half-precision weights, so the loaded component could not run."""
    model = tc.make_compatible('resnetblur18', split='layer1', interface=tc.Interface(width=16), num_classes=4,
                               image_size=32).eval()
    for role in ('extractor', 'head'):
        getattr(model, role).to(dtype).save_pretrained(tmp_path / role)
    loaded = {role: tc.load_component(tmp_path / role) for role in ('extractor', 'head')}
    for component in loaded.values():
        assert {b.dtype for b in component.buffers() if b.is_floating_point()} == {dtype}
    if dtype is torch.bfloat16:  # CPU convolutions take bfloat16, not float16
        x = torch.randn(2, 3, 32, 32, dtype=dtype)
        with torch.no_grad():
            assert torch.equal(loaded['head'](loaded['extractor'](x)), model.head(model.extractor(x)))


def test_a_save_that_changed_the_role_and_stopped_loads_as_the_new_component(folder, saved):
    path = folder('head')
    old_config = (path / 'config.json').read_bytes()
    extractor = tc.load_component(saved / 'extractor')
    extractor.save_pretrained(path)
    (path / 'config.json').write_bytes(old_config)  # a crash between the weights' rename and config.json's
    assert isinstance(tc.load_component(path), tc.Extractor)
    assert isinstance(tc.Component.from_pretrained(path), tc.Extractor)


@pytest.mark.parametrize('role,cls', [('extractor', tc.Extractor), ('head', tc.Head), ('interface', tc.Interface)])
def test_the_base_class_from_pretrained_loads_any_role(saved, role, cls):
    assert type(tc.Component.from_pretrained(saved / role)) is cls


def test_reshaped_weights_are_refused_as_a_component_error(folder):
    path = folder('extractor')
    tensors = load_file(path / 'model.safetensors')
    key = next(k for k, v in sorted(tensors.items()) if v.dim() == 4 and v.shape[0] != v.shape[1])
    tensors[key] = tensors[key].reshape(tensors[key].shape[1], tensors[key].shape[0], *tensors[key].shape[2:])
    with safe_open(str(path / 'model.safetensors'), framework='pt') as f:
        metadata = f.metadata()
    save_file(tensors, path / 'model.safetensors', metadata=metadata)  # same bytes, another shape
    with pytest.raises(tc.ComponentError, match=rf'{key}: shape .* not .*Download or save the component again'):
        tc.load_component(path)


def test_single_channel_extractors_build_save_and_load(tmp_path):
    model = tc.make_compatible('resnet8_cifar', split='layer2', interface=None, width=16, num_classes=4,
                               in_chans=1).eval()
    assert model.extractor.config['pretrained_cfg']['input_size'][0] == 1
    model.extractor.save_pretrained(tmp_path / 'extractor')
    loaded = tc.load_component(tmp_path / 'extractor')
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.extractor(x))


def test_a_revision_for_a_local_folder_is_refused_not_ignored(saved):
    # A revision pins a commit of a Hub repo; a local folder has none, so a pin there would silently not pin.
    with pytest.raises(tc.ComponentError, match=r"revision='main'.*is a local folder, which has no revisions"):
        tc.load_component(saved / 'head', revision='main')


@pytest.mark.parametrize('version', ['2', 2.0, None, [2]])
def test_a_format_version_of_another_type_is_a_component_error(folder, version):
    path = folder('head')
    _forge(path, format_version=version)
    with pytest.raises(tc.ComponentError, match=r'format_version .* is not an integer'):
        tc.load_component(path)


def test_a_recombined_folder_loaded_as_a_component_names_load_recombined(saved, tmp_path):
    extractor, head = tc.load_component(saved / 'extractor'), tc.load_component(saved / 'head')
    from timm_compat.recombined import save_recombined
    save_recombined(tc.recombine(extractor, head), tmp_path / 'pair')
    with pytest.raises(tc.ComponentError, match=r'load it with timm_compat\.load_recombined'):
        tc.load_component(tmp_path / 'pair')


@pytest.mark.parametrize('role', ['extractor', 'head', 'interface'])
def test_a_loaded_component_saves_with_the_current_format_version(saved, role, monkeypatch, tmp_path):
    from timm_compat import component
    loaded = tc.load_component(saved / role)
    monkeypatch.setattr(component, 'FORMAT_VERSION', component.FORMAT_VERSION + 1)
    assert loaded.full_config()['format_version'] == component.FORMAT_VERSION


@pytest.mark.parametrize('backbone,split,input_size,recorded', [
    ('test_maxvit', 1, (3, 64, 64), {'img_size': 64}),  # fixed input size: timm builds it at the overlay's size
    ('resnet8_cifar', 'layer2', (1, 32, 32), {'in_chans': 1}),
    ('resnet8_cifar', 'layer2', (3, 40, 40), {}),  # any size: nothing about the architecture changes
])
def test_an_overlay_input_size_is_recorded_as_the_model_args_timm_built_from(tmp_path, backbone, split, input_size,
                                                                              recorded):
    """timm builds in_chans (and img_size for a fixed-input-size model) from pretrained_cfg_overlay's input_size; the
    overlay is not recorded, so such a component saved, then could not be rebuilt."""
    model = tc.make_compatible(backbone, split=split, interface=tc.Interface(width=16), num_classes=4,
                               pretrained_cfg_overlay=dict(input_size=input_size)).eval()
    assert model.extractor.config['model_args'] == recorded
    assert model.extractor.config['pretrained_cfg']['input_size'] == list(input_size)
    model.extractor.save_pretrained(tmp_path / 'extractor')
    x = torch.randn(2, *input_size)
    with torch.no_grad():
        assert torch.equal(tc.load_component(tmp_path / 'extractor')(x), model.extractor(x))


def test_an_architecture_that_cannot_be_rebuilt_is_a_component_error(tmp_path):
    model = tc.make_compatible('test_maxvit', split=1, interface=tc.Interface(width=16), num_classes=4,
                               pretrained_cfg_overlay=dict(input_size=(3, 64, 64)))
    model.extractor.save_pretrained(tmp_path / 'extractor')
    _forge(tmp_path / 'extractor', model_args={})  # as saved before: built at 64 px, rebuilt at timm's default size
    with pytest.raises(tc.ComponentError, match=r'cannot rebuild the architecture in config.json.*64'):
        tc.load_component(tmp_path / 'extractor')
    with pytest.raises(tc.ComponentError, match=r'input_size=\(3, 64, 48\).*square'):
        tc.make_compatible('test_maxvit', split=1, interface=tc.Interface(width=16), num_classes=4,
                           pretrained_cfg_overlay=dict(input_size=(3, 64, 48)))


def test_save_refuses_another_librarys_config_and_keeps_a_readme_it_did_not_write(saved, tmp_path):
    """save_pretrained silently replaced another library's config.json and overwrote any README.md (huggingface_hub's
    ModelHubMixin never overwrites a README.md)."""
    head = tc.load_component(saved / 'head')
    bert = tmp_path / 'bert'
    bert.mkdir()
    (bert / 'config.json').write_text(json.dumps({'model_type': 'bert', 'hidden_size': 768}))
    with pytest.raises(tc.ComponentError, match=r'config.json that timm-compat did not write.*another folder'):
        head.save_pretrained(bert)
    assert [p.name for p in bert.iterdir()] == ['config.json']  # refused before anything was written
    notes = tmp_path / 'notes'
    notes.mkdir()
    (notes / 'README.md').write_text('# My notes\n')
    with pytest.warns(UserWarning, match=r'README.md.*not written by timm-compat.*kept'):
        head.save_pretrained(notes)
    assert (notes / 'README.md').read_text() == '# My notes\n'
    assert isinstance(tc.load_component(notes), tc.Head)
    # The card timm-compat wrote is its own: saved over, it describes the component saved now.
    tc.load_component(saved / 'extractor').save_pretrained(folder_ := tmp_path / 'own')
    head.save_pretrained(folder_)
    assert 'compat-role-head' in (folder_ / 'README.md').read_text()
