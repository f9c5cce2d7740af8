"""Results of a sweep: ``DIR/summary.csv`` and ``DIR/curves_<env>.png``, rebuilt from the run
directories (so they can be made at any time, also while the sweep runs).

Statistics over the seeds of a group (Agarwal et al. 2021, "Deep Reinforcement Learning at the
Edge of the Statistical Precipice"): the interquartile mean (IQM: the mean of the middle half, as
``scipy.stats.trim_mean(x, 0.25)``: ``floor(n / 4)`` values cut from each end) of the final eval
returns, with a 95 % percentile-bootstrap confidence interval. A group holds one task, so the
paper's stratified bootstrap (resampling runs within each task) is a bootstrap over the group's
seeds. It is computed here with numpy (fixed generator seed: the summary is reproducible) instead
of the ``rliable`` package: rliable needs ``arch`` < 8, and ``arch`` 7 does not import with the
pandas 3 that Ray Tune installs.
"""

from __future__ import annotations

import csv
import math
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from fastrp.sweep.spec import Trial, group_keys, trials_of

SUMMARY_NAME = "summary.csv"
BOOTSTRAP_REPS = 50_000
BOOTSTRAP_SEED = 0
STAT_COLUMNS = ["n", "finished", "env_steps", "final_eval_mean", "final_eval_std", "best_eval_mean", "best_eval_std",
                "final_eval_iqm", "final_eval_iqm_ci_low", "final_eval_iqm_ci_high"]
"""Columns after the group's keys: ``n`` seeds with an evaluation, how many of them ``finished``
(their trainer exited 0), the fewest ``env_steps`` any of them reached, mean and population std
of the final and the best eval return, and the IQM of the final eval return with its 95 %
bootstrap confidence interval."""


def iqm(values: np.ndarray, axis: int = -1) -> np.ndarray:
    """Interquartile mean along ``axis``: the mean after cutting ``floor(n / 4)`` of the sorted
    values from each end (``scipy.stats.trim_mean(values, 0.25, axis)``); NaN where any value is
    NaN (a NaN must not be cut away as if it were the largest value)."""
    values = np.asarray(values, dtype=np.float64)
    has_nan = np.isnan(values).any(axis=axis)
    values = np.sort(values, axis=axis)
    n = values.shape[axis]
    cut = int(0.25 * n)
    out = np.take(values, np.arange(cut, n - cut), axis=axis).mean(axis=axis)
    return np.where(has_nan, np.nan, out)


def iqm_bootstrap_ci(values: Sequence[float], reps: int = BOOTSTRAP_REPS, confidence: float = 0.95,
                     seed: int = BOOTSTRAP_SEED) -> Tuple[float, float]:
    """Percentile-bootstrap confidence interval of the IQM: ``reps`` resamples of the values with
    replacement (same size), the IQM of each, and the ``(1 - confidence) / 2`` and
    ``(1 + confidence) / 2`` quantiles of those IQMs."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"values: expected a non-empty 1-d sequence, got shape {x.shape}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence: expected a value in (0, 1), got {confidence}")
    rng = np.random.default_rng(seed)
    samples = iqm(x[rng.integers(0, x.size, size=(reps, x.size))], axis=1)
    tail = 100 * (1 - confidence) / 2
    lo, hi = np.percentile(samples, [tail, 100 - tail])
    return float(lo), float(hi)


# ---- run directories ---------------------------------------------------------------------------------
def read_rows(run_dir: str) -> List[Dict[str, str]]:
    """The complete rows of ``run_dir/metrics.csv`` (a line still being written is left out);
    [] when the run has not written any yet."""
    path = os.path.join(run_dir, "metrics.csv")
    try:
        with open(path, newline="") as fh:
            text = fh.read()
    except FileNotFoundError:
        return []
    if not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
    return list(csv.DictReader(text.splitlines()))


def _number(cell: Optional[str]) -> float:
    try:
        return float(cell) if cell not in (None, "") else math.nan
    except ValueError:
        return math.nan


def run_result(rows: Sequence[Dict[str, str]]) -> Dict[str, object]:
    """``env_steps`` of the last row, the ``final`` eval return (the last evaluated one) and the
    ``best`` (largest finite) one; final / best are None before the first evaluation."""
    evals = [_number(r.get("eval_return_mean")) for r in rows if r.get("eval_return_mean") not in (None, "")]
    finite = [v for v in evals if math.isfinite(v)]
    return {"env_steps": int(_number(rows[-1]["env_steps"])) if rows else 0,
            "final": evals[-1] if evals else None, "best": max(finite) if finite else None}


# ---- summary -------------------------------------------------------------------------------------
def _cell(value: object) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6g}"
    return str(value)


def summarize(sweep_dir: str, spec: Dict[str, object], finished: Dict[str, bool]) -> Tuple[List[str], List[List[str]]]:
    """Header and rows of the summary: one row per group of trials with equal values of every
    grid field but ``seed`` (grid order), groups with no evaluation yet left out."""
    keys = ["env"] + [k for k in group_keys(spec) if k != "env"]
    groups: Dict[Tuple[str, ...], List[Trial]] = {}
    for trial in trials_of(spec):
        values = dict(trial.values, env=trial.env)
        groups.setdefault(tuple(str(values[k]) for k in keys), []).append(trial)
    rows: List[List[str]] = []
    for group, members in groups.items():
        results = [(t, run_result(read_rows(os.path.join(sweep_dir, t.name)))) for t in members]
        results = [(t, r) for t, r in results if r["final"] is not None]
        if not results:
            continue
        final = np.array([r["final"] for _, r in results], dtype=np.float64)
        best = np.array([np.nan if r["best"] is None else r["best"] for _, r in results], dtype=np.float64)
        lo, hi = iqm_bootstrap_ci(final)
        stats = [len(results), sum(finished.get(t.name, False) for t, _ in results),
                 min(int(r["env_steps"]) for _, r in results), float(final.mean()), float(final.std()),
                 float(best.mean()), float(best.std()), float(iqm(final)), lo, hi]
        rows.append(list(group) + [_cell(v) for v in stats])
    return keys + STAT_COLUMNS, rows


def write_summary(sweep_dir: str, header: List[str], rows: List[List[str]]) -> str:
    path = os.path.join(sweep_dir, SUMMARY_NAME)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    os.replace(tmp, path)
    return path


def format_table(header: List[str], rows: List[List[str]]) -> str:
    """The summary as a Markdown table (mean ± std and IQM [95 % CI] in one cell each)."""
    keys = header[: len(header) - len(STAT_COLUMNS)]
    out_header = keys + ["n", "final eval (mean ± std)", "best eval (mean ± std)", "final eval IQM [95% CI]"]
    lines = ["| " + " | ".join(out_header) + " |", "|" + "---|" * len(out_header)]
    for row in rows:
        cells = dict(zip(header, row))
        num = {k: float(cells[k]) for k in STAT_COLUMNS[3:]}
        seeds = cells["n"] if cells["finished"] == cells["n"] else f"{cells['n']} ({cells['finished']} finished)"
        lines.append("| " + " | ".join(
            [cells[k] for k in keys]
            + [seeds, f"{num['final_eval_mean']:.1f} ± {num['final_eval_std']:.1f}",
               f"{num['best_eval_mean']:.1f} ± {num['best_eval_std']:.1f}",
               f"{num['final_eval_iqm']:.1f} "
               f"[{num['final_eval_iqm_ci_low']:.1f}, {num['final_eval_iqm_ci_high']:.1f}]"])
            + " |")
    return "\n".join(lines)


def write_curves(sweep_dir: str, spec: Dict[str, object]) -> List[str]:
    """``curves_<env>.png`` per env: each group's eval return, mean ± std over its seeds, drawn by
    :func:`fastrp.plot.learning_curves_figure` with the group's grid values as labels."""
    from fastrp.plot import learning_curves_figure

    keys = [k for k in group_keys(spec) if k != "env"]
    by_env: Dict[str, List[Tuple[str, str]]] = {}
    for trial in trials_of(spec):
        run_dir = os.path.join(sweep_dir, trial.name)
        if run_result(read_rows(run_dir))["final"] is None or not os.path.isfile(os.path.join(run_dir, "config.json")):
            continue
        label = " ".join(f"{k}={trial.values[k]}" for k in keys)
        by_env.setdefault(trial.env, []).append((run_dir, label))
    written = []
    for env, runs in sorted(by_env.items()):
        out = os.path.join(sweep_dir, f"curves_{env}.png")
        labels = [label for _, label in runs] if keys else None  # seeds only: fastrp.plot labels by algo
        learning_curves_figure([d for d, _ in runs], out, labels=labels)
        written.append(out)
    return written
