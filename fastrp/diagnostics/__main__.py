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

``bias RUN_DIR``
    The model's bias in the imagined objective (maac, rp-sn, ddppo, ddppo-sn): the H-step value
    the policy maximises through the prediction model against the same value through MuJoCo, from
    ``--states`` on-policy states of fresh copies of the task with the same policy noise
    (:mod:`fastrp.diagnostics.bias`), for each H of ``--horizons``. Prints a table and appends the
    rows to ``<run_dir>/model_bias.csv`` (or ``--csv PATH``).

Sizes default to the run's ``diag_*`` config, the generators to the seeds the training hook
uses at the checkpoint's step, the device to the one the run trained on (its config's
``device``; for ``auto``, cuda when the checkpoint's RNG state shows CUDA was in use, else cpu;
a run that trained on cuda is measured on cpu, with a note on stderr, where torch has no CUDA
device) and the CPU threads to the run's ``cpu_threads``. Runs are
checked first (directory, checkpoint, algorithm, options: from ``config.json``, or the
checkpoint's config where it is missing), then loaded, measured and released one at a time.

When the rows reproduce the training-time ones: only for a checkpoint written at a step that had
a training diagnostics pass (``diag_every > 0``; the first log row at or past a multiple of
``diag_every``, after warm-up), and only with the run's sizes (no ``--states``, ``--batch``,
``--samples``, ``--transitions``, ``--rollout-steps`` overrides) and seed (no ``--seed``); for
``variance``, the rows of H = 1 .. ``diag_max_horizon`` (the horizon range options do not change
the row of a given H: each H redraws the same minibatches). Then, on CPU with the run's
``cpu_threads`` (the defaults, when the run trained on CPU) and the same torch / fastrp build, the
rows equal the training-time ``diagnostics.csv`` rows of that step exactly; on CUDA (the default
for a CUDA-trained run where CUDA is available) they agree up to floating-point rounding (some
CUDA kernels are not bit-for-bit deterministic). With another ``--threads`` on CPU they agree
up to floating-point rounding. On another device type than training's (``--device``, or the cpu
fallback for a CUDA-trained run) the generators are other generators (CPU and CUDA random
streams differ), so - like other sizes or another seed - that gives a new, independent
measurement of the same quantities, not a reproduction.
Exit codes: 0 done, 2 bad input (one line on stderr).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from typing import Dict, List, Optional, Sequence

import torch

from fastrp.config import Config
from fastrp.diagnostics.run import (BIAS_STREAM, COLUMNS, DIAG_CSV, JACOBIAN_ALGOS, VARIANCE_ALGOS, LoadedRun, RunError,
                                    Settings, append_rows, diag_seed, jacobian_rows, load_run, measurement_device,
                                    read_config, read_rows, supports_jacobian, supports_variance, variance_rows)

CLI_CSV = "diagnostics_cli.csv"
"""Default CSV (inside each run directory) of the command line's rows."""

CLI_COLUMNS = ["run_dir", "env", "algo", "seed"] + COLUMNS
"""Columns of the command line's CSV: the run, then :data:`fastrp.diagnostics.run.COLUMNS`."""

PROG = "python -m fastrp.diagnostics"

BIAS_CSV = "model_bias.csv"
"""Default CSV (inside the run directory) of ``bias`` rows."""

BIAS_COLUMNS = ["run_dir", "env", "algo", "seed", "env_steps", "horizon", "model_return", "real_return", "model_reward",
                "real_reward", "model_terminal", "real_terminal", "model_alive", "real_alive", "rms_error",
                "real_spread", "correlation", "states"]
"""Columns of ``model_bias.csv`` (see :func:`fastrp.diagnostics.bias.imagined_vs_real`)."""

REPRODUCE = ("With the defaults (the run's sizes, seed, device type and cpu_threads) the rows reproduce the "
             "training-time diagnostics.csv rows of the checkpoint's step, when that step had a diagnostics pass and "
             "the torch / fastrp build is the same: exactly on CPU, up to floating-point rounding on CUDA. Another --threads changes them by rounding at "
             "most; another device type (CPU and CUDA draw different random numbers), sizes or --seed give a new "
             "measurement.")
"""The help text's note on when the command's rows equal the training-time rows."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line on stderr, exit code 2, no usage dump
        raise RunError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, allow_abbrev=False,
                     description="Gradient diagnostics of fastrp runs (papers 000 and 003).", epilog=REPRODUCE)
    sub = parser.add_subparsers(dest="command", metavar="{variance,jacobian,bias}")
    sub.required = True

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--seed", type=int, default=None,
                       help="base seed of the diagnostic's generators (default: the run's seed, as in training)")
        p.add_argument("--device", default=None,
                       help="torch device to measure on (default: the device the run trained on; cpu, with a note, "
                            "when that is cuda and torch has no CUDA device here). Only on "
                            "the device type training used do the rows reproduce the training-time rows of the "
                            "checkpoint's step: CPU and CUDA draw different random minibatches")
        p.add_argument("--threads", type=int, default=None,
                       help="torch CPU threads (default: the run's cpu_threads; on CPU another count may change "
                            "the rows by floating-point rounding)")
        p.add_argument("--csv", default=None,
                       help=f"append the rows to this CSV (default: <run_dir>/{CLI_CSV} of each run)")
        p.add_argument("--out", default=None, help="output PNG path")

    var = sub.add_parser("variance", allow_abbrev=False,
                         help="policy-gradient variance against the unroll length H",
                         description="Trace of the covariance and mean norm of the model-based RP policy gradient "
                                     "from independent minibatches of a fixed pool of replay-buffer states, for "
                                     "each H; one line per run in the plot.", epilog=REPRODUCE)
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
                                     "training-time diagnostics.csv rows and this checkpoint's point.",
                         epilog=REPRODUCE)
    jac.add_argument("run_dir", metavar="RUN_DIR")
    jac.add_argument("--transitions", type=int, default=None, help="held-out transitions (default: diag_transitions)")
    jac.add_argument("--rollout-steps", type=int, default=None,
                     help="length of the fresh rollouts they are drawn from (default: diag_rollout_steps)")
    common(jac)

    bias = sub.add_parser("bias", allow_abbrev=False,
                          help="model bias of the imagined objective against the same objective through MuJoCo",
                          description="The H-step value the policy maximises (paper 003 eq. 11), through the "
                                      "prediction model and through the simulator, from the same on-policy states "
                                      "with the same policy noise: means, their per-state RMS difference and "
                                      "correlation, for each H.")
    bias.add_argument("run_dir", metavar="RUN_DIR")
    bias.add_argument("--horizons", default="0,1,2,3,5,10",
                      help="comma-separated unroll lengths H >= 0 (default 0,1,2,3,5,10; at H = 0 both values are "
                           "equal by construction)")
    bias.add_argument("--states", type=int, default=256, help="start states = parallel copies of the task (default 256)")
    bias.add_argument("--policy-steps", type=int, default=100,
                      help="steps of the current policy before the start states are taken (default 100)")
    bias.add_argument("--seed", type=int, default=None,
                      help="seed of the env copies and the noise (default: from the run's seed and step)")
    bias.add_argument("--device", default=None, help="torch device to measure on (default: the run's)")
    bias.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: the run's cpu_threads)")
    bias.add_argument("--csv", default=None, help=f"append the rows to this CSV (default: <run_dir>/{BIAS_CSV})")
    return parser


def _settings(cfg: Config, args: argparse.Namespace) -> Settings:
    s = Settings.from_config(cfg)
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


def _prepare(run: LoadedRun, args: argparse.Namespace) -> None:
    """Print the device note (stderr) and set the CPU threads for measuring ``run``."""
    if run.note:
        print(f"note: {run.run_dir}: {run.note}", file=sys.stderr)
    torch.set_num_threads(args.threads if args.threads is not None else run.cfg.cpu_threads)


def _release(on_cuda: bool) -> None:
    """Free the memory of the run the caller has just dropped (its agent and replay buffer, on the
    host and on the device) before the next run is loaded."""
    gc.collect()
    if on_cuda:
        torch.cuda.empty_cache()


def cmd_variance(args: argparse.Namespace) -> int:
    from fastrp.plot import variance_figure

    # check every run (directory, checkpoint, algorithm, options) before loading or measuring any
    for run_dir in args.run_dirs:
        cfg = read_config(run_dir)
        if cfg.algo not in VARIANCE_ALGOS:
            raise RunError(f"{run_dir}: algorithm {cfg.algo!r} has no model-based policy gradient; "
                           f"variance needs maac, rp-sn, ddppo or ddppo-sn")
        _settings(cfg, args)
    curves, written, envs, first_settings = [], [], set(), None
    print(f"{'run':<28}{'H':>4}{'trace_cov':>14}{'mean_grad_norm':>16}{'trace_cov_norm':>16}{'action_grad_sq':>16}")
    for run_dir in args.run_dirs:  # one run in memory at a time (a replay buffer can take GBs)
        run = load_run(run_dir, args.device)
        if not supports_variance(run.agent):
            raise RunError(f"{run.run_dir}: algorithm {run.cfg.algo!r} has no model-based policy gradient; "
                           f"variance needs maac, rp-sn, ddppo or ddppo-sn")
        _prepare(run, args)
        settings = _settings(run.cfg, args)
        first_settings = first_settings or settings
        rows = variance_rows(run.agent, run.buffer, run.cfg, run.step, settings, seed=args.seed)
        for row in rows:
            print(f"{_label(run):<28}{row['horizon']:>4}{_fmt(row['trace_cov'], 14)}{_fmt(row['mean_grad_norm'], 16)}"
                  f"{_fmt(row['trace_cov_norm'], 16)}{_fmt(row['action_grad_sq'], 16)}")
        written.append(_write_csv(args, run, rows))
        curves.append((_label(run), [r["horizon"] for r in rows], [r["trace_cov"] for r in rows],
                       [r["mean_grad_norm"] for r in rows]))
        envs.add(run.cfg.env)
        on_cuda = run.buffer.device.type == "cuda"
        del run
        _release(on_cuda)
    title = (f"{', '.join(sorted(envs))}: RP policy-gradient variance, {first_settings.samples} minibatches of "
             f"{first_settings.batch} start states per H")
    out = args.out or os.path.join(args.run_dirs[0], "variance.png")
    variance_figure(curves, out, title=title)
    print(f"rows appended to {', '.join(sorted(set(written)))}; plot {out}")
    return 0


def cmd_jacobian(args: argparse.Namespace) -> int:
    from fastrp.plot import jacobian_figure

    cfg = read_config(args.run_dir)
    if cfg.algo not in JACOBIAN_ALGOS:
        raise RunError(f"algorithm {cfg.algo!r} has no dynamics model: the jacobian diagnostic needs mbpo, maac, "
                       f"rp-sn, ddppo or ddppo-sn")
    _settings(cfg, args)
    run = load_run(args.run_dir, args.device)
    if not supports_jacobian(run.agent):
        raise RunError(f"algorithm {run.cfg.algo!r} has no dynamics model: the jacobian diagnostic needs mbpo, "
                       f"maac, rp-sn, ddppo or ddppo-sn")
    _prepare(run, args)
    settings = _settings(run.cfg, args)
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


def _horizons(text: str) -> List[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip() != ""]
    except ValueError:
        values = []
    if not values or min(values) < 0:
        raise RunError(f"--horizons: expected comma-separated ints >= 0, got {text!r}")
    return values


def cmd_bias(args: argparse.Namespace) -> int:
    from fastrp.diagnostics.bias import imagined_vs_real
    from fastrp.envs import make

    horizons = _horizons(args.horizons)
    for name in ("states", "policy_steps"):
        value = getattr(args, name)
        if value < (1 if name == "states" else 0) or value > 1 << 16:
            low = 1 if name == "states" else 0
            raise RunError(f"--{name.replace('_', '-')}: must be in [{low}, 65536], got {value}")
    cfg = read_config(args.run_dir)
    if cfg.algo not in VARIANCE_ALGOS:
        raise RunError(f"algorithm {cfg.algo!r} has no model-based policy objective; bias needs maac, rp-sn, ddppo "
                       f"or ddppo-sn")
    run = load_run(args.run_dir, args.device)
    _prepare(run, args)
    seed = diag_seed(run.cfg.seed if args.seed is None else args.seed, run.step, BIAS_STREAM) % (2 ** 31)
    env = make(run.cfg.env, args.states, seed=seed, num_threads=1)
    rows = []
    try:
        limit = env.max_episode_steps
        if limit is not None and args.policy_steps + max(horizons) >= limit:
            raise RunError(f"--policy-steps + the largest of --horizons must be < the task's time limit {limit} (an "
                           f"episode cut inside the window would restart the real pass), got "
                           f"{args.policy_steps + max(horizons)}")
        print(f"{'H':>4}{'model_return':>14}{'real_return':>13}{'rms_error':>11}{'real_spread':>13}{'correlation':>13}")
        for h in horizons:
            values = imagined_vs_real(run.agent, env, h, seed, warmup_steps=args.policy_steps)
            rows.append({"run_dir": run.run_dir, "env": run.cfg.env, "algo": run.cfg.algo, "seed": run.cfg.seed,
                         "env_steps": run.step, "horizon": h, **values})
            print(f"{h:>4}{_fmt(values['model_return'], 14)}{_fmt(values['real_return'], 13)}"
                  f"{_fmt(values['rms_error'], 11)}{_fmt(values['real_spread'], 13)}{_fmt(values['correlation'], 13)}")
    finally:
        env.close()
    path = args.csv or os.path.join(run.run_dir, BIAS_CSV)
    try:
        append_rows(path, rows, BIAS_COLUMNS)
    except (ValueError, OSError) as err:
        raise RunError(f"--csv: {err}") from None
    print(f"rows appended to {path}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI entry point; returns the exit code (0 done, 2 bad input)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
        if args.threads is not None and args.threads < 1:
            raise RunError(f"--threads: must be >= 1, got {args.threads}")
        if args.device is not None:
            measurement_device("cpu", args.device)  # a bad or unavailable --device fails before any run is read
        return {"variance": cmd_variance, "jacobian": cmd_jacobian, "bias": cmd_bias}[args.command](args)
    except RunError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
