"""Twin Q-function (clipped double Q of TD3 / SAC) as one two-member fused ensemble MLP.

Both critics run in a single :class:`fastrp.nn.ensemble.EnsembleMLP` call with ``E = 2``, so the
pair costs one fused launch instead of two networks' worth of small kernels.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from fastrp.nn.ensemble import EnsembleMLP
from fastrp.ops._common import check_tensor


class TwinQ(nn.Module):
    """Two independent Q-networks ``Q_j(s, a)``, each an MLP on ``[s, a]``.

    Args:
        obs_dim, act_dim: observation and action widths.
        hidden_dim, num_layers: ``num_layers`` hidden layers of ``hidden_dim`` units per network.
        activation: ``"relu"`` (default), ``"silu"`` or ``"tanh"``.
        backend: forwarded to the fastrp ops (``None`` picks the fastest for the device).
        precision: matmul input precision of the fused ops, ``"ieee"`` (default), ``"tf32"`` or
            ``"tf32x3"`` (see :class:`fastrp.nn.EnsembleMLP`; no effect on CPU).
        obs_normalizer: optional shared :class:`fastrp.nn.RunningNormalizer` over observations
            (the networks see ``(obs - mean) / std``; actions enter as they are).

    ``self.net`` is the ``E = 2`` ensemble: member 0 is ``Q1``, member 1 is ``Q2``.
    """

    def __init__(
        self,
        obs_dim: int,
        act_dim: int,
        hidden_dim: int = 256,
        num_layers: int = 2,
        activation: str = "relu",
        backend: Optional[str] = None,
        obs_normalizer: Optional[nn.Module] = None,
        precision: str = "ieee",
    ):
        super().__init__()
        self.obs_dim, self.act_dim = int(obs_dim), int(act_dim)
        self.net = EnsembleMLP(obs_dim + act_dim, 1, hidden_dim, num_layers, 2, activation=activation,
                               spectral_norm="none", backend=backend, precision=precision)
        self.obs_normalizer = obs_normalizer

    def forward(self, obs: torch.Tensor, action: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(q1[B], q2[B])`` for ``obs[B, obs_dim]`` and ``action[B, act_dim]``."""
        check_tensor("obs", obs, shape=(None, self.obs_dim), what="[B, obs_dim]")
        check_tensor("action", action, shape=(obs.shape[0], self.act_dim), dtypes=(obs.dtype,), device=obs.device,
                     what="[B, act_dim] (same B, dtype and device as obs)")
        if self.obs_normalizer is not None:
            obs = self.obs_normalizer.normalize(obs)
        x = torch.cat([obs, action], dim=-1)
        q = self.net(x)
        return q[0, :, 0], q[1, :, 0]

    def min_q(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """``min(Q1, Q2)[B]``, the clipped double-Q estimate."""
        q1, q2 = self(obs, action)
        return torch.minimum(q1, q2)
