"""One agent for all six algorithms, assembled from the parts its :class:`~fastrp.algos.AlgoSpec`
names (the table in :mod:`fastrp.algos`).

Read top to bottom: the networks (policy, twin critic and its target, temperature; the
prediction and gradient models with their fitters and the model-rollout buffer when the spec
has them), acting, the model phase (refit, then rollouts), where the critic's and the policy's
data come from, the critic update, the policy objective, the policy + temperature update, and
checkpointing. Every loss is a pure function of :mod:`fastrp.algos.losses`; the trainer
(:mod:`fastrp.train`) decides when each phase runs.
"""

from __future__ import annotations

import contextlib
import copy
import math
from typing import Callable, Dict, Iterator, Optional, Tuple

import torch

from fastrp.algos import AlgoSpec
from fastrp.algos import losses
from fastrp.algos.common import Adam, UpdateStats, compile_update, finite_module, frozen_modules, guarded_update
from fastrp.nn.critic import TwinQ
from fastrp.nn.model import ProbabilisticEnsemble
from fastrp.nn.normalizer import RunningNormalizer
from fastrp.nn.policy import TanhGaussianPolicy
from fastrp.rl.buffer import Batch, ReplayBuffer
from fastrp.rl.model_fit import FDTerm, ModelFitter, guarded_fit
from fastrp.rl.unroll import model_rollout

__all__ = ["Agent", "EPOCH_STEPS", "rollout_length", "make_model"]

EPOCH_STEPS = 1000
"""Env steps per "epoch" of MBPO's rollout-length schedule."""


def rollout_length(cfg, step: int) -> int:
    """MBPO's schedule: ``rollout_min_len`` until epoch ``rollout_min_epoch``, linear up to
    ``rollout_max_len`` at epoch ``rollout_max_epoch``, constant after (a function of the env step
    counter only, so resumed runs follow the same schedule)."""
    epoch = step // EPOCH_STEPS
    span = max(cfg.rollout_max_epoch - cfg.rollout_min_epoch, 1)
    frac = min(max((epoch - cfg.rollout_min_epoch) / span, 0.0), 1.0)
    return int(cfg.rollout_min_len + frac * (cfg.rollout_max_len - cfg.rollout_min_len))


def make_model(cfg, obs_dim: int, act_dim: int, device: torch.device) -> ProbabilisticEnsemble:
    """The config's ensemble: ``ensemble_size`` members, ``model_num_layers`` x ``model_hidden_dim``
    SiLU, spectral norm on all but the output layer when ``model_spectral_norm``, standardised
    targets when ``model_target_norm``, matmuls in ``precision``."""
    return ProbabilisticEnsemble(obs_dim, act_dim, cfg.model_hidden_dim, cfg.model_num_layers, cfg.ensemble_size,
                                 cfg.num_elites, activation="silu",
                                 spectral_norm="hidden" if cfg.model_spectral_norm else "none",
                                 precision=cfg.precision, normalize_targets=cfg.model_target_norm).to(device)


class Agent:
    """The networks, optimizers and update steps of one algorithm.

    Args:
        cfg: the resolved run config (:class:`fastrp.config.Config`).
        obs_dim, act_dim: env widths.
        action_low, action_high: the action box (``[act_dim]`` sequences).
        device: training device.
        termination: the env's torch termination function (model rollouts and unrolls).
        spec: the algorithm's parts (``fastrp.algos.SPECS[cfg.algo]``).

    Attributes: ``policy``, ``critic``, ``critic_target``, ``log_alpha``, ``obs_normalizer``
    (None without ``obs_norm``), ``model`` / ``grad_model`` (None when the spec has no such
    model), ``model_buffer`` (None unless the spec mixes model data), ``stats``
    (:class:`~fastrp.algos.common.UpdateStats` of the current log interval).
    """

    def __init__(self, cfg, obs_dim: int, act_dim: int, action_low, action_high, device: torch.device,
                 termination: Optional[Callable] = None, *, spec: AlgoSpec):
        self.cfg, self.spec, self.device, self.termination = cfg, spec, device, termination
        self.obs_dim, self.act_dim = obs_dim, act_dim
        low = torch.as_tensor(action_low, dtype=torch.float32)
        high = torch.as_tensor(action_high, dtype=torch.float32)
        # RP-PGM's observation normalisation (running mean / std of every real observation, std
        # clipped to [0.1, 10]), shared by the policy, the critic and the target critic
        self.obs_normalizer = RunningNormalizer(obs_dim, clip_std=(0.1, 10.0)).to(device) if cfg.obs_norm else None
        self.policy = TanhGaussianPolicy(obs_dim, act_dim, cfg.hidden_dim, cfg.num_layers,
                                         spectral_norm=cfg.policy_sn_layers if cfg.policy_spectral_norm else False,
                                         action_scale=((high - low) / 2).tolist(),
                                         action_bias=((high + low) / 2).tolist(),
                                         obs_normalizer=self.obs_normalizer, precision=cfg.precision).to(device)
        self.critic = TwinQ(obs_dim, act_dim, cfg.hidden_dim, cfg.num_layers, obs_normalizer=self.obs_normalizer,
                            precision=cfg.precision).to(device)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.critic_target.obs_normalizer = self.obs_normalizer  # shared, not a frozen copy
        self.log_alpha = torch.tensor(float(cfg.init_alpha), device=device).log().requires_grad_(True)
        self.target_entropy = -cfg.target_entropy_scale * act_dim
        self.actor_opt = Adam(self.policy.parameters(), cfg.actor_lr)
        self.critic_opt = Adam(self.critic.parameters(), cfg.critic_lr)
        self.alpha_opt = Adam([self.log_alpha], cfg.alpha_lr)
        self.stats = UpdateStats(device)

        self.model = make_model(cfg, obs_dim, act_dim, device) if "prediction" in spec.models else None
        self.grad_model = make_model(cfg, obs_dim, act_dim, device) if "gradient" in spec.models else None
        self.model_fitter = ModelFitter(self.model, cfg.model_lr) if self.model is not None else None
        self.grad_model_fitter = ModelFitter(self.grad_model, cfg.model_lr) if self.grad_model is not None else None
        self.model_buffer: Optional[ReplayBuffer] = None
        if spec.uses_model_buffer:
            per_epoch = math.ceil(EPOCH_STEPS / cfg.model_train_every)
            capacity = cfg.rollout_batch_size * cfg.rollout_max_len * per_epoch * cfg.model_retain_epochs
            self.model_buffer = ReplayBuffer(obs_dim, act_dim, capacity, device)

        # the two update steps, each one compiled region under --compile (loss, backward, optimizer step)
        self._critic_update = compile_update(self.critic_update, cfg.compile, cfg.cuda_graphs)
        self._policy_update = compile_update(self.policy_update, cfg.compile, cfg.cuda_graphs)

    # ---- acting --------------------------------------------------------------------------------
    @torch.no_grad()
    def act(self, obs: torch.Tensor, deterministic: bool = False) -> torch.Tensor:
        """Actions ``[N, act_dim]`` for ``obs[N, obs_dim]`` (eval mode: SN vectors are not updated)."""
        self.policy.eval()
        action, _ = self.policy(obs, deterministic=deterministic)
        self.policy.train()
        return action

    @property
    def alpha(self) -> torch.Tensor:
        return self.log_alpha.detach().exp()

    def observe(self, obs: torch.Tensor) -> None:
        """A new real observation ``[N, obs_dim]``: the observation statistics take it in."""
        if self.obs_normalizer is not None:
            self.obs_normalizer.update(obs)

    # ---- model phase (the trainer calls it every model_train_every env steps) ------------------
    def refit_models(self, buffer: ReplayBuffer) -> Dict[str, float]:
        """Refit the prediction model, then the gradient model (NLL + ``fd_weight`` x the
        directional-derivative loss on kNN finite differences), on every real transition. A fit
        that diverges is undone and counted in ``model_fits_skipped``."""
        cfg = self.cfg
        data = buffer.latest(len(buffer))  # oldest first, as the FD window expects
        stats, ok = guarded_fit(self.model_fitter, data, cfg)
        out = {"model_nll": stats["train_nll"], "model_holdout_mse": stats["holdout_mse"],
               "model_fits_skipped": float(not ok)}
        if self.grad_model is not None:
            fd_k = min(cfg.fd_k, min(cfg.fd_window, len(buffer)) - 1)  # fewer neighbours while the buffer is tiny
            term = FDTerm(cfg.fd_weight, fd_k, cfg.fd_window, cfg.fd_batch_size) if cfg.fd_weight > 0 else None
            stats, ok = guarded_fit(self.grad_model_fitter, data, cfg, extra_term=term)
            out["grad_model_fd_loss"] = stats["fd_loss"]
            out["model_fits_skipped"] += float(not ok)
        return out

    def generate_rollouts(self, buffer: ReplayBuffer, step: int) -> Dict[str, float]:
        """MBPO's branched rollouts: the current policy from ``rollout_batch_size`` real states for
        the scheduled length through the prediction model (one random elite per sample), into the
        model buffer. Rows with non-finite values are dropped and counted. With ``real_ratio`` 1
        every critic and policy row is real, nothing would read the rollouts, and none are made."""
        if self.model_buffer is None or self.cfg.real_ratio >= 1.0:
            return {}
        cfg = self.cfg
        length = rollout_length(cfg, step)
        start = buffer.sample(cfg.rollout_batch_size).obs
        # eval mode: the rollout must not move the policy's or the model's stored SN vectors
        with frozen_modules([self.policy, self.model]):
            rows = model_rollout(self.policy, self.model, start, length, self.termination)
        finite = torch.ones(rows["reward"].shape[0], dtype=torch.bool, device=self.device)
        for key in ("obs", "action", "reward", "next_obs"):
            finite &= torch.isfinite(rows[key].reshape(finite.shape[0], -1)).all(dim=1)
        kept = {key: value[finite] for key, value in rows.items()}  # a diverged model never feeds the critic
        self.model_buffer.add(kept["obs"], kept["action"], kept["reward"], kept["next_obs"], kept["terminated"])
        return {"rollout_len": float(length), "model_nonfinite_rows": float(finite.numel() - kept["reward"].shape[0])}

    # ---- where the updates' data come from -------------------------------------------------------
    def _mixed_batch(self, buffer: ReplayBuffer) -> Batch:
        """``real_ratio`` real rows, the rest from the model buffer (all real while it is empty)."""
        n = self.cfg.batch_size
        if len(self.model_buffer) == 0:
            return buffer.sample(n)
        n_real = int(round(n * self.cfg.real_ratio))
        real, fake = buffer.sample(n_real), self.model_buffer.sample(n - n_real)
        return Batch(*(torch.cat([r, f]) for r, f in zip(real, fake)))

    def critic_batch(self, buffer: ReplayBuffer) -> Batch:
        """The critic's minibatch: real transitions, or MBPO's real / model mix."""
        if self.spec.critic_data == "mixed":
            return self._mixed_batch(buffer)
        return buffer.sample(self.cfg.batch_size)

    def policy_states(self, buffer: ReplayBuffer) -> torch.Tensor:
        """Start states of the policy objective: real states, or MBPO's real / model mix."""
        if self.spec.policy_states == "mixed":
            return self._mixed_batch(buffer).obs
        return buffer.sample(self.cfg.batch_size).obs

    # ---- critic ----------------------------------------------------------------------------------
    def critic_update(self, batch: Batch) -> Dict[str, torch.Tensor]:
        """One soft Bellman update of both Q networks, then Polyak-average the target."""
        loss, info = losses.critic_loss(self.critic, self.critic_target, self.policy, batch, self.cfg.gamma, self.alpha)
        ok, _ = guarded_update(self.critic_opt, loss)
        losses.polyak_update(self.critic_target, self.critic, self.cfg.tau)
        return {"ok": ok, "critic_loss": loss.detach(), "q_mean": info["q_mean"]}

    # ---- policy and temperature -----------------------------------------------------------------
    def policy_loss(self, obs: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The policy objective of the spec from start states ``obs``; returns ``(loss, mean log
        pi over the policy's samples (detached))``."""
        if self.spec.policy_objective == "sac":
            loss, info = losses.sac_actor_loss(self.policy, self.critic, obs, self.alpha)
            return loss, info["log_prob"]
        loss, info = losses.imagined_objective(self.policy, self.model, self.critic, obs, self.cfg.horizon,
                                               self.cfg.gamma, self.alpha, self.termination,
                                               grad_model=self.grad_model)
        return loss, -info["entropy"]

    def policy_update(self, obs: torch.Tensor) -> Dict[str, torch.Tensor]:
        """One policy update, then one temperature update on the same samples (run inside
        :meth:`policy_update_mode`)."""
        with self.policy.net.cached_scales():  # one power iteration for the whole step, inside the graph
            loss, mean_log_prob = self.policy_loss(obs)
        ok, grad_norm = guarded_update(self.actor_opt, loss)
        alpha_ok, _ = guarded_update(self.alpha_opt, losses.temperature_loss(self.log_alpha, mean_log_prob,
                                                                             self.target_entropy))
        return {"ok": ok & alpha_ok, "actor_loss": loss.detach(), "policy_grad_norm": grad_norm,
                "entropy": -mean_log_prob, "alpha": self.alpha}

    @contextlib.contextmanager
    def policy_update_mode(self) -> Iterator[None]:
        """The one place the policy step's surroundings are set: only the policy is
        differentiated (critic and models frozen by :func:`~fastrp.algos.common.frozen_modules`:
        no graph through their weights; eval mode, as the models' spectral-norm vectors belong
        to model training), and the models' spectral-norm scales are computed once for the whole
        step (the policy's are cached inside :meth:`policy_update`, where they are differentiated).
        Flags and modes are restored on exit. Outside the compiled region: its switches would make
        dynamo recompile."""
        with frozen_modules([self.critic, self.model, self.grad_model]), contextlib.ExitStack() as stack:
            for module in (self.model, self.grad_model):
                if module is not None:
                    stack.enter_context(module.net.cached_scales())
            yield

    # ---- the updates of one env step ---------------------------------------------------------------
    def update(self, buffer: ReplayBuffer) -> None:
        """``critic_updates`` critic steps, then ``policy_updates`` policy + temperature steps.
        Results are accumulated on the device in :attr:`stats` (no host synchronisation)."""
        for _ in range(self.cfg.critic_updates):
            out = self._critic_update(self.critic_batch(buffer))
            self.stats.critic.add(out.pop("ok"), out)
        for _ in range(self.cfg.policy_updates):
            obs = self.policy_states(buffer)
            with self.policy_update_mode():
                out = self._policy_update(obs)
            self.stats.policy.add(out.pop("ok"), out)

    def updates_per_step(self) -> int:
        return self.cfg.critic_updates + self.cfg.policy_updates

    # ---- checkpointing -------------------------------------------------------------------------
    def modules(self) -> Dict[str, torch.nn.Module]:
        mods = {"policy": self.policy, "critic": self.critic, "critic_target": self.critic_target}
        if self.model is not None:
            mods["model"] = self.model
        if self.grad_model is not None:
            mods["grad_model"] = self.grad_model
        return mods

    def optimizers(self) -> Dict[str, object]:
        opts: Dict[str, object] = {"actor_opt": self.actor_opt, "critic_opt": self.critic_opt, "alpha_opt": self.alpha_opt}
        if self.model_fitter is not None:
            opts["model_fitter"] = self.model_fitter
        if self.grad_model_fitter is not None:
            opts["grad_model_fitter"] = self.grad_model_fitter
        return opts

    def is_finite(self) -> bool:
        """Host check that every network and the temperature are finite (before a checkpoint)."""
        return finite_module(*self.modules().values()) and bool(torch.isfinite(self.log_alpha).item())

    def state_dict(self) -> Dict[str, object]:
        state: Dict[str, object] = {k: m.state_dict() for k, m in self.modules().items()}
        state.update({k: o.state_dict() for k, o in self.optimizers().items()})
        state["log_alpha"] = self.log_alpha.detach().cpu()
        state["stats"] = self.stats.state_dict()
        if self.model_buffer is not None:
            state["model_buffer"] = self.model_buffer.state_dict()
        return state

    def load_state_dict(self, state: Dict[str, object]) -> None:
        """Restore :meth:`state_dict`; also reads checkpoints of the earlier layout (each model's
        optimizer inside the model's ``_extra_state``, a ``metrics`` entry instead of ``stats``)."""
        state = dict(state)
        for model_key, fitter_key in (("model", "model_fitter"), ("grad_model", "grad_model_fitter")):
            if model_key in state and "_extra_state" in state[model_key]:
                model_state = dict(state[model_key])
                state.setdefault(fitter_key, model_state.pop("_extra_state"))
                state[model_key] = model_state
        for k, m in self.modules().items():
            m.load_state_dict(state[k])
        for k, o in self.optimizers().items():
            o.load_state_dict(state[k])
        with torch.no_grad():
            self.log_alpha.copy_(state["log_alpha"])
        if "stats" in state:
            self.stats.load_state_dict(state["stats"])
        if self.model_buffer is not None:
            self.model_buffer.load_state_dict(state["model_buffer"])
