"""``python -m fastrp.sweep``: the command line (see :mod:`fastrp.sweep`)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from fastrp.sweep import spec as spec_mod
from fastrp.sweep.spec import SweepError
from fastrp.sweep.summary import format_table, summarize, write_curves, write_summary

PROG = "python -m fastrp.sweep"
INSTALL_HINT = ('Ray Tune is not installed; install the sweep extra: pip install "fastrp[sweep]" '
                '(in a fastrp checkout: pip install ".[sweep]")')
RESUME_OPTIONS = ("address", "num_cpus")
"""The only options a ``--resume`` may give: the rest of the sweep is read from DIR/.sweep/sweep.json."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line on stderr, exit code 2, no usage dump
        raise SweepError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG, allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run a grid of fastrp training runs on Ray (a local Ray instance, or a cluster with\n"
                    "--address). Every trial is an ordinary run directory DIR/<grid values> that\n"
                    "python -m fastrp.train --resume, python -m fastrp.plot and python -m fastrp.diagnostics\n"
                    "accept as is. At the end, and with --summary: DIR/summary.csv (per group of seeds: final and\n"
                    "best eval return mean +- std, IQM of the final eval return with a bootstrap 95% CI) and\n"
                    "DIR/curves_<env>.png.",
        epilog="examples:\n"
               f"  {PROG} --sweep-dir sweeps/ip --grid algo=sac,ddppo-sn --grid seed=0-4 --set env=InvertedPendulum\n"
               f"  {PROG} --resume sweeps/ip        # after the command was killed: runs only the unfinished trials\n"
               f"  {PROG} --summary sweeps/ip       # rebuild summary.csv and curves_<env>.png (also while running)\n"
               "exit codes: 0 every trial finished; 1 a trial failed, diverged or is unfinished (e.g. after\n"
               "Ctrl-C; the summary is still written), or Ray is not installed; 2 bad command line;\n"
               "130 a second Ctrl-C")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--sweep-dir", metavar="DIR",
                      help="start a new sweep in DIR (created; must not hold a sweep already)")
    mode.add_argument("--resume", metavar="DIR",
                      help="continue the sweep in DIR after the command was stopped or killed: finished trials are "
                           "kept, unfinished and failed ones continue from their own checkpoints; the grid and "
                           "settings are the ones DIR was started with (only --address and --num-cpus may be given)")
    mode.add_argument("--summary", metavar="DIR",
                      help="only rebuild DIR/summary.csv and DIR/curves_<env>.png from the run directories and print "
                           "the table (no Ray needed; works while the sweep runs)")
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                        help="a Config field and its values (repeatable; any field of python -m fastrp.train --help, "
                             "written with _ or -); integer fields take ranges too: seed=0-4 is seed=0,1,2,3,4. "
                             "The trials are every combination; each is named after its values, e.g. algo=sac,seed=0")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a Config field with one value for every trial (repeatable), e.g. env=Hopper")
    parser.add_argument("--address", metavar="ADDR",
                        help="address of a running Ray cluster (e.g. 10.0.0.1:6379, or auto); default: start a local "
                             "Ray instance for this command and stop it at the end")
    parser.add_argument("--num-cpus", type=int, metavar="N",
                        help="CPUs of the local Ray instance (default: all of this machine's); not with --address")
    parser.add_argument("--cpus-per-trial", type=int, default=1, metavar="N",
                        help="CPUs Ray reserves for each trial; the trial's trainer gets --cpu-threads N (default: 1)")
    parser.add_argument("--gpus-per-trial", type=float, default=0.0, metavar="G",
                        help="GPUs Ray reserves for each trial, fractions allowed (0.25: four trials share a GPU); "
                             "trials run on cuda when G > 0, else on cpu (default: 0)")
    parser.add_argument("--max-retries", type=int, default=2, metavar="N",
                        help="retries of a trial whose trainer or Ray worker died; each retry continues from the "
                             "trial's last checkpoint (default: 2). A diverged run (exit code 3) is a result, not "
                             "retried")
    parser.add_argument("--max-concurrent", type=int, default=0, metavar="N",
                        help="at most N trials at once (default: 0 = as many as the cluster's resources allow)")
    return parser


def _check(args: argparse.Namespace) -> None:
    defaults = vars(build_parser().parse_args(["--summary", "x"]))
    if args.resume or args.summary:
        allowed = RESUME_OPTIONS if args.resume else ()
        for key, value in vars(args).items():
            if key in ("sweep_dir", "resume", "summary") or key in allowed or value == defaults[key]:
                continue
            mode = "--resume" if args.resume else "--summary"
            raise SweepError(f"--{key.replace('_', '-')}: not allowed with {mode} (the sweep's grid and settings "
                             f"are kept in DIR/{spec_mod.STATE_DIR}/{spec_mod.SPEC_NAME})")
    if args.num_cpus is not None and (args.num_cpus < 1 or args.address):
        raise SweepError("--num-cpus: must be >= 1, and only for the local Ray instance (not with --address)")
    if args.cpus_per_trial < 1:
        raise SweepError(f"--cpus-per-trial: must be >= 1, got {args.cpus_per_trial}")
    if not args.gpus_per_trial >= 0:
        raise SweepError(f"--gpus-per-trial: must be >= 0, got {args.gpus_per_trial}")
    if args.gpus_per_trial > 1 and args.gpus_per_trial != int(args.gpus_per_trial):
        raise SweepError(f"--gpus-per-trial: above 1 it must be a whole number, got {args.gpus_per_trial}")
    if args.max_retries < 0:
        raise SweepError(f"--max-retries: must be >= 0, got {args.max_retries}")
    if args.max_concurrent < 0:
        raise SweepError(f"--max-concurrent: must be >= 0, got {args.max_concurrent}")


def _new_spec(args: argparse.Namespace, argv: Sequence[str]) -> dict:
    sweep_dir = os.path.abspath(args.sweep_dir)
    if os.path.exists(spec_mod.spec_path(sweep_dir)):
        raise SweepError(f"--sweep-dir {args.sweep_dir}: already holds a sweep; continue it with "
                         f"{PROG} --resume {args.sweep_dir}, or choose another directory")
    trials = spec_mod.build_trials(args.set, args.grid, sweep_dir, args.cpus_per_trial, args.gpus_per_trial)
    grid = []
    for trial in trials:
        for key, value in trial.values.items():
            entry = next((g for g in grid if g[0] == key), None)
            if entry is None:
                grid.append([key, [value]])
            elif value not in entry[1]:
                entry[1].append(value)
    return {"version": spec_mod.SPEC_VERSION, "command": [PROG, *argv], "set": list(args.set), "grid": grid,
            "cpus_per_trial": args.cpus_per_trial, "gpus_per_trial": args.gpus_per_trial,
            "max_retries": args.max_retries, "max_concurrent": args.max_concurrent,
            "trials": [dict(t.__dict__) for t in trials]}


def _results(sweep_dir: str, spec: dict, statuses: dict) -> None:
    header, rows = summarize(sweep_dir, spec, {name: s == "done" for name, s in statuses.items()})
    if not rows:
        print(f"{PROG}: no trial has an evaluation yet; no summary written", file=sys.stderr)
        return
    path = write_summary(sweep_dir, header, rows)
    print(format_table(header, rows))
    print(f"wrote {path}")
    for out in write_curves(sweep_dir, spec):
        print(f"wrote {out}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI entry point; returns the exit code (see ``--help``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
        _check(args)
        if args.summary:
            sweep_dir = os.path.abspath(args.summary)
            spec = spec_mod.load_spec(sweep_dir, "--summary")
            _results(sweep_dir, spec, _record_statuses(sweep_dir, spec))
            return 0
        if args.resume:
            sweep_dir = os.path.abspath(args.resume)
            spec = spec_mod.load_spec(sweep_dir, "--resume")
            spec_mod.revalidate(spec_mod.trials_of(spec))
        else:
            sweep_dir = os.path.abspath(args.sweep_dir)
            spec = _new_spec(args, argv)
    except SweepError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    try:
        from fastrp.sweep import ray_tune
    except ImportError:
        print(f"{PROG}: error: {INSTALL_HINT}", file=sys.stderr)
        return 1
    try:
        ray_tune.connect(args.address, args.num_cpus, ray_tune.trial_resources(spec))
    except SweepError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    if not args.resume:
        spec_mod.save_spec(sweep_dir, spec)
    trials = spec_mod.trials_of(spec)
    print(f"{PROG}: {len(trials)} trials in {sweep_dir} ({' x '.join(f'{k} {len(v)}' for k, v in spec['grid'])}); "
          f"trainer logs in {os.path.join(sweep_dir, spec_mod.STATE_DIR, 'logs')}", file=sys.stderr)
    try:
        statuses = ray_tune.run_sweep(spec, sweep_dir, resume=bool(args.resume))
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; continue with {PROG} --resume {sweep_dir}", file=sys.stderr)
        return 130
    _results(sweep_dir, spec, statuses)
    unfinished = [n for n, s in statuses.items() if s not in ("done", "diverged", "failed")]
    bad = [f"{n} ({s})" for n, s in statuses.items() if s in ("diverged", "failed")]
    if bad:
        print(f"{PROG}: {len(bad)} trials did not finish: {', '.join(bad)}; their logs are in "
              f"{os.path.join(sweep_dir, spec_mod.STATE_DIR, 'logs')}", file=sys.stderr)
    if unfinished:
        print(f"{PROG}: {len(unfinished)} trials unfinished; continue with {PROG} --resume {sweep_dir}",
              file=sys.stderr)
    return 1 if bad or unfinished else 0


def _record_statuses(sweep_dir: str, spec: dict) -> dict:
    return {t.name: str(spec_mod.read_record(sweep_dir, t.name)["status"]) for t in spec_mod.trials_of(spec)}


if __name__ == "__main__":
    sys.exit(main())
