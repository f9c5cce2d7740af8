"""Trainer-update benchmark: the work of one env step of ``ddppo-sn`` on HalfCheetah, in updates/s.

    python bench/update.py                                   # auto device, paper preset
    python bench/update.py --quick                           # smoke test (tiny preset, seconds)
    python bench/update.py --device cpu --threads 1 --preset paper --repeats 3 --model-epochs 1 \\
        --json bench/results/cpu-update.json
    python bench/update.py --device cuda --json bench/results/h200-update.json

What one "update" is (``fastrp/algos/ddppo.py`` and its bases ``maac.py`` / ``mbpo.py`` /
``sac.py``, driven by ``fastrp/train.py``): after every env step past warm-up the trainer calls
``agent.on_env_step`` (every ``model_train_every`` steps: refit the prediction model, refit the
gradient model, roll the policy out through the prediction model into the model buffer) and
``agent.update`` (``critic_updates`` critic steps on mixed real/model minibatches, then
``policy_updates`` policy + temperature steps through the ``horizon``-step unroll, values from the
prediction model and gradients from the gradient model).  The phases, each its own NVTX range:

* ``model``       ``guarded_fit`` of the prediction ensemble on the whole replay buffer (holdout
                  early stopping, at most ``model_max_epochs`` epochs) + the model rollout of
                  ``rollout_batch_size`` start states into the model buffer
* ``grad_model``  ``guarded_fit`` of the gradient ensemble (NLL + ``fd_weight`` x directional-
                  derivative loss; kNN over the last ``fd_window`` transitions, forward-mode JVPs)
* ``critic``      ``critic_updates`` x ``agent._critic_update`` (compiled under ``--compile``, as the policy step)
* ``policy``      ``policy_updates`` x ``agent._policy_update`` (the unroll, forward + backward)

The two refits happen once per ``model_train_every`` env steps, so one update costs
``critic + policy + (model + grad_model) / model_train_every``; that amortised sum is the "update"
of the table (``updates/s`` = env steps/s of the trainer's update work, env stepping excluded).
Every repeat runs all four phases once, each timed with ``time.perf_counter`` between device
synchronisations; the table shows median / p20 / p80 over repeats after one warm-up repeat.
``--model-epochs`` caps the refits' epochs (default: the preset's ``model_max_epochs``), to
keep CPU runs short; the JSON records the cap.

Providers, in one process, each with its own agent (same seed, same replay buffer):

* ``eager``             every fastrp op on its torch reference backend: each ``EnsembleMLP`` of the
                        policy, twin Q, prediction and gradient models gets ``backend="torch"``
                        (dense layers, spectral norm, JVP), and the models' kNN
                        (``fastrp.nn.model.fd_targets``) is called with ``backend="torch"``
* ``fastrp``            the trainer as it runs by default (auto backends: Triton / CUDA kernels on
                        CUDA, C++ kNN and torch dense ops on CPU)
* ``fastrp-compile``    the trainer's ``--compile`` (critic and policy closures compiled with
                        ``torch.compile``, no CUDA graphs); by default on CUDA only (on a small CPU
                        each closure compiles for minutes: ask for it with ``--providers``)
* ``fastrp-cudagraph``  the trainer's ``--compile --cuda-graphs`` (critic and policy closures compiled
                        with ``mode="reduce-overhead"``; CUDA only)

The replay buffer holds ``--fill`` real HalfCheetah transitions from ``fastrp.envs`` with uniform
random actions (as the trainer's warm-up).  Without the simulator (no mujoco / gymnasium, as on the
GPU machine) or with ``--synthetic``, it holds synthetic transitions of HalfCheetah's sizes instead
(smooth random dynamics, see :func:`synthetic_buffer`): the update's work is the same, only the
fitted models differ; the JSON records which (``transitions``).  Each provider is timed once right after its warm-up,
then the other repeats go round-robin over the providers (load on a shared machine hits them
alike).  A provider that fails prints its error in its row; the others still run.  With
``--json`` the file is rewritten after each provider's first repeat and after every round
(``complete: false`` until the end), so a run stopped by a time limit keeps what it measured.
``--counters`` adds, per provider, the torch.compile counters its calls moved (inductor,
cudagraph skips, graph breaks, recompilations): a silently skipped CUDA graph shows there.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys
import time
import traceback
from typing import Dict, List

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import fastrp.rl.model_fit as fastrp_model_fit  # noqa: E402
from fastrp import algos  # noqa: E402
from fastrp.config import resolve  # noqa: E402
from fastrp.nn.ensemble import EnsembleMLP  # noqa: E402
from fastrp.rl.buffer import ReplayBuffer  # noqa: E402
from fastrp.rl.model_fit import FDTerm, guarded_fit  # noqa: E402

ENV, ALGO = "HalfCheetah", "ddppo-sn"
ALL_PROVIDERS = ("eager", "fastrp", "fastrp-compile", "fastrp-cudagraph")
CPU_DEFAULT = ("eager", "fastrp", "fastrp-cudagraph")  # fastrp-compile is opt-in on CPU (minutes of compiling)
CUDA_ONLY = ("fastrp-cudagraph",)
COUNTER_KEYS = ("inductor", "graph_break", "stats", "recompiles")
PHASES = ("model", "grad_model", "critic", "policy")


# --------------------------------------------------------------------------------------------
# Data and agents
# --------------------------------------------------------------------------------------------
OBS_DIM, ACT_DIM = 17, 6  # HalfCheetah-v5


def simulator():
    """``fastrp.envs`` when the simulator packages import, else None."""
    try:
        import fastrp.envs as envs
    except ImportError:
        return None
    return envs


def env_spec(synthetic: bool):
    """``(obs_dim, act_dim, action low, action high, termination fn)`` of HalfCheetah."""
    envs = None if synthetic else simulator()
    if envs is None:  # HalfCheetah never terminates
        return OBS_DIM, ACT_DIM, -np.ones(ACT_DIM), np.ones(ACT_DIM), \
            lambda obs, act, next_obs: torch.zeros(obs.shape[0], dtype=torch.bool, device=obs.device)
    env = envs.make(ENV, 1, seed=0)
    space = env.single_action_space
    out = env.obs_dim, env.act_dim, space.low, space.high, envs.termination_fn(ENV)
    env.close()
    return out


def synthetic_buffer(n: int, device: torch.device, seed: int) -> ReplayBuffer:
    """``n`` transitions of HalfCheetah's sizes from a fixed smooth random map
    ``s' = s + 0.1 tanh(s A + a C)``, reward ``tanh(s) . r`` (seeded): learnable dynamics, so the
    model fits do the same work as on real data, without the simulator."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(OBS_DIM, OBS_DIM, generator=g) / OBS_DIM ** 0.5
    C = torch.randn(ACT_DIM, OBS_DIM, generator=g) / ACT_DIM ** 0.5
    r = torch.randn(OBS_DIM, generator=g) / OBS_DIM ** 0.5
    obs = torch.randn(n, OBS_DIM, generator=g)
    act = torch.rand(n, ACT_DIM, generator=g) * 2 - 1
    next_obs = obs + 0.1 * torch.tanh(obs @ A + act @ C)
    reward = torch.tanh(obs) @ r
    buffer = ReplayBuffer(OBS_DIM, ACT_DIM, n, device)
    buffer.add(obs.numpy(), act.numpy(), reward.numpy(), next_obs.numpy(), np.zeros(n, dtype=bool))
    return buffer


def fill_buffer(n: int, device: torch.device, seed: int, synthetic: bool = False) -> ReplayBuffer:
    """``n`` HalfCheetah transitions with uniform random actions (one env, as the warm-up), or
    :func:`synthetic_buffer` without the simulator."""
    envs = None if synthetic else simulator()
    if envs is None:
        return synthetic_buffer(n, device, seed)
    make = envs.make
    env = make(ENV, 1, seed=seed)
    env.reset(seed=seed)
    space = env.single_action_space
    rng = np.random.default_rng(seed)
    buffer = ReplayBuffer(env.obs_dim, env.act_dim, n, device)
    for _ in range(n):
        tr = env.step_transition(rng.uniform(space.low, space.high)[None].astype(np.float64))
        buffer.add(tr.obs, tr.action, tr.reward, tr.next_obs, tr.terminated)
    env.close()
    return buffer


class Runner:
    """One provider: a ``ddppo-sn`` agent and the four timed phases of one update."""

    def __init__(self, provider: str, base_cfg: dict, buffer: ReplayBuffer, device: torch.device, seed: int,
                 synthetic: bool = False):
        self.provider, self.buffer, self.device = provider, buffer, device
        compiled, graphs = provider in ("fastrp-compile", "fastrp-cudagraph"), provider == "fastrp-cudagraph"
        self.cfg = cfg = resolve({**base_cfg, "compile": compiled, "cuda_graphs": graphs})
        torch.manual_seed(seed)
        obs_dim, act_dim, low, high, termination = env_spec(synthetic)
        self.agent = algos.get(ALGO)(cfg, obs_dim, act_dim, low, high, device, termination=termination)
        self.eager = provider == "eager"
        if self.eager:
            for module in (self.agent.policy, self.agent.critic, self.agent.critic_target, self.agent.model,
                           self.agent.grad_model):
                for m in module.modules():
                    if isinstance(m, EnsembleMLP):
                        m.backend = "torch"
        self.step = cfg.warmup_steps  # a refit step of the schedule (rollout length of epoch 5)

    @contextlib.contextmanager
    def _backends(self):
        """For ``eager``: the models' kNN on the torch backend (restored afterwards)."""
        if not self.eager:
            yield
            return
        original = fastrp_model_fit.fd_targets
        fastrp_model_fit.fd_targets = functools.partial(original, backend="torch")
        try:
            yield
        finally:
            fastrp_model_fit.fd_targets = original

    # ---- the phases (the bodies of Agent.refit_models, Agent.generate_rollouts and Agent.update) ---
    def model(self) -> None:
        agent, cfg = self.agent, self.cfg
        guarded_fit(agent.model_fitter, self.buffer.latest(len(self.buffer)), cfg)
        agent.generate_rollouts(self.buffer, self.step)

    def grad_model(self) -> None:
        cfg = self.cfg
        fd_k = min(cfg.fd_k, min(cfg.fd_window, len(self.buffer)) - 1)
        guarded_fit(self.agent.grad_model_fitter, self.buffer.latest(len(self.buffer)), cfg,
                    extra_term=FDTerm(cfg.fd_weight, fd_k, cfg.fd_window, cfg.fd_batch_size))

    def critic(self) -> None:
        for _ in range(self.cfg.critic_updates):
            out = self.agent._critic_update(self.agent.critic_batch(self.buffer))
            self.agent.stats.critic.add(out.pop("ok"), out)

    def policy(self) -> None:
        for _ in range(self.cfg.policy_updates):
            obs = self.agent.policy_states(self.buffer)
            with self.agent.policy_update_mode():
                out = self.agent._policy_update(obs)
            self.agent.stats.policy.add(out.pop("ok"), out)

    def repeat(self) -> Dict[str, float]:
        """One update's four phases; wall ms of each (device synchronised around each)."""
        out = {}
        with self._backends():
            for phase in PHASES:
                common.synchronize(self.device)
                t0 = time.perf_counter()
                with common.nvtx_range(f"{self.provider}/{phase}"):
                    getattr(self, phase)()
                common.synchronize(self.device)
                out[phase] = (time.perf_counter() - t0) * 1e3
        self.agent.stats.pop()  # the host read the trainer does once per log interval
        return out


# --------------------------------------------------------------------------------------------
# Measurement and report
# --------------------------------------------------------------------------------------------
def quantiles(samples: List[float]) -> Dict[str, float]:
    q = torch.quantile(torch.tensor(samples, dtype=torch.float64), torch.tensor(common.QUANTILES, dtype=torch.float64))
    return {"median_ms": q[0].item(), "p20_ms": q[1].item(), "p80_ms": q[2].item()}


def _counters() -> Dict[str, Dict[str, int]]:
    from torch._dynamo.utils import counters

    return {k: dict(counters[k]) for k in COUNTER_KEYS if counters[k]}


def _moved(before: Dict[str, Dict[str, int]], after: Dict[str, Dict[str, int]], into: Dict[str, Dict[str, int]]):
    """Add the counter increments from ``before`` to ``after`` into ``into``."""
    for key, values in after.items():
        for name, value in values.items():
            delta = value - before.get(key, {}).get(name, 0)
            if delta:
                into.setdefault(key, {})[name] = into.get(key, {}).get(name, 0) + delta


def run(providers: List[str], base_cfg: dict, buffer: ReplayBuffer, device: torch.device, repeats: int,
        seed: int, synthetic: bool = False, progress=None) -> Dict[str, dict]:
    """Build each provider, warm it up and time it once, then ``repeats - 1`` round-robin rounds.
    ``progress(results, complete)`` is called after each provider's first sample and every round."""
    errors: Dict[str, dict] = {}
    runners: Dict[str, Runner] = {}
    warmup_s: Dict[str, float] = {}
    moved: Dict[str, Dict[str, Dict[str, int]]] = {name: {} for name in providers}
    samples: Dict[str, List[Dict[str, float]]] = {name: [] for name in providers}

    def call(name, fn):
        before = _counters()
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - reported in the row
            traceback.print_exc()
            errors[name] = {"error": f"{type(exc).__name__}: {exc}".splitlines()[0][:200]}
            runners.pop(name, None)
            return None
        finally:
            _moved(before, _counters(), moved[name])

    def summary() -> Dict[str, dict]:
        results: Dict[str, dict] = {}
        for name in providers:
            extra = {"counters": moved[name]} if moved[name] else {}
            if name in errors or not samples[name]:
                results[name] = {**errors.get(name, {"error": "not measured"}), **extra}
                continue
            every = base_every
            per_phase = {p: quantiles([s[p] for s in samples[name]]) for p in PHASES}
            total = quantiles([s["critic"] + s["policy"] + (s["model"] + s["grad_model"]) / every
                               for s in samples[name]])
            results[name] = {"phases": per_phase, "update": total, "updates_per_s": 1e3 / total["median_ms"],
                             "repeats": len(samples[name]), "warmup_s": warmup_s[name], **extra}
        return results

    def measure(name, runner):
        out = call(name, runner.repeat)
        if out is not None:
            samples[name].append(out)

    base_every = resolve(base_cfg).model_train_every
    for name in providers:  # build, warm up and time once (each provider has a sample early)
        if name in CUDA_ONLY and device.type != "cuda":
            errors[name] = {"error": "CUDA only"}
            continue
        t0 = time.perf_counter()
        runner = call(name, lambda: Runner(name, base_cfg, buffer, device, seed, synthetic))
        if runner is not None and call(name, runner.repeat) is not None:
            warmup_s[name] = time.perf_counter() - t0
            print(f"  {name}: build + warm-up {warmup_s[name]:.1f} s", flush=True)
            runners[name] = runner
            if repeats > 0:
                measure(name, runner)
        if progress:
            progress(summary(), False)
    for _ in range(repeats - 1):  # the other repeats round-robin
        for name, runner in list(runners.items()):
            measure(name, runner)
        if progress:
            progress(summary(), False)
    return summary()


def report(results: Dict[str, dict], every: int) -> str:
    eager = results.get("eager", {}).get("update", {}).get("median_ms")
    rows = []
    for name, r in results.items():
        if "error" in r:
            rows.append({"provider": name, "update ms (p20-p80)": r["error"]})
            continue
        u, ph = r["update"], r["phases"]
        rows.append({
            "provider": name,
            "update ms (p20-p80)": f"{common.fmt_ms(u['median_ms'])} ({common.fmt_ms(u['p20_ms'])}-{common.fmt_ms(u['p80_ms'])})",
            "updates/s": f"{r['updates_per_s']:.3g}",
            "vs eager": f"{eager / u['median_ms']:.2f}x" if eager else "-",
            f"model fit+rollout ms (/{every})": common.fmt_ms(ph["model"]["median_ms"]),
            f"grad-model fit ms (/{every})": common.fmt_ms(ph["grad_model"]["median_ms"]),
            "critic ms": common.fmt_ms(ph["critic"]["median_ms"]),
            "policy ms": common.fmt_ms(ph["policy"]["median_ms"]),
        })
    columns = ["provider", "update ms (p20-p80)", "updates/s", "vs eager", f"model fit+rollout ms (/{every})",
               f"grad-model fit ms (/{every})", "critic ms", "policy ms"]
    return common.format_table(rows, columns)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--providers", default=None,
                        help=f"comma list of {', '.join(ALL_PROVIDERS)} (default: all on CUDA, "
                             f"{','.join(CPU_DEFAULT)} on CPU)")
    parser.add_argument("--preset", choices=("paper", "tiny"), default="paper", help="fastrp.config size preset")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per provider (after one warm-up)")
    parser.add_argument("--fill", type=int, default=5000, help="random-action HalfCheetah transitions in the buffer")
    parser.add_argument("--model-epochs", type=int, default=None,
                        help="cap on the refits' epochs (default: the preset's model_max_epochs)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny preset, small buffer, 2 repeats (seconds)")
    parser.add_argument("--json", default=None, help="write the results to this path")
    parser.add_argument("--counters", action="store_true",
                        help="print, per provider, the torch.compile counters (inductor, cudagraph skips, graph "
                             "breaks, recompiles) its calls moved")
    parser.add_argument("--synthetic", action="store_true",
                        help="synthetic transitions instead of HalfCheetah (the default without mujoco/gymnasium)")
    args = parser.parse_args(argv)

    if args.quick:
        args.preset, args.fill, args.repeats = "tiny", 600, 2
    device = common.pick_device(args.device)
    if args.providers is None:
        args.providers = ",".join(ALL_PROVIDERS if device.type == "cuda" else CPU_DEFAULT)
    providers = common.parse_list(args.providers, str)
    unknown = [p for p in providers if p not in ALL_PROVIDERS]
    if unknown:
        parser.error(f"--providers: unknown {', '.join(unknown)}; choose from {', '.join(ALL_PROVIDERS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    base_cfg = {"env": ENV, "algo": ALGO, "preset": args.preset, "device": device.type, "seed": args.seed}
    if args.model_epochs is not None:
        base_cfg["model_max_epochs"] = args.model_epochs
    if args.quick:
        base_cfg["rollout_batch_size"] = 64
    cfg = resolve(base_cfg)

    print(f"# {ALGO} {ENV} update, preset {args.preset}, {common.device_name(device)}")
    print(f"# {cfg.critic_updates} critic + {cfg.policy_updates} policy steps per update, batch {cfg.batch_size}, "
          f"H {cfg.horizon}; model refits every {cfg.model_train_every} steps (<= {cfg.model_max_epochs} epochs, "
          f"{cfg.ensemble_size}x{cfg.model_num_layers}x{cfg.model_hidden_dim}, fd_k {cfg.fd_k}), "
          f"rollout batch {cfg.rollout_batch_size}; buffer {args.fill} random-action transitions")
    synthetic = args.synthetic or simulator() is None
    transitions = "synthetic (HalfCheetah sizes)" if synthetic else "HalfCheetah random-action"
    t0 = time.perf_counter()
    buffer = fill_buffer(args.fill, device, args.seed, synthetic)
    print(f"  buffer filled with {args.fill} {transitions} transitions in {time.perf_counter() - t0:.1f} s", flush=True)
    def write(results: Dict[str, dict], complete: bool) -> None:
        if args.json:
            out = [{"provider": name, **r} for name, r in results.items()]
            common.write_json(args.json, device, out, quiet=not complete, complete=complete, algo=ALGO, env=ENV,
                              preset=args.preset, fill=args.fill, transitions=transitions, repeats=args.repeats,
                              model_max_epochs=cfg.model_max_epochs, model_train_every=cfg.model_train_every,
                              critic_updates=cfg.critic_updates, policy_updates=cfg.policy_updates,
                              batch_size=cfg.batch_size, horizon=cfg.horizon)

    results = run(providers, base_cfg, buffer, device, args.repeats, args.seed, synthetic, progress=write)
    print()
    print(report(results, cfg.model_train_every))
    print(f"\nupdate = critic + policy + (model + grad_model) / {cfg.model_train_every}; median over "
          f"{args.repeats} repeats (p20-p80); phase columns are medians of one occurrence.")
    if args.counters:  # a skipped CUDA graph shows as inductor cudagraph_skips
        for name, r in results.items():
            for key, values in r.get("counters", {}).items():
                print(f"counters {name} {key}: {values}")
    if not args.counters:
        results = {name: {k: v for k, v in r.items() if k != "counters"} for name, r in results.items()}
    write(results, True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
