"""Multi-node training as Accelerate documents it: ``configs/accelerate/multi_node.yaml``, launched once per
machine. Stood in for by two 2-process "machines" on this host (gloo on CPU, a static rendezvous on localhost)."""
import json
import os
import socket
import subprocess
import sys

import pytest

from tests.conftest import REPO

TINY = str(REPO / 'tests' / 'tiny.yaml')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.mark.slow  # four processes start
def test_two_machines_of_two_processes_train_one_run(tmp_path):
    env = {**os.environ, 'CUDA_VISIBLE_DEVICES': '', 'ACCELERATE_USE_CPU': 'true', 'OMP_NUM_THREADS': '1'}
    port = str(_free_port())
    out = tmp_path / 'run'  # one folder on storage every machine sees, as on a cluster
    machines = [subprocess.Popen(
        [sys.executable, '-m', 'accelerate.commands.launch', '--config_file',
         str(REPO / 'configs' / 'accelerate' / 'multi_node.yaml'), '--machine_rank', str(rank),
         '--num_processes', '4', '--main_process_ip', '127.0.0.1', '--main_process_port', port,
         '--mixed_precision', 'no', str(REPO / 'train.py'), '-c', TINY, '--output-dir', str(out),
         '--set', 'cpu_threads=1'],
        env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    results = [m.communicate(timeout=600) for m in machines]
    for machine, (_, stderr) in zip(machines, results):
        assert machine.returncode == 0, stderr[-3000:]
    summary = json.loads((out / 'summary.json').read_text())
    assert summary['processes'] == 4
    ids = summary['phases']['main']['interface_id_per_rank']
    assert len(ids) == 4 and len(set(ids)) == 1 and ids[0] == summary['phases']['main']['interface_id']
    rows = (out / 'main' / 'metrics.csv').read_text().splitlines()
    assert [r.split(',')[0] for r in rows[1:]] == ['2', '4']  # written once, by the main process of machine 0
