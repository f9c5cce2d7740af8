"""``python -m fastrp.diagnostics``: gradient diagnostics of saved runs.

``variance RUN_DIR [RUN_DIR ...]``
    For each run's checkpoint: the trace of the covariance and the mean norm of the model-based
    RP policy gradient for unroll lengths ``H = --min-horizon .. --max-horizon`` (maac, rp-sn,
    ddppo, ddppo-sn). Prints a table, appends the rows to ``<run_dir>/diagnostics_cli.csv`` (or
    all to ``--csv PATH``) and draws one line per run into ``--out`` (default
    ``<first run_dir>/variance.png``).

``jacobian RUN_DIR``
    The relative error of the prediction model's (and for ddppo / ddppo-sn the gradient
    model's) Jacobians against MuJoCo's on fresh held-out transitions of the current policy, and
    their prediction error (mbpo, maac, rp-sn, ddppo, ddppo-sn). Prints a table, appends the rows
    like ``variance`` and plots the run's training-time ``diagnostics.csv`` jacobian rows against
    env steps with the checkpoint's point added (``--out``, default ``<run_dir>/jacobian.png``).

Sizes default to the run's ``diag_*`` config and the generators to the same seeds the training
hook uses at the checkpoint's step, so with default options the printed numbers equal the
training-time row of that step. Exit codes: 0 done, 2 bad input (one line on stderr).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, List, Optional, Sequence

import torch

from fastrp.diagnostics.run import (COLUMNS, DIAG_CSV, LoadedRun, RunError, Settings, append_rows, jacobian_rows,
                                    load_run, read_rows, supports_variance, variance_rows)

CLI_CSV = "diagnostics_cli.csv"
"""Default CSV (inside each run directory) of the command line's rows."""

CLI_COLUMNS = ["run_dir", "env", "algo", "seed"] + COLUMNS
"""Columns of the command line's CSV: the run, then :data:`fastrp.diagnostics.run.COLUMNS`."""

PROG = "python -m fastrp.diagnostics"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line on stderr, exit code 2, no usage dump
        raise RunError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, allow_abbrev=False,
                     description="Gradient diagnostics of fastrp runs (papers 000 and 003).")
    sub = parser.add_subparsers(dest="command", metavar="{variance,jacobian}")
    sub.required = True

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--seed", type=int, default=None,
                       help="base seed of the diagnostic's generators (default: the run's seed, as in training)")
        p.add_argument("--device", default="cpu", help="torch device to measure on (default: cpu)")
        p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
        p.add_argument("--csv", default=None,
                       help=f"append the rows to this CSV (default: <run_dir>/{CLI_CSV} of each run)")
        p.add_argument("--out", default=None, help="output PNG path")

    var = sub.add_parser("variance", allow_abbrev=False,
                         help="policy-gradient variance against the unroll length H",
                         description="Trace of the covariance and mean norm of the model-based RP policy gradient "
                                     "from independent minibatches of a fixed pool of replay-buffer states, for "
                                     "each H; one line per run in the plot.")
    var.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    var.add_argument("--min-horizon", type=int, default=1, help="smallest H (default 1; 0 = SAC's model-free gradient)")
    var.add_argument("--max-horizon", type=int, default=None, help="largest H (default: the run's diag_max_horizon)")
    var.add_argument("--states", type=int, default=None, help="start-state pool size (default: diag_states)")
    var.add_argument("--batch", type=int, default=None, help="start states per minibatch (default: diag_batch)")
    var.add_argument("--samples", type=int, default=None, help="gradient samples per H, >= 2 (default: diag_samples)")
    common(var)

    jac = sub.add_parser("jacobian", allow_abbrev=False,
                         help="model Jacobian error against MuJoCo's true Jacobians",
                         description="Relative Frobenius error of the models' ds'/ds and ds'/da against MuJoCo's, "
                                     "and their prediction MSE, on fresh held-out transitions; the plot shows the "
                                     "training-time diagnostics.csv rows and this checkpoint's point.")
    jac.add_argument("run_dir", metavar="RUN_DIR")
    jac.add_argument("--transitions", type=int, default=None, help="held-out transitions (default: diag_transitions)")
    jac.add_argument("--rollout-steps", type=int, default=None,
                     help="length of the fresh rollouts they are drawn from (default: diag_rollout_steps)")
    common(jac)
    return parser


def _settings(run: LoadedRun, args: argparse.Namespace) -> Settings:
    s = Settings.from_config(run.cfg)
    for field in ("min_horizon", "max_horizon", "states", "batch", "samples", "transitions", "rollout_steps"):
        value = getattr(args, field, None)  # options of the other subcommand are absent: keep the config's
        if value is not None:
            setattr(s, field, value)
    try:
        s.validate()
    except ValueError as err:
        raise RunError(f"--{str(err).replace('_', '-')}") from None
    return s


def _cli_rows(run: LoadedRun, rows: Sequence[Dict[str, object]]) -> List[Dict[str, object]]:
    meta = {"run_dir": run.run_dir, "env": run.cfg.env, "algo": run.cfg.algo, "seed": run.cfg.seed}
    return [{**meta, **row} for row in rows]


def _write_csv(args: argparse.Namespace, run: LoadedRun, rows: Sequence[Dict[str, object]]) -> str:
    path = args.csv or os.path.join(run.run_dir, CLI_CSV)
    try:
        append_rows(path, _cli_rows(run, rows), CLI_COLUMNS)
    except (ValueError, OSError) as err:
        raise RunError(f"--csv: {err}") from None
    return path


def _fmt(value, width: int = 12) -> str:
    if value is None or value == "":
        return "-".rjust(width)
    if isinstance(value, float):
        return f"{value:{width}.4g}"
    return str(value).rjust(width)


def _label(run: LoadedRun) -> str:
    return f"{run.cfg.algo} s{run.cfg.seed} @{run.step}"


def cmd_variance(args: argparse.Namespace) -> int:
    from fastrp.plot import variance_figure

    runs = [load_run(d, args.device) for d in args.run_dirs]
    for run in runs:  # check every run before measuring any
        if not supports_variance(run.agent):
            raise RunError(f"{run.run_dir}: algorithm {run.cfg.algo!r} has no model-based policy gradient; "
                           f"variance needs maac, rp-sn, ddppo or ddppo-sn")
    all_settings = [_settings(run, args) for run in runs]
    curves, written = [], []
    print(f"{'run':<28}{'H':>4}{'trace_cov':>14}{'mean_grad_norm':>16}")
    for run, settings in zip(runs, all_settings):
        rows = variance_rows(run.agent, run.buffer, run.cfg, run.step, settings, seed=args.seed)
        for row in rows:
            print(f"{_label(run):<28}{row['horizon']:>4}{_fmt(row['trace_cov'], 14)}{_fmt(row['mean_grad_norm'], 16)}")
        written.append(_write_csv(args, run, rows))
        curves.append((_label(run), [r["horizon"] for r in rows], [r["trace_cov"] for r in rows],
                       [r["mean_grad_norm"] for r in rows]))
    envs = sorted({run.cfg.env for run in runs})
    first, settings = runs[0], all_settings[0]
    title = (f"{', '.join(envs)}: RP policy-gradient variance, {settings.samples} minibatches of {settings.batch} "
             f"start states per H")
    out = args.out or os.path.join(first.run_dir, "variance.png")
    variance_figure(curves, out, title=title)
    print(f"rows appended to {', '.join(sorted(set(written)))}; plot {out}")
    return 0


def cmd_jacobian(args: argparse.Namespace) -> int:
    from fastrp.plot import jacobian_figure

    run = load_run(args.run_dir, args.device)
    settings = _settings(run, args)
    rows = jacobian_rows(run.agent, run.cfg, run.step, settings, seed=args.seed)
    print(f"{'model':<12}{'env_steps':>10}{'jac_state_err':>15}{'jac_action_err':>16}{'pred_mse':>12}{'transitions':>13}")
    for row in rows:
        print(f"{row['model']:<12}{row['env_steps']:>10}{_fmt(row['jac_state_err'], 15)}"
              f"{_fmt(row['jac_action_err'], 16)}{_fmt(row['pred_mse'], 12)}{row['samples']:>13}")
    path = _write_csv(args, run, rows)
    history = [r for r in read_rows(os.path.join(run.run_dir, DIAG_CSV)) if r.get("kind") == "jacobian"]
    out = args.out or os.path.join(run.run_dir, "jacobian.png")
    title = f"{run.cfg.env}, {run.cfg.algo} seed {run.cfg.seed}: model gradient error on held-out real transitions"
    jacobian_figure(history, rows, out, title=title)
    print(f"rows appended to {path}; plot {out} ({len(history)} training-time rows from {DIAG_CSV})")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI entry point; returns the exit code (0 done, 2 bad input)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
        if args.threads < 1:
            raise RunError(f"--threads: must be >= 1, got {args.threads}")
        try:
            device = torch.device(args.device)
        except RuntimeError:
            raise RunError(f"--device: not a torch device: {args.device!r}") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RunError("--device: cuda requested but torch has no CUDA device")
        torch.set_num_threads(args.threads)
        return cmd_variance(args) if args.command == "variance" else cmd_jacobian(args)
    except RunError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
