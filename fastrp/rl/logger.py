"""Metrics CSV, TensorBoard events and the live progress line of a run."""

from __future__ import annotations

import csv
import json
import math
import os
import sys
import time
import warnings
from typing import Dict, List, Optional

COLUMNS = [
    "env_steps", "wall_time", "eval_return_mean", "eval_return_std", "train_return", "episodes",
    "nonfinite_transitions", "model_nll", "model_holdout_mse", "grad_model_fd_loss", "policy_grad_norm", "alpha", "q_mean",
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


def _replace_atomic(path: str, write) -> None:
    """Write a file through ``write(fh)`` into ``path + ".tmp"``, flush it to disk and
    ``os.replace`` it onto ``path``: a crash leaves the old file or the new one, never a torn or
    empty one; on an error the temporary file is removed and the error re-raised."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "w", newline="") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json_atomic(path: str, obj) -> None:
    """``json.dump(obj)`` to ``path`` atomically (see :func:`_replace_atomic`)."""
    _replace_atomic(path, lambda fh: json.dump(obj, fh, indent=2, sort_keys=True))


def truncate_csv(path: str, columns, resume_step: int) -> None:
    """Rewrite the CSV at ``path`` keeping only rows with ``env_steps <= resume_step`` (a resumed
    run continues exactly where its checkpoint left off; rows written after it are dropped).
    The rewrite is atomic: a kill during it leaves the old file."""
    with open(path, newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("env_steps", "").isdigit() and int(r["env_steps"]) <= resume_step]

    def write(fh):
        writer = csv.DictWriter(fh, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)

    _replace_atomic(path, write)


class MetricsLogger:
    """Appends one row per log interval to ``<run_dir>/metrics.csv`` and mirrors every numeric value
    to TensorBoard (``<run_dir>/tb``; skipped with one warning if tensorboard is not installed).

    On resume, rows after ``resume_step`` (written by the interrupted run after its last
    checkpoint) are dropped so the file continues exactly where the checkpoint left off, and the
    TensorBoard writer purges the events after that step (the checkpoint's own step is kept), so
    every logged step appears exactly once.
    """

    def __init__(self, run_dir: str, resume_step: Optional[int] = None):
        self.path = os.path.join(run_dir, "metrics.csv")
        if resume_step is not None and os.path.exists(self.path):
            truncate_csv(self.path, COLUMNS, resume_step)
        else:
            _replace_atomic(self.path, lambda fh: csv.DictWriter(fh, COLUMNS).writeheader())
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            purge = None if resume_step is None else resume_step + 1  # events at steps >= purge are dropped
            self.tb = SummaryWriter(os.path.join(run_dir, "tb"), purge_step=purge)
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
    """The live status on stderr (``\\r``-rewritten on a terminal, one line per update otherwise):
    env steps, steps/s, updates/s, last eval return and ETA; refreshed at every metrics row and at
    least every ``refresh_s`` seconds in between.

    The ETA uses the rate after warm-up only (random warm-up steps are far faster than training
    steps): the time per env step without model refits, plus the mean time of a refit times the
    refits still to come (one every ``refit_every`` steps after warm-up; 0 = no refits). During
    warm-up it is not known yet."""

    def __init__(self, total_steps: int, warmup_steps: int, enabled: bool = True, refit_every: int = 0,
                 refresh_s: float = 30.0):
        self.total, self.warmup, self.enabled = total_steps, warmup_steps, enabled
        self.refit_every, self.refresh_s = refit_every, refresh_s
        self.tty = sys.stderr.isatty()
        self.post_steps, self.post_time = 0, 0.0  # steps after warm-up and their time, refits excluded
        self.model_time, self.model_phases = 0.0, 0
        self._pending_model = 0.0
        self._last_model = 0.0
        self._last_print = time.perf_counter()
        self._rates: Optional[tuple] = None
        self._eval: Optional[float] = None
        self._step = 0

    def model_phase_starts(self, step: int) -> None:
        if self.enabled and self._last_model >= 10.0:
            self._write(f"step {step}/{self.total} | refitting the models (the last refit took "
                        f"{self._last_model:.0f} s)")

    def model_phase_done(self, seconds: float) -> None:
        self.model_time += seconds
        self.model_phases += 1
        self._pending_model = seconds
        self._last_model = seconds

    def step_done(self, step: int, seconds: float) -> None:
        """Env step ``step`` took ``seconds`` in all (a model phase in it included)."""
        self._step = step
        if step >= self.warmup:
            self.post_steps += 1
            self.post_time += max(seconds - self._pending_model, 0.0)
        self._pending_model = 0.0

    def rate_after_warmup(self) -> Optional[float]:
        """Env steps per second after warm-up, refits included (None before any such step)."""
        total = self.post_time + self.model_time
        return self.post_steps / total if self.post_steps and total > 0 else None

    def eta(self, step: int) -> Optional[float]:
        """Seconds to ``total_steps`` (None while unknown)."""
        if self.post_steps == 0 or self.post_time <= 0:
            return None
        remaining = self.total - step
        seconds = remaining * self.post_time / self.post_steps
        if self.refit_every > 0 and self.model_phases:
            done = max(step - self.warmup, -1) // self.refit_every
            future = max((self.total - self.warmup) // self.refit_every - done, 0)
            seconds += future * self.model_time / self.model_phases
        return seconds

    def row(self, step: int, steps_per_s: float, updates_per_s: float, eval_return: Optional[float]) -> None:
        self._rates = (steps_per_s, updates_per_s)
        self._eval = eval_return
        self._print(step)

    def maybe_refresh(self, step: int, eval_return: Optional[float]) -> None:
        if self.enabled and time.perf_counter() - self._last_print >= self.refresh_s:
            self._eval = eval_return
            self._print(step)

    def _print(self, step: int) -> None:
        if not self.enabled:
            return
        rates = "- steps/s | - updates/s" if self._rates is None else \
            f"{self._rates[0]:.1f} steps/s | {self._rates[1]:.1f} updates/s"
        ev = "-" if self._eval is None else f"{self._eval:.1f}"
        if step < self.warmup:
            eta = "ETA after warm-up"
        else:
            eta = f"ETA {_duration(self.eta(step))}"
        self._write(f"step {step}/{self.total} | {rates} | eval {ev} | {eta}")

    def _write(self, line: str) -> None:
        sys.stderr.write(("\r" + line + "\x1b[K") if self.tty else line + "\n")
        sys.stderr.flush()
        self._last_print = time.perf_counter()

    def close(self) -> None:
        if self.enabled and self.tty:
            sys.stderr.write("\n")


def _duration(seconds: Optional[float]) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
