"""What every recipe shares: running ``accelerate launch train.py`` as a user would, and the hardware line."""
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # train.py (load_task_data) lives at the top level


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


def hardware() -> str:
    import torch
    if torch.cuda.is_available():
        return f'{torch.cuda.get_device_name(0)}, torch {torch.__version__}'
    model = next((line.split(':', 1)[1].strip() for line in Path('/proc/cpuinfo').read_text().splitlines()
                  if line.startswith('model name')), platform.processor()) if Path('/proc/cpuinfo').exists() else ''
    return f'CPU {model} ({os.cpu_count()} cores), torch {torch.__version__}'
