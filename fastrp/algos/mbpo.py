"""MBPO (Janner et al. 2019): SAC on a mix of real transitions and short branched model rollouts.

Every ``model_train_every`` env steps: refit the probabilistic ensemble on the whole replay
buffer (holdout early stopping, elites), then roll the current policy out for the scheduled
length from ``rollout_batch_size`` real states, one random elite per sample, into the model
buffer. Critic and policy minibatches take ``real_ratio`` real rows and the rest model rows.
"""

from __future__ import annotations

import copy
import math
from typing import Dict, Tuple

import torch

from fastrp.algos.common import finite_module
from fastrp.algos.sac import SAC
from fastrp.nn.model import ProbabilisticEnsemble
from fastrp.rl.buffer import Batch, ReplayBuffer
from fastrp.rl.unroll import model_rollout

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
    """The preset's ensemble: ``ensemble_size`` members, ``model_num_layers`` x ``model_hidden_dim``
    SiLU, spectral norm on all but the output layer when ``model_spectral_norm``."""
    return ProbabilisticEnsemble(obs_dim, act_dim, cfg.model_hidden_dim, cfg.model_num_layers, cfg.ensemble_size,
                                 cfg.num_elites, activation="silu",
                                 spectral_norm="hidden" if cfg.model_spectral_norm else "none",
                                 lr=cfg.model_lr).to(device)


def guarded_fit(model: ProbabilisticEnsemble, buffer: ReplayBuffer, cfg, **fd) -> Tuple[Dict[str, object], bool]:
    """Refit ``model`` on every real transition (oldest first, as the FD window expects). If the fit
    leaves non-finite weights or a non-finite loss, the model is put back as it was before the
    fit; returns ``(fit stats, ok)``."""
    data = buffer.latest(len(buffer))
    backup = copy.deepcopy(model.state_dict())
    stats = model.fit(data.obs, data.action, data.next_obs, data.reward, holdout_ratio=cfg.model_holdout,
                      max_epochs=cfg.model_max_epochs, max_steps=cfg.model_max_steps or None,
                      batch_size=cfg.model_batch_size, patience=cfg.model_patience,
                      **fd)
    ok = finite_module(model) and math.isfinite(stats["train_nll"]) and math.isfinite(stats["fd_loss"])
    if not ok:
        model.load_state_dict(backup)
    return stats, ok


class MBPO(SAC):
    """SAC + prediction ensemble + model buffer (see the module docstring)."""

    name = "mbpo"

    def __init__(self, cfg, obs_dim, act_dim, action_low, action_high, device, termination=None):
        super().__init__(cfg, obs_dim, act_dim, action_low, action_high, device, termination)
        self.model = make_model(cfg, obs_dim, act_dim, device)
        per_epoch = math.ceil(EPOCH_STEPS / cfg.model_train_every)
        capacity = cfg.rollout_batch_size * cfg.rollout_max_len * per_epoch * cfg.model_retain_epochs
        self.model_buffer = ReplayBuffer(obs_dim, act_dim, capacity, device)

    # ---- model training and rollouts (once every model_train_every env steps) -----------------
    def fit_models(self, buffer: ReplayBuffer) -> Dict[str, float]:
        """Refit the prediction ensemble (a diverged fit is undone and counted)."""
        stats, ok = guarded_fit(self.model, buffer, self.cfg)
        return {"model_nll": stats["train_nll"], "model_holdout_mse": stats["holdout_mse"],
                "model_fits_skipped": float(not ok)}

    def on_env_step(self, step: int, buffer: ReplayBuffer) -> Dict[str, float]:
        out = super().on_env_step(step, buffer)
        cfg = self.cfg
        if step < cfg.warmup_steps or (step - cfg.warmup_steps) % cfg.model_train_every != 0:
            return out
        out.update(self.fit_models(buffer))
        length = rollout_length(cfg, step)
        start = buffer.sample(cfg.rollout_batch_size).obs
        modes = (self.policy.training, self.model.training)
        self.policy.eval()
        self.model.eval()  # stored SN vectors: the rollout must not move the model's power iteration
        try:
            rows = model_rollout(self.policy, self.model, start, length, self.termination)
        finally:
            self.policy.train(modes[0])
            self.model.train(modes[1])
        finite = torch.ones(rows["reward"].shape[0], dtype=torch.bool, device=self.device)
        for key in ("obs", "action", "reward", "next_obs"):
            finite &= torch.isfinite(rows[key].reshape(finite.shape[0], -1)).all(dim=1)
        kept = {key: value[finite] for key, value in rows.items()}  # a diverged model never feeds the critic
        self.model_buffer.add(kept["obs"], kept["action"], kept["reward"], kept["next_obs"], kept["terminated"])
        out["rollout_len"] = float(length)
        out["model_nonfinite_rows"] = float(finite.numel() - kept["reward"].shape[0])
        return out

    # ---- critic and policy data ------------------------------------------------------------------
    def mixed_batch(self, buffer: ReplayBuffer) -> Batch:
        """``real_ratio`` real rows, the rest from the model buffer (all real while it is empty)."""
        n = self.cfg.batch_size
        if len(self.model_buffer) == 0:
            return buffer.sample(n)
        n_real = int(round(n * self.cfg.real_ratio))
        real, fake = buffer.sample(n_real), self.model_buffer.sample(n - n_real)
        return Batch(*(torch.cat([r, f]) for r, f in zip(real, fake)))

    def critic_batch(self, buffer: ReplayBuffer) -> Batch:
        return self.mixed_batch(buffer)

    def actor_obs(self, buffer: ReplayBuffer) -> torch.Tensor:
        return self.mixed_batch(buffer).obs

    # ---- checkpointing -----------------------------------------------------------------------------
    def modules(self):
        return {**super().modules(), "model": self.model}

    def state_dict(self):
        return {**super().state_dict(), "model_buffer": self.model_buffer.state_dict()}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.model_buffer.load_state_dict(state["model_buffer"])

    def is_finite(self) -> bool:
        return super().is_finite() and finite_module(self.model)
