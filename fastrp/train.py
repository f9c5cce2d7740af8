"""``python -m fastrp.train``: train an agent on a MuJoCo task and write a run directory.

The run directory holds ``config.json`` (the resolved config, and where each value came from),
``metrics.csv`` (one row per log interval and per evaluation, columns in
:data:`fastrp.rl.logger.COLUMNS`), ``diagnostics.csv``, TensorBoard events under ``tb/`` and
``checkpoint.pt`` (written atomically; everything a resume needs). ``--resume RUN_DIR`` continues
a run exactly where its checkpoint left off.

The loop (:meth:`Trainer.run`) is one explicit schedule per env step: env step -> replay buffer
-> model refit and rollouts (if due) -> critic and policy updates -> metrics row (if due) ->
evaluation (if due) -> diagnostics (if due) -> checkpoint (if due).

Exit codes: 0 done; 1 an I/O error (one line; the last good checkpoint is kept); 2 invalid
command line or an unusable checkpoint (one line); 3 the run cannot go on honestly (non-finite
updates for ``--max-bad-intervals`` consecutive intervals, model fits failing
``MAX_FAILED_FITS`` times in a row, or a state that cannot be checkpointed; the message names the
last good checkpoint); 130 / 143 interrupted by SIGINT / SIGTERM (after writing a checkpoint).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from fastrp import algos
from fastrp.config import (RESUME_FIXED, CliError, Config, build_parser, config_from_checkpoint,
                           given_flags, parse_args_with_sources, validate)
from fastrp.rl import checkpoint as ckpt
from fastrp.rl.buffer import ReplayBuffer
from fastrp.rl.logger import SUMMED_COLUMNS, MetricsLogger, Progress, write_json_atomic

EXIT_IO = 1
EXIT_USAGE = 2
EXIT_DIVERGED = 3
MAX_FAILED_FITS = 3
"""Consecutive model refits that may fail (be undone) before the run stops."""
PROG = "python -m fastrp.train"


class Diverged(RuntimeError):
    """The run cannot continue honestly (see the module docstring, exit code 3)."""


class CheckpointMismatch(RuntimeError):
    """A checkpoint that does not belong to this run or does not fit its networks (exit code 2)."""


class Interrupted(Exception):
    """SIGINT / SIGTERM stopped the run after a step (exit code 128 + signal)."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise CliError("--device: cuda requested but torch has no CUDA device")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def evaluate(agent, cfg: Config, device: torch.device) -> List[float]:
    """Returns of ``eval_episodes`` deterministic episodes on a separate env reset with a fixed seed
    (so evaluations neither consume nor depend on the training RNG streams)."""
    from fastrp.envs import make

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


def _physical_memory() -> Optional[int]:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def memory_estimate(cfg: Config, obs_dim: int, act_dim: int) -> Dict[str, int]:
    """Bytes the run will allocate for its largest parts: the replay buffer (``steps`` float32
    transitions), the model-rollout buffer and the networks with their gradients and Adam state."""
    row = 4 * (2 * obs_dim + act_dim + 2)
    spec = algos.SPECS[cfg.algo]

    def mlp(d_in: int, d_out: int, width: int, layers: int) -> int:
        dims = [d_in] + [width] * layers + [d_out]
        return sum(a * b + b for a, b in zip(dims[:-1], dims[1:]))

    params = mlp(obs_dim, 2 * act_dim, cfg.hidden_dim, cfg.num_layers)
    params += 2 * 2 * mlp(obs_dim + act_dim, 1, cfg.hidden_dim, cfg.num_layers)  # twin critic and its target
    model = cfg.ensemble_size * mlp(obs_dim + act_dim, 2 * (obs_dim + 1), cfg.model_hidden_dim, cfg.model_num_layers)
    params += len(spec.models) * model
    out = {"replay buffer": cfg.steps * row, "networks": 4 * 4 * params}
    if spec.uses_model_buffer:
        per_epoch = math.ceil(1000 / cfg.model_train_every)
        out["model buffer"] = cfg.rollout_batch_size * cfg.rollout_max_len * per_epoch * cfg.model_retain_epochs * row
    return out


def check_memory(cfg: Config, obs_dim: int, act_dim: int, device: torch.device) -> None:
    """Raise :class:`CliError` when the run's buffers and networks cannot fit this machine."""
    if device.type == "cuda":
        available = torch.cuda.get_device_properties(device).total_memory
        where = "the GPU's"
    else:
        available = _physical_memory()
        where = "this machine's"
    if not available:
        return
    parts = memory_estimate(cfg, obs_dim, act_dim)
    total = sum(parts.values())
    if total > 0.9 * available:
        biggest = max(parts, key=parts.get)
        flag = {"replay buffer": "--steps", "model buffer": "--rollout-batch-size"}.get(biggest, "--hidden-dim / --model-hidden-dim")
        raise CliError(f"{flag}: the run needs about {total / 2 ** 30:.1f} GiB ({biggest}: "
                       f"{parts[biggest] / 2 ** 30:.1f} GiB), more than {where} {available / 2 ** 30:.1f} GiB")


class Trainer:
    """One run: env, replay buffer, agent, logger, checkpoints (see the module docstring)."""

    def __init__(self, cfg: Config, run_dir: str, resume_state: Optional[dict] = None):
        from fastrp.diagnostics.run import TrainingDiagnostics
        from fastrp.envs import make, termination_fn

        self.cfg, self.run_dir = cfg, run_dir
        self.device = resolve_device(cfg.device)
        torch.set_num_threads(cfg.cpu_threads)
        ckpt.seed_everything(cfg.seed)
        self.env = make(cfg.env, 1, seed=cfg.seed)
        self.env.reset(seed=cfg.seed)
        space = self.env.single_action_space
        check_memory(cfg, self.env.obs_dim, self.env.act_dim, self.device)
        self.action_low, self.action_high = space.low.astype(np.float64), space.high.astype(np.float64)
        self.buffer = ReplayBuffer(self.env.obs_dim, self.env.act_dim, cfg.steps, self.device)
        self.agent = algos.get(cfg.algo)(cfg, self.env.obs_dim, self.env.act_dim, space.low, space.high, self.device,
                                         termination=termination_fn(cfg.env))
        self.explore_rng = np.random.default_rng(cfg.seed)
        self.step = 0
        self.episode_return = 0.0
        self.last_eval: Optional[float] = None
        self.best_eval: Optional[float] = None
        self.bad_intervals = 0
        self.failed_fits = 0
        self.wall_before = 0.0  # training wall time of earlier invocations (resume)
        self.interval = self._new_interval(0)
        self.last_good_step: Optional[int] = None
        self.stop_signal: Optional[int] = None
        if resume_state is not None:
            try:
                self._load(resume_state)
            except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as err:
                first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                raise CheckpointMismatch(f"the checkpoint in {run_dir} does not fit the networks built from its "
                                         f"config: {first}") from err
        resume_step = self.step if resume_state is not None else None
        self.logger = MetricsLogger(run_dir, resume_step=resume_step)
        self.diagnostics = TrainingDiagnostics(cfg, run_dir, resume_step=resume_step)
        self.ckpt_path = os.path.join(run_dir, ckpt.CHECKPOINT_NAME)

    @staticmethod
    def _new_interval(step: int) -> Dict[str, object]:
        """What a metrics row sums up since the previous row (saved in mid-interval checkpoints)."""
        return {"start_step": step, "elapsed": 0.0, "updates": 0, "finished": [], "host": {},
                "nonfinite_transitions": 0}

    # ---- checkpoints ---------------------------------------------------------------------------
    def _state(self, wall_total: float, interval_elapsed: float) -> dict:
        interval = dict(self.interval, elapsed=interval_elapsed)
        return {
            "config": dataclasses.asdict(self.cfg), "step": self.step, "episode_return": self.episode_return,
            "last_eval": self.last_eval, "best_eval": self.best_eval, "bad_intervals": self.bad_intervals,
            "failed_fits": self.failed_fits, "wall_time": wall_total, "interval": interval,
            "agent": self.agent.state_dict(), "buffer": self.buffer.state_dict(), "env": self.env.state_dict(),
            "rng": ckpt.rng_state(), "explore_rng": self.explore_rng.bit_generator.state,
        }

    def _load(self, state: dict) -> None:
        self.step = int(state["step"])
        self.episode_return = float(state["episode_return"])
        self.last_eval, self.best_eval = state["last_eval"], state["best_eval"]
        self.bad_intervals = int(state["bad_intervals"])
        self.failed_fits = int(state.get("failed_fits", 0))
        self.wall_before = float(state.get("wall_time", 0.0))
        interval = state.get("interval")
        if interval is None:  # written by an earlier version: always at a row boundary
            interval = self._new_interval(self.step)
            interval["host"] = dict(state.get("host_metrics", {}))
        self.interval = dict(interval)
        self.agent.load_state_dict(state["agent"])
        self.buffer.load_state_dict(state["buffer"])
        self.env.load_state_dict(state["env"])
        ckpt.set_rng_state(state["rng"])
        self.explore_rng.bit_generator.state = state["explore_rng"]
        self.last_good_step = self.step

    def _last_good(self) -> str:
        if self.last_good_step is None:
            return "no checkpoint has been written yet"
        return f"the last good checkpoint (env step {self.last_good_step}) is {self.ckpt_path}"

    def save(self, wall_total: float, interval_elapsed: float) -> None:
        """Write the checkpoint; raises :class:`Diverged` when the agent holds non-finite values
        (a checkpoint that would not resume), keeping the last good one."""
        if not self.agent.is_finite():
            raise Diverged(f"at env step {self.step} the agent's state holds non-finite values and cannot be "
                           f"checkpointed; {self._last_good()}")
        ckpt.save_atomic(self._state(wall_total, interval_elapsed), self.ckpt_path)
        self.last_good_step = self.step

    # ---- one env step ----------------------------------------------------------------------------
    def collect(self) -> None:
        """One env step (random actions during warm-up, else the policy's) into the replay
        buffer. A transition with a non-finite observation, action, reward or next observation
        never enters the buffer: it is counted and the env is reset."""
        cfg = self.cfg
        if self.step < cfg.warmup_steps:
            action = self.explore_rng.uniform(self.action_low, self.action_high)[None]
        else:
            obs = torch.as_tensor(self.env.obs, dtype=torch.float32, device=self.device)
            action = self.agent.act(obs).cpu().numpy().astype(np.float64)
        tr = self.env.step_transition(action)
        self.step += 1
        finite = all(np.isfinite(np.asarray(x, dtype=np.float64)).all()
                     for x in (tr.obs, tr.action, tr.reward, tr.next_obs))
        if not finite:
            self.interval["nonfinite_transitions"] += 1
            self.env.reset_envs(np.zeros(1, dtype=np.int64))
            self.episode_return = 0.0  # the episode is cut short, not finished
            return
        self.buffer.add(tr.obs, tr.action, tr.reward, tr.next_obs, tr.terminated)
        self.agent.observe(self.buffer.latest(1).obs)
        self.episode_return += float(tr.reward[0])
        if tr.terminated[0] or tr.truncated[0]:
            self.interval["finished"].append(self.episode_return)
            self.episode_return = 0.0

    def model_phase_due(self) -> bool:
        cfg = self.cfg
        return (algos.SPECS[cfg.algo].model_based and self.step >= cfg.warmup_steps
                and (self.step - cfg.warmup_steps) % cfg.model_train_every == 0 and len(self.buffer) > 1)

    def model_phase(self) -> None:
        """Refit the models, then roll the policy out through them (MBPO's model buffer)."""
        stats = self.agent.refit_models(self.buffer)
        stats.update(self.agent.generate_rollouts(self.buffer, self.step))
        host = self.interval["host"]
        for key, value in stats.items():
            host[key] = host[key] + value if key in SUMMED_COLUMNS and key in host else value
        self.failed_fits = self.failed_fits + 1 if stats.get("model_fits_skipped", 0) > 0 else 0
        if self.failed_fits >= MAX_FAILED_FITS:
            raise Diverged(f"run stopped at env step {self.step}: the model refits diverged (non-finite weights or "
                           f"loss, undone) {self.failed_fits} times in a row; {self._last_good()}")

    # ---- the loop ----------------------------------------------------------------------------------
    def run(self) -> dict:
        """Train up to ``cfg.steps`` env steps; returns the summary of this invocation. Raises
        :class:`Diverged` or :class:`Interrupted`."""
        cfg = self.cfg
        start_step = self.step
        refit_every = cfg.model_train_every if algos.SPECS[cfg.algo].model_based else 0
        progress = Progress(cfg.steps, cfg.warmup_steps, cfg.progress, refit_every=refit_every)
        t_start = time.perf_counter()
        t_interval = t_start - float(self.interval["elapsed"])
        t_checkpoint = t_start
        try:
            while self.step < cfg.steps:
                t_step = time.perf_counter()
                self.collect()
                if self.model_phase_due():
                    progress.model_phase_starts(self.step)
                    t_model = time.perf_counter()
                    self.model_phase()
                    progress.model_phase_done(time.perf_counter() - t_model)
                if self.step >= cfg.warmup_steps and len(self.buffer) > 0:
                    self.agent.update(self.buffer)
                    self.interval["updates"] += self.agent.updates_per_step()
                now = time.perf_counter()
                progress.step_done(self.step, now - t_step)
                wall = self.wall_before + now - t_start
                eval_due = self.step % cfg.eval_every == 0 or self.step == cfg.steps
                row_due = self.step % cfg.log_every == 0 or eval_due
                if row_due:
                    self._row(wall, now - t_interval, eval_due, progress)
                    t_interval = time.perf_counter()
                    step_ckpt = self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps
                    if step_ckpt or self._time_for_checkpoint(t_checkpoint) or self.stop_signal is not None:
                        self._checkpoint_at_row(wall)
                        t_checkpoint = time.perf_counter()
                elif self.stop_signal is not None or self._time_for_checkpoint(t_checkpoint):
                    if self.bad_intervals == 0 and not self.interval_looks_bad():
                        self.save(wall, time.perf_counter() - t_interval)
                        t_checkpoint = time.perf_counter()
                    elif self.stop_signal is None:
                        t_checkpoint = time.perf_counter()  # not from a diverging interval; try again later
                progress.maybe_refresh(self.step, self.last_eval)
                if self.stop_signal is not None:
                    saved = self.last_good_step == self.step
                    where = (f"checkpoint written; resume with: {PROG} --resume {self.run_dir}" if saved else
                             f"no checkpoint written at this step (the updates are diverging); {self._last_good()}")
                    raise Interrupted(self.stop_signal, f"interrupted at env step {self.step}; {where}")
        finally:
            progress.close()
            self.logger.close()
        elapsed = time.perf_counter() - t_start
        return {"env_steps": self.step, "steps_this_run": self.step - start_step, "wall_time_s": elapsed,
                "total_wall_time_s": self.wall_before + elapsed, "final_eval": self.last_eval,
                "best_eval": self.best_eval, "steps_per_s_after_warmup": progress.rate_after_warmup(),
                "run_dir": self.run_dir}

    def _time_for_checkpoint(self, t_checkpoint: float) -> bool:
        minutes = self.cfg.checkpoint_minutes
        return minutes > 0 and time.perf_counter() - t_checkpoint >= 60.0 * minutes

    def interval_looks_bad(self) -> bool:
        """Whether the current interval's updates are mostly non-finite so far (a device read)."""
        stats = self.agent.stats
        if stats.critic.count == 0 and stats.policy.count == 0:
            return False
        checks = []
        for acc in (stats.critic, stats.policy):
            if acc.count:
                checks.append(acc.ok < 0.5 * acc.count)
        return bool(torch.stack(checks).any())

    def _checkpoint_at_row(self, wall: float) -> None:
        """The checkpoint of a row boundary: never from a diverging interval (the last good one
        stays); at the end of the run that is an error, not a silently stale checkpoint."""
        if self.bad_intervals == 0:
            self.save(wall, 0.0)
        elif self.step == self.cfg.steps:
            raise Diverged(f"run ended at env step {self.step} with non-finite updates in its last interval, so no "
                           f"final checkpoint was written; {self._last_good()}")

    def _row(self, wall: float, elapsed: float, eval_due: bool, progress: Progress) -> None:
        """Write one metrics row (reads the device-side statistics once), evaluate when due, run
        the diagnostics when due, and stop a diverging run."""
        cfg = self.cfg
        interval = self.interval
        stats = self.agent.stats.pop()
        elapsed = max(elapsed, 1e-9)
        steps = self.step - int(interval["start_step"])
        row: Dict[str, object] = {"env_steps": self.step, "wall_time": wall, "updates": stats.updates,
                                  "skipped_updates": stats.skipped, "steps_per_s": steps / elapsed,
                                  "updates_per_s": interval["updates"] / elapsed,
                                  "episodes": len(interval["finished"]),
                                  "nonfinite_transitions": interval["nonfinite_transitions"]}
        if interval["finished"]:
            row["train_return"] = float(np.mean(interval["finished"]))
        means = stats.means()
        for key in ("alpha", "q_mean", "critic_loss", "actor_loss", "entropy", "policy_grad_norm"):
            if key in means:
                row[key] = means[key]
        row.update(interval["host"])
        self.bad_intervals = self.bad_intervals + 1 if stats.bad else 0
        if eval_due:
            returns = evaluate(self.agent, cfg, self.device)
            row["eval_return_mean"], row["eval_return_std"] = float(np.mean(returns)), float(np.std(returns))
            self.last_eval = row["eval_return_mean"]
            if math.isfinite(self.last_eval):
                self.best_eval = self.last_eval if self.best_eval is None else max(self.best_eval, self.last_eval)
        self.logger.write(row)
        progress.row(self.step, row["steps_per_s"], row["updates_per_s"], self.last_eval)
        previous = int(interval["start_step"])
        self.interval = self._new_interval(self.step)
        self.diagnostics(self.agent, self.buffer, self.step, previous, tb=self.logger.tb)
        if self.bad_intervals >= cfg.max_bad_intervals:
            raise Diverged(f"run diverged at env step {self.step}: more than half of the critic or policy updates "
                           f"were non-finite and skipped in {self.bad_intervals} consecutive log intervals; "
                           f"{self._last_good()}")


# ---- command line ------------------------------------------------------------------------------
def _new_run_dir(cfg: Config) -> str:
    name = cfg.run_name or f"{cfg.env}_{cfg.algo}_s{cfg.seed}_{time.strftime('%Y%m%d-%H%M%S')}"
    if os.path.exists(cfg.logdir) and not os.path.isdir(cfg.logdir):
        raise CliError(f"--logdir: {cfg.logdir} exists and is not a directory")
    run_dir = os.path.join(cfg.logdir, name)
    if os.path.exists(os.path.join(run_dir, ckpt.CHECKPOINT_NAME)):
        raise CliError(f"--run-name: {run_dir} already holds a run; use --resume {run_dir} or another name")
    try:
        os.makedirs(run_dir, exist_ok=True)
    except OSError as err:
        raise CliError(f"--logdir: cannot create the run directory {run_dir}: {err.strerror or err}") from None
    if not os.access(run_dir, os.W_OK):
        raise CliError(f"--logdir: the run directory {run_dir} is not writable")
    return run_dir


def _write_config(cfg: Config, sources: Dict[str, str], run_dir: str) -> None:
    write_json_atomic(os.path.join(run_dir, "config.json"), {**dataclasses.asdict(cfg), "sources": sources})


def _read_checkpoint(run_dir: str) -> dict:
    """The checkpoint of ``run_dir``, or :class:`CliError` saying in one line why it cannot be used."""
    path = os.path.join(run_dir, ckpt.CHECKPOINT_NAME)
    if not os.path.isdir(run_dir):
        raise CliError(f"--resume: no run directory at {run_dir}")
    if not os.path.exists(path):
        raise CliError(f"--resume: no checkpoint at {path}")
    if not os.access(run_dir, os.W_OK):
        raise CliError(f"--resume: the run directory {run_dir} is not writable")
    try:
        state = ckpt.load(path)
    except Exception as err:  # truncated, empty, random bytes, another format: all one line
        reason = " ".join(str(err).split())[:160] or type(err).__name__
        raise CliError(f"--resume: cannot read {path} (truncated, corrupt or not a fastrp checkpoint: "
                       f"{type(err).__name__}: {reason})") from None
    missing = [k for k in ("config", "step", "agent", "buffer", "env", "rng") if not isinstance(state, dict) or k not in state]
    if missing:
        what = type(state).__name__ if not isinstance(state, dict) else f"a dict without {', '.join(missing)}"
        raise CliError(f"--resume: {path} is not a fastrp checkpoint (it holds {what})")
    return state


def _check_belongs(run_dir: str, values: Dict[str, object]) -> None:
    """Refuse a checkpoint whose env, algo or network shapes differ from the run's config.json."""
    path = os.path.join(run_dir, "config.json")
    if not os.path.exists(path):
        return
    try:
        with open(path) as fh:
            run_cfg = json.load(fh)
    except (OSError, ValueError) as err:
        raise CliError(f"--resume: cannot read {path}: {err}") from None
    if not isinstance(run_cfg, dict):
        raise CliError(f"--resume: {path} is not a fastrp config")
    for key in RESUME_FIXED:
        if key in run_cfg and key in values and run_cfg[key] != values[key]:
            raise CliError(f"--resume: the checkpoint does not belong to this run: its {key} is {values[key]!r}, "
                           f"{path} says {run_cfg[key]!r}")


def setup(argv: Sequence[str]) -> Tuple[Config, Dict[str, str], str, Optional[dict]]:
    """Parse ``argv`` into ``(config, sources, run_dir, resume_state or None)``; raises :class:`CliError`."""
    cfg, sources = parse_args_with_sources(argv)
    check_machine(cfg)
    if cfg.cuda_graphs and not torch.cuda.is_available():
        raise CliError("--cuda-graphs: needs a CUDA device (torch sees none)")
    if not cfg.resume:
        resolve_device(cfg.device)
        return cfg, sources, _new_run_dir(cfg), None
    run_dir = cfg.resume
    state = _read_checkpoint(run_dir)
    try:
        values = dataclasses.asdict(config_from_checkpoint(state["config"]))
    except (CliError, TypeError) as err:
        raise CliError(f"--resume: the checkpoint's config is not usable: {err}") from None
    _check_belongs(run_dir, values)
    explicit = vars(build_parser().parse_args(list(argv)))
    sources = {k: "checkpoint" for k in values}
    for key in given_flags(argv):
        if key == "resume":
            continue
        if key in RESUME_FIXED:
            if explicit[key] != values[key]:
                raise CliError(f"--{key.replace('_', '-')}: cannot change on --resume (the run uses {values[key]!r})")
            continue
        values[key] = explicit[key]
        sources[key] = "flag"
    values["resume"] = ""
    resumed = Config(**values)
    validate(resumed)
    if resumed.steps < int(state["step"]):
        raise CliError(f"--steps: the run is already at env step {state['step']}")
    check_machine(resumed)
    if resumed.cuda_graphs and not torch.cuda.is_available():
        raise CliError("--cuda-graphs: needs a CUDA device (torch sees none)")
    resolve_device(resumed.device)
    return resumed, sources, run_dir, state


def check_machine(cfg: Config) -> None:
    """What only this machine can tell: ``--cpu-threads`` must not exceed its cores (a config that
    is valid elsewhere, e.g. on a sweep's worker nodes, can still be refused here)."""
    cores = os.cpu_count() or 1
    if cfg.cpu_threads > cores:
        raise CliError(f"--cpu-threads: must be <= {cores} (the CPU cores of this machine), got {cfg.cpu_threads}")


def banner(cfg: Config, sources: Dict[str, str], run_dir: str, device: torch.device, resume_step: Optional[int]) -> str:
    """The start banner: what runs where, with which preset and why."""
    threads = f", {cfg.cpu_threads} torch thread{'s' if cfg.cpu_threads != 1 else ''}" if device.type == "cpu" else ""
    lines = [f"fastrp: {cfg.algo} on {cfg.env}, seed {cfg.seed}, device {device}{threads}"]
    why = sources.get("preset", "")
    if why.startswith("auto"):
        other = "--preset paper for the papers' sizes" if cfg.preset == "cpu" else "--preset cpu for CPU sizes"
        lines.append(f"  preset {cfg.preset} ({why}; {other})")
    else:
        lines.append(f"  preset {cfg.preset} ({why})")
    if cfg.preset == "paper" and device.type == "cpu":
        lines.append("  note: the paper preset is sized for a GPU; on a CPU the model-based algorithms take about "
                     "1-2 s per env step (--preset cpu is sized for a CPU)")
    if sources.get("horizon") == "size cpu" and algos.SPECS[cfg.algo].policy_objective == "imagined":
        lines.append(f"  policy unroll H = {cfg.horizon} (cpu preset: through more steps of the CPU-sized models the "
                     "policy gradient was nearly uncorrelated with the true one; --horizon N sets it)")
    warm = f"{cfg.warmup_steps} random warm-up steps"
    lines.append(f"  {cfg.steps} env steps ({warm}), eval every {cfg.eval_every}, checkpoint every "
                 f"{cfg.checkpoint_every} steps" + (f" and {cfg.checkpoint_minutes:g} min" if cfg.checkpoint_minutes else ""))
    if cfg.steps <= cfg.warmup_steps:
        lines.append(f"  warning: --steps {cfg.steps} <= warm-up {cfg.warmup_steps}: no update will run")
    if cfg.compile and device.type == "cpu":
        lines.append("  note: --compile on CPU compiles the updates but gains little there (it is for the GPU)")
    lines.append(f"  run dir {run_dir}" + (f"; resuming at env step {resume_step}" if resume_step is not None else ""))
    return "\n".join(lines)


def _handle_signals(trainer: Trainer):
    """SIGINT / SIGTERM ask the loop to stop after the current step (and checkpoint); a second
    signal stops at once (default handling)."""

    def handler(signum, frame):
        trainer.stop_signal = signum
        name = signal.Signals(signum).name
        print(f"\n{PROG}: {name} received: stopping after this env step and writing a checkpoint "
              f"({name} again to stop at once)", file=sys.stderr, flush=True)
        signal.signal(signum, signal.SIG_DFL if signum != signal.SIGINT else signal.default_int_handler)

    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in previous:
        signal.signal(s, handler)
    return previous


def _error(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI entry point; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        cfg, sources, run_dir, state = setup(argv)
    except CliError as err:
        _error(str(err))
        return EXIT_USAGE
    device = resolve_device(cfg.device)
    resume_step = int(state["step"]) if state is not None else None
    if cfg.progress:
        print(banner(cfg, sources, run_dir, device, resume_step), file=sys.stderr, flush=True)
    trainer = None
    previous_handlers = None
    try:
        try:
            trainer = Trainer(cfg, run_dir, state)
        except CheckpointMismatch as err:
            _error(f"--resume: {err}")
            return EXIT_USAGE
        except CliError as err:
            _error(str(err))
            return EXIT_USAGE
        del state
        _write_config(cfg, sources, run_dir)
        if threading_is_main():
            previous_handlers = _handle_signals(trainer)
        summary = trainer.run()
    except Diverged as err:
        print(f"{PROG}: {err}", file=sys.stderr)
        return EXIT_DIVERGED
    except Interrupted as err:
        print(f"{PROG}: {err}", file=sys.stderr)
        return 128 + err.signum
    except KeyboardInterrupt:  # the second Ctrl-C
        where = trainer._last_good() if trainer is not None else "nothing was written"
        print(f"\n{PROG}: aborted at env step {trainer.step if trainer else 0} without a checkpoint; {where}",
              file=sys.stderr)
        return 128 + signal.SIGINT
    except OSError as err:  # disk full, read-only or vanished run directory: one line, the last checkpoint stays
        target = err.filename or run_dir
        where = trainer._last_good() if trainer is not None else "nothing was written"
        _error(f"cannot write {target}: {err.strerror or err}; {where}")
        return EXIT_IO
    finally:
        if previous_handlers:
            for s, h in previous_handlers.items():
                signal.signal(s, h)
    final = "-" if summary["final_eval"] is None else f"{summary['final_eval']:.1f}"
    best = "-" if summary["best_eval"] is None else f"{summary['best_eval']:.1f}"
    rate = summary["steps_per_s_after_warmup"]
    rate_text = f"{rate:.1f} env steps/s after warm-up" if rate is not None else "no steps after warm-up"
    resumed = f" (resumed at {resume_step}; run total {summary['total_wall_time_s']:.0f} s)" if resume_step is not None else ""
    print(f"done: {cfg.algo} on {cfg.env}, env step {summary['env_steps']}/{cfg.steps}: "
          f"{summary['steps_this_run']} steps in {summary['wall_time_s']:.0f} s{resumed}, {rate_text}; "
          f"eval return final {final}, best {best}; run dir {run_dir}", file=sys.stderr)
    return 0


def threading_is_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


if __name__ == "__main__":
    sys.exit(main())
