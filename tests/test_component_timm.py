"""A single saved extractor or head loads through timm's own API (``local-dir:`` and ``hf-hub:``), bit-identical to
``timm_compat.load_component``; an interface folder is refused with a clear message; folders saved before the timm
architecture was recorded still load with ``load_component``.

Hub ids resolve through a real Hugging Face cache the tests fill, with ``HF_HUB_OFFLINE=1`` (``tests/test_hub.py``).
"""
import json
import re
import shutil
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

import timm_compat as tc
from timm_compat.component import write_folder

from .conftest import REPO
from .hub_util import hf_cache, put_in_cache  # noqa: F401 (hf_cache is a fixture)

NAMES = ['cat', 'dog', 'frog']
# (backbone, split, width, model_args): a CIFAR ResNet with an adapter, a CIFAR MobileNetV2 with an adapter, and
# timm's own test_resnet with identity adapters and a backbone argument that timm passes back on load.
BACKBONES = {
    'resnet8_cifar': ('resnet8_cifar', 'layer2', 16, {}),
    'mobilenetv2_100_cifar': ('mobilenetv2_100_cifar', 'blocks.4.0', 24, {}),
    'test_resnet': ('test_resnet', 'layer2', 48, {'drop_rate': 0.25}),
}


def _saved(root: Path, name: str) -> tc.CompatibleModel:
    backbone, split, width, model_args = BACKBONES[name]
    torch.manual_seed(0)
    model = tc.make_compatible(backbone, split=split, interface=tc.Interface(width=width, rp=True),
                               num_classes=len(NAMES), class_names=NAMES, image_size=32, **model_args).eval()
    for role in ('extractor', 'head', 'interface'):
        getattr(model, role).save_pretrained(root / role)
    return model


# MobileNetV2 builds and splits slowly on CPU (about a minute for this module): run by CI with the slow tests.
@pytest.fixture(scope='module', params=[pytest.param(name, marks=[pytest.mark.slow] if 'mobilenet' in name else [])
                                        for name in sorted(BACKBONES)])
def saved(request, tmp_path_factory):
    """``(folder, model, {role: load_component(folder / role)})`` for each backbone."""
    root = tmp_path_factory.mktemp(request.param)
    model = _saved(root, request.param)
    return root, model, {role: tc.load_component(root / role) for role in ('extractor', 'head')}


@pytest.fixture(scope='module')
def r8(tmp_path_factory):
    """The same for the ResNet-8 only: the tests of one mechanism, whatever the backbone."""
    root = tmp_path_factory.mktemp('r8')
    model = _saved(root, 'resnet8_cifar')
    return root, model, {role: tc.load_component(root / role) for role in ('extractor', 'head')}


def _images(n: int = 4) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def _assert_same_as_components(extractor_model, head_model, components) -> None:
    x = _images()
    features = extractor_model.forward_features(x)
    assert torch.equal(features, components['extractor'](x))
    assert torch.equal(head_model(features), components['head'](features))
    assert torch.equal(extractor_model(x), torch.flatten(torch.nn.functional.adaptive_avg_pool2d(features, 1), 1))


def test_extractor_and_head_load_with_timm_bit_identical(saved):
    root, model, components = saved
    extractor = timm.create_model(f'local-dir:{root / "extractor"}', pretrained=True)
    head = timm.create_model(f'local-dir:{root / "head"}', pretrained=True)
    assert not (extractor.training or head.training)
    _assert_same_as_components(extractor, head, components)
    assert (extractor.num_classes, extractor.num_features, head.num_classes) == (0, model.extractor.width, 3)
    assert extractor(_images()).shape == (4, model.extractor.width)
    # timm finds a classifier by pretrained_cfg['classifier'] (reset, pretrained loading): the extractor has none.
    assert extractor.pretrained_cfg.get('classifier') is None
    assert isinstance(head.get_submodule(head.pretrained_cfg['classifier']), torch.nn.Linear)
    # timm's data config is the training input the component recorded (32 px, the backbone's mean and std).
    for timm_model in (extractor, head):
        data = timm.data.resolve_data_config(model=timm_model)
        recorded = model.extractor.pretrained_cfg
        assert (tuple(data['input_size']), list(data['mean']), list(data['std'])) == (
            (3, 32, 32), list(recorded['mean']), list(recorded['std']))


def test_timm_without_pretrained_builds_the_architecture_only(r8):
    root, model, _ = r8
    fresh = timm.create_model(f'local-dir:{root / "head"}')
    assert fresh.num_classes == 3
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {
        k: v.shape for k, v in model.head.state_dict().items()}
    assert not all(torch.equal(v, model.head.state_dict()[k]) for k, v in fresh.state_dict().items())


def test_hf_hub_ids_load_through_the_offline_cache(r8, hf_cache):  # noqa: F811 (fixture)
    root, _, components = r8
    for role in ('extractor', 'head'):
        put_in_cache(hf_cache, f'org/c-{role}', root / role)
    extractor = timm.create_model('hf-hub:org/c-extractor', pretrained=True)
    head = timm.create_model('hf-hub:org/c-head', pretrained=True)
    _assert_same_as_components(extractor, head, components)


def test_hf_hub_ids_never_read_a_local_folder_of_the_same_name(r8, hf_cache, tmp_path, monkeypatch):  # noqa: F811
    """Saved to ORG/NAME before the push, loaded as hf-hub:ORG/NAME from the same directory: timm reads the
    Hub's config; the weights must be the Hub's too, not the local folder's."""
    root, model, components = r8
    put_in_cache(hf_cache, 'org/c-extractor', root / 'extractor')
    other = tc.make_compatible('resnet8_cifar', split='layer2', interface=tc.Interface(width=16, rp=True),
                               num_classes=3, class_names=NAMES, image_size=32)
    with torch.no_grad():
        for p in other.extractor.parameters():
            p.add_(1.0)
    other.extractor.save_pretrained(tmp_path / 'org' / 'c-extractor')
    monkeypatch.chdir(tmp_path)
    extractor = timm.create_model('hf-hub:org/c-extractor', pretrained=True)
    with torch.no_grad():
        assert torch.equal(extractor.forward_features(_images()), components['extractor'](_images()))


def test_docs_one_liner_runs_offline(r8, hf_cache):  # noqa: F811 (fixture)
    root, _, components = r8
    text = (REPO / 'docs' / 'hub.md').read_text()
    match = re.search(r'<!-- tested by tests/test_component_timm.py -->\s*```python\n(.*?)```', text, re.S)
    assert match, 'docs/hub.md lost its timm one-liner'
    put_in_cache(hf_cache, 'ORG/alice-a-extractor', root / 'extractor')
    scope = {}
    exec(compile(match.group(1), 'docs/hub.md', 'exec'), scope)
    with torch.no_grad():
        assert torch.equal(scope['model'].forward_features(_images()), components['extractor'](_images()))


def test_interface_and_stitch_folders_are_refused_with_a_clear_message(r8, tmp_path):
    root, _, _ = r8
    tc.Stitch(16, 16).save_pretrained(tmp_path / 'stitch')
    for role, folder in (('interface', root / 'interface'), ('stitch', tmp_path / 'stitch')):
        with pytest.raises(tc.ComponentError, match=rf'holds a timm-compat {role} .*not a model.*load_component'):
            timm.create_model(f'local-dir:{folder}', pretrained=True)


def test_timm_loading_verifies_the_weights(r8, tmp_path):
    root, _, _ = r8
    for name in ('config.json', 'model.safetensors', 'README.md'):
        (tmp_path / name).write_bytes((root / 'head' / name).read_bytes())
    tensors = load_file(tmp_path / 'model.safetensors')
    key = next(k for k, v in sorted(tensors.items()) if v.is_floating_point())
    tensors[key] = tensors[key] + 1
    config = json.loads((tmp_path / 'config.json').read_text())
    write_folder(tmp_path, tensors, config, lambda: 'card')  # the old digest, the new weights
    with pytest.raises(tc.ComponentError, match='do not match the digest'):
        timm.create_model(f'local-dir:{tmp_path}', pretrained=True)


def test_arguments_that_change_the_saved_component_are_refused(r8):
    root, _, _ = r8
    with pytest.raises(ValueError, match='saved with num_classes=3.*extend_classes'):
        timm.create_model(f'local-dir:{root / "head"}', pretrained=True, num_classes=5)
    with pytest.raises(ValueError, match="takes no argument 'features_only'"):
        timm.create_model(f'local-dir:{root / "extractor"}', pretrained=True, features_only=True)


def test_global_pool_sets_the_extractors_pooling_and_refusals_say_why(r8):
    """timm's ``global_pool=''`` idiom (unpooled feature maps) was refused, in a garbled sentence ("the extractor was
    takes no argument"), though the extractor's pooling is not part of the saved component."""
    root, _, components = r8
    x = _images()
    with torch.no_grad():
        features = components['extractor'](x)
        unpooled = timm.create_model(f'local-dir:{root / "extractor"}', pretrained=True, global_pool='')
        assert torch.equal(unpooled(x), features)
        maxed = timm.create_model(f'local-dir:{root / "extractor"}', pretrained=True, global_pool='max')
        assert torch.equal(maxed(x), features.amax((2, 3)))
        maxed.reset_classifier(0, '')
        assert torch.equal(maxed(x), features)
    with pytest.raises(ValueError, match=r"the extractor takes no argument 'features_only', so features_only=True"):
        timm.create_model(f'local-dir:{root / "extractor"}', pretrained=True, features_only=True)
    with pytest.raises(ValueError, match=r"the head takes no argument 'global_pool'"):
        timm.create_model(f'local-dir:{root / "head"}', pretrained=True, global_pool='')


def test_asked_for_by_name_it_says_it_needs_a_saved_folder():
    with pytest.raises(tc.ComponentError, match='no weights of its own.*local-dir:DIR'):
        timm.create_model('compatible_extractor')


def test_card_gives_the_timm_line(r8):
    root, _, _ = r8
    for role in ('extractor', 'head'):
        card = (root / role / 'README.md').read_text()
        assert 'import timm, timm_compat' in card and f'`compatible_{role}`, which plain timm does not know' in card
        assert 'timm.create_model("hf-hub:ORG/NAME", pretrained=True)' in card


def test_folders_saved_before_the_timm_architecture_still_load(r8, tmp_path):
    """The layout before: no ``architecture``, no extractor ``num_classes``; written here as that version wrote it."""
    root, _, components = r8
    x = _images()
    for role in ('extractor', 'head'):
        config = json.loads((root / role / 'config.json').read_text())
        config.pop('architecture')
        if role == 'extractor':
            config.pop('num_classes')
        write_folder(tmp_path / 'old' / role, load_file(root / role / 'model.safetensors'), config, lambda: 'card')
        old = tc.load_component(tmp_path / 'old' / role)
        with torch.no_grad():
            assert torch.equal(old(x), components[role](x))
            x = old(x)  # the extractor's features are the head's input
        # Saved again, it records the architecture and timm loads it.
        old.save_pretrained(tmp_path / 'new' / role)
        assert timm.create_model(f'local-dir:{tmp_path / "new" / role}').num_classes == (3 if role == 'head' else 0)


def test_timm_refuses_a_config_json_older_than_the_weights(r8, tmp_path):
    """timm reads pretrained_cfg from config.json, so a save stopped before config.json (which load_component takes
    as the new component) would give the new weights the old preprocessing."""
    root, _, components = r8
    path = Path(shutil.copytree(root / 'extractor', tmp_path / 'extractor'))
    old_config = (path / 'config.json').read_bytes()
    extractor = tc.load_component(path)
    extractor.config['pretrained_cfg']['input_size'] = [3, 16, 16]
    extractor.save_pretrained(path)
    (path / 'config.json').write_bytes(old_config)
    assert tc.load_component(path).config['pretrained_cfg']['input_size'] == [3, 16, 16]
    with pytest.raises(tc.ComponentError, match=r'config.json is older than its weights.*save.*again'):
        timm.create_model(f'local-dir:{path}', pretrained=True)


def test_a_push_after_timm_read_config_json_gives_one_commits_preprocessing_and_weights(hf_cache, tmp_path,
                                                                                          monkeypatch):  # noqa: F811
    """timm downloads config.json (its pretrained_cfg and model_args) itself, before timm_compat pins a commit for the
    weights: a push landing between the two paired the old version's preprocessing with the new version's weights."""
    _saved(tmp_path / 'old', 'test_resnet')  # saved with model_args drop_rate=0.25, which timm passes back
    new = tc.load_component(tmp_path / 'old' / 'extractor')
    with torch.no_grad():
        for p in new.parameters():
            p.add_(1.0)
    new.config['pretrained_cfg'] = {**new.config['pretrained_cfg'], 'input_size': [3, 24, 24]}
    new.config['model_args'] = {'drop_rate': 0.125}
    new.save_pretrained(tmp_path / 'new')
    pushed = 'f' * 40
    put_in_cache(hf_cache, 'org/moving', tmp_path / 'new', commit=pushed)
    put_in_cache(hf_cache, 'org/moving', tmp_path / 'old' / 'extractor')  # main names the old version
    download = timm.models._hub.hf_hub_download

    def download_then_push(*args, **kwargs):
        path = download(*args, **kwargs)
        (hf_cache / 'models--org--moving' / 'refs' / 'main').write_text(pushed)
        return path
    monkeypatch.setattr(timm.models._hub, 'hf_hub_download', download_then_push)
    model = timm.create_model('hf-hub:org/moving', pretrained=True)
    assert tuple(timm.data.resolve_data_config(model=model)['input_size']) == (3, 24, 24)
    with torch.no_grad():
        assert torch.equal(model.forward_features(_images()), new.eval()(_images()))
