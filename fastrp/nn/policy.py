"""Tanh-Gaussian policy (SAC / SVG(H) / RP-PGM actor) on fastrp's fused ensemble MLP.

The network is a one-member :class:`fastrp.nn.ensemble.EnsembleMLP` (fused layers, and spectral
normalisation of the hidden layers when asked: RP-PGM's placement, which bounds the policy's
Lipschitz constant and with it the variance of the reparameterized gradient).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from fastrp.nn.ensemble import EnsembleMLP
from fastrp.ops._common import check_tensor

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def _sn_mode(spectral_norm: Union[bool, str]) -> str:
    if spectral_norm is True:
        return "hidden"
    if spectral_norm is False or spectral_norm is None:
        return "none"
    if spectral_norm in ("none", "hidden", "all"):
        return spectral_norm
    raise ValueError(f"spectral_norm must be a bool or one of 'none', 'hidden', 'all', got {spectral_norm!r}")


class TanhGaussianPolicy(nn.Module):
    """``a = bias + scale * tanh(u)``, ``u ~ N(mean(s), std(s))``, reparameterized.

    Args:
        obs_dim, act_dim: observation and action widths.
        hidden_dim, num_layers: ``num_layers`` hidden layers of ``hidden_dim`` units.
        spectral_norm: spectral normalisation: ``True`` or ``"hidden"`` on the hidden layers (not
            on the output layer: RP-PGM's code), ``"all"`` on every layer (paper 000's text),
            ``False`` / ``"none"`` off; the power-iteration vectors are updated in training mode
            only.
        log_std_bounds: ``(lo, hi)``; the raw log-std output is squashed smoothly into this range
            with ``lo + (hi - lo) * (tanh(x) + 1) / 2``.
        activation: ``"relu"`` (default), ``"silu"`` or ``"tanh"``.
        action_scale, action_bias: affine map from ``(-1, 1)`` to the action box (a float, or a
            sequence of ``act_dim`` values: ``(high - low) / 2`` and ``(high + low) / 2``).
        n_power_iterations: power iterations per training-mode forward when ``spectral_norm``.
        backend: forwarded to the fastrp ops (``None`` picks the fastest for the device).
        precision: matmul input precision of the fused ops, ``"ieee"`` (default), ``"tf32"`` or
            ``"tf32x3"`` (see :class:`fastrp.nn.EnsembleMLP`; no effect on CPU).
        obs_normalizer: optional :class:`fastrp.nn.RunningNormalizer` over observations; the
            network then sees ``(obs - mean) / std`` (RP-PGM's observation normalisation). The
            module is shared, not copied: its owner updates the statistics.
    """

    def __init__(
        self,
        obs_dim: int,
        act_dim: int,
        hidden_dim: int = 256,
        num_layers: int = 2,
        spectral_norm: Union[bool, str] = False,
        log_std_bounds: Tuple[float, float] = (-5.0, 2.0),
        activation: str = "relu",
        action_scale: Union[float, Sequence[float]] = 1.0,
        action_bias: Union[float, Sequence[float]] = 0.0,
        n_power_iterations: int = 1,
        backend: Optional[str] = None,
        obs_normalizer: Optional[nn.Module] = None,
        precision: str = "ieee",
    ):
        super().__init__()
        lo, hi = (float(b) for b in log_std_bounds)
        if not lo < hi:
            raise ValueError(f"log_std_bounds must be (lo, hi) with lo < hi, got {log_std_bounds}")
        self.obs_dim, self.act_dim = int(obs_dim), int(act_dim)
        self.log_std_bounds = (lo, hi)
        self.net = EnsembleMLP(
            obs_dim,
            2 * act_dim,
            hidden_dim,
            num_layers,
            1,
            activation=activation,
            spectral_norm=_sn_mode(spectral_norm),
            n_power_iterations=n_power_iterations,
            backend=backend,
            precision=precision,
        )
        scale = torch.as_tensor(action_scale, dtype=torch.float32).expand(act_dim).clone()
        bias = torch.as_tensor(action_bias, dtype=torch.float32).expand(act_dim).clone()
        if not bool((scale > 0).all()):
            raise ValueError(f"action_scale must be positive, got {action_scale}")
        self.register_buffer("action_scale", scale)
        self.register_buffer("action_bias", bias)
        self.obs_normalizer = obs_normalizer

    def distribution(self, obs: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(mean[B, act], log_std[B, act])`` of the pre-tanh Gaussian for ``obs[B, obs_dim]``."""
        check_tensor("obs", obs, shape=(None, self.obs_dim), what="[B, obs_dim]")
        if self.obs_normalizer is not None:
            obs = self.obs_normalizer.normalize(obs)
        out = self.net(obs)[0]
        mean, raw = out.split(self.act_dim, dim=-1)
        lo, hi = self.log_std_bounds
        log_std = lo + 0.5 * (hi - lo) * (torch.tanh(raw) + 1.0)
        return mean, log_std

    def forward(
        self, obs: torch.Tensor, deterministic: bool = False, noise: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Sample an action and its log-density.

        Args:
            obs: ``[B, obs_dim]``.
            deterministic: use the mean (``u = mean``) instead of sampling.
            noise: standard-normal ``[B, act_dim]`` to use for ``u = mean + std * noise``; drawn
                with ``torch.randn`` when None (ignored when ``deterministic``).

        Returns:
            ``action[B, act_dim]`` (differentiable in the parameters and in ``obs``) and
            ``log_prob[B]``, the density of the action including the tanh change of variables
            ``-Σ log(scale (1 - tanh²u))``.
        """
        mean, log_std = self.distribution(obs)
        if deterministic:
            eps = torch.zeros_like(mean)
        elif noise is None:
            eps = torch.randn_like(mean)
        else:
            eps = check_tensor("noise", noise, shape=tuple(mean.shape), dtypes=(mean.dtype,), device=mean.device,
                               what="[B, act_dim] standard normal")
        u = mean + log_std.exp() * eps
        # log(1 - tanh(u)^2) = 2 (log 2 - u - softplus(-2u)), stable for large |u|
        log_det = 2.0 * (math.log(2.0) - u - F.softplus(-2.0 * u)) + self.action_scale.log()
        log_prob = (-0.5 * eps.square() - log_std - _HALF_LOG_2PI - log_det).sum(-1)
        action = self.action_bias + self.action_scale * torch.tanh(u)
        return action, log_prob
