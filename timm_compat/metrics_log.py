"""``metrics.csv``: one row per logged step, consistent with the checkpoint a run resumes from."""
import csv
from pathlib import Path
from typing import Any, Dict

from .checkpoint import atomic_write_text

__all__ = ['MetricsLog']


class MetricsLog:
    """Append-only CSV of logged rows, each with a ``step`` column.

    Args:
        path: The CSV file.
    """

    def __init__(self, path: Path):
        self.path = Path(path)

    def append(self, row: Dict[str, Any]) -> None:
        new_file = not self.path.exists()
        with open(self.path, 'a', newline='') as f:
            writer = csv.DictWriter(f, fieldnames=list(row))
            if new_file:
                writer.writeheader()
            writer.writerow(row)

    def rewind(self, step: int) -> None:
        """Drop the rows logged after ``step``: a resumed run logs them again from its checkpoint.

        ``step=0`` removes the file (a phase that never reached a checkpoint starts over).
        """
        if not self.path.exists():
            return
        if step == 0:
            self.path.unlink()
            return
        lines = self.path.read_text().splitlines(keepends=True)
        kept = lines[:1] + [line for line in lines[1:] if int(line.split(',', 1)[0]) <= step]
        atomic_write_text(self.path, ''.join(kept))
