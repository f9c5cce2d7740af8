"""MAAC / RP-DP / SVG(H) (paper 003 eq. 11; paper 000's RP-DP), and ``rp-sn`` with spectral norm.

MBPO's machinery (ensemble, model buffer, critic on 5% real / 95% model data) with a different
policy objective: from real states, unroll the policy ``horizon`` steps through the prediction
ensemble (one random elite per sample, the fused grouped path), sum the discounted model rewards
and entropy terms, add the discounted terminal min-Q, mask everything after a predicted
termination, and back-propagate through the model into the policy.

``rp-sn`` is this file with ``policy_spectral_norm`` and ``model_spectral_norm`` set by its preset
(RP-PGM's placement: policy hidden layers, model all but the output layer), which bounds the
Lipschitz constants that the RP gradient's variance grows with.
"""

from __future__ import annotations

import contextlib
from typing import Dict, Optional, Tuple

import torch

from fastrp.algos.mbpo import MBPO
from fastrp.rl.buffer import ReplayBuffer
from fastrp.rl.unroll import imagined_objective


class MAAC(MBPO):
    """Model-based RP policy gradient through the prediction ensemble (see the module docstring)."""

    name = "maac"

    def __init__(self, cfg, obs_dim, act_dim, action_low, action_high, device, termination=None):
        super().__init__(cfg, obs_dim, act_dim, action_low, action_high, device, termination)
        # --compile covers the critic closure only: the policy closure toggles requires_grad on
        # the critic and models and draws elite indices per call, which makes dynamo recompile
        self._actor_step = self.actor_step

    def gradient_model(self) -> Optional[torch.nn.Module]:
        """The model the policy gradient flows through (None: the prediction model itself)."""
        return None

    def actor_obs(self, buffer: ReplayBuffer) -> torch.Tensor:
        return buffer.sample(self.cfg.batch_size).obs

    def actor_objective(self, obs: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, Dict[str, torch.Tensor]]:
        models = [m for m in (self.model, self.gradient_model()) if m is not None]
        frozen = [self.critic] + models
        for m in frozen:  # only the policy is differentiated: no graph through the other weights
            m.requires_grad_(False)
        modes = [m.training for m in models]
        for m in models:  # the models' spectral-norm vectors belong to model training: eval mode
            m.eval()
        try:
            with contextlib.ExitStack() as stack:  # each network's SN scales computed once per update
                for module in [self.policy] + models:
                    net = getattr(module, "net", None)
                    if hasattr(net, "cached_scales"):
                        stack.enter_context(net.cached_scales())
                loss, info = imagined_objective(self.policy, self.model, self.critic, obs, self.cfg.horizon,
                                                self.cfg.gamma, self.alpha, self.termination,
                                                grad_model=self.gradient_model())
        finally:
            for m in frozen:
                m.requires_grad_(True)
            for m, mode in zip(models, modes):
                m.train(mode)
        extra = {"model_return": info["return"], "imagined_alive": info["alive"]}
        return loss, -info["entropy"], extra
