import copy

import pytest
import timm
import torch
from safetensors.torch import save_file

import timm_compat as tc

CIFAR10 = ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck']

BACKBONES = [
    ('resnet18', 'layer2'),
    ('resnet50', 'layer2'),
    ('mobilenetv2_100', 'blocks.4.0'),
    ('efficientnet_b0', 'blocks.3'),
    ('convnext_tiny', 'stages.1'),
    ('regnety_002', 's2'),
    ('resnet56_cifar', 'layer2'),
    ('wide_resnet56_cifar', 'layer2'),
]


@pytest.fixture(scope='module')
def interface():
    return tc.Interface(width=64, rp=True, dcc_classes=CIFAR10[:5])


@pytest.mark.parametrize('backbone,split', [pytest.param(b, s, marks=pytest.mark.slow)
                                            if b in ('resnet50', 'convnext_tiny') else (b, s) for b, s in BACKBONES],
                         ids=[b for b, _ in BACKBONES])
def test_make_compatible_width(backbone, split, interface):
    model = tc.make_compatible(backbone, split=split, interface=interface, num_classes=10)
    x = torch.randn(2, 3, 64, 64)
    feats = model.features(x)
    assert feats.shape[:2] == (2, 64) and feats.dim() == 4
    assert model(x).shape == (2, 10)
    assert model.extractor.interface is interface and model.head.interface is interface
    # The aux heads are shared by reference, not copied.
    assert model.interface.rp is interface.rp


def test_resnet56_extractor_with_mobilenetv2_head(interface):
    r56 = tc.make_compatible('resnet56_cifar', split='layer2', interface=interface, num_classes=10)
    mnv2 = tc.make_compatible('mobilenetv2_100', split='blocks.4.0', interface=interface, num_classes=10)
    mixed = tc.recombine(r56.extractor, mnv2.head)
    out = mixed(torch.randn(4, 3, 32, 32))
    out.sum().backward()
    assert out.shape == (4, 10)
    assert all(p.grad is not None for p in r56.extractor.parameters())
    assert all(p.grad is not None for p in mnv2.head.parameters())


def test_head_from_other_timm_model(interface):
    model = tc.make_compatible('resnet56_cifar', split='layer2', interface=interface, num_classes=10,
                               head='mobilenetv2_100', head_split='blocks.4.0')
    assert model.head.config['backbone'] == 'mobilenetv2_100'
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_head_custom_module(interface):
    custom = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(64, 3))
    model = tc.make_compatible('resnet20_cifar', split='layer2', interface=interface, num_classes=3, head=custom)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)


def test_head_with_wrong_input_width_refused(interface):
    wrong = torch.nn.Sequential(torch.nn.Conv2d(32, 8, 1), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    with pytest.raises(ValueError, match=r'does not accept interface features of shape \(N, 64, H, W\)'):
        tc.make_compatible('resnet20_cifar', split='layer2', interface=interface, num_classes=8, head=wrong)


def test_adapter_added_only_when_widths_differ():
    same = tc.Interface(width=32)
    model = tc.make_compatible('resnet20_cifar', split='layer2', interface=same, num_classes=10)
    assert isinstance(model.extractor.adapter, torch.nn.Identity)
    wide = tc.Interface(width=48)
    model = tc.make_compatible('resnet20_cifar', split='layer2', interface=wide, num_classes=10)
    assert isinstance(model.extractor.adapter, tc.Adapter) and isinstance(model.head.adapter, tc.Adapter)
    assert model.extractor.adapter[0].out_channels == 48 and model.head.adapter[0].out_channels == 32


def test_iiw_identical_and_seeds_differ(interface):
    def params(seed):
        m = tc.make_compatible('resnet20_cifar', split='layer2', interface=interface, num_classes=10, init_seed=seed)
        return [p.detach().clone() for p in m.extractor.parameters()] + [p.detach().clone() for p in m.head.parameters()]
    a, b, c = params(7), params(7), params(8)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    # Tasks with different numbers of classes still start from identical extractors.
    nine = tc.make_compatible('resnet20_cifar', split='layer2', interface=interface, num_classes=9, init_seed=7)
    assert all(torch.equal(x, y) for x, y in zip(a, nine.extractor.parameters()))
    # IIW must not disturb the global RNG stream.
    torch.manual_seed(1)
    before = torch.rand(1)
    torch.manual_seed(1)
    params(7)
    assert torch.equal(torch.rand(1), before)


def test_pretrained_through_timm_loading(tmp_path, interface):
    source = timm.create_model('resnet18', num_classes=1000)
    path = tmp_path / 'resnet18.safetensors'
    save_file(source.state_dict(), str(path))
    model = tc.make_compatible('resnet18', split='layer2', interface=interface, num_classes=10, pretrained=True,
                               pretrained_cfg_overlay=dict(file=str(path)))
    assert torch.equal(model.extractor.trunk.conv1.weight, source.conv1.weight)
    assert torch.equal(model.head.tail.get_submodule('layer3.0.conv1').weight, source.layer3[0].conv1.weight)
    assert 'pretrained_cfg_overlay' not in model.extractor.config['model_args']


def test_recombine_refuses_other_interface():
    a_itf, b_itf = tc.Interface(width=64, rp=True), tc.Interface(width=64, rp=True)
    a = tc.make_compatible('resnet20_cifar', split='layer2', interface=a_itf, num_classes=10)
    b = tc.make_compatible('resnet20_cifar', split='layer2', interface=b_itf, num_classes=10)
    assert a_itf.id != b_itf.id
    with pytest.raises(ValueError, match=f'interface {a_itf.id}.*interface {b_itf.id}'):
        tc.recombine(a.extractor, b.head)
    assert tc.recombine(a.extractor, b.head, force=True)(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    narrow = tc.make_compatible('resnet20_cifar', split='layer2', interface=tc.Interface(width=16), num_classes=10)
    with pytest.raises(ValueError, match='width 64.*width 16'):
        tc.recombine(a.extractor, narrow.head, force=True)


def test_recombine_refuses_networks_without_an_interface():
    a = tc.make_compatible('resnet8_cifar', split='layer2', interface=None, width=16, num_classes=10)
    b = tc.make_compatible('resnet8_cifar', split='layer2', interface=None, width=16, num_classes=10)
    assert a.extractor.interface_id is None and b.head.interface_id is None
    with pytest.raises(ValueError, match='the extractor was trained without an interface.*force=True'):
        tc.recombine(a.extractor, b.head)
    with pytest.raises(ValueError, match='the head was trained without an interface'):
        tc.recombine(tc.make_compatible('resnet8_cifar', split='layer2', interface=tc.Interface(width=16),
                                        num_classes=10).extractor, b.head)
    assert tc.recombine(a.extractor, b.head, force=True)(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize('width', [0, -3, 2.5])
def test_width_below_one(width):
    with pytest.raises(ValueError, match='width must be a positive integer'):
        tc.Interface(width=width)


def test_vit_refused_with_reason(interface):
    with pytest.raises(ValueError, match='token features'):
        tc.make_compatible('vit_tiny_patch16_224', split='blocks.5', interface=interface, num_classes=10)


def test_unknown_split_in_make_compatible(interface):
    with pytest.raises(ValueError, match='Valid split points include: act1, layer1'):
        tc.make_compatible('resnet56_cifar', split='stage2', interface=interface, num_classes=10)


def test_extend_classes_keeps_known_rows(tmp_path):
    itf = tc.Interface(width=16)
    model = tc.make_compatible('mobilenetv2_100_cifar', split='blocks.4.0', interface=itf, num_classes=2,
                               class_names=['cat', 'dog'])
    classifier = model.head.tail.get_submodule('classifier')
    old_cat = classifier.weight[0].detach().clone()
    model.head.extend_classes(['dog', 'cat', 'emu'])
    new = model.head.tail.get_submodule('classifier')
    assert new.out_features == 3 and torch.equal(new.weight[1], old_cat)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)
    model.head.save_pretrained(tmp_path / 'head')
    loaded = tc.Head.from_pretrained(tmp_path / 'head')
    assert loaded.class_names == ['dog', 'cat', 'emu']
    assert torch.equal(loaded.tail.get_submodule('classifier').weight, new.weight)


def test_extend_classes_matches_names_up_to_synonyms():
    """STL-10's 'car' is CIFAR-10's 'automobile': its trained row is kept, as every other class match in the library
    does (timm_compat.classes), not re-initialised."""
    model = tc.make_compatible('mobilenetv2_100_cifar', split='blocks.4.0', interface=tc.Interface(width=16),
                               num_classes=2, class_names=['automobile', 'cat'])
    old = model.head.tail.get_submodule('classifier').weight.detach().clone()
    model.head.extend_classes(['Car', 'cat', 'dog'])
    new = model.head.tail.get_submodule('classifier').weight
    assert torch.equal(new[0], old[0]) and torch.equal(new[1], old[1])


def test_saved_config_survives_a_load(tmp_path):
    itf = tc.Interface(width=16)
    model = tc.make_compatible('resnet20_cifar', split='layer2', interface=itf, num_classes=10)
    model.extractor.config['pretrained_cfg']['input_size'] = [3, 40, 40]  # e.g. a user's input-size overlay
    model.extractor.save_pretrained(tmp_path / 'e')
    loaded = tc.Extractor.from_pretrained(tmp_path / 'e')
    assert loaded.pretrained_cfg['input_size'] == (3, 40, 40)


def test_channels_last_backbone_adapts_channels_not_height(interface):
    # Swin stages emit NHWC: the adapter must map the stage's 192 channels, not the feature map's 8 rows.
    model = tc.make_compatible('swin_tiny_patch4_window7_224', split='layers.1', interface=interface, num_classes=10,
                               img_size=64, pretrained_cfg_overlay=dict(input_size=(3, 64, 64)))
    assert model.extractor.config['in_chs'] == 192
    x = torch.randn(2, 3, 64, 64)
    assert model.features(x).shape == (2, 64, 8, 8)
    assert model(x).shape == (2, 10)


def test_head_needing_another_feature_size_is_named(interface):
    takes_4x4 = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64 * 4 * 4, 3))
    with pytest.raises(ValueError, match=r'spatial size 16x16 .*it takes 4x4'):
        tc.make_compatible('resnet20_cifar', split='layer2', interface=interface, num_classes=3, head=takes_4x4)


def test_recombine_names_the_feature_size_a_head_needs(interface):
    takes_8x8 = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64 * 8 * 8, 10))
    deep = tc.make_compatible('resnet20_cifar', split='layer3', interface=interface, num_classes=10, head=takes_8x8)
    shallow = tc.make_compatible('resnet20_cifar', split='layer2', interface=interface, num_classes=10)
    with pytest.raises(ValueError, match=r'spatial size 16x16 .*it takes 8x8'):
        tc.recombine(shallow.extractor, deep.head)
    assert tc.recombine(deep.extractor, deep.head)(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize('num_classes', [0, -1, 2.5, True])
def test_num_classes_must_be_a_positive_integer(num_classes):
    with pytest.raises(ValueError, match=rf'num_classes must be a positive integer, got {num_classes!r}'):
        tc.make_compatible('resnet8_cifar', split='layer2', interface=tc.Interface(width=16), num_classes=num_classes)


def test_head_module_with_the_wrong_number_of_outputs_is_refused():
    wrong = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 5))
    with pytest.raises(ValueError, match=r'outputs of shape \(2, 5\) for 2 images, but the task has 3 classes'):
        tc.make_compatible('resnet8_cifar', split='layer2', interface=tc.Interface(width=16), num_classes=3,
                           head=wrong)
    right = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 3))
    model = tc.make_compatible('resnet8_cifar', split='layer2', interface=tc.Interface(width=16), num_classes=3,
                               head=right)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)


def test_every_entry_point_refuses_a_mismatch_with_one_wording(tmp_path, capsys):
    from timm_compat.hub import main
    from timm_compat.stitching import Stitch, StitchedModel
    from timm_compat.transfer import transfer
    a_itf, b_itf = tc.Interface(width=16), tc.Interface(width=16)
    a = tc.make_compatible('resnet8_cifar', split='layer2', interface=a_itf, num_classes=4)
    b = tc.make_compatible('resnet8_cifar', split='layer2', interface=b_itf, num_classes=4)
    problem = (f'the extractor emits features of interface {a_itf.id} but the head takes features of interface '
               f'{b_itf.id}')
    assert tc.fit_problems(a.extractor, b.head) == [problem]
    with pytest.raises(ValueError, match=f'^The components do not fit: {problem}. Use components'):
        tc.recombine(a.extractor, b.head)
    with pytest.raises(ValueError, match=f"^The components do not fit: source 'a': {problem}. Pass on_mismatch"):
        transfer(b, {'a': a.extractor}, None, None)  # refused before the data is looked at
    a.extractor.save_pretrained(tmp_path / 'extractor')
    b.head.save_pretrained(tmp_path / 'head')
    assert main(['check', str(tmp_path / 'extractor'), str(tmp_path / 'head')]) == 1
    assert f'They do not fit:\n  - {problem}\n' in capsys.readouterr().out
    # A stitch joins two interfaces on purpose: each side must be the interface it was fitted for.
    stitch = Stitch(16, 16, extractor_interface_id=b_itf.id, head_interface_id=b_itf.id)
    with pytest.raises(ValueError, match=f'^The components do not fit: the extractor emits features of interface '
                                         f'{a_itf.id} but the stitch takes features of interface {b_itf.id}. Use fit_stitch'):
        StitchedModel(a.extractor, stitch, b.head)


def test_fit_problems_names_roles_and_independent_networks():
    itf = tc.Interface(width=16)
    model = tc.make_compatible('resnet8_cifar', split='layer2', interface=itf, num_classes=4)
    assert tc.fit_problems(model.head, model.extractor) == [
        'the first component is a head, not an extractor: give the extractor first, then the head',
        'the second component is an extractor, not a head: give the extractor first, then the head']
    assert tc.fit_problems(itf, model.head)[0].startswith('the first component is an interface')
    independent = tc.make_compatible('resnet8_cifar', split='layer2', interface=None, width=16, num_classes=4)
    assert tc.fit_problems(model.extractor, independent.head) == [
        'the head was trained without an interface (an independent network), so nothing makes it compatible with '
        'another component']
    assert tc.fit_problems(model.extractor, independent.head, force=True) == []


def test_half_precision_components_recombine_and_a_dtype_mismatch_is_named():
    """The fit probes ran fp32 zeros: a bf16 extractor crashed recombine, a bf16 head was refused as taking other
    channels."""
    itf = tc.Interface(width=32)
    a, b = (tc.make_compatible('resnet8_cifar', split='layer2', interface=itf, num_classes=3, init_seed=s)
            for s in (0, 1))
    extractor, head = copy.deepcopy(a.extractor).bfloat16(), copy.deepcopy(b.head).bfloat16()
    assert tc.recombine(extractor, head)(torch.zeros(1, 3, 32, 32, dtype=torch.bfloat16)).dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r'extractor computes in torch\.bfloat16 but the head in torch\.float32'):
        tc.recombine(extractor, b.head)


def test_class_names_other_than_a_given_heads_are_refused():
    interface = tc.Interface(width=16)
    trained = tc.make_compatible('resnet8_cifar', interface=interface, num_classes=2, class_names=['cat', 'dog'])
    with pytest.raises(ValueError, match=r"class_names=\['dog', 'cat'\], but the given head classifies"):
        tc.make_compatible('resnet8_cifar', interface=interface, head=trained.head, class_names=['dog', 'cat'])
    again = tc.make_compatible('resnet8_cifar', interface=interface, head=trained.head, class_names=['Cat', 'dog'])
    assert again.head is trained.head


@pytest.mark.parametrize('names', [['car', 'automobile', 'cat'], ['house', 'House', 'tree']])
def test_dcc_classes_naming_one_class_twice_are_refused(names):
    # One DCC output would never get a target, yet compete in every softmax.
    with pytest.raises(ValueError, match=r'dcc_classes names the class .* twice'):
        tc.Interface(width=16, dcc_classes=names)
