"""SAC (Haarnoja et al. 2018): the model-free baseline, and the base of the model-based algorithms.

Read top to bottom: networks and optimizers, acting, the critic update (soft Bellman target with
clipped double Q), the policy + temperature update, and the per-env-step schedule. The model-based
files override two hooks: :meth:`SAC.critic_batch` (where critic data comes from) and
:meth:`SAC.actor_objective` (how the policy loss is computed), plus :meth:`SAC.on_env_step`.
"""

from __future__ import annotations

import copy
from typing import Dict, Tuple

import torch

from fastrp.algos.common import DeviceMetrics, finite_module, guarded_step, make_adam, maybe_compile, soft_update
from fastrp.config import Config
from fastrp.nn.critic import TwinQ
from fastrp.nn.normalizer import RunningNormalizer
from fastrp.nn.policy import TanhGaussianPolicy
from fastrp.rl.buffer import Batch, ReplayBuffer


class SAC:
    """Soft actor-critic with twin Q, target critic and automatic temperature.

    Args:
        cfg: the resolved run config.
        obs_dim, act_dim: env widths.
        action_low, action_high: the action box (``[act_dim]`` sequences).
        device: training device.
        termination: the env's torch termination function (used by the model-based subclasses).
    """

    name = "sac"

    def __init__(self, cfg: Config, obs_dim: int, act_dim: int, action_low, action_high, device: torch.device,
                 termination=None):
        self.cfg, self.device, self.termination = cfg, device, termination
        self.obs_dim, self.act_dim = obs_dim, act_dim
        low = torch.as_tensor(action_low, dtype=torch.float32)
        high = torch.as_tensor(action_high, dtype=torch.float32)
        # RP-PGM's observation normalisation (running mean / std of every real observation, std
        # clipped to [0.1, 10]), shared by the policy, the critic and the target critic
        self.obs_normalizer = RunningNormalizer(obs_dim, clip_std=(0.1, 10.0)).to(device) if cfg.obs_norm else None
        self.policy = TanhGaussianPolicy(obs_dim, act_dim, cfg.hidden_dim, cfg.num_layers,
                                         spectral_norm=cfg.policy_spectral_norm, action_scale=((high - low) / 2).tolist(),
                                         action_bias=((high + low) / 2).tolist(),
                                         obs_normalizer=self.obs_normalizer).to(device)
        self.critic = TwinQ(obs_dim, act_dim, cfg.hidden_dim, cfg.num_layers, obs_normalizer=self.obs_normalizer).to(device)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.critic_target.obs_normalizer = self.obs_normalizer  # shared, not a frozen copy
        self.log_alpha = torch.tensor(float(cfg.init_alpha), device=device).log().requires_grad_(True)
        self.target_entropy = -cfg.target_entropy_scale * act_dim
        self.actor_opt = make_adam(self.policy.parameters(), cfg.actor_lr, device)
        self.critic_opt = make_adam(self.critic.parameters(), cfg.critic_lr, device)
        self.alpha_opt = make_adam([self.log_alpha], cfg.alpha_lr, device)
        self.metrics = DeviceMetrics(device)
        # multiplies the critic loss: 1, or NaN from cfg.fault_nan_at on (the guard's test fault)
        self.fault = torch.ones((), device=device)
        self._critic_step = maybe_compile(self.critic_step, cfg.compile, cfg.cuda_graphs)
        self._actor_step = maybe_compile(self.actor_step, cfg.compile, cfg.cuda_graphs)

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

    # ---- critic --------------------------------------------------------------------------------
    def critic_batch(self, buffer: ReplayBuffer) -> Batch:
        """The critic's minibatch: real transitions only (MBPO mixes in model data)."""
        return buffer.sample(self.cfg.batch_size)

    def critic_step(self, batch: Batch) -> Dict[str, torch.Tensor]:
        """One soft Bellman update of both Q networks, then Polyak-average the target."""
        with torch.no_grad():
            next_action, next_logp = self.policy(batch.next_obs)
            next_q = self.critic_target.min_q(batch.next_obs, next_action) - self.alpha * next_logp
            target = batch.reward + self.cfg.gamma * (1.0 - batch.terminated) * next_q
        q1, q2 = self.critic(batch.obs, batch.action)
        loss = ((q1 - target).square().mean() + (q2 - target).square().mean()) * self.fault
        ok, _ = guarded_step(self.critic_opt, list(self.critic.parameters()), loss)
        soft_update(self.critic_target, self.critic, self.cfg.tau)
        return {"critic_loss": loss.detach(), "q_mean": q1.detach().mean(), "critic_ok": ok.float()}

    # ---- policy and temperature ---------------------------------------------------------------
    def actor_obs(self, buffer: ReplayBuffer) -> torch.Tensor:
        """States the policy objective starts from: real ones here."""
        return buffer.sample(self.cfg.batch_size).obs

    def actor_objective(self, obs: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, Dict[str, torch.Tensor]]:
        """SAC's ``E[alpha log pi(a|s) - min Q(s, a)]``; returns ``(loss, mean log_prob (detached),
        extra metrics)``. The model-based files replace this with an unroll through the model."""
        action, logp = self.policy(obs)
        q = self.critic.min_q(obs, action)
        return (self.alpha * logp - q).mean(), logp.detach().mean(), {}

    def actor_step(self, obs: torch.Tensor) -> Dict[str, torch.Tensor]:
        """One policy update, then one temperature update on the same samples."""
        loss, mean_logp, extra = self.actor_objective(obs)
        ok, grad_norm = guarded_step(self.actor_opt, list(self.policy.parameters()), loss)
        alpha_loss = -self.log_alpha * (mean_logp + self.target_entropy)
        alpha_ok, _ = guarded_step(self.alpha_opt, [self.log_alpha], alpha_loss)
        out = {"actor_loss": loss.detach(), "policy_grad_norm": grad_norm, "entropy": -mean_logp,
               "alpha": self.alpha, "actor_ok": (ok & alpha_ok).float()}
        out.update({k: v.detach() for k, v in extra.items()})
        return out

    # ---- schedule ------------------------------------------------------------------------------
    def on_env_step(self, step: int, buffer: ReplayBuffer) -> Dict[str, float]:
        """Hook after every env step: the observation statistics take in the new real observation
        (model training in the model-based algorithms). Returns host metrics produced at this step
        (empty for SAC)."""
        if self.cfg.fault_nan_at >= 0 and step >= self.cfg.fault_nan_at:
            self.fault.fill_(float("nan"))
        if self.obs_normalizer is not None:
            self.obs_normalizer.update(buffer.latest(1).obs)
        return {}

    def update(self, step: int, buffer: ReplayBuffer) -> None:
        """The updates of one env step: ``critic_updates`` critic steps, ``policy_updates`` policy
        steps. Losses are accumulated on the device (no host synchronisation)."""
        for _ in range(self.cfg.critic_updates):
            self.metrics.add(self._critic_step(self.critic_batch(buffer)))
        for _ in range(self.cfg.policy_updates):
            self.metrics.add(self._actor_step(self.actor_obs(buffer)))

    def updates_per_step(self) -> int:
        return self.cfg.critic_updates + self.cfg.policy_updates

    # ---- checkpointing -------------------------------------------------------------------------
    def modules(self) -> Dict[str, torch.nn.Module]:
        return {"policy": self.policy, "critic": self.critic, "critic_target": self.critic_target}

    def optimizers(self) -> Dict[str, torch.optim.Optimizer]:
        return {"actor_opt": self.actor_opt, "critic_opt": self.critic_opt, "alpha_opt": self.alpha_opt}

    def is_finite(self) -> bool:
        """Host check that every network and the temperature are finite (before a checkpoint)."""
        return finite_module(*self.modules().values()) and bool(torch.isfinite(self.log_alpha).item())

    def state_dict(self) -> Dict[str, object]:
        state: Dict[str, object] = {k: m.state_dict() for k, m in self.modules().items()}
        state.update({k: o.state_dict() for k, o in self.optimizers().items()})
        state["log_alpha"] = self.log_alpha.detach().cpu()
        state["metrics"] = self.metrics.state_dict()
        state["fault"] = self.fault.cpu()
        return state

    def load_state_dict(self, state: Dict[str, object]) -> None:
        for k, m in self.modules().items():
            m.load_state_dict(state[k])
        for k, o in self.optimizers().items():
            o.load_state_dict(state[k])
        with torch.no_grad():
            self.log_alpha.copy_(state["log_alpha"])
            self.fault.copy_(state["fault"])
        self.metrics.load_state_dict(state["metrics"])
