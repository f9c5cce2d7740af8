"""Trainer tests: every algorithm on a tiny preset, exact resume, CLI errors, the divergence guard,
termination masks in the imagined unroll, checkpoint atomicity and the buffer round trip."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from fastrp import train
from fastrp.algos import ALGORITHMS
from fastrp.config import ALGO_PRESETS, ENV_PRESETS, CliError, build_parser, parse_args
from fastrp.rl.buffer import ReplayBuffer
from fastrp.rl.checkpoint import CHECKPOINT_NAME, load, save_atomic
from fastrp.rl.logger import COLUMNS, TIMING_COLUMNS, read_metrics
from fastrp.rl.unroll import imagined_objective

TINY = ["--env", "InvertedPendulum", "--preset", "tiny", "--progress", "false"]


def run_main(tmp_path, *args):
    return train.main([*TINY, "--logdir", str(tmp_path), *args])


def _float(cell):
    return float(cell) if cell != "" else None


@pytest.mark.parametrize("algo", ALGORITHMS)
def test_algorithm_runs_and_writes_metrics(tmp_path, algo):
    assert run_main(tmp_path, "--algo", algo, "--steps", "200", "--run-name", "r") == 0
    run_dir = tmp_path / "r"
    cfg = json.loads((run_dir / "config.json").read_text())
    assert cfg["algo"] == algo and cfg["steps"] == 200 and cfg["hidden_dim"] == 32
    rows = read_metrics(str(run_dir))
    assert [int(r["env_steps"]) for r in rows] == [50, 100, 150, 200]
    assert list(rows[0]) == COLUMNS
    for row in rows:
        assert int(row["skipped_updates"]) == 0
        for key in ("alpha", "q_mean", "critic_loss", "actor_loss", "policy_grad_norm", "steps_per_s"):
            assert math.isfinite(float(row[key])), (key, row[key])
    # warm-up is 50 steps: updates start at step 50, then critic + policy updates every step
    assert int(rows[1]["updates"]) == 50 * (1 + 1)
    assert _float(rows[1]["eval_return_mean"]) > 0 and _float(rows[0]["eval_return_mean"]) is None
    if algo != "sac":
        assert math.isfinite(float(rows[-1]["model_nll"])) and float(rows[-1]["model_holdout_mse"]) >= 0
        assert float(rows[-1]["rollout_len"]) == 1.0
    if algo.startswith("ddppo"):
        assert float(rows[-1]["grad_model_fd_loss"]) >= 0
    state = load(str(run_dir / CHECKPOINT_NAME))
    assert state["step"] == 200 and len(state["buffer"]["data"][0]) == 200
    assert list((run_dir / "tb").iterdir()), "no TensorBoard events"
    assert not os.path.exists(str(run_dir / CHECKPOINT_NAME) + ".tmp")


@pytest.mark.parametrize("algo", ["sac", "ddppo-sn"])
def test_resume_equals_uninterrupted_run(tmp_path, algo):
    args = ["--algo", algo, "--seed", "3"]
    assert run_main(tmp_path, *args, "--steps", "200", "--run-name", "full") == 0
    assert run_main(tmp_path, *args, "--steps", "100", "--run-name", "half") == 0
    assert train.main(["--resume", str(tmp_path / "half"), "--steps", "200", "--progress", "false"]) == 0
    full, resumed = read_metrics(str(tmp_path / "full")), read_metrics(str(tmp_path / "half"))
    assert [r["env_steps"] for r in resumed] == [r["env_steps"] for r in full]
    for a, b in zip(full, resumed):
        assert {k: v for k, v in a.items() if k not in TIMING_COLUMNS} == \
               {k: v for k, v in b.items() if k not in TIMING_COLUMNS}
    assert json.loads((tmp_path / "half" / "config.json").read_text())["steps"] == 200


def test_resume_drops_rows_written_after_the_checkpoint(tmp_path):
    assert run_main(tmp_path, "--algo", "sac", "--steps", "100", "--run-name", "r") == 0
    with open(tmp_path / "r" / "metrics.csv", "a") as fh:  # a row the killed run wrote after its checkpoint
        fh.write("150" + "," * (len(COLUMNS) - 1) + "\n")
    assert train.main(["--resume", str(tmp_path / "r"), "--steps", "150", "--progress", "false"]) == 0
    steps = [int(r["env_steps"]) for r in read_metrics(str(tmp_path / "r"))]
    assert steps == [50, 100, 150]


def test_nan_guard_stops_a_diverging_run(tmp_path, capsys):
    code = run_main(tmp_path, "--algo", "sac", "--steps", "400", "--run-name", "r", "--fault-nan-at", "120")
    assert code == train.EXIT_DIVERGED
    err = capsys.readouterr().err
    assert "diverged" in err and "last good checkpoint (env step 100)" in err
    rows = read_metrics(str(tmp_path / "r"))
    assert int(rows[-1]["env_steps"]) == 250  # three bad intervals: 150, 200, 250
    assert all(int(r["skipped_updates"]) > 0 for r in rows[2:])
    state = load(str(tmp_path / "r" / CHECKPOINT_NAME))
    assert state["step"] == 100
    for key in ("policy", "critic", "critic_target"):
        assert all(torch.isfinite(t).all() for t in state["agent"][key].values())


def test_guard_keeps_parameters_when_loss_is_nan():
    from fastrp.algos.common import guarded_step

    layer = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(layer.parameters(), lr=0.1)
    before = [p.detach().clone() for p in layer.parameters()]
    ok, norm = guarded_step(opt, list(layer.parameters()), layer(torch.ones(1, 3)).sum() * float("nan"))
    assert not bool(ok)
    assert all(torch.equal(p, b) for p, b in zip(layer.parameters(), before))
    assert all(torch.isfinite(s).all() for st in opt.state.values() for s in st.values())
    ok, _ = guarded_step(opt, list(layer.parameters()), layer(torch.ones(1, 3)).sum())
    assert bool(ok) and not torch.equal(next(layer.parameters()), before[0])


def test_adam_grads_preallocated_and_cuda_graph_closures_warm_up_eagerly():
    """make_adam gives every parameter a zeroed .grad up front (never first created by a compiled
    backward); with cuda_graphs, maybe_compile runs the closure's first call eagerly (the ops'
    cached device tables are then allocated outside the CUDA-graph pool) and compiles later calls."""
    from fastrp.algos.common import make_adam, maybe_compile

    layer = torch.nn.Linear(3, 2)
    make_adam(layer.parameters(), 1e-3, torch.device("cpu"))
    assert all(p.grad is not None and not p.grad.any() for p in layer.parameters())
    traced = []

    def step(x):
        traced.append(torch.compiler.is_compiling())
        return (x * 2).sum()

    torch._dynamo.reset()
    fn = maybe_compile(step, enabled=True, cuda_graphs=True)
    assert [fn(torch.ones(4)).item() for _ in range(3)] == [8.0, 8.0, 8.0]
    assert traced[0] is False and traced[1] is True  # eager first call, then dynamo traced it
    assert maybe_compile(step, enabled=False, cuda_graphs=True) is step


def test_diverged_model_fit_is_undone_and_counted(tmp_path, monkeypatch):
    from fastrp.nn.model import ProbabilisticEnsemble

    real_fit = ProbabilisticEnsemble.fit

    def poisoned_fit(self, *args, **kwargs):
        stats = real_fit(self, *args, **kwargs)
        with torch.no_grad():
            self.net.weights[0].fill_(float("nan"))
        return stats

    monkeypatch.setattr(ProbabilisticEnsemble, "fit", poisoned_fit)
    assert run_main(tmp_path, "--algo", "ddppo", "--steps", "100", "--run-name", "r") == 0
    rows = read_metrics(str(tmp_path / "r"))
    # fits at steps 50 and 100, each of both models, all undone
    assert [float(r["model_fits_skipped"]) for r in rows] == [2.0, 2.0]
    assert all(int(r["skipped_updates"]) == 0 for r in rows)
    state = load(str(tmp_path / "r" / CHECKPOINT_NAME))
    weights = [t for k, t in state["agent"]["model"].items() if k.startswith("net.weights")]
    assert weights and all(torch.isfinite(t).all() for t in weights)


@pytest.mark.parametrize("argv, message", [
    (["--env", "Pong"], "--env: unknown environment 'Pong'"),
    (["--algo", "ppo"], "invalid choice: 'ppo'"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["--steps", "-5"], "--steps: must be >= 1"),
    (["--steps", "1e4"], "invalid int value: '1e4'"),
    (["--gamma", "1.5"], "--gamma: must be in (0, 1]"),
    (["--num-elites", "9"], "--num-elites: must be <= --ensemble-size"),
    (["--device", "tpu"], "invalid choice: 'tpu'"),
    (["--cuda-graphs"], "--cuda-graphs: needs --compile"),
    (["--progress", "maybe"], "expected a boolean"),
])
def test_bad_cli_input(tmp_path, capsys, argv, message):
    assert train.main([*argv, "--logdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_bad_cli_subprocess_exit_code_and_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fastrp.train", "--env", "Nope", "--logdir", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    # the one-time notice of a missing compiled extension (FASTRP_DISABLE_EXT=1 runs) is not the error
    lines = [ln for ln in proc.stderr.strip().splitlines() if "fastrp._C not available" not in ln]
    assert len(lines) == 1 and "unknown environment 'Nope'" in lines[0]
    assert "Traceback" not in proc.stderr


def test_resume_errors(tmp_path, capsys):
    assert train.main(["--resume", str(tmp_path / "missing")]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert run_main(tmp_path, "--algo", "sac", "--steps", "100", "--run-name", "r") == 0
    assert train.main(["--resume", str(tmp_path / "r"), "--env", "Hopper"]) == 2
    assert "cannot change on --resume" in capsys.readouterr().err
    assert train.main(["--resume", str(tmp_path / "r"), "--steps", "50"]) == 2
    assert "already at env step 100" in capsys.readouterr().err
    assert run_main(tmp_path, "--algo", "sac", "--steps", "100", "--run-name", "r") == 2
    assert "already holds a run" in capsys.readouterr().err
    assert train.main(["--resume", str(tmp_path / "r"), "--obs-norm", "false"]) == 2
    assert "--obs-norm: cannot change on --resume" in capsys.readouterr().err
    # tensors that do not fit the networks: one line, exit 2, the run's config.json untouched
    path = tmp_path / "r" / "checkpoint.pt"
    good = torch.load(path, weights_only=False)
    bad = torch.load(path, weights_only=False)
    bad["agent"]["policy"]["net.weights.0"] = torch.zeros(1, 2, 3)
    torch.save(bad, path)
    config_before = (tmp_path / "r" / "config.json").read_text()
    assert train.main(["--resume", str(tmp_path / "r"), "--steps", "200"]) == 2
    err = capsys.readouterr().err
    assert "does not fit the networks" in err and len(err.strip().splitlines()) == 1
    assert (tmp_path / "r" / "config.json").read_text() == config_before
    # a checkpoint written before observation normalisation existed resumes as it ran (obs_norm off)
    old = dict(good, config={k: v for k, v in good["config"].items() if k not in ("obs_norm", "diag_every")})
    for key in ("policy", "critic", "critic_target"):
        old["agent"][key] = {k: v for k, v in good["agent"][key].items() if not k.startswith("obs_normalizer.")}
    torch.save(old, path)
    assert train.main(["--resume", str(tmp_path / "r"), "--steps", "150", "--progress", "false"]) == 0
    assert json.loads((tmp_path / "r" / "config.json").read_text())["obs_norm"] is False


def test_help_documents_every_field():
    text = build_parser().format_help()
    for flag in ("--env", "--algo", "--seed", "--steps", "--warmup-steps", "--device", "--logdir", "--resume",
                 "--eval-every", "--eval-episodes", "--horizon", "--fd-k", "--fd-weight", "--compile", "--cuda-graphs"):
        assert flag in text
    assert "Elite members (lowest holdout loss)" in text
    assert "ddppo-sn" in text


def test_presets_and_precedence():
    cfg = parse_args([])
    assert cfg.algo == "ddppo-sn" and cfg.env == "HalfCheetah"
    assert (cfg.ensemble_size, cfg.num_elites, cfg.model_hidden_dim, cfg.model_num_layers) == (7, 5, 200, 4)
    assert (cfg.policy_updates, cfg.critic_updates, cfg.model_train_every) == (10, 10, 250)
    assert cfg.policy_spectral_norm and cfg.model_spectral_norm
    hopper = parse_args(["--env", "Hopper", "--algo", "ddppo"])
    assert (hopper.horizon, hopper.fd_k, hopper.fd_weight) == (2, 25, 50.0)
    assert (hopper.rollout_min_len, hopper.rollout_max_len) == (1, 15) and not hopper.model_spectral_norm
    assert parse_args(["--env", "InvertedPendulum"]).warmup_steps == 200
    assert parse_args(["--env", "Hopper", "--horizon", "5"]).horizon == 5  # flags beat presets
    assert parse_args(["--algo", "sac"]).policy_updates == 1
    assert set(ENV_PRESETS) == {"InvertedPendulum", "Hopper", "Walker2d", "HalfCheetah", "Ant", "Humanoid"}
    assert set(ALGO_PRESETS) == set(ALGORITHMS)
    with pytest.raises(CliError, match="--eval-every: must be a multiple of --log-every"):
        parse_args(["--eval-every", "1500"])


def test_rollout_length_schedule():
    from fastrp.algos.mbpo import rollout_length

    cfg = parse_args(["--env", "Hopper"])
    assert [rollout_length(cfg, s) for s in (0, 20_999, 60_000, 100_000, 300_000)] == [1, 1, 8, 15, 15]
    assert rollout_length(parse_args(["--env", "HalfCheetah"]), 90_000) == 1


class _ConstModel(torch.nn.Module):
    """A stand-in prediction model: ``s' = s + 1``, reward 1 (what the unroll sees of a model)."""

    obs_dim, act_dim, ensemble_size, out_dim, learn_reward = 4, 1, 3, 5, True

    def sample_elites(self, batch_size, generator=None):
        return torch.zeros(batch_size, dtype=torch.int64)

    def predict(self, obs, act, members=None, deterministic=True, generator=None, noise=None):
        return obs + 1.0 + 0.0 * act.sum(-1, keepdim=True), torch.ones(obs.shape[0]) + 0.0 * act.sum(-1)


@pytest.mark.parametrize("start, expected_reward, expected_alive", [
    (0.0, 3.0, 1.0),   # never terminates within H = 3: rewards 1 + 1 + 1
    (1.5, 2.0, 0.0),   # terminates on the 2nd step (s = 2.5 -> 3.5 > 3): that reward counts, later ones do not
    (5.0, 1.0, 0.0),   # terminates on the first step
])
def test_termination_masks_stop_reward_accumulation(start, expected_reward, expected_alive):
    from fastrp.algos.maac import MAAC

    cfg = parse_args([*TINY, "--algo", "maac", "--horizon", "3", "--gamma", "1.0"])
    agent = MAAC(cfg, 4, 1, [-3.0], [3.0], torch.device("cpu"), termination=lambda s, a, s2: s2[..., 0] > 3.0)
    agent.model = _ConstModel()
    obs = torch.full((8, 4), start)
    loss, mean_logp, extra = agent.actor_objective(obs)
    assert extra["imagined_alive"].item() == expected_alive
    with torch.no_grad():
        _, info = imagined_objective(agent.policy, agent.model, agent.critic, obs, 3, 1.0, 0.0, agent.termination)
    assert info["model_reward"].item() == pytest.approx(expected_reward)
    loss.backward()
    assert not any(p.grad.any() for p in agent.critic.parameters()), "the critic must not be differentiated"


def test_checkpoint_is_atomic(tmp_path, monkeypatch):
    path = str(tmp_path / "ck.pt")
    save_atomic({"a": 1}, path)

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        save_atomic({"a": 2}, path)
    monkeypatch.undo()
    assert load(path) == {"a": 1}


def test_buffer_round_trip_with_larger_capacity():
    small = ReplayBuffer(2, 1, 5, torch.device("cpu"))
    for i in range(7):  # wraps: holds rows 2..6
        small.add(np.full((1, 2), i), np.zeros((1, 1)), np.array([i]), np.zeros((1, 2)), np.array([False]))
    big = ReplayBuffer(2, 1, 10, torch.device("cpu"))
    big.load_state_dict(small.state_dict())
    assert big.latest(10).reward.tolist() == [2, 3, 4, 5, 6]
    same = ReplayBuffer(2, 1, 5, torch.device("cpu"))
    same.load_state_dict(small.state_dict())
    torch.manual_seed(0)
    a = small.sample(16).reward
    torch.manual_seed(0)
    assert torch.equal(a, same.sample(16).reward)


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["sac", "ddppo-sn"])
def test_compile_on_cpu(tmp_path, algo):
    """--compile wraps the critic and policy update closures in torch.compile (for ddppo-sn the
    policy closure holds the unroll through both models); a short run compiles, trains and skips
    nothing."""
    assert run_main(tmp_path, "--algo", algo, "--steps", "150", "--compile", "--run-name", "c") == 0
    rows = read_metrics(str(tmp_path / "c"))
    assert rows and all(int(r["skipped_updates"]) == 0 for r in rows)
    assert all(math.isfinite(float(r["critic_loss"])) for r in rows if r["critic_loss"])


@pytest.mark.slow
def test_compiled_policy_step_restores_the_models():
    """The compiled ddppo-sn policy step (dynamo does compile it) differentiates only the policy:
    the critic and both models get no gradient, and afterwards they are trainable and in training
    mode again (a flag frozen before the step stays frozen); the policy has moved."""
    from torch._dynamo.utils import counters

    from fastrp.algos import get as get_algo

    torch._dynamo.reset()
    counters.clear()
    cfg = parse_args([*TINY, "--algo", "ddppo-sn", "--compile"])
    agent = get_algo("ddppo-sn")(cfg, 4, 1, [-3.0], [3.0], torch.device("cpu"),
                                 termination=lambda o, a, n: torch.zeros(o.shape[0], dtype=torch.bool))
    for m in (agent.critic, agent.model, agent.grad_model):
        for p in m.parameters():
            p.grad = torch.zeros_like(p)
    agent.model.min_logvar.requires_grad_(False)
    before = [p.detach().clone() for p in agent.policy.parameters()]
    for _ in range(3):
        out = agent._actor_step(torch.randn(8, 4))
        assert bool(out["actor_ok"])
        for m in (agent.critic, agent.model, agent.grad_model):
            assert not any(p.grad.any() for p in m.parameters())
            assert all(p.requires_grad for n, p in m.named_parameters() if not (m is agent.model and n == "min_logvar"))
        assert not agent.model.min_logvar.requires_grad
        assert agent.model.training and agent.grad_model.training and not agent._policy_mode
    assert any(not torch.equal(a, b) for a, b in zip(before, agent.policy.parameters()))
    assert counters["stats"]["unique_graphs"] > 0


@pytest.mark.cuda
@pytest.mark.parametrize("algo", ["sac", "ddppo-sn"])
def test_cuda_run_and_compile(tmp_path, algo):
    assert run_main(tmp_path, "--algo", algo, "--steps", "150", "--device", "cuda", "--run-name", "r") == 0
    rows = read_metrics(str(tmp_path / "r"))
    assert all(math.isfinite(float(r["critic_loss"])) for r in rows)
    assert run_main(tmp_path, "--algo", "sac", "--steps", "150", "--device", "cuda", "--compile",
                    "--run-name", "c") == 0
    assert all(int(r["skipped_updates"]) == 0 for r in read_metrics(str(tmp_path / "c")))
    assert run_main(tmp_path, "--algo", algo, "--steps", "150", "--device", "cuda", "--compile", "--cuda-graphs",
                    "--run-name", "g") == 0
    rows = read_metrics(str(tmp_path / "g"))
    assert rows and all(int(r["skipped_updates"]) == 0 for r in rows)
    assert all(math.isfinite(float(r["critic_loss"])) for r in rows if r["critic_loss"])


def test_buffer_latest_contiguous_and_wrapped():
    from fastrp.rl.buffer import ReplayBuffer

    buf = ReplayBuffer(2, 1, 5, torch.device("cpu"))
    rows = lambda lo, hi: (torch.arange(lo, hi).float()[:, None].expand(-1, 2), torch.zeros(hi - lo, 1),
                           torch.arange(lo, hi).float(), torch.zeros(hi - lo, 2), torch.zeros(hi - lo))
    buf.add(*rows(0, 3))
    assert buf.latest(2).reward.tolist() == [1.0, 2.0] and buf.latest(9).reward.tolist() == [0.0, 1.0, 2.0]
    buf.add(*rows(3, 7))  # wraps: storage holds 5, 6, 2, 3, 4
    assert buf.latest(4).reward.tolist() == [3.0, 4.0, 5.0, 6.0]
    assert buf.latest(2).reward.tolist() == [5.0, 6.0] and buf.latest(1).obs.tolist() == [[6.0, 6.0]]
