"""Figures of fastrp runs (matplotlib, ``Agg`` backend: no display needed).

``python -m fastrp.plot RUN_DIR... --out fig.png [--metric eval_return_mean] [--x env_steps|wall_time]``
draws learning curves from the runs' ``metrics.csv``, one subplot per env. Runs are grouped by
their ``config.json`` (:func:`group_curves`): by env, algo and every other config field that takes
more than one value among the given runs of that env - except the fields that do not change what
is learned (:data:`NOT_GROUPED`: seed, run name, log dir, resume, steps, device, progress, the
eval / log / checkpoint cadences and the diagnostics settings). A group is labelled by its algo
plus those differing fields (``maac hidden_dim=64``), leaving out fields the algorithm presets set
that only differ between algorithms (``rp-sn``'s spectral-norm flags next to ``maac``, ``sac``'s own
``cpu`` sizes next to the model-based algorithms'). Each
group is drawn as the mean over its runs (seeds) with a +-1 std band. Rows are aligned on
``env_steps`` and only rows where the metric has a value are used (evaluations happen every
``eval_every`` steps); with ``--x wall_time`` a group's x is the mean wall time of its runs at
that env step.

The same module draws the diagnostics figures of ``python -m fastrp.diagnostics``:
:func:`variance_figure` (trace of the gradient covariance against H, one line per run) and
:func:`jacobian_figure` (model Jacobian and prediction errors against env steps).

Exit codes of the CLI: 0 done, 2 bad input (one line on stderr).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

__all__ = ["PlotError", "RunCurves", "NOT_GROUPED", "read_run", "group_labels", "group_curves",
           "learning_curves_figure", "variance_figure", "jacobian_figure", "main"]

X_CHOICES = ("env_steps", "wall_time")
NOT_GROUPED = frozenset({"seed", "run_name", "logdir", "resume", "steps", "device", "progress", "eval_every",
                         "log_every", "checkpoint_every", "diag_every", "diag_states", "diag_batch", "diag_samples",
                         "diag_max_horizon", "diag_transitions", "diag_rollout_steps"})
"""Config fields that never split runs into separate curves: they do not change what the agent
learns (seeds are what a group averages over; ``steps`` only ends a run earlier or later)."""
DPI = 100


class PlotError(Exception):
    """Bad input to a plot (reported as one line, exit code 2)."""


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: str) -> str:
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    fig.savefig(out, dpi=DPI, bbox_inches="tight")
    _pyplot().close(fig)
    return out


def _float(cell: Optional[str]) -> float:
    if cell is None or cell == "":
        return math.nan
    try:
        return float(cell)
    except ValueError:
        return math.nan


# ---- learning curves -------------------------------------------------------------------------------
class RunCurves:
    """One run's metric: ``env``, ``algo``, ``seed`` (from ``config.json``), its ``config`` (a dict:
    ``config.json`` completed by :func:`fastrp.config.config_from_checkpoint`, so fields an older
    version did not write hold the value that reproduces its behaviour), and the rows where the
    metric has a value as arrays ``steps``, ``wall`` (wall time) and ``values``."""

    def __init__(self, run_dir: str, env: str, algo: str, seed: int, steps: np.ndarray, wall: np.ndarray,
                 values: np.ndarray, config: Optional[Dict[str, object]] = None):
        self.run_dir, self.env, self.algo, self.seed = run_dir, env, algo, seed
        self.steps, self.wall, self.values = steps, wall, values
        self.config: Dict[str, object] = dict(config) if config is not None else {"env": env, "algo": algo,
                                                                                   "seed": seed}


def _full_config(raw: Dict[str, object]) -> Dict[str, object]:
    """``raw`` (a ``config.json``) with the fields it lacks filled as an old run behaved; ``raw``
    itself when it cannot be completed (e.g. written by a newer fastrp with unknown fields)."""
    try:
        import dataclasses

        from fastrp import config as config_mod

        complete = getattr(config_mod, "config_from_checkpoint", None)
        if complete is None:
            return dict(raw)
        return dataclasses.asdict(complete(dict(raw)))
    except Exception:
        return dict(raw)


def read_run(run_dir: str, metric: str) -> RunCurves:
    """Read ``metric`` of one run directory; raises :class:`PlotError` for a missing directory,
    ``config.json`` or ``metrics.csv``, or a metric that is not a column of ``metrics.csv``."""
    if not os.path.isdir(run_dir):
        raise PlotError(f"{run_dir}: no such run directory")
    metrics_path = os.path.join(run_dir, "metrics.csv")
    if not os.path.isfile(metrics_path):
        raise PlotError(f"{run_dir}: no metrics.csv in it (not a fastrp run directory?)")
    config_path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(config_path):
        raise PlotError(f"{run_dir}: no config.json in it (not a fastrp run directory?)")
    try:
        with open(config_path) as fh:
            cfg = json.load(fh)
        if not isinstance(cfg, dict):
            raise ValueError("not a JSON object")
    except ValueError as err:
        raise PlotError(f"{config_path}: not a fastrp config ({err})") from None
    with open(metrics_path, newline="") as fh:
        reader = csv.DictReader(fh)
        columns = reader.fieldnames or []
        rows = list(reader)
    if metric not in columns:
        raise PlotError(f"--metric: {metric!r} is not a column of {metrics_path}; choose from "
                        f"{', '.join(c for c in columns if c != 'env_steps')}")
    steps, wall, values = [], [], []
    for row in rows:
        value = _float(row.get(metric))
        if math.isnan(value):
            continue
        steps.append(int(float(row["env_steps"])))
        wall.append(_float(row.get("wall_time")))
        values.append(value)
    return RunCurves(run_dir, str(cfg.get("env", "?")), str(cfg.get("algo", "?")), int(cfg.get("seed", 0)),
                     np.asarray(steps, dtype=np.int64), np.asarray(wall, dtype=np.float64),
                     np.asarray(values, dtype=np.float64), config=_full_config(cfg))


_MISSING = object()


def _value_key(value) -> Tuple[str, object]:
    """A comparison key treating ``1`` and ``1.0`` alike (JSON may write a float field either way)."""
    if value is _MISSING:
        return ("missing", None)
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, (int, float)):
        return ("num", float(value))
    return ("other", json.dumps(value, sort_keys=True, default=str))


def _field_order() -> List[str]:
    try:
        import dataclasses

        from fastrp.config import Config

        return [f.name for f in dataclasses.fields(Config)]
    except Exception:
        return []


def _algo_preset_fields() -> frozenset:
    """Fields an algorithm's presets set: its ``ALGO_PRESETS`` entry and its entries in the size
    presets (e.g. ``sac``'s own ``cpu`` sizes, ``mbpo``'s ``real_ratio``)."""
    try:
        from fastrp.config import ALGO_PRESETS, SIZE_PRESETS

        fields = {k for layer in ALGO_PRESETS.values() for k in layer}
        fields.update(k for size in SIZE_PRESETS.values() for name, layer in size.items() if name in ALGO_PRESETS
                      for k in layer)
        return frozenset(fields)
    except Exception:
        return frozenset()


def group_labels(runs: Sequence[RunCurves]) -> List[Tuple[str, str]]:
    """The ``(env, label)`` group of each run (in order); see the module docstring.

    Per env: the fields (other than env, algo and :data:`NOT_GROUPED`) with more than one value
    among that env's runs split the runs; the label is the algo followed by ``field=value`` for
    each of those fields in config order, except fields the algorithm presets set
    (``fastrp.config.ALGO_PRESETS`` and the size presets' per-algorithm entries) that are constant
    within every algo (the algo already names them). Runs with equal labels are averaged together.
    """
    order = {name: i for i, name in enumerate(_field_order())}
    algo_fields = _algo_preset_fields()
    labels: List[Tuple[str, str]] = [("", "")] * len(runs)
    for env in sorted({r.env for r in runs}):
        idx = [i for i, r in enumerate(runs) if r.env == env]
        names = sorted({k for i in idx for k in runs[i].config} - NOT_GROUPED - {"env", "algo"},
                       key=lambda k: (order.get(k, len(order)), k))
        shown = []
        for name in names:
            values = {_value_key(runs[i].config.get(name, _MISSING)) for i in idx}
            if len(values) < 2:
                continue
            if name in algo_fields:
                per_algo: Dict[str, set] = {}
                for i in idx:
                    per_algo.setdefault(runs[i].algo, set()).add(_value_key(runs[i].config.get(name, _MISSING)))
                if all(len(v) == 1 for v in per_algo.values()):
                    continue  # differs only between algorithms: the algo names it
            shown.append(name)
        for i in idx:
            parts = [runs[i].algo]
            for name in shown:
                value = runs[i].config.get(name, _MISSING)
                parts.append(f"{name}={'?' if value is _MISSING else value}")
            labels[i] = (env, " ".join(parts))
    return labels


def group_curves(runs: Sequence[RunCurves], x: str = "env_steps",
                 labels: Optional[Sequence[str]] = None) -> Dict[Tuple[str, str], Dict[str, object]]:
    """Mean and std per group of runs (:func:`group_labels`, or ``labels``: one per run, runs of
    one env with equal labels form a group), aligned on env steps.

    Returns ``{(env, label): {"x", "mean", "std", "count", "seeds", "algo", "label", "runs"}}``:
    at every env step where at least one run of the group has a value, ``mean`` / ``std``
    (population std, 0 for one run) over the runs that have it and ``count`` of them; ``x`` is the
    env step, or with ``x="wall_time"`` the mean wall time of those runs at that step. ``seeds``
    lists the seeds, ``runs`` the run directories; ``label`` is the legend text without the seed
    count (``algo`` alone when the runs differ in nothing else).
    """
    if x not in X_CHOICES:
        raise PlotError(f"--x: choose from {', '.join(X_CHOICES)}, got {x!r}")
    if labels is not None and len(labels) != len(runs):
        raise PlotError(f"labels: expected one per run ({len(runs)}), got {len(labels)}")
    keys = group_labels(runs) if labels is None else [(r.env, str(label)) for r, label in zip(runs, labels)]
    groups: Dict[Tuple[str, str], List[RunCurves]] = {}
    for run, key in zip(runs, keys):
        groups.setdefault(key, []).append(run)
    out: Dict[Tuple[str, str], Dict[str, object]] = {}
    for key, members in groups.items():
        steps = np.unique(np.concatenate([r.steps for r in members])) if members else np.zeros(0, np.int64)
        xs, means, stds, counts = [], [], [], []
        for step in steps:
            vals, walls = [], []
            for r in members:
                hit = np.flatnonzero(r.steps == step)
                if hit.size:
                    vals.append(r.values[hit[-1]])
                    walls.append(r.wall[hit[-1]])
            if x == "env_steps":
                xs.append(float(step))
            else:
                xs.append(float(np.nanmean(walls)) if np.isfinite(walls).any() else math.nan)
            means.append(float(np.mean(vals)))
            stds.append(float(np.std(vals)))
            counts.append(len(vals))
        out[key] = {"x": np.asarray(xs), "mean": np.asarray(means), "std": np.asarray(stds),
                    "count": np.asarray(counts), "seeds": np.asarray(sorted(r.seed for r in members)),
                    "algo": members[0].algo, "label": key[1], "runs": [r.run_dir for r in members]}
    return out


def learning_curves_figure(run_dirs: Sequence[str], out: str, metric: str = "eval_return_mean",
                           x: str = "env_steps", labels: Optional[Sequence[str]] = None) -> str:
    """Draw the learning curves of ``run_dirs`` into the PNG ``out`` (see the module docstring);
    returns ``out``. ``labels`` (one per run directory) replaces the grouping by config: runs of
    one env with equal labels are averaged into one curve. Raises :class:`PlotError` on bad input
    or when no run has a value of the metric."""
    if not run_dirs:
        raise PlotError("give at least one run directory")
    if x not in X_CHOICES:
        raise PlotError(f"--x: choose from {', '.join(X_CHOICES)}, got {x!r}")
    runs = [read_run(d, metric) for d in run_dirs]
    if all(r.values.size == 0 for r in runs):
        raise PlotError(f"--metric: no run has a value of {metric!r} yet")
    groups = group_curves(runs, x, labels)
    envs = sorted({env for env, _ in groups})
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(envs), figsize=(5.0 * len(envs), 3.6), squeeze=False, layout="constrained")
    for ax, env in zip(axes[0], envs):
        for (g_env, label), curve in sorted(groups.items()):
            if g_env != env or curve["x"].size == 0:
                continue
            n = len(curve["seeds"])
            line, = ax.plot(curve["x"], curve["mean"], marker="." if curve["x"].size < 30 else None,
                            label=f"{label} ({n} seed{'s' if n != 1 else ''})")
            ax.fill_between(curve["x"], curve["mean"] - curve["std"], curve["mean"] + curve["std"],
                            color=line.get_color(), alpha=0.2, linewidth=0)
        ax.set_title(env)
        ax.set_xlabel("env steps" if x == "env_steps" else "wall time (s)")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("mean +- std over seeds", fontsize=9)
    return _save(fig, out)


# ---- diagnostics figures ---------------------------------------------------------------------------
def variance_figure(curves: Sequence[Tuple[str, Sequence[int], Sequence[float], Sequence[float]]], out: str,
                    title: str = "") -> str:
    """Gradient variance against the unroll length H, one line per run, log y.

    Args:
        curves: ``(label, horizons, trace_cov, mean_grad_norm)`` per run.
        out: PNG path. title: figure title.

    Left panel: trace of the gradient covariance; right panel: mean gradient norm. Returns ``out``.
    """
    plt = _pyplot()
    fig, (ax_var, ax_norm) = plt.subplots(1, 2, figsize=(10.0, 3.6), layout="constrained")
    for label, hs, trace, norm in curves:
        ax_var.plot(hs, _positive(trace), marker="o", label=label)
        ax_norm.plot(hs, _positive(norm), marker="o", label=label)
    for ax, ylabel in ((ax_var, "trace of gradient covariance"), (ax_norm, "mean gradient norm")):
        ax.set_yscale("log")
        ax.set_xlabel("unroll length H (model steps)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, which="both")
        ax.xaxis.get_major_locator().set_params(integer=True)
    ax_var.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, out)


def _positive(values) -> np.ndarray:
    """Values for a log axis: non-positive or non-finite ones become NaN (gaps, not crashes)."""
    arr = np.asarray(values, dtype=np.float64)
    return np.where(np.isfinite(arr) & (arr > 0), arr, np.nan)


def jacobian_figure(history: Sequence[Dict[str, object]], points: Sequence[Dict[str, object]], out: str,
                    title: str = "") -> str:
    """Model gradient error against training progress (paper 003's Figure 2 on a real task).

    Args:
        history: jacobian rows (dicts with ``env_steps``, ``model``, ``jac_state_err``,
            ``jac_action_err``, ``pred_mse``; strings or numbers) from a run's training-time
            ``diagnostics.csv``, drawn as lines.
        points: rows measured now on the checkpoint, drawn as star markers.
        out: PNG path. title: figure title.

    Left panel: relative Jacobian error (state block solid, action block dashed, one colour per
    model); right panel: prediction MSE. Both log y. Returns ``out``.
    """
    plt = _pyplot()
    fig, (ax_jac, ax_mse) = plt.subplots(1, 2, figsize=(10.0, 3.8), layout="constrained")
    colors = {"prediction": "tab:blue", "gradient": "tab:orange"}
    models = sorted({str(r["model"]) for r in list(history) + list(points)}, key=lambda m: (m != "prediction", m))
    for model in models:
        color = colors.get(model)
        rows = sorted((r for r in history if str(r["model"]) == model), key=lambda r: float(r["env_steps"]))
        pts = [r for r in points if str(r["model"]) == model]
        steps = [float(r["env_steps"]) for r in rows]
        for key, style, what in (("jac_state_err", "-", "ds'/ds"), ("jac_action_err", "--", "ds'/da")):
            if rows:
                line, = ax_jac.plot(steps, _positive([_float(str(r[key])) for r in rows]), style, color=color,
                                    marker=".", label=f"{model} model {what}")
                color = line.get_color()
            if pts:
                ax_jac.plot([float(r["env_steps"]) for r in pts], _positive([_float(str(r[key])) for r in pts]),
                            "*", color=color, markersize=11,
                            label=None if rows else f"{model} model {what} (checkpoint)")
        if rows:
            ax_mse.plot(steps, _positive([_float(str(r["pred_mse"])) for r in rows]), ":", color=color, marker=".",
                        label=f"{model} model")
        if pts:
            ax_mse.plot([float(r["env_steps"]) for r in pts], _positive([_float(str(r["pred_mse"])) for r in pts]),
                        "*", color=color, markersize=11, label=None if rows else f"{model} model (checkpoint)")
    ax_jac.set_ylabel("relative Jacobian error")
    ax_jac.set_title("||J - J_true||_F / ||J_true||_F (solid ds'/ds, dashed ds'/da)", fontsize=8)
    ax_mse.set_title("mean squared error of the predicted next observation", fontsize=8)
    ax_mse.set_ylabel("prediction MSE")
    for ax in (ax_jac, ax_mse):
        ax.set_yscale("log")
        ax.set_xlabel("env steps")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, handlelength=3.5)
    if points:
        title = (title + "\n" if title else "") + "lines: training-time diagnostics.csv; stars: this checkpoint"
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, out)


# ---- CLI -------------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line on stderr, exit code 2, no usage dump
        raise PlotError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m fastrp.plot", allow_abbrev=False,
                     description="Learning curves of fastrp runs: mean +- std over seeds, one subplot per env; "
                                 "runs are grouped by algorithm and every other config field that differs between "
                                 "them (except seed, run name, log dir, resume, steps, device, progress, the "
                                 "eval / log / checkpoint cadences and the diagnostics settings), and labelled by "
                                 "the algorithm plus those fields.")
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories (config.json + metrics.csv)")
    parser.add_argument("--out", required=True, help="output PNG path")
    parser.add_argument("--metric", default="eval_return_mean", help="metrics.csv column (default: eval_return_mean)")
    parser.add_argument("--x", default="env_steps", choices=X_CHOICES, help="x axis (default: env_steps)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI entry point; returns the exit code (0 done, 2 bad input)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
        out = learning_curves_figure(args.run_dirs, args.out, args.metric, args.x)
    except PlotError as err:
        print(f"python -m fastrp.plot: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
