"""DDPPO (paper 003): a prediction model for values, a gradient model for gradients; ``ddppo-sn``
adds spectral normalization to both models and the policy.

Everything of :mod:`fastrp.algos.maac`, plus a second ensemble, the **gradient model**, refit
with the prediction model every ``model_train_every`` steps on the NLL plus ``fd_weight`` x the
directional-derivative loss (eq. 9-10): its Jacobian-vector products along ``x_i - x`` (forward
mode, :func:`fastrp.ops.ensemble_mlp_jvp`) match the finite differences ``y_i - y`` to the
``fd_k`` nearest neighbours (exact kNN on normalised inputs, :func:`fastrp.ops.fd_targets`) among
the last ``fd_window`` transitions. In the policy unroll the next state's value comes from the
prediction model and its gradient from the gradient model: ``s' = p.detach() + g - g.detach()``.
"""

from __future__ import annotations

from typing import Dict

from fastrp.algos.maac import MAAC
from fastrp.algos.mbpo import guarded_fit, make_model
from fastrp.rl.buffer import ReplayBuffer


class DDPPO(MAAC):
    """Two-model RP policy gradient (see the module docstring)."""

    name = "ddppo"

    def __init__(self, cfg, obs_dim, act_dim, action_low, action_high, device, termination=None):
        super().__init__(cfg, obs_dim, act_dim, action_low, action_high, device, termination)
        self.grad_model = make_model(cfg, obs_dim, act_dim, device)

    def gradient_model(self):
        return self.grad_model

    def fit_models(self, buffer: ReplayBuffer) -> Dict[str, float]:
        out = super().fit_models(buffer)
        cfg = self.cfg
        fd_k = min(cfg.fd_k, min(cfg.fd_window, len(buffer)) - 1)  # fewer neighbours while the buffer is tiny
        stats, ok = guarded_fit(self.grad_model, buffer, cfg, fd_weight=cfg.fd_weight, fd_k=fd_k,
                                fd_window=cfg.fd_window, fd_batch_size=cfg.fd_batch_size)
        out["grad_model_fd_loss"] = stats["fd_loss"]
        out["model_fits_skipped"] += float(not ok)
        return out

    def modules(self):
        return {**super().modules(), "grad_model": self.grad_model}
