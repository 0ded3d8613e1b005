"""A CSV logger that a re-run appends to: Lightning's deletes the earlier rows of metrics.csv when
the run folder exists, and crashes when a resumed run logs other columns than the file has."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from patronus.runs import atomic_write


class AppendingWriter(ExperimentWriter):
    """Keeps metrics.csv: reads its header on start, appends rows, and widens the header (every
    earlier row kept, written atomically) when new columns appear."""

    def _check_log_dir_exists(self) -> None:
        path = Path(self.metrics_file_path)
        if path.is_file():
            with open(path, newline="") as fh:
                header = next(csv.reader(fh), [])
            self.metrics_keys = sorted(set(header))

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        with open(self.metrics_file_path, newline="") as fh:
            rows = list(csv.DictReader(fh))

        def write(out) -> None:
            text = io.StringIO(newline="")
            writer = csv.DictWriter(text, fieldnames=fieldnames)
            writer.writeheader()
            writer.writerows(rows)
            out.write(text.getvalue().encode())

        atomic_write(self.metrics_file_path, write)


class AppendingCSVLogger(CSVLogger):
    """CSVLogger whose metrics.csv survives re-runs: resumed runs append (after `drop_rows_after` removed
    what a killed run logged past its last checkpoint)."""

    @property
    def experiment(self) -> AppendingWriter:
        if self._experiment is None:
            os.makedirs(self.root_dir or ".", exist_ok=True)
            self._experiment = AppendingWriter(log_dir=self.log_dir)
        return self._experiment


def logged_after(row: dict[str, str], step: int) -> bool:
    """Whether a metrics.csv row was logged after the checkpoint of global step `step`.

    Lightning logs a batch's metrics (rows with an `epoch`) at global_step − 1, so the batch that
    made the checkpoint writes `step − 1`; callbacks (summary, monitor) log at global_step itself.
    """
    try:
        at = int(float(row.get("step") or ""))
    except ValueError:
        return False  # a row without a step is kept: nothing says when it was logged
    return (at + 1 if row.get("epoch") not in (None, "") else at) > step


def drop_rows_after(metrics_file: str | Path, step: int) -> int:
    """Remove the rows a killed run logged after its last checkpoint (`step`), atomically, so the
    resumed run continues the history instead of repeating those steps. Returns the rows dropped."""
    path = Path(metrics_file)
    if not path.is_file():
        return 0
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        fieldnames, rows = list(reader.fieldnames or []), list(reader)
    kept = [r for r in rows if not logged_after(r, step)]
    if len(kept) == len(rows):
        return 0

    def write(out) -> None:
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=fieldnames)
        writer.writeheader()
        writer.writerows(kept)
        out.write(text.getvalue().encode())

    atomic_write(path, write)
    return len(rows) - len(kept)
