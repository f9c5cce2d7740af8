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
from typing import Dict, Iterator, Optional, Tuple

import torch

from fastrp.algos.common import frozen_modules
from fastrp.algos.mbpo import MBPO
from fastrp.rl.buffer import ReplayBuffer
from fastrp.rl.unroll import imagined_objective


class MAAC(MBPO):
    """Model-based RP policy gradient through the prediction ensemble (see the module docstring)."""

    name = "maac"

    def __init__(self, cfg, obs_dim, act_dim, action_low, action_high, device, termination=None):
        super().__init__(cfg, obs_dim, act_dim, action_low, action_high, device, termination)
        self._policy_mode = False
        # SAC compiled ``actor_step`` under --compile; the freezing stays outside the compiled
        # region (its requires_grad / mode switches would make dynamo recompile)
        self._compiled_actor_step = self._actor_step
        self._actor_step = self._frozen_actor_step

    def _frozen_actor_step(self, obs: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The trainer's policy step: the (possibly compiled) ``actor_step`` inside
        :meth:`policy_update_mode`."""
        with self.policy_update_mode():
            return self._compiled_actor_step(obs)

    def gradient_model(self) -> Optional[torch.nn.Module]:
        """The model the policy gradient flows through (None: the prediction model itself)."""
        return None

    def actor_obs(self, buffer: ReplayBuffer) -> torch.Tensor:
        return buffer.sample(self.cfg.batch_size).obs

    @contextlib.contextmanager
    def policy_update_mode(self) -> Iterator[None]:
        """The state of a policy update: only the policy is differentiated (critic and models
        frozen by :func:`~fastrp.algos.common.frozen_modules`: no graph through their weights, eval
        mode, as the models' spectral-norm vectors belong to model training) and each network's
        spectral-norm scales computed once for the whole unroll. Flags and modes are restored on
        exit; nested entries are no-ops."""
        if self._policy_mode:
            yield
            return
        models = [m for m in (self.model, self.gradient_model()) if m is not None]
        try:
            with frozen_modules([self.critic] + models), contextlib.ExitStack() as stack:
                self._policy_mode = True
                for module in [self.policy] + models:
                    net = getattr(module, "net", None)
                    if hasattr(net, "cached_scales"):
                        stack.enter_context(net.cached_scales())
                yield
        finally:
            self._policy_mode = False

    def actor_objective(self, obs: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, Dict[str, torch.Tensor]]:
        with self.policy_update_mode():
            loss, info = imagined_objective(self.policy, self.model, self.critic, obs, self.cfg.horizon,
                                            self.cfg.gamma, self.alpha, self.termination,
                                            grad_model=self.gradient_model())
        extra = {"model_return": info["return"], "imagined_alive": info["alive"]}
        return loss, -info["entropy"], extra
