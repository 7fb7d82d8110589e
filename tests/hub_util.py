"""Component folders of two interfaces and a real offline Hugging Face cache, shared by the Hub tests."""
import hashlib
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants

import timm_compat as tc

CLASSES = ['cat', 'dog', 'frog', 'ship']
COMMIT = '0123456789abcdef0123456789abcdef01234567'


@pytest.fixture(scope='module')
def saved(tmp_path_factory):
    """Folders of two interfaces' components: ``saved[0]['extractor']`` etc., plus the modules that wrote them.
    Each is a ResNet-8 split after layer2 on an interface of width 16 with rotation prediction."""
    root = tmp_path_factory.mktemp('components')
    out = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        interface = tc.Interface(width=16, rp=True)
        model = tc.make_compatible('resnet8_cifar', split='layer2', interface=interface, num_classes=4,
                                   class_names=CLASSES).eval()
        parts = {'interface': interface, 'extractor': model.extractor, 'head': model.head}
        for role, component in parts.items():
            component.save_pretrained(root / str(seed) / role)
        out.append({'modules': parts, **{role: root / str(seed) / role for role in parts}})
    return out


@pytest.fixture
def folder(saved, tmp_path):
    """A writable copy of one of the saved component folders."""
    def copy(role: str, which: int = 0) -> Path:
        return Path(shutil.copytree(saved[which][role], tmp_path / f'{role}{which}'))
    return copy


def put_in_cache(cache: Path, repo_id: str, folder: Path, files=None, commit: str = COMMIT) -> None:
    """Lay ``folder`` out as ``hf_hub_download`` leaves a downloaded repo: content-named blobs, snapshot
    symlinks to them, and ``refs/main`` naming the commit."""
    repo = cache / f'models--{repo_id.replace("/", "--")}'
    for name in files or sorted(p.name for p in folder.iterdir()):
        data = (folder / name).read_bytes()
        blob = repo / 'blobs' / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / 'snapshots' / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / 'refs').mkdir(exist_ok=True)
    (repo / 'refs' / 'main').write_text(commit)  # no newline: the library uses the file's text as the commit


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty HF_HOME in offline mode; huggingface_hub read both at import, so its constants are set too (the
    environment is for subprocesses)."""
    home = tmp_path / 'hf'
    monkeypatch.setenv('HF_HOME', str(home))
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(home / 'hub'))
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)
    (home / 'hub').mkdir(parents=True)
    return home / 'hub'


@pytest.fixture
def published(saved, hf_cache):
    """Both interfaces' components, as if downloaded from the Hub as ``org/i<n>-<role>``."""
    for n, parts in enumerate(saved):
        for role in ('interface', 'extractor', 'head'):
            put_in_cache(hf_cache, f'org/i{n}-{role}', parts[role])
    return hf_cache


def write_pickle_that_leaves_a_trace(path: Path, trace: Path) -> None:
    """A pickle at ``path`` that creates the folder ``trace`` if anything ever unpickles it."""
    class Trap:
        def __reduce__(self):
            return os.mkdir, (str(trace),)
    path.write_bytes(pickle.dumps({'weight': Trap()}))
