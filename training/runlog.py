"""The run log of both trainers: ``RUN_DIR/log.csv``, one row of losses and metrics per epoch.

Columns: ``epoch`` (1-based), ``iterations`` (done so far), ``lr`` (of the epoch's last
iteration), then the trainer's own columns (``train_*`` losses, ``val_*`` losses and metrics),
then ``images_per_s`` and ``epoch_s``. Floats are written with 5 decimals (``lr`` with 6
significant digits). A resumed run appends to the existing file; a fresh run starts a new one.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path

LOG_NAME = "log.csv"


class RunLog:
    """Append-only CSV log of a training run.

    Args:
        run_dir: the run directory (the log is ``run_dir / "log.csv"``).
        columns: the trainer's own columns (between ``lr`` and ``images_per_s``).
        resume: append to an existing log (a fresh run, or a missing log, writes the header).
    """

    def __init__(self, run_dir: Path, columns: Sequence[str], *, resume: bool) -> None:
        self.path = Path(run_dir) / LOG_NAME
        self.columns = list(columns)
        self.fields = ["epoch", "iterations", "lr", *self.columns, "images_per_s", "epoch_s"]
        if not resume or not self.path.is_file():
            with self.path.open("w", newline="") as f:
                csv.writer(f).writerow(self.fields)

    def write(self, *, epoch: int, iterations: int, lr: float, values: Mapping[str, float], images_per_s: float,
              epoch_s: float) -> None:
        """Append one epoch's row.

        Args:
            epoch: 1-based epoch number.
            iterations: iterations done in all.
            lr: learning rate of the epoch's last iteration.
            values: one float per column given at construction.
            images_per_s: training throughput of the epoch.
            epoch_s: wall time of the epoch (training and validation), seconds.

        Raises:
            KeyError: if a column has no value.
        """
        row = [epoch, iterations, f"{lr:.6g}", *(f"{float(values[c]):.5f}" for c in self.columns),
               f"{images_per_s:.2f}", f"{epoch_s:.1f}"]
        with self.path.open("a", newline="") as f:
            csv.writer(f).writerow(row)
