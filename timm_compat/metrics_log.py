"""``metrics.csv``: one row per logged step, consistent with the checkpoint a run resumes from; and the config as
the scalar hparams a tracker takes."""
import csv
import io
from pathlib import Path
from typing import Any, Dict, List

from ._integrity import atomic_write_text

__all__ = ['MetricsLog', 'tracker_hparams']


class MetricsLog:
    """Append-only CSV of logged rows, each with a ``step`` column.

    Args:
        path: The CSV file.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self._header: List[str] = []  # the file's columns, read once

    def append(self, row: Dict[str, Any]) -> None:
        """Add ``row``; a key the file has no column for yet (a network's first turn under the alternate
        schedule) widens the file, earlier rows leaving that column empty."""
        if not self._header and self.path.exists():
            with open(self.path, newline='') as f:
                self._header = next(csv.reader(f), [])
        if self._header and all(k in self._header for k in row):
            with open(self.path, 'a', newline='') as f:
                csv.DictWriter(f, fieldnames=self._header, restval='').writerow(row)
            return
        rows = self._read() if self.path.exists() else []
        self._write(self._header + [k for k in row if k not in self._header], rows + [row])

    def rows(self) -> List[Dict[str, str]]:
        """Every row logged so far, as strings (an empty string where a row has no value)."""
        return self._read() if self.path.exists() else []

    def _read(self) -> List[Dict[str, str]]:
        with open(self.path, newline='') as f:
            return list(csv.DictReader(f))

    def _write(self, header: List[str], rows: List[Dict[str, Any]]) -> None:
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=header, restval='')
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(self.path, out.getvalue())
        self._header = header

    def rewind(self, step: int) -> None:
        """Drop the rows logged after ``step``: a resumed run logs them again from its checkpoint.

        ``step=0`` removes the file (a phase that never reached a checkpoint starts over).
        """
        if not self.path.exists():
            return
        if step == 0:
            self.path.unlink()
            self._header = []
            return
        rows = self._read()
        if rows:
            self._write(list(rows[0]), [r for r in rows if int(r['step']) <= step])


def tracker_hparams(tree, prefix: str = '') -> Dict[str, Any]:
    """Flatten a config into the scalar hparams TensorBoard accepts."""
    flat = {}
    items = tree.items() if isinstance(tree, dict) else enumerate(tree)
    for k, v in items:
        key = f'{prefix}{k}'
        if isinstance(v, (dict, list)):
            flat.update(tracker_hparams(v, key + '.'))
        elif isinstance(v, (int, float, str, bool)):
            flat[key] = v
    return flat
