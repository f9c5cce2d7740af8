"""A training run is never lost and never lies: interrupts (signals to a real process), wall-clock
checkpoints in the middle of a log interval, exact resumes, unusable checkpoints, I/O errors,
non-finite transitions and states, TensorBoard after a resume, the banner and the ETA."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from fastrp import train
from fastrp.rl import checkpoint as ckpt
from fastrp.rl.checkpoint import CHECKPOINT_NAME, load
from fastrp.rl.logger import TIMING_COLUMNS, Progress, read_metrics

pytest.importorskip("mujoco", reason="training steps MuJoCo")

TINY = ["--env", "InvertedPendulum", "--preset", "tiny", "--progress", "false"]


def run_main(tmp_path, *args):
    return train.main([*TINY, "--logdir", str(tmp_path), *args])


def _same_rows(a, b):
    assert [r["env_steps"] for r in a] == [r["env_steps"] for r in b]
    for x, y in zip(a, b):
        assert {k: v for k, v in x.items() if k not in TIMING_COLUMNS} == \
               {k: v for k, v in y.items() if k not in TIMING_COLUMNS}, x["env_steps"]


def _one_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if "fastrp._C not available" not in ln]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ---- interrupts ----------------------------------------------------------------------------------
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_checkpoints_and_the_resumed_run_equals_an_uninterrupted_one(tmp_path, sig, code):
    args = [*TINY, "--algo", "ddppo", "--seed", "2", "--logdir", str(tmp_path), "--steps", "400",
            "--checkpoint-every", "1000", "--checkpoint-minutes", "0"]
    proc = subprocess.Popen([sys.executable, "-m", "fastrp.train", *args, "--run-name", "cut"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "cut" / "metrics.csv"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:  # past warm-up and a model refit
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == code, err
    line = [ln for ln in err.splitlines() if "interrupted at env step" in ln]
    assert len(line) == 1 and "Traceback" not in err, err
    step = load(str(tmp_path / "cut" / CHECKPOINT_NAME))["step"]
    assert f"interrupted at env step {step}; checkpoint written; resume with: python -m fastrp.train " \
           f"--resume {tmp_path / 'cut'}" in line[0]
    assert 100 <= step < 400
    assert train.main(["--resume", str(tmp_path / "cut"), "--progress", "false"]) == 0
    assert train.main([*args, "--run-name", "full"]) == 0
    _same_rows(read_metrics(str(tmp_path / "full")), read_metrics(str(tmp_path / "cut")))


def test_wall_clock_checkpoint_mid_interval_resumes_exactly(tmp_path, monkeypatch):
    """A checkpoint taken by wall time between two metrics rows carries the interval's partial
    statistics: a run killed after it and resumed writes the same rows as an uninterrupted one."""
    args = ["--algo", "sac", "--seed", "4", "--steps", "300", "--checkpoint-every", "1000"]
    assert run_main(tmp_path, *args, "--run-name", "full") == 0
    clock = {"t": 0.0}
    monkeypatch.setattr(train.time, "perf_counter", lambda: clock["t"])
    real_collect = train.Trainer.collect

    def collect(self):
        real_collect(self)
        clock["t"] += 1.0  # one "second" per env step: a checkpoint every 60 steps
        if self.step == 130:
            raise KeyboardInterrupt  # a crash between checkpoints (the process dies)

    monkeypatch.setattr(train.Trainer, "collect", collect)
    assert run_main(tmp_path, *args, "--checkpoint-minutes", "1", "--run-name", "cut") == 130
    state = load(str(tmp_path / "cut" / CHECKPOINT_NAME))
    assert state["step"] == 120 and state["interval"]["start_step"] == 100  # mid-interval
    monkeypatch.undo()
    assert train.main(["--resume", str(tmp_path / "cut"), "--progress", "false"]) == 0
    _same_rows(read_metrics(str(tmp_path / "full")), read_metrics(str(tmp_path / "cut")))
    rows = read_metrics(str(tmp_path / "cut"))
    assert float(rows[-1]["wall_time"]) > 120  # the wall time continues from the checkpoint


# ---- resume: what is refused -----------------------------------------------------------------------
def _a_run(tmp_path, name="r", algo="sac"):
    assert run_main(tmp_path, "--algo", algo, "--steps", "100", "--run-name", name) == 0
    return tmp_path / name


@pytest.mark.parametrize("content, expected", [
    (lambda good: good[: len(good) // 2], "cannot read"),
    (lambda good: b"", "cannot read"),
    (lambda good: os.urandom(2000), "cannot read"),
])
def test_unreadable_checkpoint_is_one_line_exit_2(tmp_path, capsys, content, expected):
    run = _a_run(tmp_path)
    path = run / CHECKPOINT_NAME
    path.write_bytes(content(path.read_bytes()))
    capsys.readouterr()
    assert train.main(["--resume", str(run), "--steps", "200"]) == 2
    assert expected in _one_line(capsys.readouterr().err)


def test_wrong_type_checkpoint_is_refused(tmp_path, capsys):
    run = _a_run(tmp_path)
    torch.save([1, 2, 3], str(run / CHECKPOINT_NAME))
    capsys.readouterr()
    assert train.main(["--resume", str(run), "--steps", "200"]) == 2
    assert "is not a fastrp checkpoint (it holds list)" in _one_line(capsys.readouterr().err)


def test_checkpoint_of_another_run_is_refused(tmp_path, capsys):
    sac = _a_run(tmp_path, "sac", "sac")
    other = _a_run(tmp_path, "mbpo", "mbpo")
    (sac / CHECKPOINT_NAME).write_bytes((other / CHECKPOINT_NAME).read_bytes())
    capsys.readouterr()
    assert train.main(["--resume", str(sac), "--steps", "200"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "does not belong to this run: its algo is 'mbpo'" in line and "says 'sac'" in line


# ---- I/O errors -------------------------------------------------------------------------------------
def test_disk_full_is_one_line_and_leaves_no_tmp(tmp_path, capsys, monkeypatch):
    real_save = torch.save

    def full(obj, fh, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("step", 0) >= 200:
            fh.write(b"partial")
            raise OSError(28, "No space left on device")
        return real_save(obj, fh, *args, **kwargs)

    monkeypatch.setattr(ckpt.torch, "save", full)
    assert run_main(tmp_path, "--algo", "sac", "--steps", "300", "--run-name", "r") == train.EXIT_IO
    line = _one_line(capsys.readouterr().err)
    assert "No space left on device" in line and "last good checkpoint (env step 100)" in line
    assert sorted(os.listdir(tmp_path / "r")) == ["checkpoint.pt", "config.json", "metrics.csv", "tb"]
    assert load(str(tmp_path / "r" / CHECKPOINT_NAME))["step"] == 100


def test_logdir_that_is_a_file(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert train.main([*TINY, "--logdir", str(tmp_path / "file")]) == 2
    assert "--logdir:" in _one_line(capsys.readouterr().err)


def test_csv_rewrite_is_atomic(tmp_path, monkeypatch):
    from fastrp.rl import logger

    run = _a_run(tmp_path)
    before = (run / "metrics.csv").read_text()

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # the process dies during the rewrite

    monkeypatch.setattr(logger.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        logger.truncate_csv(str(run / "metrics.csv"), logger.COLUMNS, 50)
    assert (run / "metrics.csv").read_text() == before and not (run / "metrics.csv.tmp").exists()


# ---- non-finite data and states -------------------------------------------------------------------------
@pytest.mark.parametrize("algo", ["sac", "ddppo"])
def test_nonfinite_transitions_never_enter_the_buffer(tmp_path, monkeypatch, algo):
    """NaN actions through the public env API give NaN rewards (MuJoCo zeroes the control, the
    control cost is NaN); a NaN observation is injected in the env's transition. Neither enters
    the buffer, both are counted, the env copy is reset, and ddppo's kNN never sees them."""
    from fastrp.envs import MujocoVectorEnv

    real_step = MujocoVectorEnv.step_transition
    calls = {"n": 0}

    def step_transition(self, actions):
        calls["n"] += 1
        if self.num_envs == 1 and calls["n"] in (70, 90):  # training env only (evaluation uses several)
            actions = np.full_like(np.asarray(actions), np.nan)
        tr = real_step(self, actions)
        if self.num_envs == 1 and calls["n"] == 120:
            tr = tr._replace(next_obs=np.full_like(tr.next_obs, np.nan))
        return tr

    monkeypatch.setattr(MujocoVectorEnv, "step_transition", step_transition)
    with pytest.warns(RuntimeWarning):  # MuJoCo's warning about the NaN control
        assert run_main(tmp_path, "--algo", algo, "--steps", "200", "--run-name", "r") == 0
    rows = read_metrics(str(tmp_path / "r"))
    assert [int(r["nonfinite_transitions"]) for r in rows] == [0, 2, 1, 0]  # env steps 70, 90 and 120
    state = load(str(tmp_path / "r" / CHECKPOINT_NAME))
    data = state["buffer"]["data"]
    assert len(data[0]) == 200 - 3 and all(torch.isfinite(t).all() for t in data)
    assert all(int(r["skipped_updates"]) == 0 for r in rows)


def test_unsaveable_state_stops_the_run_instead_of_a_stale_checkpoint(tmp_path, monkeypatch, capsys):
    from fastrp.algos.agent import Agent

    real_update = Agent.update

    def update(self, buffer):
        real_update(self, buffer)
        if len(buffer) >= 150:  # a non-finite value that does not break the updates
            with torch.no_grad():
                self.model.max_logvar.fill_(float("nan"))

    monkeypatch.setattr(Agent, "update", update)
    assert run_main(tmp_path, "--algo", "mbpo", "--steps", "300", "--run-name", "r") == train.EXIT_DIVERGED
    err = capsys.readouterr().err
    assert "non-finite values and cannot be checkpointed" in err and "last good checkpoint (env step 100)" in err
    assert "done:" not in err


# ---- TensorBoard, rows, cadences ---------------------------------------------------------------------
def _tb_steps(run_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    return [e.step for e in acc.Scalars(tag)]


def test_tensorboard_holds_every_step_once_after_a_resume(tmp_path):
    pytest.importorskip("tensorboard")
    assert run_main(tmp_path, "--algo", "sac", "--steps", "100", "--run-name", "r") == 0
    assert train.main(["--resume", str(tmp_path / "r"), "--steps", "200", "--progress", "false"]) == 0
    assert _tb_steps(tmp_path / "r", "steps_per_s") == [50, 100, 150, 200]
    assert _tb_steps(tmp_path / "r", "eval_return_mean") == [100, 200]


def test_evaluation_cadence_independent_of_log_every(tmp_path):
    assert run_main(tmp_path, "--algo", "sac", "--steps", "200", "--log-every", "100", "--eval-every", "75",
                    "--checkpoint-every", "120", "--run-name", "r") == 0
    rows = read_metrics(str(tmp_path / "r"))
    assert [int(r["env_steps"]) for r in rows] == [75, 100, 150, 200]
    assert [r["eval_return_mean"] != "" for r in rows] == [True, False, True, True]
    assert sum(int(r["updates"]) for r in rows) == 2 * (200 - 50 + 1)  # every update in exactly one row
    # the rates are those of each row's own interval
    for r, prev in zip(rows, [0] + [int(x["env_steps"]) for x in rows[:-1]]):
        assert float(r["steps_per_s"]) > 0 and int(r["env_steps"]) > prev


def test_steps_below_warmup_warns_and_the_banner_says_what_runs(tmp_path, capsys):
    assert train.main(["--env", "InvertedPendulum", "--preset", "tiny", "--logdir", str(tmp_path), "--steps", "40",
                       "--run-name", "r"]) == 0
    err = capsys.readouterr().err
    assert "fastrp: ddppo-sn on InvertedPendulum, seed 0, device cpu" in err
    assert "preset tiny (flag)" in err and "40 env steps (50 random warm-up steps)" in err
    assert "warning: --steps 40 <= warm-up 50: no update will run" in err
    assert f"run dir {tmp_path / 'r'}" in err
    assert train.main(["--resume", str(tmp_path / "r"), "--steps", "60"]) == 0
    err = capsys.readouterr().err
    assert "resuming at env step 40" in err and "40 -> " not in err
    assert "env step 60/60: 20 steps in" in err and "(resumed at 40;" in err


def test_auto_preset_banner_on_cpu(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert train.main(["--env", "InvertedPendulum", "--algo", "sac", "--logdir", str(tmp_path), "--steps", "5",
                       "--run-name", "r"]) == 0
    err = capsys.readouterr().err
    assert "preset cpu (auto: no CUDA device; --preset paper for the papers' sizes)" in err
    assert json.loads((tmp_path / "r" / "config.json").read_text())["sources"]["preset"] == "auto: no CUDA device"


def test_banner_says_why_the_cpu_preset_unrolls_one_step():
    from fastrp.config import parse_args_with_sources

    cpu = torch.device("cpu")
    cfg, src = parse_args_with_sources(["--env", "HalfCheetah", "--preset", "cpu"])
    assert "policy unroll H = 1 (cpu preset" in train.banner(cfg, src, "runs/x", cpu, None)
    for argv in (["--env", "HalfCheetah", "--preset", "cpu", "--horizon", "2"],  # the user's own H
                 ["--env", "HalfCheetah", "--preset", "cpu", "--algo", "sac"],  # no unroll
                 ["--env", "HalfCheetah", "--preset", "paper"]):
        cfg, src = parse_args_with_sources(argv)
        assert "policy unroll" not in train.banner(cfg, src, "runs/x", cpu, None)


def test_eta_uses_the_rate_after_warmup_and_counts_refits():
    p = Progress(total_steps=1100, warmup_steps=100, enabled=False, refit_every=250)
    for step in range(1, 100):
        p.step_done(step, 0.001)  # fast random warm-up steps do not count
    assert p.eta(99) is None
    for step in range(100, 600):
        if (step - 100) % 250 == 0:
            p.model_phase_done(10.0)
            p.step_done(step, 10.0 + 0.1)
        else:
            p.step_done(step, 0.1)
    # 500 steps at 0.1 s each, refits at 100, 350 (10 s each); left: 501 steps and the refits at 600, 850, 1100
    assert p.eta(599) == pytest.approx(501 * 0.1 + 3 * 10.0)
    assert p.rate_after_warmup() == pytest.approx(500 / (500 * 0.1 + 20.0))


def test_progress_refreshes_inside_a_long_interval(capsys, monkeypatch):
    clock = {"t": 0.0}
    monkeypatch.setattr("fastrp.rl.logger.time.perf_counter", lambda: clock["t"])
    p = Progress(total_steps=100, warmup_steps=0, enabled=True)
    p.step_done(1, 1.0)
    clock["t"] = 10.0
    p.maybe_refresh(1, None)
    assert capsys.readouterr().err == ""
    clock["t"] = 31.0
    p.maybe_refresh(1, None)
    out = capsys.readouterr().err
    assert "step 1/100" in out and "ETA 0:01:39" in out
    assert math.isfinite(p.eta(1))


def test_checkpoint_of_the_previous_layout_resumes_exactly(tmp_path):
    """Checkpoints written before the restructuring (each model's optimizer inside the model's
    ``_extra_state``, ``metrics`` / ``fault`` entries, the ``fault_nan_at`` field, no
    ``checkpoint_minutes`` / interval / wall time) resume and continue exactly."""
    args = ["--algo", "ddppo-sn", "--seed", "6", "--checkpoint-every", "100"]
    assert run_main(tmp_path, *args, "--steps", "300", "--run-name", "full") == 0
    assert run_main(tmp_path, *args, "--steps", "200", "--run-name", "old") == 0
    path = tmp_path / "old" / CHECKPOINT_NAME
    state = load(str(path))
    agent = state["agent"]
    for model, fitter in (("model", "model_fitter"), ("grad_model", "grad_model_fitter")):
        agent[model]["_extra_state"] = {"optimizer": agent.pop(fitter)["optimizer"]}
    agent.pop("stats")
    agent["metrics"], agent["fault"] = {"sums": {}, "counts": {}}, torch.ones(())
    state["config"]["fault_nan_at"] = -1
    del state["config"]["checkpoint_minutes"]
    for key in ("interval", "wall_time", "failed_fits"):
        del state[key]
    state["host_metrics"] = {}
    torch.save(state, str(path))
    config = json.loads((tmp_path / "old" / "config.json").read_text())
    config = {k: v for k, v in config.items() if k not in ("sources", "checkpoint_minutes")}
    (tmp_path / "old" / "config.json").write_text(json.dumps({**config, "fault_nan_at": -1}))
    assert train.main(["--resume", str(tmp_path / "old"), "--steps", "300", "--progress", "false"]) == 0
    _same_rows(read_metrics(str(tmp_path / "full")), read_metrics(str(tmp_path / "old")))
