"""A recombined model saved as one timm folder and loaded back (timm's local-dir:/hf-hub: and timm_compat's route).
The deployable model (AdaBN) is in test_deployment.py."""
import copy
import json
import os
import shutil
import subprocess
import sys

import pytest
import safetensors.torch
import timm
import torch
from huggingface_hub import ModelCard

import timm_compat as tc
from timm_compat.batchnorm import eval_mode
from tests.hub_util import hf_cache, put_in_cache, write_pickle_that_leaves_a_trace  # noqa: F401 (fixture)

NAMES = ['w', 'x', 'y', 'z']


def busy_bn(model, seed=1):
    """Non-trivial running statistics everywhere (a fresh BN holds 0 / 1, which a lost buffer would not show)."""
    g = torch.Generator().manual_seed(seed)
    size = model.extractor.pretrained_cfg['input_size']
    with torch.no_grad():
        model.train()
        for _ in range(3):
            model(torch.randn(8, *size, generator=g) * 2 + 0.5)
    return model.eval()


def assert_same_logits(a, b, input_size):
    x = torch.randn(6, *input_size, generator=torch.Generator().manual_seed(3))
    for bn in ('batch', 'running'):
        with torch.no_grad(), eval_mode(a, bn), eval_mode(b, bn):
            assert torch.equal(a(x), b(x)), bn


@pytest.fixture(scope='module')
def pair():
    """Extractor of a resnet8 and head of a resnet20 (so adapters, two backbones): compatible_model format."""
    interface = tc.Interface(width=24)
    a = tc.make_compatible('resnet8_cifar', split='layer2', interface=interface, num_classes=4, class_names=NAMES)
    b = tc.make_compatible('resnet20_cifar', split='layer2', interface=interface, num_classes=4, class_names=NAMES,
                           init_seed=7)
    return busy_bn(tc.recombine(a.extractor, b.head))


@pytest.fixture(scope='module')
def same_backbone():
    """Two timm-native test_resnet networks, identity adapters at layer2 (48 channels): a plain test_resnet."""
    nets = [tc.make_compatible('test_resnet', split='layer2', interface=None, width=48, num_classes=3,
                               init_seed=seed, pretrained_cfg_overlay=dict(input_size=(3, 64, 64))) for seed in (1, 2)]
    return busy_bn(tc.recombine(nets[0].extractor, nets[1].head, force=True))


def test_recombined_model_round_trips_bit_identically_through_timm_and_timm_compat(pair, tmp_path):
    assert pair.save_pretrained(tmp_path) == 'timm_compat'
    assert sorted(p.name for p in tmp_path.iterdir()) == ['README.md', 'config.json', 'model.safetensors']
    config = json.loads((tmp_path / 'config.json').read_text())
    assert config['architecture'] == 'compatible_model' and config['num_classes'] == 4
    assert config['label_names'] == NAMES and config['pretrained_cfg']['input_size'] == [3, 32, 32]
    size = (3, 32, 32)
    via_timm = timm.create_model(f'local-dir:{tmp_path}', pretrained=True)
    for loaded in (tc.load_recombined(tmp_path), tc.CompatibleModel.from_pretrained(tmp_path), via_timm):
        assert isinstance(loaded, tc.RecombinedModel) and loaded.head.class_names == NAMES
        # timm finds the classifier by this path (reset_classifier, pretrained loading with other classes).
        assert loaded.get_submodule(loaded.pretrained_cfg['classifier']) is loaded.head.tail.fc
        assert loaded.extractor.interface_id == pair.extractor.interface_id
        assert_same_logits(pair, loaded, size)
    # timm's own data config reads the recorded preprocessing.
    assert tuple(timm.data.resolve_data_config(model=via_timm)['input_size']) == size
    # Without pretrained=True timm builds the architecture only, as it does for any model.
    fresh = timm.create_model(f'local-dir:{tmp_path}')
    assert not torch.equal(fresh.head.tail.fc.weight, pair.head.tail.fc.weight)
    # timm's model arguments cannot rebuild a saved pair: refused, not silently dropped (the model had no dropout).
    for pretrained in (True, False):
        with pytest.raises(ValueError, match='compatible_model takes no argument drop_rate'):
            timm.create_model(f'local-dir:{tmp_path}', pretrained=pretrained, drop_rate=0.5)


def test_same_backbone_pair_loads_with_plain_timm_without_timm_compat(same_backbone, tmp_path):
    folder, io = tmp_path / 'model', tmp_path / 'io.safetensors'
    assert same_backbone.save_pretrained(folder) == 'timm'
    config = json.loads((folder / 'config.json').read_text())
    assert config['architecture'] == 'test_resnet' and config['model_args'] == {}
    x = torch.randn(5, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    safetensors.torch.save_file({'x': x}, io)
    script = (
        'import sys, timm, torch, safetensors.torch as st\n'
        f'm = timm.create_model("local-dir:{folder}", pretrained=True).eval()\n'
        'x = st.load_file(sys.argv[1])["x"]\n'
        'with torch.no_grad():\n'
        '    running = m(x)\n'
        '    for bn in m.modules():\n'
        '        if isinstance(bn, torch.nn.BatchNorm2d): bn.train(); bn.track_running_stats = False\n'
        '    batch = m(x)\n'
        'assert "timm_compat" not in sys.modules\n'
        'st.save_file({"running": running, "batch": batch}, sys.argv[1])\n')
    subprocess.run([sys.executable, '-c', script, str(io)], check=True, env=dict(os.environ, PYTHONPATH=''))
    out = safetensors.torch.load_file(io)
    for bn in ('running', 'batch'):
        with torch.no_grad(), eval_mode(same_backbone, bn):
            assert torch.equal(same_backbone(x), out[bn]), bn
    loaded = tc.load_recombined(folder)  # the timm_compat route keeps the extractor / head split
    assert isinstance(loaded.extractor, tc.Extractor)
    assert_same_logits(same_backbone, loaded, (3, 64, 64))


def test_card_says_which_call_loads_the_model(pair, same_backbone, tmp_path):
    pair.save_pretrained(tmp_path / 'a', repo_id='org/mixed')
    same_backbone.save_pretrained(tmp_path / 'b', repo_id='org/plain')
    mixed, plain = (ModelCard.load(tmp_path / n / 'README.md') for n in 'ab')
    assert mixed.data.library_name == 'timm-compat' and plain.data.library_name == 'timm'
    assert mixed.data.pipeline_tag == plain.data.pipeline_tag == 'image-classification'
    assert 'import timm_compat  # registers compatible_model' in mixed.text
    assert 'plain timm without timm-compat cannot load it' in mixed.text
    assert 'plain timm loads it, without timm-compat' in plain.text and 'import timm_compat  #' not in plain.text
    assert 'timm.create_model("hf-hub:org/plain", pretrained=True)' in plain.text
    assert 'timm_compat.deploy(model' in mixed.text  # the running statistics are not the target's
    # The plain pair was joined with force=True: its card must not call its parts compatible.
    assert 'trained against one interface' in mixed.text and 'compatible' not in plain.text.split('## Loading')[0]
    assert 'share no interface' in plain.text


def test_card_says_force_only_where_the_parts_may_have_been_forced(pair, tmp_path):
    """Every pair without one interface id was called force-joined, also one independent network saved whole."""
    network = tc.make_compatible('resnet8_cifar', split='layer2', interface=None, width=24, num_classes=4)
    other = tc.make_compatible('resnet8_cifar', split='layer2', interface=tc.Interface(width=24), num_classes=4,
                               class_names=NAMES)
    network.save_pretrained(tmp_path / 'one')
    tc.recombine(pair.extractor, other.head, force=True).save_pretrained(tmp_path / 'forced')
    one, forced = ((tmp_path / name / 'README.md').read_text().split('## Loading')[0] for name in ('one', 'forced'))
    assert 'force=True' not in one and 'trained without one (parts of independent networks)' in one
    assert 'joined with `force=True` and saved' in forced and 'independent networks' not in forced


def test_hf_hub_route_through_an_offline_cache(pair, tmp_path, hf_cache):  # noqa: F811 (fixture)
    pair.save_pretrained(tmp_path / 'm')
    put_in_cache(hf_cache, 'org/mixed', tmp_path / 'm')
    assert_same_logits(pair, timm.create_model('hf-hub:org/mixed', pretrained=True), (3, 32, 32))
    assert_same_logits(pair, tc.load_recombined('org/mixed'), (3, 32, 32))


def test_push_to_hub_uploads_the_one_folder(pair, monkeypatch, tmp_path):
    """The Hub itself cannot be reached here: its two calls are replaced, keeping what would be uploaded."""
    from huggingface_hub import HfApi, RepoUrl, constants
    calls = []
    monkeypatch.setattr(HfApi, 'create_repo', lambda self, repo_id, **kw: RepoUrl(f'{constants.ENDPOINT}/{repo_id}'))
    monkeypatch.setattr(HfApi, 'upload_folder', lambda self, **kw: calls.append(
        dict(kw, kept=shutil.copytree(kw['folder_path'], tmp_path / 'up'))) or 'commit')
    assert pair.push_to_hub('org/mixed') == 'commit'
    (call,) = calls
    assert call['repo_id'] == 'org/mixed' and 'loads with timm_compat' in call['commit_message']
    assert 'timm.create_model("hf-hub:org/mixed", pretrained=True)' in (call['kept'] / 'README.md').read_text()
    assert_same_logits(pair, tc.load_recombined(call['kept']), (3, 32, 32))


def _tamper_config(folder):
    config = json.loads((folder / 'config.json').read_text())
    config['label_names'] = config['label_names'][::-1]  # same shapes, silently different predictions
    (folder / 'config.json').write_text(json.dumps(config))


def _tamper_weights(folder):
    path = folder / 'model.safetensors'
    with safetensors.safe_open(str(path), 'pt') as f:
        metadata = f.metadata()
    tensors = safetensors.torch.load_file(path)
    tensors['head.tail.fc.bias'] = tensors['head.tail.fc.bias'] + 1
    safetensors.torch.save_file(tensors, path, metadata=metadata)


@pytest.mark.parametrize('tamper, message', [
    (_tamper_config, 'config.json was changed after saving'),
    (_tamper_weights, 'do not match the digest'),
    (lambda f: (f / 'config.json').write_text('{"architecture": "compatible_model",'), 'not valid JSON'),
    (lambda f: (f / 'model.safetensors').write_bytes(b'\x08\x00\x00'), 'not a readable safetensors file'),
])
def test_tampered_or_malformed_folder_is_refused_by_both_routes(pair, tmp_path, tamper, message):
    pair.save_pretrained(tmp_path)
    tamper(tmp_path)
    with pytest.raises(tc.ComponentError, match=message):
        tc.load_recombined(tmp_path)
    if message != 'not valid JSON':  # timm parses config.json itself first, and says so in its own words
        with pytest.raises(tc.ComponentError, match=message):
            timm.create_model(f'local-dir:{tmp_path}', pretrained=True)


def test_pickled_weights_are_never_unpickled_by_either_route(pair, tmp_path):
    folder, trace = tmp_path / 'm', tmp_path / 'unpickled'
    pair.save_pretrained(folder)
    (folder / 'model.safetensors').unlink()
    write_pickle_that_leaves_a_trace(folder / 'pytorch_model.bin', trace)
    for load in (tc.load_recombined, lambda f: timm.create_model(f'local-dir:{f}', pretrained=True)):
        with pytest.raises(tc.ComponentError, match='never loaded'):
            load(folder)
    assert not trace.exists()


def test_a_single_component_or_a_custom_module_is_refused_with_the_right_call(pair, tmp_path):
    pair.extractor.save_pretrained(tmp_path / 'e')
    with pytest.raises(tc.ComponentError, match='single .extractor. component.*load_component'):
        tc.load_recombined(tmp_path / 'e')
    custom = tc.CompatibleModel(pair.extractor, tc.Head(torch.nn.Identity(), 24, 24, 24))
    with pytest.raises(tc.ComponentError, match='Cannot save this recombined model.*custom module'):
        custom.save_pretrained(tmp_path / 'c')
    assert not (tmp_path / 'c').exists()
    with pytest.raises(ValueError, match='num_classes=7 differs'):
        timm.create_model('compatible_model', extractor=pair.extractor.full_config(), head=pair.head.full_config(),
                          num_classes=7)


def test_compatible_model_built_by_name_takes_the_pairs_preprocessing_and_classifier(pair):
    """Without a folder, timm gave the registry's placeholder cfg: ImageNet mean/std, 224 px, no classifier."""
    configs = dict(extractor=pair.extractor.full_config(), head=pair.head.full_config())
    model = timm.create_model('compatible_model', **configs)
    data, cfg = timm.data.resolve_data_config(model=model), pair.extractor.pretrained_cfg
    assert [tuple(data[k]) for k in ('input_size', 'mean', 'std')] == [cfg['input_size'], cfg['mean'], cfg['std']]
    assert model.get_submodule(model.pretrained_cfg['classifier']) is model.head.tail.fc
    assert model.pretrained_cfg['num_classes'] == 4
    # The caller's overlay still wins over the pair's own.
    resized = timm.create_model('compatible_model', **configs, pretrained_cfg_overlay=dict(input_size=(3, 40, 40)))
    assert tuple(timm.data.resolve_data_config(model=resized)['input_size']) == (3, 40, 40)


@pytest.mark.parametrize('which', ['pair', 'same_backbone'])
def test_a_half_precision_recombined_model_saves_and_loads_in_its_dtype(request, which, tmp_path):
    """bf16 same-backbone pairs crashed in the save's probe (fp32 input); pairs loaded back as fp32."""
    model = copy.deepcopy(request.getfixturevalue(which)).to(torch.bfloat16)
    model.save_pretrained(tmp_path / 'm')
    loaded = tc.load_recombined(tmp_path / 'm')
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    x = torch.randn(2, *model.extractor.pretrained_cfg['input_size'], dtype=torch.bfloat16)
    with torch.no_grad(), eval_mode(model, 'running'), eval_mode(loaded, 'running'):
        assert torch.equal(loaded(x), model(x))


def test_a_stitched_model_is_refused_by_save_recombined_too(pair, tmp_path):
    """save_recombined(StitchedModel) wrote stitch.* tensors that neither route could load back."""
    from timm_compat.recombined import save_recombined
    from timm_compat.stitching import Stitch, StitchedModel
    stitched = StitchedModel(pair.extractor, Stitch(24, 24, False, pair.extractor.interface_id,
                                                    pair.head.interface_id), pair.head)
    with pytest.raises(tc.ComponentError, match=r'stitch.*save it as its parts'):
        save_recombined(stitched, tmp_path / 's')
    assert not (tmp_path / 's').exists()


def test_a_pair_of_a_backbone_timm_compat_registers_needs_the_import_and_says_so(tmp_path):
    nets = [tc.make_compatible('resnet8_cifar', split='layer2', interface=None, width=32, num_classes=4,
                               init_seed=seed) for seed in (1, 2)]
    model = busy_bn(tc.recombine(nets[0].extractor, nets[1].head, force=True))
    assert model.save_pretrained(tmp_path) == 'timm_compat'
    assert json.loads((tmp_path / 'config.json').read_text())['architecture'] == 'resnet8_cifar'
    assert 'once `import timm_compat` has registered `resnet8_cifar`' in (tmp_path / 'README.md').read_text()
    assert_same_logits(model, timm.create_model(f'local-dir:{tmp_path}', pretrained=True), (3, 32, 32))


def test_a_recombined_model_saves_and_pushes_as_model_hub_mixin_does(pair, monkeypatch, tmp_path):
    """save_pretrained(dir, push_to_hub=True) was a TypeError for a recombined model, as it was for components."""
    from huggingface_hub import HfApi, RepoUrl, constants
    calls = []
    monkeypatch.setattr(HfApi, 'create_repo', lambda self, repo_id, **kwargs: calls.append(
        ('create_repo', repo_id, kwargs)) or RepoUrl(f'{constants.ENDPOINT}/user/{repo_id}'))
    monkeypatch.setattr(HfApi, 'upload_folder', lambda self, **kwargs: calls.append(
        ('upload_folder', kwargs['repo_id'], kwargs['commit_message'])) or 'commit-info')
    with pytest.raises(TypeError, match="unexpected keyword argument 'privat'"):
        pair.save_pretrained(tmp_path / 'typo', push_to_hub=True, privat=True)
    with pytest.raises(TypeError, match='pass push_to_hub=True'):
        pair.save_pretrained(tmp_path / 'unpushed', private=True)
    assert calls == [] and not (tmp_path / 'typo').exists() and not (tmp_path / 'unpushed').exists()
    assert pair.save_pretrained(tmp_path / 'pair', push_to_hub=True, private=True, commit_message='m') == 'commit-info'
    assert calls == [('create_repo', 'pair', {'private': True, 'exist_ok': True}), ('upload_folder', 'user/pair', 'm')]
    assert_same_logits(tc.load_recombined(tmp_path / 'pair'), pair, pair.extractor.pretrained_cfg['input_size'])
