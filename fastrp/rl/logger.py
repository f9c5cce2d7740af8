"""Metrics CSV, TensorBoard events and the live progress line of a run."""

from __future__ import annotations

import csv
import math
import os
import sys
import time
import warnings
from typing import Dict, List, Optional

COLUMNS = [
    "env_steps", "wall_time", "eval_return_mean", "eval_return_std", "train_return", "episodes",
    "model_nll", "model_holdout_mse", "grad_model_fd_loss", "policy_grad_norm", "alpha", "q_mean",
    "critic_loss", "actor_loss", "entropy", "rollout_len", "model_nonfinite_rows", "model_fits_skipped", "updates", "skipped_updates", "steps_per_s",
    "updates_per_s",
]
"""Columns of ``metrics.csv``; empty cells mean "not measured in this interval"."""

SUMMED_COLUMNS = ("model_nonfinite_rows", "model_fits_skipped")
"""Host-side counters summed over a log interval (other model metrics keep the latest fit's value)."""

TIMING_COLUMNS = ("wall_time", "steps_per_s", "updates_per_s")
"""Columns that depend on wall-clock time (everything else is reproducible on CPU)."""


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else repr(value)
    return str(value)


def truncate_csv(path: str, columns, resume_step: int) -> None:
    """Rewrite the CSV at ``path`` keeping only rows with ``env_steps <= resume_step`` (a resumed
    run continues exactly where its checkpoint left off; rows written after it are dropped)."""
    with open(path, newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("env_steps", "").isdigit() and int(r["env_steps"]) <= resume_step]
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


class MetricsLogger:
    """Appends one row per log interval to ``<run_dir>/metrics.csv`` and mirrors every numeric value
    to TensorBoard (``<run_dir>/tb``; skipped with one warning if tensorboard is not installed).

    On resume, rows after ``resume_step`` (written by the interrupted run after its last
    checkpoint) are dropped so the file continues exactly where the checkpoint left off.
    """

    def __init__(self, run_dir: str, resume_step: Optional[int] = None):
        self.path = os.path.join(run_dir, "metrics.csv")
        if resume_step is not None and os.path.exists(self.path):
            truncate_csv(self.path, COLUMNS, resume_step)
        else:
            with open(self.path, "w", newline="") as fh:
                csv.DictWriter(fh, COLUMNS).writeheader()
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(run_dir, "tb"), purge_step=resume_step)
        except ImportError:
            warnings.warn("tensorboard is not installed: no TensorBoard events (pip install tensorboard)", stacklevel=2)

    def write(self, row: Dict[str, object]) -> None:
        with open(self.path, "a", newline="") as fh:
            csv.DictWriter(fh, COLUMNS).writerow({k: _fmt(row.get(k)) for k in COLUMNS})
        if self.tb is not None:
            step = int(row["env_steps"])
            for key, value in row.items():
                if key != "env_steps" and isinstance(value, (int, float)) and value is not None:
                    self.tb.add_scalar(key, value, step)
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(run_dir: str) -> List[Dict[str, str]]:
    """The rows of ``<run_dir>/metrics.csv`` as dicts of strings."""
    with open(os.path.join(run_dir, "metrics.csv"), newline="") as fh:
        return list(csv.DictReader(fh))


class Progress:
    """A live one-line status on stderr (``\\r``-rewritten on a terminal, one line per log interval
    otherwise): env steps, steps/s, updates/s, last eval return and ETA."""

    def __init__(self, total_steps: int, start_step: int, enabled: bool = True):
        self.total, self.enabled = total_steps, enabled
        self.t0, self.s0 = time.perf_counter(), start_step
        self.tty = sys.stderr.isatty()

    def update(self, step: int, steps_per_s: float, updates_per_s: float, eval_return: Optional[float]) -> None:
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.t0
        rate = (step - self.s0) / elapsed if elapsed > 0 else 0.0
        eta = (self.total - step) / rate if rate > 0 else float("inf")
        ev = "-" if eval_return is None else f"{eval_return:.1f}"
        line = (f"step {step}/{self.total} | {steps_per_s:.1f} steps/s | {updates_per_s:.1f} updates/s | "
                f"eval {ev} | ETA {_duration(eta)}")
        sys.stderr.write(("\r" + line + "\x1b[K") if self.tty else line + "\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            sys.stderr.write("\n")


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
