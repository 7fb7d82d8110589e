"""Component folders and the Hub round trip, tested offline through a real Hugging Face cache.

Downloads go through huggingface_hub's own resolution (``hf_hub_download`` reading a cache laid out as it leaves
downloaded repos); only the upload and search calls, which need a live Hub, are recorded at ``HfApi``.
"""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from huggingface_hub import HfApi, ModelCard, ModelInfo, RepoUrl, constants, scan_cache_dir
from safetensors import safe_open
from safetensors.torch import save_file

import timm_compat as tc
from timm_compat import _files as files
from timm_compat.compatible import fit_problems
from timm_compat.hub import main

from tests.hub_util import COMMIT, CLASSES, folder, hf_cache, published, put_in_cache, saved  # noqa: F401 (fixtures)


def assert_same_outputs(a, b):
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


def test_round_trip_is_bit_identical_for_each_role(saved):
    parts = saved[0]['modules']
    loaded = {role: tc.load_component(saved[0][role]) for role in parts}
    assert {role: type(c) for role, c in loaded.items()} == {
        'interface': tc.Interface, 'extractor': tc.Extractor, 'head': tc.Head}
    assert_same_outputs(parts['extractor'], loaded['extractor'])
    features = torch.randn(3, 16, 8, 8)
    with torch.no_grad():
        assert torch.equal(parts['head'](features), loaded['head'](features))
        assert torch.equal(parts['interface'].eval().rp(features), loaded['interface'].rp(features))
    assert loaded['interface'].id == parts['interface'].id
    assert loaded['extractor'].interface_id == loaded['head'].interface_id == parts['interface'].id
    assert loaded['head'].class_names == CLASSES
    assert_same_outputs(tc.recombine(parts['extractor'], parts['head']),
                        tc.recombine(loaded['extractor'], loaded['head']))


def test_folder_format_config_metadata_and_card(saved):
    iid = saved[0]['modules']['interface'].id
    for role in ('interface', 'extractor', 'head'):
        path = saved[0][role]
        assert sorted(p.name for p in path.iterdir()) == ['README.md', 'config.json', 'model.safetensors']
        config = json.loads((path / 'config.json').read_text())
        assert config['role'] == role and config['interface_id'] == iid and config['width'] == 16
        with safe_open(str(path / 'model.safetensors'), framework='pt') as f:
            assert f.metadata()['role'] == role and f.metadata()['interface_id'] == iid
        card = ModelCard.load(path / 'README.md')
        assert {'timm-compat', f'compat-interface-{iid}', f'compat-role-{role}'} <= set(card.data.tags)
        assert card.data.library_name == 'timm-compat' and card.data.license == 'apache-2.0'
        # The Hub's task filter: an extractor gives features, a head classifies them; an interface does neither.
        assert card.data.pipeline_tag == {'interface': None, 'extractor': 'image-feature-extraction',
                                          'head': 'image-classification'}[role]
        assert 'timm_compat.' in card.text and '```python' in card.text
    extractor = json.loads((saved[0]['extractor'] / 'config.json').read_text())
    assert (extractor['backbone'], extractor['split'], extractor['model_args']) == ('resnet8_cifar', 'layer2', {})
    assert extractor['pretrained_cfg']['input_size'] == [3, 32, 32] and len(extractor['pretrained_cfg']['mean']) == 3
    head = json.loads((saved[0]['head'] / 'config.json').read_text())
    assert head['num_classes'] == 4 and head['class_names'] == CLASSES
    assert json.loads((saved[0]['interface'] / 'config.json').read_text())['rp'] is True


def test_card_names_repo_and_no_base_model_for_local_weights(tmp_path):
    # tests/test_usage.py checks that weights from the Hub are named as the card's base_model.
    save_file(timm.create_model('resnet8_cifar').state_dict(), tmp_path / 'w.safetensors')
    model = tc.make_compatible('resnet8_cifar', split='layer2', interface=tc.Interface(width=16), num_classes=4,
                               pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / 'w.safetensors')))
    model.extractor.save_pretrained(tmp_path / 'ext', repo_id='org/r8-extractor')
    card = ModelCard.load(tmp_path / 'ext' / 'README.md')
    assert card.data.base_model is None  # a local file is no Hub repo (not timm/resnet8_cifar.untrained)
    assert 'timm_compat.load_component("org/r8-extractor")' in card.text


def test_load_through_hf_cache_offline(saved, published):
    extractor = tc.Extractor.from_pretrained('org/i0-extractor')
    head = tc.load_component('org/i0-head', revision=COMMIT)
    interface = tc.load_component('org/i0-interface')
    assert isinstance(head, tc.Head) and interface.id == saved[0]['modules']['interface'].id
    assert_same_outputs(tc.recombine(saved[0]['modules']['extractor'], saved[0]['modules']['head']),
                        tc.recombine(extractor, head))
    # The layout is one huggingface_hub itself recognises as a valid cache.
    cache = scan_cache_dir(published)
    assert not cache.warnings and len(cache.repos) == 6


LOADERS = {'load_component': tc.load_component, 'from_pretrained': tc.Extractor.from_pretrained,
           'timm': lambda repo: timm.create_model(f'hf-hub:{repo}', pretrained=True).eval()}


def push_during_first_download(saved, hf_cache, monkeypatch):
    """'org/moving' holds network 0's extractor on main (COMMIT); the first file downloaded from it moves main to a
    push of network 1's extractor, as a push landing mid-load would."""
    pushed = 'f' * 40
    put_in_cache(hf_cache, 'org/moving', saved[1]['extractor'], commit=pushed)
    put_in_cache(hf_cache, 'org/moving', saved[0]['extractor'])  # main names COMMIT
    download = files.hf_hub_download

    def download_then_push(*args, **kwargs):
        path = download(*args, **kwargs)
        (hf_cache / 'models--org--moving' / 'refs' / 'main').write_text(pushed)
        return path
    monkeypatch.setattr(files, 'hf_hub_download', download_then_push)


@pytest.mark.parametrize('loader', LOADERS)
def test_a_push_during_a_download_does_not_mix_two_commits(saved, hf_cache, monkeypatch, loader):
    # A new version is pushed to main while one component downloads: each of huggingface_hub's downloads resolves
    # main anew. The load must read every file at the commit its first file came from: the version of the moment
    # it started, complete, not config and weights of two versions (a misleading digest error) or two versions'
    # checks.
    push_during_first_download(saved, hf_cache, monkeypatch)
    loaded = LOADERS[loader]('org/moving')
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features = loaded.forward_features(x) if loader == 'timm' else loaded(x)
        assert torch.equal(features, saved[0]['modules']['extractor'].eval()(x))


def test_downloads_of_two_interfaces_are_refused_and_check_says_why(published, capsys):
    extractor, head = tc.load_component('org/i0-extractor'), tc.load_component('org/i1-head')
    with pytest.raises(ValueError, match='The components do not fit: the extractor emits features of interface'):
        tc.recombine(extractor, head)
    assert main(['check', 'org/i0-extractor', 'org/i1-head']) == 1
    out = capsys.readouterr().out
    assert 'They do not fit' in out and extractor.interface_id in out and head.interface_id in out
    assert main(['check', 'org/i0-extractor', 'org/i0-head']) == 0
    assert 'They fit' in capsys.readouterr().out
    assert main(['check', 'org/i0-head', 'org/i0-extractor']) == 1
    assert 'the first component is a head, not an extractor' in capsys.readouterr().out
    assert main(['check', 'org/i0-extractor', 'org/missing-head']) == 2
    assert 'org/missing-head' in capsys.readouterr().err


def test_check_explains_why_components_do_not_fit(saved, tmp_path, capsys):
    independent = tc.make_compatible('resnet8_cifar', split='layer2', interface=None, width=16, num_classes=4)
    independent.extractor.save_pretrained(tmp_path / 'independent-extractor')
    narrow = tc.make_compatible('resnet8_cifar', split='layer2', interface=tc.Interface(width=8), num_classes=4)
    narrow.head.save_pretrained(tmp_path / 'narrow-head')
    assert main(['check', str(tmp_path / 'independent-extractor'), str(saved[0]['head'])]) == 1
    assert 'the extractor was trained without an interface' in capsys.readouterr().out
    assert main(['check', str(saved[0]['extractor']), str(tmp_path / 'narrow-head')]) == 1
    out = capsys.readouterr().out
    assert 'the head takes features of interface' in out and 'emits width 16 but the head takes width 8' in out


def test_check_refuses_components_of_unrelated_interfaces_without_aux_heads(tmp_path, capsys):
    """IIW-only networks of two runs (one seed, no aux heads) recombine at chance: they must not fit."""
    folders = []
    for run in ('alice', 'bob'):
        torch.manual_seed(0)
        model = tc.make_compatible('resnet8_cifar', split='layer2', interface=tc.Interface(width=16), num_classes=4,
                                   init_seed=0)
        model.extractor.save_pretrained(tmp_path / run / 'extractor')
        model.head.save_pretrained(tmp_path / run / 'head')
        folders.append(tmp_path / run)
    assert main(['check', str(folders[0] / 'extractor'), str(folders[1] / 'head')]) == 1
    assert 'the extractor emits features of interface' in capsys.readouterr().out
    assert main(['check', str(folders[0] / 'extractor'), str(folders[0] / 'head')]) == 0


def test_card_of_a_network_without_interface_claims_none(tmp_path):
    independent = tc.make_compatible('resnet8_cifar', split='layer2', interface=None, width=16, num_classes=4)
    independent.head.save_pretrained(tmp_path / 'head')
    card = ModelCard.load(tmp_path / 'head' / 'README.md')
    assert 'compat-role-head' in card.data.tags and not [t for t in card.data.tags if 'compat-interface' in t]
    assert 'trained without an interface' in card.text and 'None' not in card.text


def test_check_runs_the_head_on_the_extractors_features():
    interface = tc.Interface(width=16)
    # Features of 1x1 (a 4x4 input) are too small for ConvNeXt's 2x2 downsampling conv.
    tiny = tc.make_compatible('resnet8_cifar', split='layer3', interface=interface, num_classes=4,
                              pretrained_cfg_overlay=dict(input_size=(3, 4, 4))).extractor.eval()
    convnext = tc.make_compatible('resnet8_cifar', split='layer3', interface=interface, num_classes=4,
                                  head='convnext_atto', head_split='stages.2').head.eval()
    assert fit_problems(tiny, convnext) == [
        "the head does not accept interface features of spatial size 1x1 (RuntimeError: Calculated padded input size "
        "per channel: (1 x 1). Kernel size: (2 x 2). Kernel size can't be greater than actual input size); it takes "
        "2x2. Give it features of that size: another input size (pretrained_cfg_overlay=dict(input_size=...)) or "
        "another split"]


def test_push_to_hub_uploads_the_component_folder(saved, monkeypatch, tmp_path):
    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(('create_repo', repo_id, kwargs))
        return RepoUrl(f'{constants.ENDPOINT}/{repo_id}')

    def upload_folder(self, **kwargs):
        # The folder is a temporary directory: keep what would have been uploaded.
        kept = shutil.copytree(kwargs['folder_path'], tmp_path / f'upload{len(list(tmp_path.iterdir()))}')
        calls.append(('upload_folder', kept, kwargs))
        return 'commit-info'

    monkeypatch.setattr(HfApi, 'create_repo', create_repo)
    monkeypatch.setattr(HfApi, 'upload_folder', upload_folder)
    extractor = saved[0]['modules']['extractor']
    assert extractor.push_to_hub('org/r8-extractor', private=True, commit_message='first run') == 'commit-info'
    (_, repo_id, create_kwargs), (_, uploaded, upload_kwargs) = calls
    assert repo_id == 'org/r8-extractor' and create_kwargs == {'private': True, 'exist_ok': True}
    assert upload_kwargs['repo_id'] == 'org/r8-extractor' and upload_kwargs['repo_type'] == 'model'
    assert upload_kwargs['commit_message'] == 'first run'
    assert sorted(p.name for p in Path(uploaded).iterdir()) == ['README.md', 'config.json', 'model.safetensors']
    card = ModelCard.load(Path(uploaded) / 'README.md')
    assert f'compat-interface-{extractor.interface_id}' in card.data.tags
    assert 'load_component("org/r8-extractor")' in card.text
    assert_same_outputs(extractor, tc.load_component(uploaded))

    calls.clear()
    saved[0]['modules']['head'].push_to_hub('org/r8-head')
    assert calls[1][2]['commit_message'] == f'Upload timm-compat head (interface {extractor.interface_id})'

    calls.clear()
    with pytest.raises(tc.ComponentError, match='cannot be rebuilt from a config'):
        tc.Head(torch.nn.Identity(), 16, 16, 4).push_to_hub('org/custom-head')  # wraps a custom module
    assert calls == []  # no empty repo is created for a component that cannot be saved


def test_push_checks_the_config_before_creating_a_repo_and_takes_numpy_strings(saved, monkeypatch):
    """push_to_hub created the Hub repo, then found a config value that is not plain JSON; and it refused the NumPy
    strings that ``np.unique(labels)`` gives as class names, which JSON holds as they are."""
    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append('create_repo')
        return RepoUrl(f'{constants.ENDPOINT}/{repo_id}')
    monkeypatch.setattr(HfApi, 'create_repo', create_repo)
    monkeypatch.setattr(HfApi, 'upload_folder', lambda self, **kwargs: calls.append(
        json.loads((Path(kwargs['folder_path']) / 'config.json').read_text())))
    head = tc.load_component(saved[0]['head'])
    head.config['pretrained_cfg'] = {**head.config['pretrained_cfg'], 'mean': torch.tensor([0.5, 0.5, 0.5])}
    with pytest.raises(tc.ComponentError, match=r'config.pretrained_cfg.mean = tensor.*is not plain JSON'):
        head.push_to_hub('org/r8-head')
    assert calls == []  # refused before any repo was created
    model = tc.make_compatible('resnet8_cifar', split='layer2', interface=tc.Interface(width=16), num_classes=4,
                               class_names=np.unique(np.array(CLASSES)))
    model.head.push_to_hub('org/r8-head')
    assert calls[0] == 'create_repo' and calls[1]['class_names'] == CLASSES


def test_save_pretrained_pushes_as_model_hub_mixin_does(saved, monkeypatch, tmp_path):
    """save_pretrained(dir, push_to_hub=True) was a TypeError, unlike huggingface_hub's ModelHubMixin."""
    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(('create_repo', repo_id, kwargs))
        return RepoUrl(f'{constants.ENDPOINT}/{repo_id if "/" in repo_id else "user/" + repo_id}')
    monkeypatch.setattr(HfApi, 'create_repo', create_repo)
    monkeypatch.setattr(HfApi, 'upload_folder', lambda self, **kwargs: calls.append(
        ('upload_folder', kwargs['repo_id'], kwargs['commit_message'])) or 'commit-info')
    head = saved[0]['modules']['head']
    with pytest.raises(TypeError, match="unexpected keyword argument 'privat'"):
        head.save_pretrained(tmp_path / 'typo', push_to_hub=True, privat=True)
    assert calls == [] and not (tmp_path / 'typo').exists()
    # As ModelHubMixin: the repo defaults to the folder's name; the other arguments are push_to_hub's.
    assert head.save_pretrained(tmp_path / 'r8-head', push_to_hub=True, private=True, commit_message='m') == 'commit-info'
    assert calls == [('create_repo', 'r8-head', {'private': True, 'exist_ok': True}),
                     ('upload_folder', 'user/r8-head', 'm')]
    assert isinstance(tc.load_component(tmp_path / 'r8-head'), tc.Head)
    assert head.save_pretrained(tmp_path / 'local', repo_id='org/r8-head') is None and len(calls) == 2
    assert 'load_component("org/r8-head")' in (tmp_path / 'local' / 'README.md').read_text()


def test_failed_save_leaves_the_previous_component_loadable(folder):
    path = folder('head')
    custom = tc.Head(torch.nn.Identity(), 16, 16, 4)
    with pytest.raises(tc.ComponentError, match='cannot be rebuilt from a config'):
        custom.save_pretrained(path)
    assert isinstance(tc.load_component(path), tc.Head)


def test_list_components_filters_by_interface_and_role(monkeypatch, capsys):
    received = []

    def list_models(self, **kwargs):
        received.append(kwargs)
        return iter([ModelInfo(id='org/r8-head', lastModified='2025-01-02T03:04:05.000Z',
                               tags=['timm-compat', 'compat-interface-0123456789ab', 'compat-role-head',
                                     'timm-backbone-resnet8_cifar'])])

    monkeypatch.setattr(HfApi, 'list_models', list_models)
    interface = tc.Interface(width=16, rp=True)
    assert [m.id for m in tc.list_components(interface=interface, role='head')] == ['org/r8-head']
    assert received[-1]['filter'] == ['timm-compat', f'compat-interface-{interface.id}', 'compat-role-head']
    list(tc.list_components(author='org', limit=5))
    assert received[-1] == {'filter': ['timm-compat'], 'author': 'org', 'limit': 5}

    assert main(['list', '--interface', '0123456789ab', '--role', 'head']) == 0
    assert received[-1]['filter'] == ['timm-compat', 'compat-interface-0123456789ab', 'compat-role-head']
    header, row = capsys.readouterr().out.splitlines()
    assert header.split() == ['REPO', 'ROLE', 'INTERFACE', 'BACKBONE', 'UPDATED']
    assert row.split() == ['org/r8-head', 'head', '0123456789ab', 'resnet8_cifar', '2025-01-02']

    with pytest.raises(ValueError, match='not an interface id'):
        tc.list_components(interface='org/r8-interface')
    with pytest.raises(ValueError, match="Unknown role 'heads'"):
        tc.list_components(role='heads')


def test_list_offline_says_so(hf_cache, capsys):
    assert main(['list']) == 2
    assert 'HF_HUB_OFFLINE is set' in capsys.readouterr().err


def test_a_crash_exits_as_an_error_not_as_components_that_do_not_fit(monkeypatch, capsys):
    """Exit status 1 means "they do not fit" to a script; a lost connection (here, faked: the machine has no Hub)
    exited 1 too, with Python's traceback."""
    def unreachable(self, **kwargs):
        raise ConnectionError('Failed to resolve huggingface.co')
    monkeypatch.delenv('HF_HUB_OFFLINE', raising=False)
    monkeypatch.setattr(HfApi, 'list_models', unreachable)
    assert main(['list']) == 2
    assert 'ConnectionError: Failed to resolve huggingface.co' in capsys.readouterr().err


def test_cli_show_summarises_card_and_interface(saved, published, capsys):
    assert main(['show', 'org/i0-head']) == 0
    out = capsys.readouterr().out
    iid = saved[0]['modules']['interface'].id
    for expected in ('role:', 'head', f'interface:   {iid}', 'resnet8_cifar', '4: cat, dog, frog, ship',
                     'license:', 'apache-2.0', 'compat-role-head', f'list --interface {iid}'):
        assert expected in out
    assert main(['show', 'org/i0-interface']) == 0
    assert 'rp head:' in capsys.readouterr().out


def test_cli_show_reads_the_card_at_the_commit_it_verified(saved, hf_cache, monkeypatch, capsys):
    """show verified config and weights at one commit but read README.md (license, base model, tags) at the branch:
    a push landing meanwhile printed one version's interface beside another version's tags."""
    push_during_first_download(saved, hf_cache, monkeypatch)
    assert main(['show', 'org/moving']) == 0
    out = capsys.readouterr().out
    ids = [saved[n]['modules']['interface'].id for n in (0, 1)]
    assert f'interface:   {ids[0]}' in out and f'compat-interface-{ids[0]}' in out and ids[1] not in out


def test_cli_show_refuses_a_config_changed_after_saving(folder, capsys):
    """show printed config.json as it was, so reordered class names were shown for a head that loading refuses."""
    head = folder('head')
    config = json.loads((head / 'config.json').read_text())
    config['class_names'] = config['class_names'][::-1]
    (head / 'config.json').write_text(json.dumps(config))
    assert main(['show', str(head)]) == 2
    assert 'config.json was changed after saving (class_names)' in capsys.readouterr().err


def test_cli_runs_as_module_offline(published):
    env = dict(os.environ, HF_HOME=str(published.parent), HF_HUB_OFFLINE='1')
    result = subprocess.run([sys.executable, '-m', 'timm_compat.hub', 'check', 'org/i0-extractor', 'org/i0-head'],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert 'They fit' in result.stdout
    assert 'found in sys.modules' not in result.stderr  # the package is not imported twice


@pytest.mark.parametrize('argv, message', [
    (['list', '--limit', '0'], '--limit: 0 is not a positive integer'),
    (['list', '--limit', '-3'], '--limit: -3 is not a positive integer'),
    (['show', '{dir}', '--revision', 'v9'], '--revision v9: .* is a local folder'),
    (['check', '{dir}', '{dir}', '--head-revision', 'main'], '--head-revision main: .* is a local folder'),
])
def test_the_cli_refuses_arguments_it_would_ignore_or_crash_on(tmp_path, capsys, argv, message):
    """--limit 0 listed nothing and --limit -3 crashed; a revision of a local folder was silently ignored."""
    with pytest.raises(SystemExit) as exit_:
        main([a.format(dir=tmp_path) for a in argv])
    assert exit_.value.code == 2
    assert re.search(message, capsys.readouterr().err)
