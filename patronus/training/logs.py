"""A CSV logger that a re-run appends to: Lightning's deletes the earlier rows of metrics.csv when
the run folder exists, and crashes when a resumed run logs other columns than the file has."""

from __future__ import annotations

import csv
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
            import io

            text = io.StringIO(newline="")
            writer = csv.DictWriter(text, fieldnames=fieldnames)
            writer.writeheader()
            writer.writerows(rows)
            out.write(text.getvalue().encode())

        atomic_write(self.metrics_file_path, write)


class AppendingCSVLogger(CSVLogger):
    """CSVLogger whose metrics.csv survives re-runs (resumed runs append; steps may repeat after a kill)."""

    @property
    def experiment(self) -> AppendingWriter:
        if self._experiment is None:
            os.makedirs(self.root_dir or ".", exist_ok=True)
            self._experiment = AppendingWriter(log_dir=self.log_dir)
        return self._experiment
