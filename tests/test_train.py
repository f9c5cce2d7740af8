"""Trainer tests: every algorithm on a tiny preset, exact resume, CLI errors, the divergence guard,
presets and where values come from, the agent's policy step, compiled updates as single graphs,
checkpoint atomicity and the buffer round trip (run lifecycle: tests/test_lifecycle.py)."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from fastrp import train
from fastrp.algos import ALGORITHMS, losses
from fastrp.config import ALGO_PRESETS, ENV_PRESETS, CliError, build_parser, parse_args, parse_args_with_sources
from fastrp.rl.buffer import ReplayBuffer
from fastrp.rl.checkpoint import CHECKPOINT_NAME, load, save_atomic
from fastrp.rl.logger import COLUMNS, TIMING_COLUMNS, read_metrics

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
    assert _float(rows[0]["eval_return_mean"]) is None and _float(rows[1]["eval_return_mean"]) is not None
    # the last row's evaluation is that of the checkpointed (final) policy, re-evaluated here
    from fastrp.diagnostics.run import load_run

    loaded = load_run(str(run_dir))
    returns = train.evaluate(loaded.agent, loaded.cfg, torch.device("cpu"))
    assert float(rows[-1]["eval_return_mean"]) == pytest.approx(float(np.mean(returns)), rel=1e-12)
    assert float(rows[-1]["eval_return_std"]) == pytest.approx(float(np.std(returns)), rel=1e-12, abs=1e-12)
    if algo != "sac":
        assert math.isfinite(float(rows[-1]["model_nll"])) and float(rows[-1]["model_holdout_mse"]) >= 0
        assert float(rows[-1]["rollout_len"]) == 1.0
    if algo.startswith("ddppo"):
        assert float(rows[-1]["grad_model_fd_loss"]) >= 0
    state = load(str(run_dir / CHECKPOINT_NAME))
    assert state["step"] == 200 and len(state["buffer"]["data"][0]) == 200
    assert list((run_dir / "tb").iterdir()), "no TensorBoard events"
    assert not os.path.exists(str(run_dir / CHECKPOINT_NAME) + ".tmp")


@pytest.mark.parametrize("algo, extra", [("sac", []), ("ddppo-sn", []), ("ddppo-sn", ["--model-target-norm", "true"])])
def test_resume_equals_uninterrupted_run(tmp_path, algo, extra):
    args = ["--algo", algo, "--seed", "3", *extra]
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


def _inject_nan_critic_loss(monkeypatch, from_step):
    """Fault injection for the guard tests: from env step ``from_step`` on, every critic loss is NaN."""
    state = {"step": 0}
    real_collect, real_loss = train.Trainer.collect, losses.critic_loss

    def collect(self):
        real_collect(self)
        state["step"] = self.step

    def critic_loss(*args, **kwargs):
        loss, info = real_loss(*args, **kwargs)
        return (loss * float("nan") if state["step"] >= from_step else loss), info

    monkeypatch.setattr(train.Trainer, "collect", collect)
    monkeypatch.setattr(losses, "critic_loss", critic_loss)


def test_nan_guard_stops_a_diverging_run(tmp_path, capsys, monkeypatch):
    _inject_nan_critic_loss(monkeypatch, 120)
    code = run_main(tmp_path, "--algo", "sac", "--steps", "400", "--run-name", "r")
    assert code == train.EXIT_DIVERGED
    err = capsys.readouterr().err
    assert "diverged" in err and "last good checkpoint (env step 100)" in err
    rows = read_metrics(str(tmp_path / "r"))
    assert int(rows[-1]["env_steps"]) == 250  # three bad intervals: 150, 200, 250
    assert all(int(r["skipped_updates"]) > 0 for r in rows[2:])
    assert [int(r["skipped_updates"]) for r in rows[:2]] == [0, 0]
    state = load(str(tmp_path / "r" / CHECKPOINT_NAME))
    assert state["step"] == 100
    for key in ("policy", "critic", "critic_target"):
        assert all(torch.isfinite(t).all() for t in state["agent"][key].values())


def test_guard_keeps_parameters_and_adam_state_when_loss_is_nan():
    from fastrp.algos.common import Adam, guarded_update

    layer = torch.nn.Linear(3, 2)
    opt = Adam(layer.parameters(), lr=0.1)
    ok, _ = guarded_update(opt, layer(torch.ones(1, 3)).sum())  # one real step: non-zero moments
    assert bool(ok)
    before = [p.detach().clone() for p in layer.parameters()]
    state_before = [{k: v.clone() for k, v in st.items()} for st in opt.state.values()]
    ok, norm = guarded_update(opt, layer(torch.ones(1, 3)).sum() * float("nan"))
    assert not bool(ok)
    assert all(torch.equal(p, b) for p, b in zip(layer.parameters(), before))
    assert all(torch.equal(v, old[k]) for st, old in zip(opt.state.values(), state_before) for k, v in st.items())
    assert all(not p.grad.any() for p in layer.parameters())  # zeroed, finite
    ok, _ = guarded_update(opt, layer(torch.ones(1, 3)).sum())
    assert bool(ok) and not torch.equal(next(layer.parameters()), before[0])


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_adam_masked_step_is_torch_adam(weight_decay):
    """fastrp's traceable Adam step gives torch.optim.Adam's parameters bit for bit on CPU."""
    from fastrp.algos.common import Adam

    torch.manual_seed(0)
    params = [torch.randn(17, 5), torch.randn(5), torch.randn(3, 1, 2)]
    ours = [p.clone().requires_grad_(True) for p in params]
    ref = [p.clone().requires_grad_(True) for p in params]
    opt, ref_opt = Adam(ours, lr=3e-4, weight_decay=weight_decay), torch.optim.Adam(ref, lr=3e-4, weight_decay=weight_decay)
    for it in range(60):
        grads = [torch.randn_like(p) * 10 ** (it % 5 - 2) for p in params]
        for p, q, g in zip(ours, ref, grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt.masked_step(torch.tensor(True))
        ref_opt.step()
    assert all(torch.equal(p, q) for p, q in zip(ours, ref))
    # checkpoints of either load into the other
    other = Adam([p.detach().clone().requires_grad_(True) for p in params], lr=3e-4, weight_decay=weight_decay)
    other.load_state_dict(ref_opt.state_dict())
    assert all(torch.equal(other.state[p]["exp_avg"], ref_opt.state[q]["exp_avg"])
               for p, q in zip(other.param_groups[0]["params"], ref))


def test_adam_grads_preallocated_and_cuda_graph_closures_warm_up_eagerly():
    """Adam gives every parameter a zeroed .grad and its state up front (never first created by a
    compiled backward); with cuda_graphs, compile_update runs the step's first call eagerly (the
    ops' cached device tables are then allocated outside the CUDA-graph pool) and compiles later calls."""
    from fastrp.algos.common import Adam, compile_update

    layer = torch.nn.Linear(3, 2)
    opt = Adam(layer.parameters(), 1e-3)
    assert all(p.grad is not None and not p.grad.any() for p in layer.parameters())
    assert all(set(opt.state[p]) == {"step", "exp_avg", "exp_avg_sq"} for p in layer.parameters())
    traced = []

    def step(x):
        traced.append(torch.compiler.is_compiling())
        return (x * 2).sum()

    torch._dynamo.reset()
    fn = compile_update(step, enabled=True, cuda_graphs=True)
    assert [fn(torch.ones(4)).item() for _ in range(3)] == [8.0, 8.0, 8.0]
    assert traced[0] is False and traced[1] is True  # eager first call, then dynamo traced it
    assert compile_update(step, enabled=False, cuda_graphs=True) is step


def test_diverged_model_fit_is_undone_counted_and_stops_the_run(tmp_path, monkeypatch, capsys):
    from fastrp.rl.model_fit import ModelFitter

    real_fit = ModelFitter.fit

    def poisoned_fit(self, *args, **kwargs):
        stats = real_fit(self, *args, **kwargs)
        with torch.no_grad():
            self.model.net.weights[0].fill_(float("nan"))
        return stats

    monkeypatch.setattr(ModelFitter, "fit", poisoned_fit)
    assert run_main(tmp_path, "--algo", "ddppo", "--steps", "100", "--run-name", "r") == 0
    rows = read_metrics(str(tmp_path / "r"))
    # fits at steps 50 and 100, each of both models, all undone
    assert [float(r["model_fits_skipped"]) for r in rows] == [2.0, 2.0]
    assert all(int(r["skipped_updates"]) == 0 for r in rows)
    state = load(str(tmp_path / "r" / CHECKPOINT_NAME))
    weights = [t for k, t in state["agent"]["model"].items() if k.startswith("net.weights")]
    assert weights and all(torch.isfinite(t).all() for t in weights)
    # a third failing refit in a row stops the run (never silently undone forever)
    capsys.readouterr()
    assert train.main(["--resume", str(tmp_path / "r"), "--steps", "300", "--progress", "false"]) == train.EXIT_DIVERGED
    err = capsys.readouterr().err
    assert "model refits diverged" in err and "3 times in a row" in err and "env step 100" in err
    assert load(str(tmp_path / "r" / CHECKPOINT_NAME))["step"] == 100


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
    pytest.param(["--compile", "--cuda-graphs"], "--cuda-graphs: needs a CUDA device",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
    (["--progress", "maybe"], "expected a boolean"),
    (["--seed", "4294967296"], "--seed: must be <= "),
    (["--seed", "-1"], "--seed: must be >= 0"),
    (["--steps", "100000000000"], "--steps: must be <= "),
    (["--hidden-dim", "10000000"], "--hidden-dim: must be <= "),
    (["--batch-size", "100000000"], "--batch-size: must be <= "),
    (["--cpu-threads", "100000"], "--cpu-threads: must be <= "),
    (["--actor-lr", "inf"], "--actor-lr: must be a finite number"),
    (["--init-alpha", "inf"], "--init-alpha: must be a finite number"),
    (["--target-entropy-scale", "nan"], "--target-entropy-scale: must be a finite number"),
    (["--actor-lr", "-1e-3"], "--actor-lr: must be > 0, got -0.001"),
    (["--gamma", "-.5"], "--gamma: must be in (0, 1]"),
    (["--run-name", "../x"], "--run-name: must be a plain directory name"),
    (["--run-name", "a/b"], "--run-name: must be a plain directory name"),
    (["--preset", "huge"], "invalid choice: 'huge'"),
    (["--horizon", "-1"], "--horizon: must be >= 0"),
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
    assert "--resume: no run directory at" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert train.main(["--resume", str(tmp_path / "empty")]) == 2
    assert "--resume: no checkpoint at" in capsys.readouterr().err
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
    config_json = json.loads((tmp_path / "r" / "config.json").read_text())
    (tmp_path / "r" / "config.json").write_text(json.dumps({k: v for k, v in config_json.items()
                                                            if k not in ("obs_norm", "diag_every", "sources")}))
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
    cfg = parse_args(["--preset", "paper"])
    assert cfg.algo == "ddppo-sn" and cfg.env == "HalfCheetah"
    assert (cfg.ensemble_size, cfg.num_elites, cfg.model_hidden_dim, cfg.model_num_layers) == (7, 5, 200, 4)
    assert (cfg.policy_updates, cfg.critic_updates, cfg.model_train_every) == (10, 10, 250)
    assert cfg.policy_spectral_norm and cfg.model_spectral_norm
    hopper = parse_args(["--env", "Hopper", "--algo", "ddppo", "--preset", "paper"])
    assert (hopper.horizon, hopper.fd_k, hopper.fd_weight) == (2, 25, 50.0)
    assert (hopper.rollout_min_len, hopper.rollout_max_len) == (1, 15) and not hopper.model_spectral_norm
    assert parse_args(["--env", "InvertedPendulum"]).warmup_steps == 200
    assert parse_args(["--env", "Hopper", "--horizon", "5"]).horizon == 5  # flags beat presets
    assert parse_args(["--algo", "sac"]).policy_updates == 1
    # the env layer holds only what the papers tie to the task: an algorithm keeps its own update counts
    mbpo = parse_args(["--env", "InvertedPendulum", "--algo", "mbpo", "--preset", "paper"])
    assert (mbpo.policy_updates, mbpo.critic_updates, mbpo.hidden_dim) == (10, 10, 256)
    assert set(ENV_PRESETS) == {"InvertedPendulum", "Hopper", "Walker2d", "HalfCheetah", "Ant", "Humanoid"}
    assert all(set(layer) <= {"steps", "warmup_steps", "horizon", "fd_k", "fd_weight", "rollout_min_len",
                              "rollout_max_len", "rollout_min_epoch", "rollout_max_epoch"} for layer in ENV_PRESETS.values())
    assert set(ALGO_PRESETS) == set(ALGORITHMS)
    # evaluations and checkpoints no longer have to be multiples of --log-every
    assert parse_args(["--eval-every", "1500"]).eval_every == 1500


def test_env_names_match_the_envs_package():
    from fastrp.config import ENV_NAMES
    from fastrp.envs import ENV_NAMES as ENVS

    assert tuple(ENV_NAMES) == tuple(ENVS)


def test_sources_say_where_each_value_came_from():
    cfg, src = parse_args_with_sources(["--env", "InvertedPendulum", "--algo", "mbpo", "--preset", "cpu",
                                        "--gamma", "0.98"])
    assert src["gamma"] == "flag" and cfg.gamma == 0.98
    assert src["policy_updates"] == "size cpu (InvertedPendulum)" and cfg.policy_updates == 1
    assert src["warmup_steps"] == "size cpu (InvertedPendulum)"
    assert src["horizon"] == "size cpu (InvertedPendulum)" and src["batch_size"] == "default"
    assert src["preset"] == "flag"
    cfg, src = parse_args_with_sources(["--env", "Hopper", "--algo", "sac", "--preset", "cpu"])
    assert src["hidden_dim"] == "size cpu (sac)" and cfg.hidden_dim == 256 and src["steps"] == "size cpu"
    cfg, src = parse_args_with_sources(["--env", "HalfCheetah", "--preset", "cpu"])  # the CPU default's fixes
    assert (cfg.horizon, src["horizon"], cfg.model_target_norm) == (1, "size cpu", True)
    assert parse_args(["--env", "HalfCheetah", "--preset", "paper"]).horizon == 3  # the paper's value stays
    cfg, src = parse_args_with_sources(["--env", "Hopper", "--preset", "paper"])
    assert src["policy_updates"] == "algo ddppo-sn" and src["steps"] == "env Hopper"
    cfg, src = parse_args_with_sources(["--device", "cpu"])  # auto picks the CPU sizes off CUDA
    assert cfg.preset == "cpu" and src["preset"] == "auto: --device cpu" and cfg.hidden_dim == 128
    text = " ".join(build_parser().format_help().split())
    assert "size cpu/InvertedPendulum: 64" in text and "algo mbpo/maac/rp-sn/ddppo/ddppo-sn: 10" in text


def test_cpu_preset_keeps_the_tuned_inverted_pendulum_settings():
    """The InvertedPendulum values tuned on CPU (they used to sit in the env preset) are the cpu
    preset's InvertedPendulum entry: the resolved config of that run is unchanged."""
    cfg = parse_args(["--env", "InvertedPendulum", "--preset", "cpu"])
    expected = dict(steps=10_000, warmup_steps=200, horizon=3, model_target_norm=False, fd_k=10, fd_weight=10.0, eval_every=1000,
                    eval_episodes=5, hidden_dim=64, model_hidden_dim=64, model_num_layers=3, policy_updates=1,
                    critic_updates=4, model_train_every=250, model_max_epochs=30, model_max_steps=200,
                    fd_batch_size=64, real_ratio=0.5, rollout_batch_size=10_000, tau=0.01, actor_lr=3e-4,
                    critic_lr=1e-3, alpha_lr=1e-3, init_alpha=0.1, batch_size=256)
    assert {k: getattr(cfg, k) for k in expected} == expected


def test_rollout_length_schedule():
    from fastrp.algos.agent import rollout_length

    cfg = parse_args(["--env", "Hopper", "--preset", "paper"])
    assert [rollout_length(cfg, s) for s in (0, 20_999, 60_000, 100_000, 300_000)] == [1, 1, 8, 15, 15]
    assert rollout_length(parse_args(["--env", "HalfCheetah"]), 90_000) == 1


class _ConstModel(torch.nn.Module):
    """A stand-in prediction model: ``s' = s + 1``, reward 1 (what the unroll sees of a model)."""

    obs_dim, act_dim, ensemble_size, out_dim, learn_reward = 4, 1, 3, 5, True

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Module()
        self.net.cached_scales = lambda: __import__("contextlib").nullcontext()
        self.w = torch.nn.Parameter(torch.ones(()))

    def sample_elites(self, batch_size, generator=None):
        return torch.zeros(batch_size, dtype=torch.int64)

    def predict(self, obs, act, members=None, deterministic=True, generator=None, noise=None):
        return obs + self.w + 0.0 * act.sum(-1, keepdim=True), self.w * torch.ones(obs.shape[0]) + 0.0 * act.sum(-1)


def test_policy_step_differentiates_only_the_policy():
    """The agent's policy + temperature step (maac): the policy moves, the critic and the model get
    no gradient and keep their training flags and modes."""
    from fastrp.algos import get as get_algo

    cfg = parse_args([*TINY, "--algo", "maac", "--horizon", "3"])
    agent = get_algo("maac")(cfg, 4, 1, [-3.0], [3.0], torch.device("cpu"), termination=lambda s, a, s2: s2[..., 0] > 3.0)
    agent.model = _ConstModel()
    for m in (agent.critic, agent.model):
        for p in m.parameters():
            p.grad = torch.zeros_like(p)
    before = [p.detach().clone() for p in agent.policy.parameters()]
    with agent.policy_update_mode():
        out = agent.policy_update(torch.zeros(8, 4))
    assert bool(out["ok"])
    assert not any(p.grad.any() for p in agent.critic.parameters()), "the critic must not be differentiated"
    assert not agent.model.w.grad.any(), "the model must not be differentiated"
    assert agent.critic.training and all(p.requires_grad for p in agent.critic.parameters())
    assert agent.model.w.requires_grad and agent.model.training
    assert any(not torch.equal(a, b) for a, b in zip(before, agent.policy.parameters()))


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
        with agent.policy_update_mode():
            out = agent._policy_update(torch.randn(8, 4))
        assert bool(out["ok"])
        for m in (agent.critic, agent.model, agent.grad_model):
            assert not any(p.grad.any() for p in m.parameters())
            assert all(p.requires_grad for n, p in m.named_parameters() if not (m is agent.model and n == "min_logvar"))
        assert not agent.model.min_logvar.requires_grad
        assert agent.model.training and agent.grad_model.training
    assert any(not torch.equal(a, b) for a, b in zip(before, agent.policy.parameters()))
    assert counters["stats"]["unique_graphs"] > 0


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(torch._dynamo.config, "trace_autograd_ops"), reason="torch < 2.11 breaks at backward")
@pytest.mark.parametrize("algo", ["sac", "ddppo-sn"])
def test_each_update_is_one_graph(algo):
    """Under --compile each update - the critic step, and the policy + temperature step with the
    model unroll - is one graph: loss, backward and optimizer step, no graph break."""
    from fastrp.algos import get as get_algo
    from fastrp.algos.common import _trace_autograd_ops

    torch._dynamo.reset()
    cfg = parse_args([*TINY, "--algo", algo])
    agent = get_algo(algo)(cfg, 4, 1, [-3.0], [3.0], torch.device("cpu"),
                           termination=lambda o, a, n: n[:, 0] > 10.0)
    buffer = ReplayBuffer(4, 1, 100, torch.device("cpu"))
    buffer.add(torch.randn(100, 4), torch.rand(100, 1), torch.randn(100), torch.randn(100, 4), torch.zeros(100))
    with _trace_autograd_ops():
        critic = torch._dynamo.explain(agent.critic_update)(agent.critic_batch(buffer))
        with agent.policy_update_mode():
            policy = torch._dynamo.explain(agent.policy_update)(agent.policy_states(buffer))
    for name, ex in (("critic", critic), ("policy", policy)):
        assert ex.graph_break_count == 0 and ex.graph_count == 1, (name, [str(b.reason)[:200] for b in ex.break_reasons])


@pytest.mark.cuda
@pytest.mark.parametrize("algo", ["sac", "ddppo-sn"])
def test_cuda_run_and_compile(tmp_path, algo):
    pytest.importorskip("mujoco", reason="training steps MuJoCo (the GPU machine has no simulator)")
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


def test_policy_sn_placement():
    """policy_sn_layers: RP-PGM's code normalises the policy's hidden layers, paper 000's text all of
    them; the agent builds what the config says and the placement is fixed for a resumed run."""
    from fastrp.algos import get as get_algo
    from fastrp.config import RESUME_FIXED

    for layers, expected in (("hidden", (0, 1)), ("all", (0, 1, 2))):
        cfg = parse_args([*TINY, "--algo", "rp-sn", "--policy-sn-layers", layers])
        agent = get_algo("rp-sn")(cfg, 4, 1, [-1.0], [1.0], torch.device("cpu"))
        assert agent.policy.net.sn_layers == expected
    off = parse_args([*TINY, "--algo", "maac", "--policy-sn-layers", "all"])
    assert get_algo("maac")(off, 4, 1, [-1.0], [1.0], torch.device("cpu")).policy.net.sn_layers == ()
    assert "policy_sn_layers" in RESUME_FIXED
    with pytest.raises(CliError, match="invalid choice: 'some'"):
        parse_args(["--policy-sn-layers", "some"])


@pytest.mark.parametrize("algo", ["rp-sn", "ddppo-sn", "maac", "ddppo"])
def test_model_sn_placement(algo):
    """Paper 000 normalises every layer of the model but the output layer (the model must reach the
    targets' scale); the gradient model of ddppo-sn likewise; no SN without the algorithm's flag."""
    from fastrp.algos import get as get_algo

    cfg = parse_args([*TINY, "--algo", algo])
    agent = get_algo(algo)(cfg, 4, 1, [-1.0], [1.0], torch.device("cpu"))
    models = [agent.model] + ([agent.grad_model] if algo.startswith("ddppo") else [])
    for model in models:
        layers = len(model.net.weights)
        assert model.net.sn_layers == (tuple(range(layers - 1)) if algo.endswith("-sn") else ())


@pytest.mark.parametrize("preset", ["paper", "cpu", "tiny"])
@pytest.mark.parametrize("env", ["InvertedPendulum", "Hopper", "HalfCheetah"])
def test_mbpo_presets_feed_model_rollouts_to_the_critic(preset, env):
    """MBPO uses its model only for data: a preset that made every critic row real would turn
    mbpo into SAC (the cpu preset's real-only mix once did)."""
    assert parse_args(["--env", env, "--algo", "mbpo", "--preset", preset]).real_ratio < 1


@pytest.mark.parametrize("real_ratio,made", [(1.0, False), (0.5, True)])
def test_model_rollouts_are_made_only_when_something_reads_them(real_ratio, made):
    from fastrp.algos import SPECS
    from fastrp.algos.agent import Agent

    torch.manual_seed(0)
    cfg = parse_args(["--env", "Hopper", "--algo", "mbpo", "--preset", "tiny", "--real-ratio", str(real_ratio)])
    never_done = lambda obs, act, next_obs: torch.zeros(obs.shape[0], dtype=torch.bool)  # noqa: E731
    agent = Agent(cfg, 11, 3, [-1.0] * 3, [1.0] * 3, torch.device("cpu"), never_done, spec=SPECS["mbpo"])
    buffer = ReplayBuffer(11, 3, 64, torch.device("cpu"))
    buffer.add(torch.randn(64, 11), torch.rand(64, 3) * 2 - 1, torch.randn(64), torch.randn(64, 11),
               torch.zeros(64, dtype=torch.bool))
    stats = agent.generate_rollouts(buffer, step=1000)
    assert (len(agent.model_buffer) > 0) == made and ("rollout_len" in stats) == made
