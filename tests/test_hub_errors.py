"""Damaged, forged or pickled component folders and unreachable Hub repos: each refused with a clear error."""
import http.server
import json
import socket
import threading
import time
from pathlib import Path

import pytest
from huggingface_hub import constants, file_download
from huggingface_hub.utils import _http as hf_http
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import timm_compat as tc
from timm_compat._integrity import weights_digest
from timm_compat.component import write_folder

from tests.hub_util import (CLASSES, folder, hf_cache, put_in_cache, saved,  # noqa: F401 (fixtures)
                            write_pickle_that_leaves_a_trace)


def test_pickled_weights_are_refused_never_unpickled(folder, tmp_path):
    trace = tmp_path / 'unpickled'
    path = folder('extractor')
    (path / 'model.safetensors').unlink()
    write_pickle_that_leaves_a_trace(path / 'pytorch_model.bin', trace)
    with pytest.raises(tc.ComponentError, match='holds pytorch_model.bin but no model.safetensors.*never loaded'):
        tc.load_component(path)
    write_pickle_that_leaves_a_trace(path / 'model.safetensors', trace)  # a pickle under the safetensors name
    with pytest.raises(tc.ComponentError, match='not a readable safetensors file'):
        tc.load_component(path)
    assert not trace.exists()


def _edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _resave(path: Path, change_tensors=None, **metadata) -> None:
    weights = path / 'model.safetensors'
    with safe_open(str(weights), framework='pt') as f:
        meta = {**f.metadata(), **metadata}
    tensors = load_file(weights)
    if change_tensors:
        change_tensors(tensors)
    save_file(tensors, weights, metadata=meta)


def _save_as_role(path: Path, role: str) -> None:
    """The folder as a newer timm-compat with the component role ``role`` would save it (consistent files)."""
    config = {**json.loads((path / 'config.json').read_text()), 'role': role}
    write_folder(path, load_file(path / 'model.safetensors'), config, lambda: 'card')


def _nudge_first(tensors):
    name = sorted(k for k in tensors if tensors[k].is_floating_point())[0]
    tensors[name] = tensors[name] + 1e-3


def _forge(path: Path, **changes) -> None:
    """Change config.json and the config recorded in the weights alike, as the publisher of a crafted repo can."""
    config = {**json.loads((path / 'config.json').read_text()), **changes}
    (path / 'config.json').write_text(json.dumps(config))
    _resave(path, config=json.dumps(config, sort_keys=True, separators=(',', ':')))


def _drop_recorded_config(path: Path) -> None:
    weights = path / 'model.safetensors'
    with safe_open(str(weights), framework='pt') as f:
        metadata = {k: v for k, v in f.metadata().items() if k != 'config'}
    save_file(load_file(weights), weights, metadata=metadata)


def _tamper_interface_and_fix_digest(path: Path) -> None:
    _resave(path, _nudge_first)
    _forge(path, weights_sha256=weights_digest(load_file(path / 'model.safetensors')))


BAD_FOLDERS = {
    'no config': ('head', lambda p: (p / 'config.json').unlink(), 'config.json is missing'),
    'no weights': ('head', lambda p: (p / 'model.safetensors').unlink(), 'model.safetensors is missing'),
    'config not json': ('head', lambda p: (p / 'config.json').write_text('{"role": '), 'not valid JSON'),
    'newer format': ('head', lambda p: _edit_json(p / 'config.json', format_version=99), 'upgrade timm-compat'),
    'unknown role': ('head', lambda p: _save_as_role(p, 'mystery'),
                     "role 'mystery', which no imported module defines"),
    'truncated weights': ('extractor', lambda p: (p / 'model.safetensors').write_bytes(
        (p / 'model.safetensors').read_bytes()[:-100]), 'truncated or corrupt'),
    'corrupt header': ('extractor', lambda p: (p / 'model.safetensors').write_bytes(b'\xff' * 64),
                       'truncated or corrupt'),
    'older format': ('head', lambda p: _edit_json(p / 'config.json', format_version=1),
                     'format 1 by an older timm-compat.*Train it again'),
    'config interface id edited': ('extractor', lambda p: _edit_json(p / 'config.json', interface_id='0' * 12),
                                   r'config.json was changed after saving \(interface_id\)'),
    'weights without a recorded config': ('head', _drop_recorded_config, 'no readable record of its config'),
    'class names reordered': ('head', lambda p: _edit_json(p / 'config.json', class_names=CLASSES[::-1]),
                              r'config.json was changed after saving \(class_names\)'),
    'mean and std edited': ('extractor', lambda p: _edit_json(p / 'config.json', pretrained_cfg={
        **json.loads((p / 'config.json').read_text())['pretrained_cfg'], 'mean': [0.5] * 3, 'std': [0.5] * 3}),
                            r'config.json was changed after saving \(pretrained_cfg\)'),
    'metadata interface id edited': ('head', lambda p: _resave(p, interface_id='0' * 12),
                                     "the weights say role='head', interface='000000000000'"),
    'extractor weights tampered': ('extractor', lambda p: _resave(p, _nudge_first),
                                   'do not match the digest.*changed or replaced after saving'),
    'interface weights tampered, digest forged': ('interface', _tamper_interface_and_fix_digest,
                                                  'interface weights hash to .* but config.json says'),
}


@pytest.mark.parametrize('role,damage,message', BAD_FOLDERS.values(), ids=list(BAD_FOLDERS))
def test_bad_folder_raises_clear_error(folder, role, damage, message):
    path = folder(role)
    damage(path)
    with pytest.raises(tc.ComponentError, match=message):
        tc.load_component(path)


def test_wrong_role_and_bad_path(saved):
    with pytest.raises(tc.ComponentError, match="holds a component of role 'extractor', not 'head'.*load_component"):
        tc.Head.from_pretrained(saved[0]['extractor'])
    with pytest.raises(tc.ComponentError, match='neither a local folder nor a Hub repo id'):
        tc.load_component('runs/typo/extractor')


def test_offline_cache_miss_names_the_file_and_hf_hub_offline(saved, hf_cache):
    with pytest.raises(tc.ComponentError, match=r"config.json of Hub repo 'org/absent' .*HF_HUB_OFFLINE is set"):
        tc.load_component('org/absent')
    put_in_cache(hf_cache, 'org/half', saved[0]['head'], files=['config.json'])
    with pytest.raises(tc.ComponentError, match=r"model.safetensors of Hub repo 'org/half' .*HF_HUB_OFFLINE"):
        tc.load_component('org/half')


@pytest.fixture
def online(hf_cache, monkeypatch):
    """Online mode against a chosen endpoint; returns a function that points the library at it."""
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', False)
    monkeypatch.delenv('HF_HUB_OFFLINE')
    # huggingface_hub 0.30 (the floor) keeps the requests session an earlier offline test made, which refuses
    # every request; later versions have no such session.
    reset = getattr(hf_http, 'reset_sessions', None)
    if reset:
        reset()

    def use(endpoint: str) -> None:
        monkeypatch.setattr(constants, 'ENDPOINT', endpoint)
        template = endpoint + '/{repo_id}/resolve/{revision}/{filename}'
        monkeypatch.setattr(constants, 'HUGGINGFACE_CO_URL_TEMPLATE', template)
        # huggingface_hub 0.30 (the floor) formats URLs with the copy file_download imported at load.
        monkeypatch.setattr(file_download, 'HUGGINGFACE_CO_URL_TEMPLATE', template, raising=False)
    return use


def test_repo_not_found_on_the_hub(online):
    class RepoNotFound(http.server.BaseHTTPRequestHandler):
        """Answers as the Hub does for a repo that does not exist (or that the token may not see)."""
        def do_HEAD(self):
            self.send_response(404)
            self.send_header('X-Error-Code', 'RepoNotFound')
            self.send_header('Content-Length', '0')
            self.end_headers()
        do_GET = do_HEAD

    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), RepoNotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        online(f'http://127.0.0.1:{server.server_port}')
        with pytest.raises(tc.ComponentError, match="Hub repo 'org/absent' not found.*hf auth login"):
            tc.load_component('org/absent')
    finally:
        server.shutdown()
        server.server_close()


def test_hub_unreachable(online, monkeypatch):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    online(f'http://127.0.0.1:{port}')
    monkeypatch.setattr(time, 'sleep', lambda seconds: None)  # skip the library's retry back-off
    with pytest.raises(tc.ComponentError, match=r"not in the local cache, and the Hub .* could not be reached.*"
                                                r"HF_HUB_OFFLINE=1"):
        tc.load_component('org/absent')
