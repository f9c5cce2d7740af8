"""The Ray side of a sweep: the Tune trainable that runs one trial, the live progress line, and
the driver that starts (or restores) the Tune experiment.

Ray Tune owns the trial state (pending / running / terminated / errored, saved under
``DIR/.sweep/tune`` and restored by ``--resume``), the retries (``FailureConfig.max_failures``),
the resources of each trial and the concurrency. Each trial is one fastrp run directory
``DIR/<name>``; its Ray worker runs the trainer as a child process (:mod:`fastrp.sweep.child`)
and continues from the run's own ``checkpoint.pt`` whenever one exists, so a retried or resumed
trial never starts over. A per-trial lock (``flock``, held by the trainer process) makes a retry
wait until the trainer of a killed attempt is gone, and a per-trial record
(``DIR/.sweep/trials/<name>.json``: status and every attempt) lets a finished trial that Tune's
last saved state still shows as unfinished return at once instead of running again.
"""

from __future__ import annotations

import fcntl
import logging
import math
import os
import socket
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence

import ray
from ray import tune

from fastrp.rl.checkpoint import CHECKPOINT_NAME  # what python -m fastrp.train --resume reads
from fastrp.sweep.spec import (SweepError, Trial, log_path, read_record, record_path, state_dir, trials_of,
                               write_json_atomic)
from fastrp.sweep.summary import read_rows, run_result
from fastrp.train import EXIT_DIVERGED  # a diverged run is a result, not a crash: not retried


POLL_S = 1.0
TUNE_NAME = "tune"


class TrialFailed(RuntimeError):
    """The trainer of an attempt exited with an error (Tune retries the trial)."""


def _acquire_lock(path: str, log) -> int:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    waited = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if not waited:
                log.write(f"[sweep] waiting for the trainer of an earlier attempt to exit ({path} is locked)\n")
                log.flush()
                waited = True
            time.sleep(POLL_S)


def _report(rows: List[Dict[str, str]], target: int, exit_code: Optional[int] = None) -> None:
    result = run_result(rows)
    metrics: Dict[str, object] = {"env_steps": result["env_steps"], "steps_target": target}
    if rows and rows[-1].get("eval_return_mean") not in (None, ""):
        metrics["eval_return_mean"] = float(rows[-1]["eval_return_mean"])
    for key in ("final", "best"):
        if result[key] is not None:
            metrics[f"{key}_eval"] = result[key]
    if exit_code is not None:
        metrics["exit_code"] = exit_code
    tune.report(metrics)


def run_trial(config: Dict[str, object]) -> None:
    """Tune function trainable: one attempt at the trial ``config["trial"]`` (a :class:`Trial` as a
    dict) of the sweep in ``config["sweep_dir"]``. Starts the run, or resumes it from its own
    checkpoint when the run directory has one, reports each new ``metrics.csv`` row to Tune, and
    raises :class:`TrialFailed` when the trainer fails (exit code other than 0 and 3)."""
    trial = Trial(**config["trial"])  # type: ignore[arg-type]
    sweep_dir = str(config["sweep_dir"])
    run_dir = os.path.join(sweep_dir, trial.name)
    record = read_record(sweep_dir, trial.name)
    if record["status"] in ("done", "diverged"):  # finished after Tune last saved its state
        code = int(record["attempts"][-1]["exit_code"])  # type: ignore[index]
        with open(log_path(sweep_dir, trial.name), "a") as log:
            log.write(f"[sweep] already finished (trainer exit code {code}): not run again\n")
        _report(read_rows(run_dir), trial.steps, code)
        return
    os.makedirs(os.path.dirname(log_path(sweep_dir, trial.name)), exist_ok=True)
    with open(log_path(sweep_dir, trial.name), "a") as log:
        lock = _acquire_lock(os.path.join(state_dir(sweep_dir), "locks", f"{trial.name}.lock"), log)
        try:
            resumed = os.path.isfile(os.path.join(run_dir, CHECKPOINT_NAME))
            argv = ["--resume", run_dir] if resumed else list(trial.argv)
            command = [sys.executable, "-m", "fastrp.sweep.child", str(os.getpid()), "--", *argv]
            attempt = {"started": time.time(), "host": socket.gethostname(), "worker_pid": os.getpid(),
                       "resumed": resumed, "argv": argv}
            log.write(f"[sweep] attempt {len(record['attempts']) + 1} on {attempt['host']}: "  # type: ignore[arg-type]
                      f"python -m fastrp.train {' '.join(argv)}\n")
            log.flush()
            proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    pass_fds=(lock,))
            try:
                attempt["trainer_pid"] = proc.pid
                record["status"] = "running"
                record["attempts"].append(attempt)  # type: ignore[union-attr]
                write_json_atomic(record_path(sweep_dir, trial.name), record)
                code, rows = _follow(proc, run_dir, trial.steps)
            finally:
                if proc.poll() is None:  # this worker failed, not the trainer: stop it before a retry
                    proc.terminate()
                    proc.wait()
        finally:
            os.close(lock)
        attempt["exit_code"], attempt["ended"] = code, time.time()
        record["status"] = {0: "done", EXIT_DIVERGED: "diverged"}.get(code, "failed")
        write_json_atomic(record_path(sweep_dir, trial.name), record)
        log.write(f"[sweep] trainer exited with {code}\n")
    if code in (0, EXIT_DIVERGED):
        _report(rows, trial.steps, code)
        return
    raise TrialFailed(f"trial {trial.name}: the trainer exited with {_describe(code)}; "
                      f"last line of {log_path(sweep_dir, trial.name)}: {_last_line(log_path(sweep_dir, trial.name))}")


def _follow(proc: subprocess.Popen, run_dir: str, target: int):
    """Wait for the trainer, reporting each new metrics row to Tune; returns (exit code, rows)."""
    reported = -1
    while True:
        code = proc.poll()
        rows = read_rows(run_dir)
        if code is not None:
            return code, rows
        last = int(rows[-1]["env_steps"]) if rows and rows[-1]["env_steps"].isdigit() else -1
        if last > reported:
            _report(rows, target)
            reported = last
        time.sleep(POLL_S)


def _describe(code: int) -> str:
    return f"signal {-code}" if code < 0 else f"exit code {code}"


def _last_line(path: str) -> str:
    try:
        with open(path, errors="replace") as fh:
            lines = [line.strip() for line in fh if line.strip() and not line.startswith("[sweep]")]
    except OSError:
        return "-"
    return lines[-1] if lines else "-"


def _trial_name(trial) -> str:
    return str(trial.config["trial"]["name"])


# ---- live progress ------------------------------------------------------------------------------------
def duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class ProgressLine(tune.Callback):
    """One status line on stderr: trials done / running / failed / pending, the best eval
    return so far (per env), env steps and an ETA from the env-step rate of this command.
    Rewritten in place on a terminal; otherwise printed when a count changes and every
    ``every`` seconds. ``grid`` maps every trial's name to its env steps: with
    ``--max-concurrent``, Tune creates trials only as slots free up, so the ones it has not
    created yet are counted here as pending."""

    def __init__(self, grid: Dict[str, int], every: float = 30.0):
        self.grid, self.every = dict(grid), every
        self.setup()

    def setup(self, **info):
        self.t0 = time.monotonic()
        self.baseline: Dict[str, int] = {}
        self.last_line, self.last_print, self.last_counts = "", 0.0, None

    def line(self, trials) -> str:
        counts = {"done": 0, "running": 0, "failed": 0, "pending": 0}
        best: Dict[str, tuple] = {}
        done_steps = total_steps = gained = 0
        created = {_trial_name(trial) for trial in trials}
        for name, steps in self.grid.items():
            if name not in created:  # not created by Tune yet
                counts["pending"] += 1
                total_steps += int(steps)
        for trial in trials:
            info, result = trial.config["trial"], trial.last_result or {}
            steps = int(result.get("env_steps", 0))
            self.baseline.setdefault(_trial_name(trial), steps)
            gained += max(0, steps - self.baseline[_trial_name(trial)])
            total_steps += int(info["steps"])
            if trial.status == "TERMINATED" and "exit_code" in result:
                counts["done" if result["exit_code"] == 0 else "failed"] += 1
                done_steps += int(info["steps"])
            elif trial.status == "ERROR":
                counts["failed"] += 1
                done_steps += int(info["steps"])
            else:  # a TERMINATED trial without an exit code was stopped (Ctrl-C): unfinished
                counts["running" if trial.status == "RUNNING" else "pending"] += 1
                done_steps += steps
            value = result.get("best_eval")
            if value is not None and (info["env"] not in best or value > best[info["env"]][0]):
                best[info["env"]] = (value, info["name"])
        if len(best) == 1:
            (value, name), = best.values()
            best_text = f"best eval {value:.1f} ({name})"
        else:
            best_text = "best eval " + (", ".join(f"{env} {v:.1f}" for env, (v, _) in sorted(best.items())) or "-")
        elapsed = time.monotonic() - self.t0
        rate = gained / elapsed if elapsed > 0 else 0.0
        eta = (total_steps - done_steps) / rate if rate > 0 else (0.0 if done_steps >= total_steps else math.inf)
        self.counts = counts
        every_trial = len(created | set(self.grid))
        return (f"sweep: {counts['done']}/{every_trial} done, {counts['running']} running, {counts['failed']} "
                f"failed, {counts['pending']} pending | {best_text} | {done_steps}/{total_steps} env steps | "
                f"ETA {duration(eta)}")

    def _show(self, trials, final: bool = False):
        text = self.line(trials)
        now = time.monotonic()
        if sys.stderr.isatty():
            if text != self.last_line or final:
                sys.stderr.write("\r" + text + "\x1b[K" + ("\n" if final else ""))
                sys.stderr.flush()
        elif final or self.counts != self.last_counts or now - self.last_print >= self.every:
            sys.stderr.write(text + "\n")
            sys.stderr.flush()
            self.last_print = now
        self.last_line, self.last_counts = text, self.counts

    def on_step_end(self, iteration, trials, **info):
        self._show(trials)

    def on_experiment_end(self, trials, **info):
        self._show(trials, final=True)


# ---- driver -------------------------------------------------------------------------------------------
def _name_creator(trial) -> str:
    return _trial_name(trial)


def connect(address: Optional[str], num_cpus: Optional[int], per_trial: Dict[str, float]) -> None:
    """Join the Ray cluster at ``address``, or start a local instance (``num_cpus``, default all);
    raises :class:`SweepError` when that fails or, on a local instance, when one trial needs more
    CPUs / GPUs than it has."""
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")  # the run directories hold the results
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    init: Dict[str, object] = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    if address:
        _check_reachable(address)
        init["address"] = address
    else:
        init.update(address="local", num_cpus=num_cpus)
    try:
        ray.init(**init)
    except (ConnectionError, RuntimeError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SweepError(f"--address {address or 'local'}: could not start or join Ray: {first}") from None
    # Tune's own result files are off (the run directories hold the results): keep its result
    # reader from warning that they are missing; after Ctrl-C, the sweep's own line says how to resume
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
    logging.getLogger("ray.tune.tune").addFilter(lambda record: "Tuner.restore" not in record.getMessage())
    try:
        _check_resources(per_trial, local=not address)
    except SweepError:
        ray.shutdown()
        raise


def trial_resources(spec: Dict[str, object]) -> Dict[str, float]:
    resources: Dict[str, float] = {"cpu": int(spec["cpus_per_trial"])}  # type: ignore[arg-type]
    if float(spec["gpus_per_trial"]) > 0:  # type: ignore[arg-type]
        resources["gpu"] = float(spec["gpus_per_trial"])  # type: ignore[arg-type]
    return resources


def run_sweep(spec: Dict[str, object], sweep_dir: str, resume: bool) -> Dict[str, str]:
    """Run (or with ``resume``, continue) the sweep on the Ray that :func:`connect` joined, and
    leave it; returns each trial's final status from its record (done, diverged, failed, or
    pending / running for a trial left unfinished)."""
    trials = trials_of(spec)
    try:
        trainable = tune.with_resources(run_trial, trial_resources(spec))
        experiment = os.path.join(state_dir(sweep_dir), TUNE_NAME)
        if resume and tune.Tuner.can_restore(experiment):
            print(f"python -m fastrp.sweep: restoring Ray Tune's experiment state from {experiment}", file=sys.stderr)
            tuner = tune.Tuner.restore(experiment, trainable, resume_unfinished=True, resume_errored=True)
        else:
            if resume:  # killed before Tune saved any state: every trial again, each from its own checkpoint
                print(f"python -m fastrp.sweep: no Ray Tune experiment state in {experiment} yet; starting every "
                      "trial again (finished ones return at once, the others continue from their checkpoints)",
                      file=sys.stderr)
            max_concurrent, max_retries = int(spec["max_concurrent"]), int(spec["max_retries"])  # type: ignore
            tuner = tune.Tuner(
                trainable,
                param_space={"sweep_dir": sweep_dir,
                             "trial": tune.grid_search([dict(t.__dict__) for t in trials])},
                tune_config=tune.TuneConfig(max_concurrent_trials=max_concurrent or None,
                                            trial_name_creator=_name_creator, trial_dirname_creator=_name_creator),
                run_config=tune.RunConfig(name=TUNE_NAME, storage_path=state_dir(sweep_dir), verbose=0,
                                          callbacks=[ProgressLine({t.name: t.steps for t in trials})],
                                          failure_config=tune.FailureConfig(max_failures=max_retries)))
        tuner.fit()
    finally:
        ray.shutdown()
    return statuses(sweep_dir, trials)


def _check_reachable(address: str) -> None:
    """Fail fast (Ray itself retries for minutes) when a HOST:PORT address accepts no connection."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "://" in address:
        return  # "auto", ray:// client addresses: left to Ray
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except OSError as err:
        raise SweepError(f"--address {address}: no Ray cluster answers there ({err.strerror or err})") from None


def _check_resources(per_trial: Dict[str, float], local: bool) -> None:
    """A trial that needs more than the whole (local) Ray instance has would wait forever."""
    have = ray.cluster_resources()
    short = [f"{need:g} {kind.upper()}s per trial, the {'local Ray instance' if local else 'cluster'} has "
             f"{have.get(kind.upper(), 0):g}" for kind, need in per_trial.items() if need > have.get(kind.upper(), 0)]
    if short and local:
        raise SweepError(f"--{'gpus' if 'GPU' in short[0] else 'cpus'}-per-trial: {short[0]}")
    for text in short:  # a cluster may still grow (autoscaler, nodes joining)
        print(f"python -m fastrp.sweep: warning: {text}; trials wait until such nodes join", file=sys.stderr)


def statuses(sweep_dir: str, trials: Sequence[Trial]) -> Dict[str, str]:
    return {t.name: str(read_record(sweep_dir, t.name)["status"]) for t in trials}
