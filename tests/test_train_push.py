"""train.py's Hub push: components go up last, once per compatible phase, and a failed push loses nothing."""
import json
from pathlib import Path

import pytest

import timm_compat as tc
import train

from tests.conftest import REPO

TINY = str(REPO / 'tests' / 'tiny.yaml')
pytestmark = pytest.mark.usefixtures('fresh_accelerate')


def run(tmp_path, *args, name='run'):
    return train.main(['-c', TINY, '--output-dir', str(tmp_path / name), *args])


def test_save_components_and_push_to_hub(tmp_path, monkeypatch):
    from huggingface_hub import HfApi, constants
    from huggingface_hub.hf_api import RepoUrl
    uploads = {}

    def create_repo(self, repo_id, **kwargs):
        return RepoUrl(f'{constants.ENDPOINT}/{repo_id}')

    def upload_folder(self, **kwargs):  # records what would go up; the folder itself is temporary
        uploads[kwargs['repo_id']] = (sorted(p.name for p in Path(kwargs['folder_path']).iterdir()),
                                      kwargs['commit_message'])
        # Pushes come last, after the run's last collective: under DDP no process waits in one during an upload.
        assert (tmp_path / 'run' / 'summary.json').is_file()

    monkeypatch.setattr(HfApi, 'create_repo', create_repo)
    monkeypatch.setattr(HfApi, 'upload_folder', upload_folder)
    logged_in(monkeypatch)
    summary = run(tmp_path, '--save-components', str(tmp_path / 'parts'), '--push-to-hub', 'org/demo')
    iid = summary['phases']['main']['interface_id']
    for part in ('interface', 'a/extractor', 'a/head', 'b/extractor', 'b/head'):
        assert tc.load_component(tmp_path / 'parts' / 'main' / part).interface_id == iid
    assert sorted(uploads) == ['org/demo-a-extractor', 'org/demo-a-head', 'org/demo-b-extractor',
                               'org/demo-b-head', 'org/demo-interface']
    files, message = uploads['org/demo-a-head']
    assert files == ['README.md', 'config.json', 'model.safetensors'] and iid in message


def recorded_uploads(monkeypatch):
    """Repo ids the Hub would receive, in order; the credential check passes."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.hf_api import RepoUrl
    uploads = []
    monkeypatch.setattr(HfApi, 'create_repo', lambda self, repo_id, **kw: RepoUrl(f'{constants.ENDPOINT}/{repo_id}'))
    monkeypatch.setattr(HfApi, 'upload_folder', lambda self, **kw: uploads.append(kw['repo_id']))
    logged_in(monkeypatch)
    return uploads


@pytest.mark.slow  # end to end: several tiny runs
def test_push_sends_each_compatible_phase_once_never_the_baseline(tmp_path, monkeypatch):
    uploads = recorded_uploads(monkeypatch)
    main_repos = ['org/demo-interface', 'org/demo-a-extractor', 'org/demo-a-head', 'org/demo-b-extractor',
                  'org/demo-b-head']
    # The independent baseline has no push_to_hub of its own: it was pushed to "None-a-extractor" etc.
    run(tmp_path, '--set', 'baseline=independent', '--push-to-hub', 'org/demo')
    assert uploads == main_repos and (tmp_path / 'run' / 'main' / 'pushed.json').is_file()
    # The baseline crashed in an earlier invocation (its summary is missing): the resume trains it again and pushes
    # main, which finished before the crash but was never pushed (pushes come last).
    uploads.clear()
    (tmp_path / 'run' / 'main' / 'pushed.json').unlink()
    (tmp_path / 'run' / 'independent' / 'summary.json').unlink()
    summary = run(tmp_path, '--set', 'baseline=independent', '--push-to-hub', 'org/demo', '--resume')
    assert uploads == main_repos
    pushed = tc.load_component(Path(summary['phases']['main']['components']) / 'a' / 'head')
    assert pushed.interface_id == summary['phases']['main']['interface_id']  # the trained one, read back
    uploads.clear()
    run(tmp_path, '--set', 'baseline=independent', '--push-to-hub', 'org/demo', '--resume')
    assert uploads == []  # pushed already
    run(tmp_path, '--set', 'baseline=independent', '--push-to-hub', 'org/demo', '--overwrite')
    assert uploads == main_repos  # retrained: pushed anew


def logged_in(monkeypatch):
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, 'get_token', lambda: 'hf_test')
    monkeypatch.setattr(huggingface_hub, 'whoami', lambda: {'name': 'tester'})


def test_push_to_hub_without_a_login_refuses_before_training(tmp_path, monkeypatch):
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, 'get_token', lambda: None)
    with pytest.raises(ValueError, match='no Hugging Face token'):
        run(tmp_path, '--push-to-hub', 'org/demo')
    assert not (tmp_path / 'run' / 'config.yaml').exists()


def test_a_failed_push_loses_nothing(tmp_path, monkeypatch):
    from huggingface_hub import HfApi
    logged_in(monkeypatch)

    def create_repo(self, repo_id, **kwargs):
        raise OSError('the Hub is down')
    monkeypatch.setattr(HfApi, 'create_repo', create_repo)
    with pytest.raises(ValueError, match='the Hub is down.*Nothing is lost'):
        run(tmp_path, '--push-to-hub', 'org/demo')
    summary = json.loads((tmp_path / 'run' / 'main' / 'summary.json').read_text())
    assert (Path(summary['components']) / 'a' / 'head' / 'model.safetensors').is_file()
