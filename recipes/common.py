"""What every recipe shares: running ``accelerate launch train.py`` as a user would."""
import json
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

REPO = Path(__file__).resolve().parents[1]


def launch(config: Path, out: Path, overrides: Sequence[str], data_dir: Optional[str], log: Path) -> dict:
    """One training run in its own process (so it can use every GPU); returns its ``main`` phase summary."""
    cmd = [sys.executable, '-m', 'accelerate.commands.launch', str(REPO / 'train.py'), '-c', str(config),
           '--output-dir', str(out), '--overwrite']
    if data_dir:
        cmd += ['--data-dir', str(data_dir)]
    for o in overrides:
        cmd += ['--set', o]
    with open(log, 'w') as f:
        proc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(f'{" ".join(cmd)} failed; see {log}')
    return json.loads((out / 'summary.json').read_text())['phases']['main']

