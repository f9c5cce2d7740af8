"""``python -m fastrp.train``: train an agent on a MuJoCo task and write a run directory.

The run directory holds ``config.json`` (the resolved config), ``metrics.csv`` (one row per log
interval, columns in :data:`fastrp.rl.logger.COLUMNS`), TensorBoard events under ``tb/`` and
``checkpoint.pt`` (written atomically; everything a resume needs). ``--resume RUN_DIR`` continues
a run; on CPU the resumed rows equal those of an uninterrupted run.

Exit codes: 0 done, 2 invalid command line, 3 the run diverged (non-finite updates for
``--max-bad-intervals`` consecutive log intervals; the last good checkpoint is kept).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from fastrp import algos
from fastrp.config import (RESUME_FIXED, CliError, Config, build_parser, config_from_checkpoint, given_flags,
                           parse_args, validate)
from fastrp.diagnostics.run import TrainingDiagnostics
from fastrp.envs import make, termination_fn
from fastrp.rl import checkpoint as ckpt
from fastrp.rl.buffer import ReplayBuffer
from fastrp.rl.logger import SUMMED_COLUMNS, MetricsLogger, Progress

EXIT_DIVERGED = 3


class Diverged(RuntimeError):
    """The run kept producing non-finite updates."""


class CheckpointMismatch(RuntimeError):
    """A checkpoint's tensors do not fit the networks built from its config."""


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise CliError("--device: cuda requested but torch has no CUDA device")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def evaluate(agent, cfg: Config, device: torch.device) -> List[float]:
    """Returns of ``eval_episodes`` deterministic episodes on a separate env reset with a fixed seed
    (so evaluations neither consume nor depend on the training RNG streams)."""
    env = make(cfg.env, cfg.eval_episodes, seed=cfg.seed + 10_000)
    env.reset(seed=cfg.seed + 10_000)
    returns = np.zeros(cfg.eval_episodes)
    running = np.ones(cfg.eval_episodes, dtype=bool)
    while running.any():
        action = agent.act(torch.as_tensor(env.obs, dtype=torch.float32, device=device), deterministic=True)
        tr = env.step_transition(action.cpu().numpy())
        returns += np.where(running, tr.reward, 0.0)
        running &= ~(tr.terminated | tr.truncated)
    env.close()
    return returns.tolist()


class Trainer:
    """One run: env, replay buffer, agent, logger, checkpoints (see the module docstring)."""

    def __init__(self, cfg: Config, run_dir: str, resume_state: Optional[dict] = None):
        self.cfg, self.run_dir = cfg, run_dir
        self.device = resolve_device(cfg.device)
        torch.set_num_threads(cfg.cpu_threads)
        ckpt.seed_everything(cfg.seed)
        self.env = make(cfg.env, 1, seed=cfg.seed)
        self.env.reset(seed=cfg.seed)
        space = self.env.single_action_space
        self.action_low, self.action_high = space.low.astype(np.float64), space.high.astype(np.float64)
        self.buffer = ReplayBuffer(self.env.obs_dim, self.env.act_dim, cfg.steps, self.device)
        self.agent = algos.get(cfg.algo)(cfg, self.env.obs_dim, self.env.act_dim, space.low, space.high, self.device,
                                         termination=termination_fn(cfg.env))
        self.explore_rng = np.random.default_rng(cfg.seed)
        self.step = 0
        self.episode_return = 0.0
        self.finished: List[float] = []
        self.last_eval: Optional[float] = None
        self.best_eval: Optional[float] = None
        self.host_metrics: Dict[str, float] = {}
        self.bad_intervals = 0
        self.last_good_step: Optional[int] = None
        if resume_state is not None:
            try:
                self._load(resume_state)
            except (RuntimeError, KeyError, ValueError) as err:
                first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                raise CheckpointMismatch(f"the checkpoint in {run_dir} does not fit the networks built from its "
                                         f"config: {first}") from err
        self.logger = MetricsLogger(run_dir, resume_step=self.step if resume_state is not None else None)
        self.diagnostics = TrainingDiagnostics(cfg, run_dir, resume_step=self.step if resume_state is not None else None)
        self.ckpt_path = os.path.join(run_dir, ckpt.CHECKPOINT_NAME)

    # ---- checkpoints ---------------------------------------------------------------------------
    def _state(self) -> dict:
        return {
            "config": dataclasses.asdict(self.cfg), "step": self.step, "episode_return": self.episode_return,
            "last_eval": self.last_eval, "best_eval": self.best_eval, "host_metrics": dict(self.host_metrics),
            "bad_intervals": self.bad_intervals, "agent": self.agent.state_dict(), "buffer": self.buffer.state_dict(),
            "env": self.env.state_dict(), "rng": ckpt.rng_state(),
            "explore_rng": self.explore_rng.bit_generator.state,
        }

    def _load(self, state: dict) -> None:
        self.step = int(state["step"])
        self.episode_return = float(state["episode_return"])
        self.last_eval, self.best_eval = state["last_eval"], state["best_eval"]
        self.host_metrics = dict(state["host_metrics"])
        self.bad_intervals = int(state["bad_intervals"])
        self.agent.load_state_dict(state["agent"])
        self.buffer.load_state_dict(state["buffer"])
        self.env.load_state_dict(state["env"])
        ckpt.set_rng_state(state["rng"])
        self.explore_rng.bit_generator.state = state["explore_rng"]
        self.last_good_step = self.step

    def save(self) -> bool:
        """Write the checkpoint unless the agent holds non-finite values (the last good one stays)."""
        if not self.agent.is_finite():
            return False
        ckpt.save_atomic(self._state(), self.ckpt_path)
        self.last_good_step = self.step
        return True

    # ---- loop ----------------------------------------------------------------------------------
    def _env_step(self) -> None:
        cfg = self.cfg
        if self.step < cfg.warmup_steps:
            action = self.explore_rng.uniform(self.action_low, self.action_high)[None]
        else:
            obs = torch.as_tensor(self.env.obs, dtype=torch.float32, device=self.device)
            action = self.agent.act(obs).cpu().numpy().astype(np.float64)
        tr = self.env.step_transition(action)
        self.buffer.add(tr.obs, tr.action, tr.reward, tr.next_obs, tr.terminated)
        self.episode_return += float(tr.reward[0])
        if tr.terminated[0] or tr.truncated[0]:
            self.finished.append(self.episode_return)
            self.episode_return = 0.0
        self.step += 1

    def run(self) -> dict:
        """Train up to ``cfg.steps`` env steps; returns the final summary. Raises :class:`Diverged`."""
        cfg = self.cfg
        progress = Progress(cfg.steps, self.step, cfg.progress)
        t_start = t_interval = time.perf_counter()
        interval_updates = 0
        rates: List[float] = []
        try:
            while self.step < cfg.steps:
                self._env_step()
                for key, value in self.agent.on_env_step(self.step, self.buffer).items():
                    summed = key in SUMMED_COLUMNS and key in self.host_metrics
                    self.host_metrics[key] = self.host_metrics[key] + value if summed else value
                if self.step >= cfg.warmup_steps:
                    self.agent.update(self.step, self.buffer)
                    interval_updates += self.agent.updates_per_step()
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    now = time.perf_counter()
                    elapsed = max(now - t_interval, 1e-9)
                    steps_per_s = cfg.log_every / elapsed
                    updates_per_s = interval_updates / elapsed
                    rates.append(steps_per_s)
                    self._log(now - t_start, steps_per_s, updates_per_s)
                    progress.update(self.step, steps_per_s, updates_per_s, self.last_eval)
                    interval_updates = 0
                    t_interval = time.perf_counter()
        finally:
            progress.close()
            self.logger.close()
        wall = time.perf_counter() - t_start
        steady = rates[1:] or rates
        return {"env_steps": self.step, "wall_time_s": wall, "final_eval": self.last_eval, "best_eval": self.best_eval,
                "steps_per_s_after_burn_in": float(np.mean(steady)) if steady else float("nan"),
                "run_dir": self.run_dir}

    def _log(self, wall: float, steps_per_s: float, updates_per_s: float) -> None:
        cfg = self.cfg
        device_metrics = self.agent.metrics.pop()
        counts = {kind: device_metrics.get(f"{kind}_ok_count", 0) for kind in ("critic", "actor")}
        skipped = {kind: int(round(n - device_metrics.get(f"{kind}_ok_sum", 0.0))) for kind, n in counts.items()}
        total = sum(counts.values())
        # an interval is bad when most critic updates or most policy updates were non-finite
        bad = any(n > 0 and skipped[kind] > 0.5 * n for kind, n in counts.items())
        row: Dict[str, object] = {"env_steps": self.step, "wall_time": wall, "updates": total,
                                  "skipped_updates": sum(skipped.values()), "steps_per_s": steps_per_s,
                                  "updates_per_s": updates_per_s, "episodes": len(self.finished)}
        if self.finished:
            row["train_return"] = float(np.mean(self.finished))
            self.finished = []
        for key in ("alpha", "q_mean", "critic_loss", "actor_loss", "entropy", "policy_grad_norm"):
            if key in device_metrics:
                row[key] = device_metrics[key]
        row.update(self.host_metrics)
        self.host_metrics = {}
        self.bad_intervals = self.bad_intervals + 1 if bad else 0
        if self.step % cfg.eval_every == 0 or self.step == cfg.steps:
            returns = evaluate(self.agent, cfg, self.device)
            row["eval_return_mean"], row["eval_return_std"] = float(np.mean(returns)), float(np.std(returns))
            self.last_eval = row["eval_return_mean"]
            if math.isfinite(self.last_eval):
                self.best_eval = self.last_eval if self.best_eval is None else max(self.best_eval, self.last_eval)
        self.logger.write(row)
        previous = self.step - (self.step % cfg.log_every or cfg.log_every)  # the log row before this one
        if cfg.diag_every > 0 and self.step // cfg.diag_every > max(previous, 0) // cfg.diag_every:
            self.diagnostics(self)  # rows go to <run_dir>/diagnostics.csv; never changes the training state
        if self.bad_intervals >= cfg.max_bad_intervals:
            where = (f"the last good checkpoint (env step {self.last_good_step}) is {self.ckpt_path}"
                     if self.last_good_step is not None else "no checkpoint was written before the divergence")
            raise Diverged(f"run diverged at env step {self.step}: more than half of the critic or policy updates "
                           f"were non-finite and skipped in {self.bad_intervals} consecutive log intervals; {where}")
        if not bad and (self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps):
            self.save()


def _new_run_dir(cfg: Config) -> str:
    name = cfg.run_name or f"{cfg.env}_{cfg.algo}_s{cfg.seed}_{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = os.path.join(cfg.logdir, name)
    if os.path.exists(os.path.join(run_dir, ckpt.CHECKPOINT_NAME)):
        raise CliError(f"--run-name: {run_dir} already holds a run; use --resume {run_dir} or another name")
    os.makedirs(run_dir, exist_ok=True)
    return run_dir


def _write_config(cfg: Config, run_dir: str) -> None:
    path = os.path.join(run_dir, "config.json")
    with open(path + ".tmp", "w") as fh:
        json.dump(dataclasses.asdict(cfg), fh, indent=2, sort_keys=True)
    os.replace(path + ".tmp", path)


def setup(argv: Sequence[str]):
    """Parse ``argv`` into ``(config, run_dir, resume_state or None)``; raises :class:`CliError`."""
    cfg = parse_args(argv)
    if not cfg.resume:
        resolve_device(cfg.device)
        run_dir = _new_run_dir(cfg)
        return cfg, run_dir, None
    run_dir = cfg.resume
    path = os.path.join(run_dir, ckpt.CHECKPOINT_NAME)
    if not os.path.exists(path):
        raise CliError(f"--resume: no checkpoint at {path}")
    state = ckpt.load(path)
    values = dataclasses.asdict(config_from_checkpoint(state["config"]))
    explicit = vars(build_parser().parse_args(list(argv)))
    for key in given_flags(argv):
        if key in RESUME_FIXED:
            if explicit[key] != values[key]:
                raise CliError(f"--{key.replace('_', '-')}: cannot change on --resume (the run uses {values[key]!r})")
            continue
        values[key] = explicit[key]
    values["resume"] = ""
    resumed = Config(**values)
    validate(resumed)
    if resumed.steps < int(state["step"]):
        raise CliError(f"--steps: the run is already at env step {state['step']}")
    resolve_device(resumed.device)
    return resumed, run_dir, state


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI entry point; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        cfg, run_dir, state = setup(argv)
    except CliError as err:
        print(f"python -m fastrp.train: error: {err}", file=sys.stderr)
        return 2
    try:
        trainer = Trainer(cfg, run_dir, state)
    except CheckpointMismatch as err:
        print(f"python -m fastrp.train: error: --resume: {err}", file=sys.stderr)
        return 2
    _write_config(cfg, run_dir)
    try:
        summary = trainer.run()
    except Diverged as err:
        print(f"python -m fastrp.train: {err}", file=sys.stderr)
        return EXIT_DIVERGED
    final = "-" if summary["final_eval"] is None else f"{summary['final_eval']:.1f}"
    best = "-" if summary["best_eval"] is None else f"{summary['best_eval']:.1f}"
    print(f"done: {cfg.algo} on {cfg.env}, {summary['env_steps']} env steps in {summary['wall_time_s']:.0f} s "
          f"({summary['steps_per_s_after_burn_in']:.1f} steps/s after burn-in); eval return final {final}, "
          f"best {best}; run dir {run_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
