"""Tables and figures of the README's "Reproducing the papers" section, from run directories.

    python docs/reproduction/report.py RUN_DIR [RUN_DIR ...] [--img-dir docs/img]

Every RUN_DIR holds a run's ``config.json``, ``metrics.csv`` and ``diagnostics.csv`` (the
training-time diagnostics, ``--diag-every``). Runs are grouped by env and label (the algorithm,
plus ``all`` for ``--policy-sn-layers all`` and the FD-loss settings where they differ from the
preset); numbers are mean +- std over the seeds of a group. Prints markdown tables on stdout and
writes the figures into ``--img-dir``:

* ``repro_variance.png``: the gradient variance against the unroll length H at the last
  diagnostics step (geometric mean over seeds, band: +-1 std of log10), in parameter space (``trace_cov``), normalised by the squared parameter norm
  (``trace_cov_norm``) and with respect to the policy's actions (``action_trace_cov``);
* ``repro_growth.png``: the growth of the variance from H = 1 to H = 20 over training;
* ``repro_lipschitz.png``: the spectral norm of the closed-loop H-step Jacobian ``d s_H / d s_0``
  through the model against H;
* ``repro_jacobian.png``: the prediction and gradient models' Jacobian errors against MuJoCo's
  over training.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
from collections import defaultdict

import numpy as np

ORDER = ["maac", "rp-sn", "rp-sn all", "ddppo", "ddppo-sn"]
PRESET_FD_WEIGHT = {"Hopper": 50.0, "HalfCheetah": 1.0}  # the env presets' FD-loss weight w (paper 003)


def _float(text):
    return float(text) if text not in ("", None) else math.nan


def load(run_dir):
    with open(os.path.join(run_dir, "config.json")) as f:
        cfg = json.load(f)
    cfg = cfg.get("config", cfg)
    label = cfg["algo"]
    if cfg.get("policy_spectral_norm") and cfg.get("policy_sn_layers") == "all":
        label += " all"
    if cfg["algo"].startswith("ddppo"):
        extra = []
        if cfg.get("fd_k") != 10:
            extra.append(f"n={cfg['fd_k']}")
        if cfg.get("fd_weight") != PRESET_FD_WEIGHT.get(cfg["env"], 1.0):
            extra.append(f"w={cfg['fd_weight']:g}")
        if extra:
            label += " " + " ".join(extra)
    diag = []
    path = os.path.join(run_dir, "diagnostics.csv")
    if os.path.exists(path):
        with open(path) as f:
            diag = list(csv.DictReader(f))
    with open(os.path.join(run_dir, "metrics.csv")) as f:
        metrics = list(csv.DictReader(f))
    return cfg["env"], label, int(cfg["seed"]), diag, metrics


def _ms(values, fmt="{:.2f}"):
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "-"
    if len(values) == 1:
        return fmt.format(values[0])
    return (fmt + " ± " + fmt).format(float(np.mean(values)), float(np.std(values)))


def _key(label):
    base = [o for o in ORDER if label == o or label.startswith(o + " ")]
    return (ORDER.index(max(base, key=len)) if base else len(ORDER), label)


def collect(run_dirs):
    """``runs[(env, label)] = [(seed, diag rows, metrics rows)]``."""
    runs = defaultdict(list)
    for d in run_dirs:
        env, label, seed, diag, metrics = load(d)
        runs[(env, label)].append((seed, diag, metrics))
    for v in runs.values():
        v.sort(key=lambda r: r[0])
    return runs


def series(diag, kind, model, column):
    """``{env_steps: {horizon: value}}`` of one column of one kind of diagnostics row."""
    out = defaultdict(dict)
    for r in diag:
        if r["kind"] == kind and r["model"] == model and r[column] not in ("", None):
            h = int(r["horizon"]) if r["horizon"] else 0
            out[int(r["env_steps"])][h] = float(r[column])
    return out


def variance_tables(runs, horizons=(1, 5, 10, 20)):
    cols = [("trace_cov", "parameter space"), ("trace_cov_norm", "parameter space / ||theta||^2"),
            ("action_trace_cov", "w.r.t. the actions")]
    lines = []
    for column, title in cols:
        lines.append(f"\nGradient variance ({title}, `{column}`) at H = {', '.join(map(str, horizons))} "
                     "and its growth H = 20 over H = 1, by env step of the diagnostics:\n")
        lines.append("| env | algo | step | " + " | ".join(f"H = {h}" for h in horizons) + " | H20 / H1 |")
        lines.append("|---|---|---|" + "---|" * (len(horizons) + 1))
        for (env, label), rs in sorted(runs.items(), key=lambda kv: (kv[0][0], _key(kv[0][1]))):
            per = [series(d, "variance", "gradient" if label.startswith("ddppo") else "prediction", column)
                   for _, d, _ in rs]
            steps = sorted(set().union(*[set(p) for p in per])) if per else []
            for step in steps:
                vals = {h: [p[step].get(h, math.nan) for p in per if step in p] for h in horizons}
                ratio = [p[step][horizons[-1]] / p[step][horizons[0]] for p in per
                         if step in p and horizons[-1] in p[step] and horizons[0] in p[step]]
                fmt = "{:.3g}"
                lines.append(f"| {env} | `{label}` | {step // 1000}k | "
                             + " | ".join(_ms(vals[h], fmt) for h in horizons) + f" | {_ms(ratio, '{:.2g}')} |")
    return "\n".join(lines)


def growth_summary(runs, first_step=10_000, pairs=((1, 10), (1, 20)), level=20):
    """One row per env and algo, pooled over every seed and every diagnostics step from
    ``first_step`` on (robust to the heavy tails of single estimates): the median and interquartile
    range of the variance's growth ``V(H_hi) / V(H_lo)`` (the same for ``trace_cov`` and
    ``trace_cov_norm``, which only divides by the step's ``||theta||^2``) in parameter space and
    with respect to the actions, and of the level at ``H = level`` of the two quantities that
    compare across parameterisations (``trace_cov_norm``, ``action_trace_cov``)."""
    def cell(values):
        if not values:
            return "-"
        q1, med, q3 = np.percentile(values, [25, 50, 75])
        return f"{med:.3g} [{q1:.2g}-{q3:.2g}]"

    growth_cols = ("trace_cov", "action_trace_cov")
    level_cols = ("trace_cov_norm", "action_trace_cov")
    lines = [f"\nThe gradient variance against H, pooled over seeds and every diagnostics step from "
             f"{first_step // 1000}k on: median [25th-75th percentile]:\n",
             "| env | algo | measurements | " + " | ".join(f"`{c}` H{hi} / H{lo}" for c in growth_cols for lo, hi in pairs)
             + " | " + " | ".join(f"`{c}` at H = {level}" for c in level_cols) + " |",
             "|---|---|---|" + "---|" * (len(growth_cols) * len(pairs) + len(level_cols))]
    for (env, label), rs in sorted(runs.items(), key=lambda kv: (kv[0][0], _key(kv[0][1]))):
        cells, count = [], 0
        for c in growth_cols:
            per = [series(d, "variance", "prediction", c) for _, d, _ in rs]
            for lo, hi in pairs:
                ratios = [p[st][hi] / p[st][lo] for p in per for st in p
                          if st >= first_step and hi in p[st] and lo in p[st]]
                count = max(count, len(ratios))
                cells.append(cell(ratios))
        for c in level_cols:
            per = [series(d, "variance", "prediction", c) for _, d, _ in rs]
            cells.append(cell([p[st][level] for p in per for st in p if st >= first_step and level in p[st]]))
        lines.append(f"| {env} | `{label}` | {count} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def lipschitz_table(runs, horizons=(1, 5, 10, 20)):
    lines = ["\nLipschitz constants: the product of the layers' spectral norms (model's mean head, policy's "
             "mean head), the spectral norm of one model step's Jacobian d s'/d[s, a], and of the closed-loop "
             "H-step map d s_H / d s_0 through the model:\n",
             "| env | algo | step | model bound | policy bound | one step | " + " | ".join(
                 f"H = {h}" for h in horizons) + " |",
             "|---|---|---|---|---|---|" + "---|" * len(horizons)]
    for (env, label), rs in sorted(runs.items(), key=lambda kv: (kv[0][0], _key(kv[0][1]))):
        model = "gradient" if label.startswith("ddppo") else "prediction"
        cols = {c: [series(d, "lipschitz", model, c) for _, d, _ in rs]
                for c in ("model_lip_bound", "policy_lip_bound", "step_jac_norm", "unroll_jac_norm")}
        steps = sorted(set().union(*[set(p) for p in cols["unroll_jac_norm"]]))
        for step in steps:
            first = lambda c: [p[step][1] for p in cols[c] if step in p and 1 in p[step]]
            unroll = {h: [p[step].get(h, math.nan) for p in cols["unroll_jac_norm"] if step in p] for h in horizons}
            lines.append(f"| {env} | `{label}` | {step // 1000}k | {_ms(first('model_lip_bound'), '{:.3g}')} | "
                         f"{_ms(first('policy_lip_bound'), '{:.3g}')} | {_ms(first('step_jac_norm'), '{:.3g}')} | "
                         + " | ".join(_ms(unroll[h], "{:.3g}") for h in horizons) + " |")
    return "\n".join(lines)


def jacobian_table(runs):
    lines = ["\nModel Jacobian errors against MuJoCo's (relative Frobenius, state block d s'/d s and action "
             "block d s'/d a) and the prediction MSE, prediction model against gradient model:\n",
             "| env | algo | step | state: prediction | state: gradient | action: prediction | action: gradient "
             "| pred MSE: prediction | pred MSE: gradient | eval return |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for (env, label), rs in sorted(runs.items(), key=lambda kv: (kv[0][0], _key(kv[0][1]))):
        if not label.startswith("ddppo"):
            continue
        cols = {(m, c): [series(d, "jacobian", m, c) for _, d, _ in rs]
                for m in ("prediction", "gradient") for c in ("jac_state_err", "jac_action_err", "pred_mse")}
        steps = sorted(set().union(*[set(p) for p in cols[("gradient", "jac_state_err")]]))
        for step in steps:
            cell = lambda m, c: _ms([p[step][0] for p in cols[(m, c)] if step in p and 0 in p[step]])
            returns = [_float(r.get("eval_return_mean")) for _, _, metrics in rs for r in metrics
                       if int(r["env_steps"]) == step]
            lines.append(f"| {env} | `{label}` | {step // 1000}k | " + " | ".join(
                cell(m, c) for c in ("jac_state_err", "jac_action_err", "pred_mse")
                for m in ("prediction", "gradient")) + f" | {_ms(returns, '{:.0f}')} |")
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, out):
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def _band(ax, x, ys, label, marker=None):
    """Geometric mean over seeds with a band of +-1 std of log10 (the estimates are heavy-tailed
    and drawn on a log axis)."""
    logs = np.log10(np.asarray(ys, dtype=float))
    mean, std = np.nanmean(logs, axis=0), np.nanstd(logs, axis=0)
    line, = ax.plot(x, 10 ** mean, label=label, marker=marker)
    ax.fill_between(x, 10 ** (mean - std), 10 ** (mean + std), color=line.get_color(), alpha=0.2)


def _last_step_against_h(ax, runs, env, kind, column, title):
    """One line per algo of ``env``: ``column`` of the ``kind`` rows against H at the last
    diagnostics step (:func:`_band` over the seeds), log axis."""
    for (e, label), rs in sorted(runs.items(), key=lambda kv: _key(kv[0][1])):
        if e != env or label.startswith("ddppo"):
            continue
        per = [p for p in (series(d, kind, "prediction", column) for _, d, _ in rs) if p]
        if not per:
            continue
        last = max(max(p) for p in per)
        per = [p[last] for p in per if last in p]
        hs = sorted(set.intersection(*[set(p) for p in per]))
        _band(ax, hs, [[p[h] for h in hs] for p in per], f"{label} ({len(per)} seeds)")
    ax.set_yscale("log")
    ax.set_xlabel("unroll length H")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)


def variance_figure(runs, out):
    plt = _pyplot()
    envs = sorted({env for env, _ in runs})
    cols = [("trace_cov", "tr Cov(grad theta)"), ("trace_cov_norm", "tr Cov(grad theta) / ||theta||^2"),
            ("action_trace_cov", "tr Cov(grad a)")]
    fig, axes = plt.subplots(len(envs), len(cols), figsize=(5 * len(cols), 3.6 * len(envs)), squeeze=False)
    for i, env in enumerate(envs):
        for j, (column, title) in enumerate(cols):
            _last_step_against_h(axes[i][j], runs, env, "variance", column, f"{env}: {title}")
    _save(plt, fig, out)


def growth_figure(runs, out, lo=1, hi=20):
    """Growth of the variance from H = lo to H = hi over training (geometric mean over seeds with a
    band of +-1 std of the log)."""
    plt = _pyplot()
    envs = sorted({env for env, _ in runs})
    cols = [("trace_cov_norm", "tr Cov(grad theta) / ||theta||^2"), ("action_trace_cov", "tr Cov(grad a)")]
    fig, axes = plt.subplots(len(envs), len(cols), figsize=(5 * len(cols), 3.6 * len(envs)), squeeze=False)
    for i, env in enumerate(envs):
        for j, (column, title) in enumerate(cols):
            ax = axes[i][j]
            for (e, label), rs in sorted(runs.items(), key=lambda kv: _key(kv[0][1])):
                if e != env or label.startswith("ddppo"):
                    continue
                per = [series(d, "variance", "prediction", column) for _, d, _ in rs]
                per = [p for p in per if p]
                if not per:
                    continue
                steps = sorted(set.intersection(*[set(p) for p in per]))
                _band(ax, np.array(steps) / 1000, [[p[s][hi] / p[s][lo] for s in steps] for p in per],
                      f"{label} ({len(per)} seeds)", marker="o")
            ax.set_yscale("log")
            ax.set_xlabel("env steps (thousands)")
            ax.set_title(f"{env}: {title}, H = {hi} over H = {lo}", fontsize=9)
            ax.legend(fontsize=7)
    _save(plt, fig, out)


def lipschitz_figure(runs, out):
    plt = _pyplot()
    envs = sorted({env for env, _ in runs})
    fig, axes = plt.subplots(1, len(envs), figsize=(5 * len(envs), 3.6), squeeze=False)
    for i, env in enumerate(envs):
        _last_step_against_h(axes[0][i], runs, env, "lipschitz", "unroll_jac_norm",
                             f"{env}: ||d s_H / d s_0|| through the model")
    _save(plt, fig, out)


def jacobian_figure(runs, out):
    plt = _pyplot()
    envs = sorted({env for env, label in runs if label.startswith("ddppo")})
    if not envs:
        return False
    fig, axes = plt.subplots(1, len(envs), figsize=(5 * len(envs), 3.6), squeeze=False)
    for i, env in enumerate(envs):
        ax = axes[0][i]
        for c, ((e, label), rs) in enumerate(sorted(runs.items(), key=lambda kv: _key(kv[0][1]))):
            if e != env or not label.startswith("ddppo"):
                continue
            for model, style in (("prediction", "--"), ("gradient", "-")):
                per = [series(d, "jacobian", model, "jac_state_err") for _, d, _ in rs]
                per = [p for p in per if p]
                steps = sorted(set.intersection(*[set(p) for p in per]))
                ys = np.array([[p[s][0] for s in steps] for p in per])
                mean, std = ys.mean(0), ys.std(0)
                ax.errorbar(np.array(steps) / 1000, mean, yerr=std, linestyle=style, capsize=3, color=f"C{c}",
                            label=f"{label}: {model} model ({len(per)} seeds)")
        ax.set_xlabel("env steps (thousands)")
        ax.set_ylabel("relative error of d s'/d s")
        ax.set_title(f"{env}: model state Jacobian against MuJoCo's", fontsize=9)
        ax.legend(fontsize=7)
    _save(plt, fig, out)
    return True


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+")
    parser.add_argument("--img-dir", default=None, help="write the figures here (default: none)")
    args = parser.parse_args(argv)
    missing = [d for d in args.run_dirs if not os.path.exists(os.path.join(d, "config.json"))]
    if missing:
        print(f"report.py: not a run directory (no config.json): {missing[0]}", file=sys.stderr)
        return 2
    runs = collect(args.run_dirs)
    rp = {k: v for k, v in runs.items() if not k[1].startswith("ddppo")}
    print(growth_summary(rp))
    print(variance_tables(rp))
    print(lipschitz_table(rp))
    print(jacobian_table(runs))
    if args.img_dir:
        os.makedirs(args.img_dir, exist_ok=True)
        if rp:
            variance_figure(rp, os.path.join(args.img_dir, "repro_variance.png"))
            growth_figure(rp, os.path.join(args.img_dir, "repro_growth.png"))
            lipschitz_figure(rp, os.path.join(args.img_dir, "repro_lipschitz.png"))
        jacobian_figure(runs, os.path.join(args.img_dir, "repro_jacobian.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
