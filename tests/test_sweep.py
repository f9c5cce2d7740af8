"""``python -m fastrp.sweep``: grids, trials as run directories on a real local Ray, the summary
against values computed here from the trials' CSVs, a killed trial worker and a killed sweep
command both continuing from the runs' own checkpoints, bad grids, and the message without Ray.

One local Ray instance (2 CPUs) serves the whole module; each sweep command joins it with
``--address`` in a subprocess (so that it can be SIGKILLed like a user's command).
"""

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from fastrp.sweep.cli import main
from fastrp.sweep.spec import build_trials, read_record
from fastrp.sweep.summary import STAT_COLUMNS, iqm, iqm_bootstrap_ci

TINY = ["--set", "env=InvertedPendulum", "--set", "preset=tiny"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ---- helpers ----------------------------------------------------------------------------------------
def _rows(run_dir):
    with open(os.path.join(run_dir, "metrics.csv"), newline="") as fh:
        return list(csv.DictReader(fh))


def _steps(run_dir):
    return [int(r["env_steps"]) for r in _rows(run_dir)]


def _evals(run_dir):
    return [float(r["eval_return_mean"]) for r in _rows(run_dir) if r["eval_return_mean"] != ""]


def _summary(sweep_dir):
    with open(os.path.join(sweep_dir, "summary.csv"), newline="") as fh:
        return list(csv.DictReader(fh))


def _sweep_cmd(*args):
    return [sys.executable, "-m", "fastrp.sweep", *args]


def _wait_for(predicate, timeout, what):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _gone(pid):
    """The process exited (a zombie waiting for its reaper counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _attempts(sweep_dir, name):
    return read_record(sweep_dir, name)["attempts"]


def _population_std(values):
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


# ---- statistics (no Ray) -------------------------------------------------------------------------------
def test_iqm_is_the_mean_of_the_middle_half():
    x = [9.0, -4.0, 1.0, 100.0, 3.0, 2.0, 7.0, -50.0]  # sorted: -50 -4 1 2 3 7 9 100 -> keep 1 2 3 7
    assert iqm(np.array(x)) == pytest.approx((1 + 2 + 3 + 7) / 4)
    five = [5.0, 1.0, 4.0, 2.0, 30.0]  # floor(5 / 4) = 1 cut from each end: 2 4 5
    assert iqm(np.array(five)) == pytest.approx((2 + 4 + 5) / 3)
    assert iqm(np.array([3.0, 8.0])) == pytest.approx(5.5)  # nothing cut below 4 values
    assert math.isnan(iqm(np.array([1.0, 2.0, 3.0, 4.0, np.nan])))  # not cut away as the largest value


def test_bootstrap_ci_of_two_seeds_is_their_range():
    # resamples of (a, b): (a, a), (a, b), (b, a), (b, b); the IQM of two values is their mean,
    # so a quarter of the bootstrap IQMs equal min and a quarter max: the 2.5 / 97.5 % quantiles
    assert iqm_bootstrap_ci([7.0, -1.5]) == (-1.5, 7.0)
    assert iqm_bootstrap_ci([4.0]) == (4.0, 4.0)


def test_bootstrap_ci_matches_the_exact_bootstrap_distribution():
    x = np.array([0.0, 1.0, 3.0, 10.0])
    # every one of the 4^4 resamples is equally likely: the exact distribution of the resampled IQM
    grid = np.stack(np.meshgrid(*[x] * 4, indexing="ij"), -1).reshape(-1, 4)
    exact = np.sort(np.sort(grid, axis=1)[:, 1:3].mean(axis=1))
    atoms, counts = np.unique(exact, return_counts=True)
    cdf = np.cumsum(counts) / counts.sum()
    expected = []
    for q in (0.025, 0.975):
        i = int(np.searchsorted(cdf, q))
        assert cdf[i] > q + 0.005 and (i == 0 or cdf[i - 1] < q - 0.005)  # q is not near a jump of the CDF
        expected.append(atoms[i])
    assert iqm_bootstrap_ci(x) == pytest.approx(tuple(expected))
    with pytest.raises(ValueError, match="confidence"):
        iqm_bootstrap_ci(x, confidence=95)
    with pytest.raises(ValueError, match="non-empty"):
        iqm_bootstrap_ci([])


def test_grid_expansion_names_and_trainer_command_lines(tmp_path):
    trials = build_trials(["env=InvertedPendulum", "preset=tiny"], ["algo=sac,mbpo", "seed=0-2", "actor-lr=1e-3,3e-4"],
                          str(tmp_path), cpus_per_trial=3, gpus_per_trial=0)
    assert len(trials) == 2 * 3 * 2
    assert trials[0].name == "algo=sac,seed=0,actor_lr=0.001"
    assert trials[-1].name == "algo=mbpo,seed=2,actor_lr=0.0003"
    assert [t.seed for t in trials[:6]] == [0, 0, 1, 1, 2, 2]
    argv = trials[1].argv
    assert argv[argv.index("--cpu-threads") + 1] == "3" and argv[argv.index("--device") + 1] == "cpu"
    assert argv[argv.index("--run-name") + 1] == trials[1].name and argv[argv.index("--logdir") + 1] == str(tmp_path)
    assert trials[0].steps == 10_000 and trials[0].env == "InvertedPendulum"  # resolved through the presets
    gpu = build_trials([], ["seed=0,1"], str(tmp_path), cpus_per_trial=1, gpus_per_trial=0.25)
    assert gpu[0].argv[gpu[0].argv.index("--device") + 1] == "cuda"


def test_summary_of_runs_written_by_hand(tmp_path, capsys):
    """summary.csv of five seeds (IQM cuts one value at each end) and a group with no evaluation yet."""
    from fastrp.sweep.spec import save_spec

    sweep_dir = str(tmp_path)
    trials = build_trials(TINY[1::2], ["algo=sac,mbpo", "seed=0-4"], sweep_dir, 1, 0)
    save_spec(sweep_dir, {"version": 1, "grid": [["algo", ["sac", "mbpo"]], ["seed", [0, 1, 2, 3, 4]]],
                          "trials": [dict(t.__dict__) for t in trials]})
    evals = {0: [10.0, 30.0], 1: [50.0, 20.0], 2: [5.0, 40.0], 3: [60.0, 80.0], 4: [0.0, float("nan")]}
    for trial in trials:
        run = tmp_path / trial.name
        run.mkdir()
        (run / "config.json").write_text(json.dumps({"env": "InvertedPendulum", "algo": trial.values["algo"],
                                                     "seed": trial.seed}))
        lines = ["env_steps,wall_time,eval_return_mean", "50,0.1,"]
        if trial.values["algo"] == "sac":
            first, last = evals[trial.seed]
            lines += [f"100,0.2,{first}", "150,0.3,", f"200,0.4,{last}"]
        (run / "metrics.csv").write_text("\n".join(lines) + "\n")
    assert main(["--summary", sweep_dir]) == 0
    rows = _summary(sweep_dir)
    assert len(rows) == 1 and rows[0]["algo"] == "sac" and rows[0]["env"] == "InvertedPendulum"
    final = [30.0, 20.0, 40.0, 80.0, float("nan")]  # the last evaluation, nan included
    best = [30.0, 50.0, 40.0, 80.0, 0.0]  # the largest finite one
    row = rows[0]
    assert int(row["n"]) == 5 and int(row["finished"]) == 0 and int(row["env_steps"]) == 200
    for key in ("final_eval_mean", "final_eval_iqm", "final_eval_iqm_ci_low", "final_eval_iqm_ci_high"):
        assert math.isnan(float(row[key])), key
    assert float(row["best_eval_mean"]) == pytest.approx(sum(best) / 5)
    assert float(row["best_eval_std"]) == pytest.approx(_population_std(best), rel=1e-5)
    # without the nan seed the IQM of four values cuts one at each end: (30 + 40) / 2
    (tmp_path / trials[4].name / "metrics.csv").write_text("env_steps,wall_time,eval_return_mean\n200,0.4,10.0\n")
    assert main(["--summary", sweep_dir]) == 0
    row = _summary(sweep_dir)[0]
    final[4] = 10.0
    assert float(row["final_eval_mean"]) == pytest.approx(sum(final) / 5)
    assert float(row["final_eval_std"]) == pytest.approx(_population_std(final), rel=1e-5)
    assert float(row["final_eval_iqm"]) == pytest.approx((20 + 30 + 40) / 3)
    assert float(row["final_eval_iqm_ci_low"]) <= (20 + 30 + 40) / 3 <= float(row["final_eval_iqm_ci_high"])
    assert float(row["final_eval_iqm_ci_low"]) >= 10.0 and float(row["final_eval_iqm_ci_high"]) <= 80.0
    out = capsys.readouterr().out
    assert "| InvertedPendulum | sac | 5 (0 finished) |" in out and (tmp_path / "curves_InvertedPendulum.png").exists()


# ---- command-line errors (no Ray) -------------------------------------------------------------------------
@pytest.mark.parametrize("args, needle", [
    (["--grid", "sed=0,1"], "sed: unknown field (did you mean seed?)"),
    (["--grid", "seed=0,x"], "--grid seed=x"),
    (["--grid", "algo=sac,ppo"], "--grid algo=ppo"),
    (["--grid", "actor_lr=3e-4,-1"], "--actor-lr: must be > 0"),
    (["--grid", "seed="], "empty value"),
    (["--grid", "seed=0,,1"], "empty value"),
    (["--grid", "seed=3-1"], "empty range"),
    ([], "give at least one --grid"),
    (["--set", "seed=1", "--grid", "seed=0,1"], "--set seed and --grid seed"),
    (["--grid", "seed=0,1", "--grid", "seed=2"], "given twice"),
    (["--grid", "seed=0,0"], "same value"),
    (["--grid", "seed=0,1", "--set", "logdir=elsewhere"], "set by the sweep itself"),
    (["--grid", "num_elites=2,9"], "--grid num_elites=9: --num-elites: must be <= --ensemble-size"),
    (["--grid", "ensemble_size=2,3", "--grid", "num_elites=3"],  # each value valid, one combination not
     "trial ensemble_size=2,num_elites=3: --num-elites: must be <= --ensemble-size"),
    (["--grid", "seed=0,1", "--cpus-per-trial", "0"], "--cpus-per-trial"),
    (["--grid", "seed=0,1", "--set", "steps"], "expected KEY=VALUE"),
])
def test_bad_grid_is_one_line_and_exit_2(tmp_path, capsys, args, needle):
    sweep_dir = tmp_path / "sweep"
    assert main(["--sweep-dir", str(sweep_dir), *TINY, *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("python -m fastrp.sweep: error: ") and needle in err, err
    assert not sweep_dir.exists()


def test_resume_and_summary_need_a_sweep_directory(tmp_path, capsys):
    assert main(["--resume", str(tmp_path)]) == 2
    assert main(["--summary", str(tmp_path), "--grid", "seed=0"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert "not a sweep directory" in err[0] and "--grid: not allowed with --summary" in err[1]


def test_unreachable_address_is_one_line_and_creates_nothing(tmp_path, capsys):
    pytest.importorskip("ray")
    sweep_dir = tmp_path / "sweep"
    assert main(["--sweep-dir", str(sweep_dir), *TINY, "--grid", "seed=0", "--address", "127.0.0.1:1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--address 127.0.0.1:1: no Ray cluster answers there" in err
    assert not sweep_dir.exists()  # a corrected command can start the same sweep


def test_without_ray_says_how_to_install_it(tmp_path):
    code = ("import runpy, sys; sys.modules['ray'] = None; "  # import ray now raises ImportError
            "sys.argv = ['fastrp.sweep'] + sys.argv[1:]; runpy.run_module('fastrp.sweep', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code, "--sweep-dir", str(tmp_path / "s"), *TINY, "--grid", "seed=0,1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and 'pip install "fastrp[sweep]"' in proc.stderr
    assert 'pip install ".[sweep]"' in proc.stderr


# ---- on a real local Ray ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_address():
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=80 * 1024 ** 2,
             log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def test_two_algos_two_seeds(tmp_path, ray_address):
    sweep_dir = str(tmp_path / "sweep")
    proc = subprocess.run(_sweep_cmd("--sweep-dir", sweep_dir, "--grid", "algo=sac,mbpo", "--grid", "seed=0-1", *TINY,
                                     "--set", "steps=200", "--address", ray_address),
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = ["algo=sac,seed=0", "algo=sac,seed=1", "algo=mbpo,seed=0", "algo=mbpo,seed=1"]
    assert sorted(n for n in os.listdir(sweep_dir) if not n.startswith((".", "summary", "curves"))) == sorted(names)
    finals, bests = {}, {}
    for name in names:
        run_dir = os.path.join(sweep_dir, name)
        cfg = json.load(open(os.path.join(run_dir, "config.json")))
        algo, seed = name.split(",")[0].split("=")[1], int(name[-1])
        assert (cfg["algo"], cfg["seed"], cfg["steps"], cfg["device"]) == (algo, seed, 200, "cpu")
        assert _steps(run_dir) == [50, 100, 150, 200]
        record = read_record(sweep_dir, name)
        assert record["status"] == "done" and [a["exit_code"] for a in record["attempts"]] == [0]
        evals = _evals(run_dir)
        finals.setdefault(algo, []).append(evals[-1])
        bests.setdefault(algo, []).append(max(evals))
    rows = {r["algo"]: r for r in _summary(sweep_dir)}
    assert list(_summary(sweep_dir)[0]) == ["env", "algo"] + STAT_COLUMNS
    for algo in ("sac", "mbpo"):
        row, final, best = rows[algo], finals[algo], bests[algo]
        assert (row["env"], row["n"], row["finished"], row["env_steps"]) == ("InvertedPendulum", "2", "2", "200")
        assert float(row["final_eval_mean"]) == pytest.approx((final[0] + final[1]) / 2, rel=1e-5)
        assert float(row["final_eval_std"]) == pytest.approx(abs(final[0] - final[1]) / 2, rel=1e-5, abs=1e-9)
        assert float(row["best_eval_mean"]) == pytest.approx((best[0] + best[1]) / 2, rel=1e-5)
        assert float(row["best_eval_std"]) == pytest.approx(abs(best[0] - best[1]) / 2, rel=1e-5, abs=1e-9)
        assert float(row["final_eval_iqm"]) == pytest.approx((final[0] + final[1]) / 2, rel=1e-5)  # 2 values: none cut
        assert float(row["final_eval_iqm_ci_low"]) == pytest.approx(min(final), rel=1e-5)
        assert float(row["final_eval_iqm_ci_high"]) == pytest.approx(max(final), rel=1e-5)
    best_all = max(max(b) for b in bests.values())
    assert f"sweep: 4/4 done, 0 running, 0 failed, 0 pending | best eval {best_all:.1f}" in proc.stderr
    assert open(os.path.join(sweep_dir, "curves_InvertedPendulum.png"), "rb").read(8) == PNG_MAGIC
    # --summary rebuilds the same file from the run directories
    before = open(os.path.join(sweep_dir, "summary.csv")).read()
    os.remove(os.path.join(sweep_dir, "summary.csv"))
    assert main(["--summary", sweep_dir]) == 0
    assert open(os.path.join(sweep_dir, "summary.csv")).read() == before
    # the trial directories are ordinary run directories
    from fastrp import plot, train
    from fastrp.diagnostics.__main__ import main as diagnostics_main

    mbpo = os.path.join(sweep_dir, "algo=mbpo,seed=0")
    assert plot.main([os.path.join(sweep_dir, n) for n in names] + ["--out", str(tmp_path / "p.png")]) == 0
    assert diagnostics_main(["jacobian", mbpo, "--out", str(tmp_path / "j.png")]) == 0
    assert train.main(["--resume", mbpo, "--steps", "250", "--progress", "false"]) == 0
    assert _steps(mbpo) == [50, 100, 150, 200, 250]


def test_killed_trial_worker_is_retried_from_its_checkpoint(tmp_path, ray_address):
    sweep_dir = str(tmp_path / "sweep")
    name = "seed=0"
    run_dir = os.path.join(sweep_dir, name)
    proc = subprocess.Popen(_sweep_cmd("--sweep-dir", sweep_dir, "--grid", "seed=0", *TINY, "--set", "algo=sac",
                                       "--set", "steps=1500", "--max-retries", "1",
                                       "--address", ray_address),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: os.path.exists(os.path.join(run_dir, "checkpoint.pt")) and os.path.exists(
            os.path.join(run_dir, "metrics.csv")) and len(_rows(run_dir)) >= 6, 200, "the trial's first checkpoints")
        attempt = _attempts(sweep_dir, name)[0]
        before = _rows(run_dir)
        os.kill(attempt["worker_pid"], signal.SIGKILL)
        _wait_for(lambda: _gone(attempt["trainer_pid"]), 30, "the killed worker's trainer to exit")
        out, err = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    attempts = _attempts(sweep_dir, name)
    assert len(attempts) == 2 and "exit_code" not in attempts[0] and attempts[1]["exit_code"] == 0
    assert attempts[1]["resumed"] and attempts[1]["argv"] == ["--resume", run_dir]
    after = _rows(run_dir)
    assert [int(r["env_steps"]) for r in after] == list(range(50, 1501, 50))  # each step once
    # a run started over would have rewritten the first rows (their wall times differ run to run)
    assert after[0] == before[0] and after[1] == before[1]


def test_sigkilled_sweep_resumes_only_unfinished_trials(tmp_path, ray_address):
    sweep_dir = str(tmp_path / "sweep")
    args = ["--grid", "steps=200,1500", "--grid", "seed=0-1", *TINY, "--set", "algo=sac", "--address", ray_address]
    short, long = ["steps=200,seed=0", "steps=200,seed=1"], ["steps=1500,seed=0", "steps=1500,seed=1"]
    proc = subprocess.Popen(_sweep_cmd("--sweep-dir", sweep_dir, *args), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        def long_runs_checkpointed():
            return all(os.path.exists(os.path.join(sweep_dir, n, "checkpoint.pt"))
                       and len(_rows(os.path.join(sweep_dir, n))) >= 4 for n in long)

        _wait_for(long_runs_checkpointed, 900, "both long trials to checkpoint")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert all(read_record(sweep_dir, n)["status"] == "done" for n in short)
    kept = {n: (open(os.path.join(sweep_dir, n, "metrics.csv")).read(),
                os.stat(os.path.join(sweep_dir, n, "checkpoint.pt")).st_mtime_ns) for n in short}
    first_rows = {n: _rows(os.path.join(sweep_dir, n))[0] for n in long}
    for n in long:
        _wait_for(lambda: _gone(_attempts(sweep_dir, n)[0]["trainer_pid"]), 60, f"the trainer of {n} to exit")
    resumed = subprocess.run(_sweep_cmd("--resume", sweep_dir, "--address", ray_address), capture_output=True,
                             text=True, timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "restoring Ray Tune's experiment state" in resumed.stderr
    for n in short:  # finished before the kill: not run again
        assert len(_attempts(sweep_dir, n)) == 1
        assert (open(os.path.join(sweep_dir, n, "metrics.csv")).read(),
                os.stat(os.path.join(sweep_dir, n, "checkpoint.pt")).st_mtime_ns) == kept[n]
    for n in long:  # continued from their checkpoints
        attempts = _attempts(sweep_dir, n)
        assert len(attempts) == 2 and attempts[1]["resumed"] and attempts[1]["exit_code"] == 0
        assert _rows(os.path.join(sweep_dir, n))[0] == first_rows[n]
    for n in short + long:
        steps = int(n.split(",")[0].split("=")[1])
        assert _steps(os.path.join(sweep_dir, n)) == list(range(50, steps + 1, 50)), n  # each step exactly once
    assert {r["steps"]: int(r["n"]) for r in _summary(sweep_dir)} == {"200": 2, "1500": 2}


def test_diverged_trial_is_a_result_not_retried(tmp_path, ray_address):
    """A critic learning rate of 1e30 makes every update non-finite: the trainer stops with exit
    code 3 (diverged), which the sweep records as a result and does not retry."""
    sweep_dir = str(tmp_path / "sweep")
    proc = subprocess.run(_sweep_cmd("--sweep-dir", sweep_dir, "--grid", "critic_lr=3e-4,1e30", *TINY, "--set",
                                     "algo=sac", "--set", "steps=300", "--max-retries", "2", "--address", ray_address),
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 1, proc.stderr[-3000:]  # not every trial finished
    ok, bad = read_record(sweep_dir, "critic_lr=0.0003"), read_record(sweep_dir, "critic_lr=1e+30")
    assert ok["status"] == "done" and bad["status"] == "diverged"
    assert [a["exit_code"] for a in bad["attempts"]] == [3]  # no retry: it would diverge again
    assert "1 trials did not finish: critic_lr=1e+30 (diverged)" in proc.stderr
    assert "sweep: 1/2 done, 0 running, 1 failed, 0 pending" in proc.stderr
    rows = {r["critic_lr"]: r for r in _summary(sweep_dir)}
    assert (rows["0.0003"]["finished"], rows["1e+30"]["finished"]) == ("1", "0")
    assert int(rows["0.0003"]["env_steps"]) == 300 and int(rows["1e+30"]["env_steps"]) < 300


def test_progress_line_counts_trials_tune_has_not_created_yet():
    """With --max-concurrent, Tune creates grid trials only as slots free up: the progress line
    must still count every trial of the grid (as pending) and its env steps."""
    from types import SimpleNamespace

    from fastrp.sweep.ray_tune import ProgressLine

    grid = {f"seed={i}": 1000 for i in range(5)}

    def trial(name, status, result):
        return SimpleNamespace(config={"trial": {"name": name, "steps": 1000, "env": "Hopper"}},
                               status=status, last_result=result)

    created = [trial("seed=0", "TERMINATED", {"exit_code": 0, "env_steps": 1000, "best_eval": 12.5}),
               trial("seed=1", "RUNNING", {"env_steps": 400, "best_eval": 3.0})]
    line = ProgressLine(grid).line(created)
    assert line.startswith("sweep: 1/5 done, 1 running, 0 failed, 3 pending | best eval 12.5 (seed=0) | "
                           "1400/5000 env steps | ETA ")
