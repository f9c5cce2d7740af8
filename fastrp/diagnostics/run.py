"""Diagnostics of a run: load an agent from a run directory, measure it, and the training-time hook.

* :func:`load_run` rebuilds the agent, replay buffer and config of a run directory from its
  ``checkpoint.pt`` (what ``python -m fastrp.diagnostics`` works on).
* :func:`variance_rows` / :func:`jacobian_rows` measure an agent and return rows of
  :data:`COLUMNS` (one per unroll length H, one per model).
* :class:`TrainingDiagnostics` is the trainer's hook: every ``diag_every`` env steps after
  warm-up it appends those rows to ``<run_dir>/diagnostics.csv`` (and TensorBoard), and on
  ``--resume`` drops the rows written after the checkpoint, as the metrics logger does.

The measurements do not perturb the run they observe: they draw from their own generators
(seeded from the run's seed, the env step and a stream constant - so a resumed run reproduces the
rows, and the CLI on a checkpoint measured on the same device type and CPU thread count as
training reproduces the training-time rows of the checkpoint's step, when that step had a
diagnostics pass; see :mod:`fastrp.diagnostics.__main__`), run every network in eval mode
(no spectral-norm vector updates), take gradients with :func:`torch.autograd.grad` only, restore
every ``requires_grad`` flag and step a separate env.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import warnings
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch

from fastrp import algos
import fastrp.config
from fastrp.config import Config
from fastrp.diagnostics.jacobian import collect_transitions, ensemble_jacobian_errors, state_columns
from fastrp.diagnostics.variance import frozen_modules, rp_gradient_variance
from fastrp.rl import checkpoint as ckpt
from fastrp.rl.buffer import ReplayBuffer
from fastrp.rl.logger import _fmt, truncate_csv

__all__ = ["COLUMNS", "DIAG_CSV", "VARIANCE_ALGOS", "JACOBIAN_ALGOS", "RunError", "LoadedRun", "Settings",
           "read_config", "trained_device", "measurement_device", "load_run", "variance_rows", "jacobian_rows",
           "lipschitz_rows",
           "supports_variance", "supports_jacobian", "diag_seed", "read_rows", "append_rows", "TrainingDiagnostics"]

DIAG_CSV = "diagnostics.csv"
"""Training-time diagnostics file inside a run directory."""

COLUMNS = ["env_steps", "kind", "model", "horizon", "trace_cov", "mean_grad_norm", "jac_state_err", "jac_action_err",
           "pred_mse", "samples", "batch", "trace_cov_norm", "action_grad_sq", "action_trace_cov", "model_lip_bound",
           "policy_lip_bound", "step_jac_norm", "unroll_jac_norm"]
"""Columns of ``diagnostics.csv`` (long format; empty cell = not applicable to the row's kind):

``env_steps`` step of the measurement; ``kind`` ``variance``, ``jacobian`` or ``lipschitz``;
``model`` ``prediction`` or ``gradient`` (variance rows: the model the policy gradient flows
through); ``horizon`` unroll length H (variance, lipschitz); ``trace_cov`` trace of the
covariance of the minibatch policy gradient; ``mean_grad_norm`` mean norm of those gradients;
``jac_state_err`` / ``jac_action_err`` mean relative Frobenius error of the model's ``ds'/ds`` /
``ds'/da`` against MuJoCo's; ``pred_mse`` mean squared error of the predicted next observation;
``samples`` gradient samples per H (variance) or held-out transitions (jacobian) or start states
(lipschitz); ``batch`` start states per minibatch (variance); ``trace_cov_norm`` ``trace_cov /
||theta||^2``; ``action_grad_sq`` / ``action_trace_cov`` mean squared norm and trace of the
covariance of the per-state gradient ``dJ/da_0`` w.r.t. the first action
(:class:`fastrp.diagnostics.variance.ActionGradientStats`: independent of the policy's
parameterisation); ``model_lip_bound`` / ``policy_lip_bound`` product of the layers' spectral
norms (model: mean over elites, mean head; policy: mean head); ``step_jac_norm`` mean spectral
norm of one model step's Jacobian ``ds'/d[s, a]``; ``unroll_jac_norm`` mean spectral norm of the
closed-loop ``ds_H/ds_0`` (:mod:`fastrp.diagnostics.lipschitz`)."""

VARIANCE_ALGOS = ("maac", "rp-sn", "ddppo", "ddppo-sn")
"""Algorithms with a model-based RP policy gradient (the variance diagnostic)."""
JACOBIAN_ALGOS = ("mbpo",) + VARIANCE_ALGOS
"""Algorithms with a learned dynamics model (the model gradient error diagnostic)."""

VARIANCE_STREAM, POOL_STREAM, JACOBIAN_STREAM, LIPSCHITZ_STREAM, BIAS_STREAM = 1, 2, 3, 4, 5
_SEED_TAG = 0xD1A6


class RunError(Exception):
    """A run directory that cannot be diagnosed (reported as one line, exit code 2)."""


class LoadedRun(NamedTuple):
    """What :func:`load_run` rebuilds: ``run_dir``, the run's ``cfg`` (``device`` = the device it
    is measured on), the ``agent`` (weights, model normalisers and elites as checkpointed), its
    replay ``buffer``, the checkpoint's env ``step`` and a ``note`` about the device choice
    (empty unless the run's own device is not available here)."""

    run_dir: str
    cfg: Config
    agent: object
    buffer: ReplayBuffer
    step: int
    note: str = ""


@dataclasses.dataclass
class Settings:
    """Sizes of one diagnostics pass (the run config's ``diag_*`` fields unless overridden)."""

    states: int
    batch: int
    samples: int
    min_horizon: int
    max_horizon: int
    transitions: int
    rollout_steps: int

    @classmethod
    def from_config(cls, cfg: Config) -> "Settings":
        return cls(states=cfg.diag_states, batch=cfg.diag_batch, samples=cfg.diag_samples, min_horizon=1,
                   max_horizon=cfg.diag_max_horizon, transitions=cfg.diag_transitions,
                   rollout_steps=cfg.diag_rollout_steps)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field."""
        for name in ("states", "batch", "transitions", "rollout_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if isinstance(self.samples, bool) or not isinstance(self.samples, int) or self.samples < 2:
            raise ValueError(f"samples must be an int >= 2 (a sample variance), got {self.samples!r}")
        if isinstance(self.min_horizon, bool) or not isinstance(self.min_horizon, int) or self.min_horizon < 0:
            raise ValueError(f"min_horizon must be an int >= 0, got {self.min_horizon!r}")
        if isinstance(self.max_horizon, bool) or not isinstance(self.max_horizon, int):
            raise ValueError(f"max_horizon must be an int, got {self.max_horizon!r}")
        if self.max_horizon < self.min_horizon:
            raise ValueError(f"max_horizon must be >= min_horizon={self.min_horizon}, got {self.max_horizon}")


def supports_variance(agent) -> bool:
    """True for the RP algorithms (``maac``, ``rp-sn``, ``ddppo``, ``ddppo-sn``): a model-based
    policy objective to differentiate."""
    return getattr(agent, "model", None) is not None and agent.spec.policy_objective == "imagined"


def supports_jacobian(agent) -> bool:
    """True for every algorithm with a learned dynamics model (all but ``sac``)."""
    return getattr(agent, "model", None) is not None


def diag_seed(seed: int, step: int, stream: int) -> int:
    """A 63-bit generator seed from the run seed, the env step and a stream constant (independent
    of every generator the training run uses)."""
    words = np.random.SeedSequence([int(seed), _SEED_TAG, int(step), int(stream)]).generate_state(2, np.uint32)
    return int((int(words[0]) << 31) ^ int(words[1]))


# ---- loading a run ---------------------------------------------------------------------------------
def _checkpoint_path(run_dir: str) -> str:
    if not os.path.isdir(run_dir):
        raise RunError(f"{run_dir}: no such run directory")
    path = os.path.join(run_dir, ckpt.CHECKPOINT_NAME)
    if not os.path.isfile(path):
        raise RunError(f"{run_dir}: no {ckpt.CHECKPOINT_NAME} in it (not a run directory, or no checkpoint written yet)")
    return path


def _config(values) -> Config:
    """:func:`fastrp.config.config_from_checkpoint` (fields an older version did not write get
    the value that reproduces its behaviour); ``Config(**known fields)`` where it does not exist."""
    from_checkpoint = getattr(fastrp.config, "config_from_checkpoint", None)
    if from_checkpoint is not None:
        return from_checkpoint(dict(values))
    known = {f.name for f in dataclasses.fields(Config)}
    return Config(**{k: v for k, v in dict(values).items() if k in known})


def read_config(run_dir: str) -> Config:
    """The config of ``run_dir`` without loading its agent or replay buffer (to check a run before
    measuring anything): its ``config.json`` (the resolved config, rewritten by every training
    process of the run, ``--resume`` included), or when that is missing or unreadable the
    checkpoint's config (the checkpoint is read and released). Checks that the run directory and
    its ``checkpoint.pt`` exist. Raises :class:`RunError` with a one-line reason."""
    path = _checkpoint_path(run_dir)
    config_path = os.path.join(run_dir, "config.json")
    if os.path.isfile(config_path):
        try:
            with open(config_path) as fh:
                return _config(json.load(fh))
        except Exception:  # fall back to the checkpoint's own copy
            pass
    try:
        values = dict(ckpt.load(path)["config"])
        return _config(values)
    except Exception as err:  # a torn or foreign file: one line, no traceback
        raise RunError(f"{path}: cannot read the checkpoint ({type(err).__name__}: {err})") from None


def trained_device(cfg_device: str, state: Dict[str, object]) -> str:
    """The device type a checkpoint's process trained on: ``cfg.device`` unless it is ``auto``;
    for ``auto``, ``cuda`` when the checkpoint's RNG state holds CUDA generator states (the
    trainer initialised CUDA), else ``cpu``; ``auto`` when the checkpoint does not tell."""
    if str(cfg_device) != "auto":
        return str(cfg_device)
    rng = state.get("rng") if isinstance(state, dict) else None
    if not isinstance(rng, dict):
        return "auto"
    return "cuda" if "cuda" in rng else "cpu"


def measurement_device(run_device: str, requested: Optional[str] = None) -> Tuple[torch.device, str]:
    """The device to measure a run on, and a note for the user (empty when there is nothing to say).

    ``requested`` (the command line's ``--device``) wins and must exist here. Otherwise the
    run's own device (:func:`trained_device`): ``cpu``; ``cuda``; ``auto`` (unknown) = cuda when
    available, as training resolves it. A run that trained on ``cuda`` is measured on cpu where
    torch has no CUDA device, with a note: the diagnostics' generators then live on another
    device type than in training (CPU and CUDA random streams differ), so the rows are a new
    measurement, not the training-time rows."""
    if requested is not None:
        try:
            dev = torch.device(requested)
        except RuntimeError:
            raise RunError(f"--device: not a torch device: {requested!r}") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise RunError("--device: cuda requested but torch has no CUDA device")
        return dev, ""
    name = str(run_device)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu"), ""
    try:
        dev = torch.device(name)
    except RuntimeError:
        return torch.device("cpu"), f"the run's device {name!r} is not a torch device: measuring on cpu"
    if dev.type == "cuda" and not torch.cuda.is_available():
        return torch.device("cpu"), ("the run trained on cuda but torch has no CUDA device here: measuring on cpu; "
                                     "CPU and CUDA draw different random numbers, so the rows are a new measurement, "
                                     "not the training-time rows")
    return dev, ""


def load_run(run_dir: str, device: Optional[str] = None) -> LoadedRun:
    """Rebuild the agent and replay buffer of ``run_dir`` from its ``checkpoint.pt``.

    The config is :func:`fastrp.config.config_from_checkpoint` of the checkpoint's config (the
    config of the process that wrote it), with compilation off and ``device`` set to the
    measurement device (:func:`measurement_device`): ``device`` when given, else the device the
    run trained on (:func:`trained_device`) when it exists here, else cpu with
    :attr:`LoadedRun.note` saying so. The agent is ``fastrp.algos.get(cfg.algo)(...)`` with the
    task's termination function, loaded with ``state["agent"]``. Raises :class:`RunError` with a one-line reason.
    """
    path = _checkpoint_path(run_dir)
    try:
        state = ckpt.load(path)
        cfg = _config(state["config"])
        step = int(state["step"])
    except Exception as err:  # a torn or foreign file: one line, no traceback
        raise RunError(f"{path}: cannot read the checkpoint ({type(err).__name__}: {err})") from None
    from fastrp.envs import make, termination_fn

    dev, note = measurement_device(trained_device(cfg.device, state), device)
    cfg = dataclasses.replace(cfg, device=str(dev), compile=False, cuda_graphs=False, resume="")
    env = make(cfg.env, 1, seed=cfg.seed)
    space = env.single_action_space
    agent = algos.get(cfg.algo)(cfg, env.obs_dim, env.act_dim, space.low, space.high, dev,
                                termination=termination_fn(cfg.env))
    try:
        agent.load_state_dict(state["agent"])
        size = int(state["buffer"]["size"])
        buffer = ReplayBuffer(env.obs_dim, env.act_dim, max(size, 1), dev)
        buffer.load_state_dict(state["buffer"])
    except (RuntimeError, KeyError, ValueError) as err:  # e.g. written by another fastrp version
        reason = " ".join(str(err).split()) or type(err).__name__
        reason = reason if len(reason) <= 200 else reason[:197] + "..."
        raise RunError(f"{path}: does not match this fastrp's {cfg.algo} agent ({reason})") from None
    finally:
        env.close()
        del state
    return LoadedRun(run_dir, cfg, agent, buffer, step, note)


# ---- measurements ----------------------------------------------------------------------------------
def _row(step: int, kind: str, model: str, **values) -> Dict[str, object]:
    row: Dict[str, object] = {"env_steps": int(step), "kind": kind, "model": model}
    row.update(values)
    return row


def _start_states(buffer: ReplayBuffer, count: int, seed: int) -> Tuple[torch.Tensor, torch.Generator]:
    """``count`` distinct replay-buffer observations (all when the buffer is smaller), drawn by a
    generator seeded with ``seed``; returns them and the generator (for the pass's later draws)."""
    gen = torch.Generator(device=buffer.device)
    gen.manual_seed(seed)
    idx = torch.randperm(len(buffer), generator=gen, device=buffer.device)[:count]
    return buffer.gather(idx).obs, gen


def variance_rows(agent, buffer: ReplayBuffer, cfg: Config, step: int, settings: Settings,
                  seed: Optional[int] = None) -> List[Dict[str, object]]:
    """Gradient variance of ``agent``'s RP policy objective for ``H = min_horizon .. max_horizon``.

    The fixed pool: ``settings.states`` distinct replay-buffer rows (all of them when the buffer
    is smaller) drawn by a generator seeded with :func:`diag_seed` ``(seed, step, POOL_STREAM)``;
    then :func:`fastrp.diagnostics.variance.rp_gradient_variance` with the agent's policy,
    prediction model, critic, temperature, termination function and (``ddppo*``) gradient
    model, seeded with ``(seed, step, VARIANCE_STREAM)``. ``seed`` defaults to ``cfg.seed``.
    Returns one row of :data:`COLUMNS` per H.
    """
    if not supports_variance(agent):
        raise RunError(f"algorithm {cfg.algo!r} has no model-based policy gradient: the variance diagnostic "
                       f"needs maac, rp-sn, ddppo or ddppo-sn")
    if len(buffer) == 0:
        raise RunError("the replay buffer is empty: no start states")
    settings.validate()
    base = cfg.seed if seed is None else seed
    pool, _ = _start_states(buffer, settings.states, diag_seed(base, step, POOL_STREAM))
    grad_model = agent.grad_model
    stats = rp_gradient_variance(agent.policy, agent.model, agent.critic, pool,
                                 range(settings.min_horizon, settings.max_horizon + 1), gamma=cfg.gamma,
                                 alpha=agent.alpha, termination_fn=agent.termination, grad_model=grad_model,
                                 num_samples=settings.samples, batch_size=settings.batch,
                                 seed=diag_seed(base, step, VARIANCE_STREAM))
    model = "gradient" if grad_model is not None else "prediction"
    return [_row(step, "variance", model, horizon=s["horizon"], trace_cov=s["trace_cov"],
                 mean_grad_norm=s["mean_grad_norm"], samples=s["samples"], batch=s["batch"],
                 trace_cov_norm=s["trace_cov_norm"], action_grad_sq=s["action_grad_sq"],
                 action_trace_cov=s["action_trace_cov"]) for s in stats]


def lipschitz_rows(agent, buffer: ReplayBuffer, cfg: Config, step: int, settings: Settings,
                   seed: Optional[int] = None) -> List[Dict[str, object]]:
    """The Lipschitz constants of ``agent``'s prediction model and policy (:mod:`fastrp.diagnostics.lipschitz`):
    the layer-norm products, and along real unrolls from ``min(settings.states, 256)`` replay-buffer
    states (drawn like the variance pool, with :func:`diag_seed` ``(seed, step, LIPSCHITZ_STREAM)``)
    the mean spectral norm of one model step's Jacobian and of the closed-loop ``ds_H/ds_0`` for
    ``H = 1 .. settings.max_horizon``. One row per H (the constants repeated)."""
    from fastrp.diagnostics.lipschitz import lipschitz_bound, step_jacobian_norms, unroll_jacobian_norms

    if not supports_variance(agent):
        raise RunError(f"algorithm {cfg.algo!r} has no model-based policy gradient: the Lipschitz diagnostic "
                       f"needs maac, rp-sn, ddppo or ddppo-sn")
    if len(buffer) == 0:
        raise RunError("the replay buffer is empty: no start states")
    settings.validate()
    base = cfg.seed if seed is None else seed
    states, gen = _start_states(buffer, min(settings.states, 256), diag_seed(base, step, LIPSCHITZ_STREAM))
    model, policy = agent.model, agent.policy
    with frozen_modules([policy, model, agent.critic, agent.grad_model]):
        model_bound = float(lipschitz_bound(model.net, model.out_dim)[model.elite_idx].mean())
        policy_bound = float(lipschitz_bound(policy.net, policy.act_dim)[0])
        step_norm = float(step_jacobian_norms(model, policy, states, gen).mean())
        unroll = unroll_jacobian_norms(model, policy, states, max(settings.max_horizon, 1), gen)
    return [_row(step, "lipschitz", "prediction", horizon=h + 1, model_lip_bound=model_bound,
                 policy_lip_bound=policy_bound, step_jac_norm=step_norm, unroll_jac_norm=float(norms.mean()),
                 samples=int(states.shape[0])) for h, norms in enumerate(unroll)]


def jacobian_rows(agent, cfg: Config, step: int, settings: Settings, seed: Optional[int] = None,
                  num_envs: int = 16) -> List[Dict[str, object]]:
    """Model gradient error of ``agent``'s prediction model (and ``ddppo*`` gradient model).

    Held-out transitions: ``min(num_envs, settings.transitions)`` fresh copies of the task
    (``fastrp.envs.make``, seeded from :func:`diag_seed` ``(seed, step, JACOBIAN_STREAM)``, one
    stepping thread) run ``settings.rollout_steps`` steps of the current stochastic policy;
    ``settings.transitions`` of the recorded ``(state, obs, action)`` are kept; the true
    Jacobians and next observations come from :func:`fastrp.envs.dynamics_jacobians`. Each model
    is scored by :func:`fastrp.diagnostics.jacobian.ensemble_jacobian_errors` (mean over its
    elites). Returns one row of :data:`COLUMNS` per model.
    """
    if not supports_jacobian(agent):
        raise RunError(f"algorithm {cfg.algo!r} has no dynamics model: the jacobian diagnostic needs mbpo, maac, "
                       f"rp-sn, ddppo or ddppo-sn")
    from fastrp.envs import dynamics_jacobians, make

    settings.validate()
    base = cfg.seed if seed is None else seed
    s = diag_seed(base, step, JACOBIAN_STREAM)
    device = agent.model.elite_idx.device
    gen = torch.Generator(device=device)
    gen.manual_seed(s)
    rng = np.random.default_rng(s)
    env_seed = int(rng.integers(0, 2 ** 31 - 1))
    n_envs = max(1, min(num_envs, settings.transitions))
    env = make(cfg.env, n_envs, seed=env_seed, num_threads=1)
    try:
        env.reset(seed=env_seed)
        grad_model = agent.grad_model
        models = [("prediction", agent.model)] + ([("gradient", grad_model)] if grad_model is not None else [])
        with frozen_modules([agent.policy, agent.model, grad_model]):
            held = collect_transitions(env, agent.policy, settings.transitions, settings.rollout_steps, gen, rng,
                                       device=device)
            truth = dynamics_jacobians(env, held.actions, held.states)
            cols = state_columns(env)
            rows = []
            for name, model in models:
                err = ensemble_jacobian_errors(model, held.obs, held.actions, truth.d_obs, truth.d_action,
                                               truth.next_obs, cols)
                rows.append(_row(step, "jacobian", name, jac_state_err=err["jac_state_err"],
                                 jac_action_err=err["jac_action_err"], pred_mse=err["pred_mse"],
                                 samples=held.obs.shape[0]))
    finally:
        env.close()
    return rows


# ---- CSV (cells formatted like metrics.csv: fastrp.rl.logger._fmt) ------------------------------------


def read_rows(path: str) -> List[Dict[str, str]]:
    """Rows of a diagnostics CSV as dicts of strings (empty list when the file does not exist)."""
    if not os.path.exists(path):
        return []
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def append_rows(path: str, rows: Sequence[Dict[str, object]], columns: Sequence[str] = COLUMNS) -> None:
    """Append ``rows`` to the CSV at ``path`` (header written when the file is new or empty).
    An existing file with another header raises ``ValueError`` (rows are never misaligned)."""
    columns = list(columns)
    exists = os.path.exists(path) and os.path.getsize(path) > 0
    if exists:
        with open(path, newline="") as fh:
            header = next(csv.reader(fh), [])
        if header != columns:
            raise ValueError(f"{path}: has columns {header}, expected {columns}; choose another --csv file")
    with open(path, "a", newline="") as fh:
        writer = csv.DictWriter(fh, columns)
        if not exists:
            writer.writeheader()
        for row in rows:
            writer.writerow({k: _fmt(row.get(k)) for k in columns})


class TrainingDiagnostics:
    """The trainer's hook (called after each metrics row).

    Active when ``cfg.diag_every > 0`` and the algorithm has a model: at the first log row at or
    past each multiple of ``diag_every`` (:meth:`due`) and at least ``warmup_steps`` (the model
    has been fit), it appends :func:`variance_rows` (RP algorithms) and :func:`jacobian_rows`
    (every model-based algorithm) to ``<run_dir>/diagnostics.csv`` and mirrors them to the run's
    TensorBoard writer. Each kind is measured and appended on its own: a failing measurement is
    reported with a warning and skipped (the other kind's rows are still written), and never
    stops the training run.

    Args:
        cfg: the run's config.
        run_dir: the run directory.
        resume_step: on ``--resume``, the checkpoint's step: rows after it are dropped (whether
            or not the resumed run has diagnostics on); None for a new run (the file starts
            empty when diagnostics are on).
    """

    def __init__(self, cfg: Config, run_dir: str, resume_step: Optional[int] = None):
        self.cfg = cfg
        self.path = os.path.join(run_dir, DIAG_CSV)
        self.settings = Settings.from_config(cfg)
        self.active = cfg.diag_every > 0 and cfg.algo != "sac"
        if resume_step is not None:
            if os.path.exists(self.path):
                truncate_csv(self.path, COLUMNS, resume_step)
        elif self.active:
            with open(self.path, "w", newline="") as fh:
                csv.DictWriter(fh, COLUMNS).writeheader()

    def due(self, step: int, previous: int) -> bool:
        """Whether a pass runs at the metrics row of env step ``step`` whose previous row was at
        ``previous``: the span ``(previous, step]`` crosses a multiple of ``diag_every``, and
        ``step >= warmup_steps``."""
        if not self.active or step < self.cfg.warmup_steps or step <= 0:
            return False
        every = self.cfg.diag_every
        return step // every > max(previous, 0) // every

    def __call__(self, agent, buffer: ReplayBuffer, step: int, previous: int, tb=None) -> List[Dict[str, object]]:
        """Measure ``agent`` (with start states from ``buffer``) at the row of env step ``step``
        (previous row at ``previous``) if due; mirror the rows to the TensorBoard writer ``tb``
        when given; returns the rows written."""
        if not self.due(step, previous):
            return []
        cfg = self.cfg
        rows: List[Dict[str, object]] = []
        kinds = (("variance", supports_variance(agent), lambda: variance_rows(agent, buffer, cfg, step,
                                                                                self.settings)),
                 ("jacobian", supports_jacobian(agent), lambda: jacobian_rows(agent, cfg, step, self.settings)),
                 ("lipschitz", supports_variance(agent), lambda: lipschitz_rows(agent, buffer, cfg, step,
                                                                                 self.settings)))
        for kind, supported, measure in kinds:
            if not supported:
                continue
            try:
                kind_rows = measure()
                append_rows(self.path, kind_rows)
            except Exception as err:  # a diagnostic must never end a training run
                warnings.warn(f"{kind} diagnostics at env step {step} failed and were skipped: "
                              f"{type(err).__name__}: {err}", stacklevel=2)
                continue
            rows += kind_rows
        if tb is not None:
            for row in rows:
                if row["kind"] == "variance":
                    for key in ("trace_cov", "mean_grad_norm", "trace_cov_norm", "action_grad_sq", "action_trace_cov"):
                        tb.add_scalar(f"diagnostics/{key}/H{row['horizon']}", row[key], step)
                elif row["kind"] == "lipschitz":
                    tb.add_scalar(f"diagnostics/unroll_jac_norm/H{row['horizon']}", row["unroll_jac_norm"], step)
                    if row["horizon"] == 1:
                        for key in ("model_lip_bound", "policy_lip_bound", "step_jac_norm"):
                            tb.add_scalar(f"diagnostics/{key}", row[key], step)
                else:
                    for key in ("jac_state_err", "jac_action_err", "pred_mse"):
                        tb.add_scalar(f"diagnostics/{row['model']}/{key}", row[key], step)
            tb.flush()
        return rows
