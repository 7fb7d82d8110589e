"""The usage the project promises: ``make_compatible(backbone, head=...)`` with timm-like defaults, components and
interfaces given as folders or Hub ids, and components that say what they were built from and trained at.

Hub ids are resolved through a real Hugging Face cache that the tests fill (``tests.hub_util.put_in_cache``), with
``HF_HUB_OFFLINE=1``: huggingface_hub's own resolution runs, and nothing reaches the network.
"""
import re
from pathlib import Path

import pytest
import timm
import torch
from huggingface_hub import ModelCard
from safetensors.torch import save_file

import timm_compat as tc
from timm_compat._split import default_split
from timm_compat.interface import DEFAULT_WIDTH

from .conftest import REPO
from .hub_util import hf_cache, put_in_cache  # noqa: F401 (hf_cache is a fixture)


def test_design_card_call_needs_only_a_backbone_and_a_head():
    model = tc.make_compatible('resnet56_cifar', head='tail')
    # The paper's split for ResNet-56 (after stage 2), a fresh RP interface of width 64, the backbone's 10 classes.
    assert model.extractor.config['split'] == model.head.config['split'] == 'layer2'
    assert isinstance(model.interface, tc.Interface) and model.interface.width == DEFAULT_WIDTH == 64
    assert model.interface.rp is not None and model.interface.dcc is None
    assert model.head.num_classes == timm.create_model('resnet56_cifar').num_classes == 10
    assert model.extractor.interface_id == model.head.interface_id == model.interface.id
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert "split='layer2'" in repr(model) and "backbone='resnet56_cifar'" in repr(model)


@pytest.mark.parametrize('backbone', ['mobilenetv2_100_cifar', 'mobilenetv2_100'])
def test_mobilenetv2_splits_after_its_11th_inverted_residual_block(backbone):
    # Counting as Sandler et al. (Table 2) and torchvision do, the t=1 block first: blocks.0.0 is the 1st,
    # blocks.1.* the 2nd-3rd, blocks.2.* the 4th-6th, blocks.3.* the 7th-10th, blocks.4.0 the 11th.
    model = timm.create_model(backbone)
    blocks = [f'blocks.{i}.{j}' for i, stage in enumerate(model.blocks) for j in range(len(stage))]
    assert len(blocks) == 17 and blocks[10] == 'blocks.4.0' == default_split(model, backbone)
    net = tc.make_compatible(backbone, head='tail', image_size=32)
    assert net.extractor.config['split'] == 'blocks.4.0'
    assert net.head.num_classes == model.num_classes
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, model.num_classes)


def test_other_backbones_split_at_a_middle_feature_level():
    model = timm.create_model('resnet18')
    assert [i['module'] for i in model.feature_info] == ['act1', 'layer1', 'layer2', 'layer3', 'layer4']
    assert default_split(model, 'resnet18') == 'layer2'
    net = tc.make_compatible('resnet18', head='tail', num_classes=3, image_size=64)
    assert net.extractor.config['split'] == 'layer2' and "split='layer2'" in repr(net.extractor)


def test_width_without_an_interface_gives_a_fresh_interface_of_that_width_and_none_an_independent_network():
    assert tc.make_compatible('resnet8_cifar', width=16).interface.width == 16
    independent = tc.make_compatible('resnet8_cifar', interface=None, width=16)
    assert independent.interface is None and independent.extractor.interface_id is None


def test_interface_and_head_by_folder(tmp_path):
    alice = tc.make_compatible('resnet8_cifar', width=16)
    alice.interface.save_pretrained(tmp_path / 'interface')
    alice.head.save_pretrained(tmp_path / 'head')
    bob = tc.make_compatible('resnet20_cifar', interface=str(tmp_path / 'interface'), head=tmp_path / 'head')
    # A published interface is loaded frozen (incremental training): Bob's training cannot move Alice's aux heads.
    assert bob.interface.id == alice.interface.id and bob.interface.frozen
    assert bob.head.interface_id == alice.interface.id and bob.head.config['backbone'] == 'resnet8_cifar'
    assert bob.extractor.config['backbone'] == 'resnet20_cifar'
    assert bob(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_a_head_component_keeps_its_interface():
    alice = tc.make_compatible('resnet8_cifar', width=16)
    bob = tc.make_compatible('resnet20_cifar', head=alice.head)
    assert bob.head is alice.head and bob.interface is alice.interface  # the head's interface, not a fresh one
    with pytest.raises(ValueError, match=f'the head takes features of interface {alice.interface.id}'):
        tc.make_compatible('resnet20_cifar', interface=tc.Interface(width=16), head=alice.head)


def test_recombine_two_hub_ids_offline(hf_cache, tmp_path):  # noqa: F811
    model = tc.make_compatible('resnet8_cifar', width=16).eval()
    model.extractor.save_pretrained(tmp_path / 'e')
    model.head.save_pretrained(tmp_path / 'h')
    put_in_cache(hf_cache, 'org/r8-extractor', tmp_path / 'e')
    put_in_cache(hf_cache, 'org/r8-head', tmp_path / 'h')
    loaded = tc.recombine('org/r8-extractor', 'org/r8-head')
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    other = tc.make_compatible('resnet8_cifar', width=16)
    other.head.save_pretrained(tmp_path / 'other')
    with pytest.raises(ValueError, match='The components do not fit: the extractor emits features of interface'):
        tc.recombine('org/r8-extractor', tmp_path / 'other')


def test_base_model_is_what_was_loaded(hf_cache, tmp_path):  # noqa: F811
    weights = tmp_path / 'w' / 'model.safetensors'
    weights.parent.mkdir()
    save_file(timm.create_model('resnet8_cifar').state_dict(), weights)
    local = tc.make_compatible('resnet8_cifar', width=16, pretrained=True,
                               pretrained_cfg_overlay=dict(file=str(weights)))
    local.extractor.save_pretrained(tmp_path / 'local')
    # A local file is no Hub repo: the card names none (it used to name timm/resnet8_cifar.untrained).
    assert local.extractor.config['base_model'] is None
    assert ModelCard.load(tmp_path / 'local' / 'README.md').data.base_model is None
    put_in_cache(hf_cache, 'org/r8-weights', weights.parent)
    hub = tc.make_compatible('resnet8_cifar', width=16, pretrained=True,
                             pretrained_cfg_overlay=dict(hf_hub_id='org/r8-weights'))
    assert torch.equal(hub.extractor.trunk.conv1.weight, local.extractor.trunk.conv1.weight)
    hub.extractor.save_pretrained(tmp_path / 'hub')
    assert ModelCard.load(tmp_path / 'hub' / 'README.md').data.base_model == 'org/r8-weights'


def test_the_card_carries_the_licence_of_the_pretrained_weights(tmp_path):
    """Cards always said apache-2.0, even for components fine-tuned from weights timm licenses otherwise (the
    pycls RegNets: mit; some ResNet-18s: cc-by-nc-4.0)."""
    tag = 'regnetx_002.pycls_in1k'
    weights = tmp_path / 'model.safetensors'  # timm's weights for the tag, as a local file: no download
    save_file(timm.create_model('regnetx_002').state_dict(), weights)
    pretrained = tc.make_compatible(tag, width=16, num_classes=4, image_size=32, pretrained=True,
                                    pretrained_cfg_overlay=dict(file=str(weights)))
    scratch = tc.make_compatible(tag, width=16, num_classes=4, image_size=32)
    for name, model, licence in (('pretrained', pretrained, 'mit'), ('scratch', scratch, 'apache-2.0')):
        model.head.save_pretrained(tmp_path / name)
        assert ModelCard.load(tmp_path / name / 'README.md').data.license == licence
    assert tc.load_component(tmp_path / 'pretrained').pretrained_cfg['license'] == 'mit'
    # A recombined model's card said apache-2.0 whatever its parts' weights were under.
    for name, head, licence in (('both', pretrained.head, 'mit'), ('mixed', scratch.head, 'other')):
        tc.recombine(pretrained.extractor, head, force=True).save_pretrained(tmp_path / name)
        card = ModelCard.load(tmp_path / name / 'README.md')
        assert card.data.license == licence
        assert ('the extractor `mit`, the head `apache-2.0`' in card.text) == (licence == 'other')
        assert card.data.get('license_name') == ('mit-and-apache-2.0' if licence == 'other' else None)


def test_pretrained_cfg_records_the_training_resolution(tmp_path):
    model = tc.make_compatible('mobilenetv2_100', head='tail', num_classes=4, image_size=32)
    model.extractor.save_pretrained(tmp_path / 'e')
    model.head.save_pretrained(tmp_path / 'h')
    loaded = tc.recombine(str(tmp_path / 'e'), str(tmp_path / 'h'))
    for m in (model, loaded, loaded.extractor):
        config = timm.data.resolve_data_config(model=m)
        assert config['input_size'] == (3, 32, 32) and config['crop_pct'] == 1.0
        assert config['mean'] == timm.data.IMAGENET_DEFAULT_MEAN  # the backbone's, which training normalises with
    assert timm.data.resolve_data_config(model=loaded, use_test_size=True)['input_size'] == (3, 32, 32)
    with pytest.raises(ValueError, match='image_size must be a positive integer'):
        tc.make_compatible('resnet8_cifar', image_size=0)


def _snippet(path: Path) -> str:
    """The fenced Python block that follows the ``<!-- tested by tests/test_usage.py -->`` marker."""
    text = path.read_text()
    match = re.search(r'<!-- tested by tests/test_usage.py -->\s*```python\n(.*?)```', text, re.S)
    assert match, f'{path.name} lost its tested snippet'
    return match.group(1)


def test_docs_three_line_recombination_runs_offline(hf_cache, tmp_path):  # noqa: F811
    snippet = _snippet(REPO / 'docs' / 'hub.md')
    assert len(snippet.strip().splitlines()) <= 3 and snippet in (REPO / 'README.md').read_text()
    alice = tc.make_compatible('resnet8_cifar', width=16)
    bob = tc.make_compatible('mobilenetv2_100_cifar', interface=alice.interface)  # trained against Alice's
    for repo, component in (('ORG/alice-a-extractor', alice.extractor), ('ORG/bob-b-head', bob.head)):
        component.save_pretrained(tmp_path / repo)
        put_in_cache(hf_cache, repo, tmp_path / repo)
    scope = {}
    exec(compile(snippet, 'docs/hub.md', 'exec'), scope)
    model = scope['model']
    assert isinstance(model, tc.CompatibleModel) and not model.training
    expected = tc.recombine(alice.extractor, bob.head).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), expected(x))


def test_training_records_its_image_size():
    from timm_compat.build import build_network
    from timm_compat.config import load_config
    cfg = load_config(str(REPO / 'tests' / 'tiny.yaml'), ['image_size=40'])
    model = build_network(cfg.networks[0], 0, cfg, tc.Interface(width=16), ['x', 'y'])
    assert timm.data.resolve_data_config(model=model)['input_size'] == (3, 40, 40)


def test_a_loaded_network_must_fit_the_runs_interface(tmp_path):
    from timm_compat.build import build_network
    from timm_compat.config import load_config
    trained_with = tc.Interface(width=16, rp=True)
    model = tc.make_compatible('resnet8_cifar', split='layer2', interface=trained_with, num_classes=2,
                               class_names=['x', 'y'])
    model.extractor.save_pretrained(tmp_path / 'net' / 'extractor')
    model.head.save_pretrained(tmp_path / 'net' / 'head')
    cfg = load_config(str(REPO / 'tests' / 'tiny.yaml'), [f'networks.0.load={tmp_path / "net"}'])
    loaded = build_network(cfg.networks[0], 0, cfg, trained_with, ['x', 'y'])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), model.eval()(x))
    other = tc.Interface(width=16, rp=True)
    with pytest.raises(ValueError, match=f'fits interface {trained_with.id}, but this run uses interface {other.id}'):
        build_network(cfg.networks[0], 0, cfg, other, ['x', 'y'])
    # A head of another interface under the right extractor is refused too.
    stray = tc.make_compatible('resnet8_cifar', split='layer2', interface=other, num_classes=2, class_names=['x', 'y'])
    stray.head.save_pretrained(tmp_path / 'net' / 'head')
    with pytest.raises(ValueError, match=f'fits interface {sorted([trained_with.id, other.id])[0]} and'):
        build_network(cfg.networks[0], 0, cfg, trained_with, ['x', 'y'])


def test_interface_card_snippet_runs_offline(hf_cache, tmp_path):  # noqa: F811
    interface = tc.Interface(width=16, rp=True)
    interface.save_pretrained(tmp_path / 'itf', repo_id='org/itf')
    put_in_cache(hf_cache, 'org/itf', tmp_path / 'itf')
    card = (tmp_path / 'itf' / 'README.md').read_text()
    scope = {}
    exec(re.search(r'```python\n(.*?)```', card, re.S).group(1), scope)
    assert scope['model'].interface.id == interface.id and scope['model'].head.num_classes == 10
