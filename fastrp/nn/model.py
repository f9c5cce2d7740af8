"""Probabilistic ensemble dynamics model (MBPO / DDPPO): the network, its prediction and its NLL.

:class:`ProbabilisticEnsemble` predicts a diagonal Gaussian over the target
``y = [next_obs - obs, reward]`` (``reward`` only with ``learn_reward=True``) from
``x = [obs, act]``:

* input normalisation: a :class:`RunningNormalizer` on ``x``, refit on the training split at the
  start of every fit (std floored at ``input_eps``). The network sees
  ``x_n = (x - mean) / std``; its mean head is in the raw target units (no output scaling, as in
  MBPO), so ``next_obs = obs + mean[:obs_dim]``.
* network: one fused :class:`fastrp.nn.EnsembleMLP` ``in -> hidden x num_layers -> 2 * out``
  (mean and raw log-variance), spectral normalisation passed through (``"hidden"`` is RP-PGM's
  placement for the model).
* soft-bounded log-variance with learnable bounds (MBPO):
  ``lv = max_lv - softplus(max_lv - raw)``, then ``lv = min_lv + softplus(lv - min_lv)``; the
  bounds start at ``0.5`` / ``-10`` per output (the training loss pulls them together with
  ``logvar_bound_coef``).
* :func:`gaussian_nll`: the per-member Gaussian negative log-likelihood.

Training lives in the RL layer: :class:`fastrp.rl.model_fit.ModelFitter` (optimizer, holdout
split, early stopping, elites) with the loss :func:`fastrp.algos.losses.model_nll_loss`; the same
class serves as DDPPO's **gradient model**, fit with the extra directional-derivative term
:class:`fastrp.rl.model_fit.FDTerm`.

Modes: in training mode every forward of a spectrally normalised model runs a power iteration
and updates the SN buffers; put the model in ``eval()`` for rollouts and imagined unrolls.

Checkpointing: ``state_dict()`` holds the network, the log-variance bounds, the normaliser, the
elite indices and the per-member holdout MSE (the fitter's optimizer is saved by its owner).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from fastrp.nn.ensemble import EnsembleMLP
from fastrp.nn.normalizer import RunningNormalizer
from fastrp._validate import float_in, int_at_least
from fastrp.ops._common import check_tensor

__all__ = ["ProbabilisticEnsemble", "gaussian_nll", "soft_bound_logvar"]

_LOG_2PI = math.log(2.0 * math.pi)
_FLOATS = (torch.float32, torch.float64)


def gaussian_nll(mean: torch.Tensor, logvar: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-member Gaussian negative log-likelihood.

    Args:
        mean, logvar: ``[E, B, o]`` predicted mean and log-variance (diagonal Gaussian).
        target: ``[E, B, o]`` or ``[B, o]`` (shared by all members).

    Returns:
        ``[E]``: ``0.5 * ((target - mean)^2 / var + logvar + log(2 pi))`` averaged over ``B`` and
        ``o``, i.e. ``-Normal(mean, exp(logvar / 2)).log_prob(target).mean()`` per member.
    """
    sq = (target - mean).square()
    nll = 0.5 * (sq * torch.exp(-logvar) + logvar + _LOG_2PI)
    return nll.flatten(1).mean(dim=1)


def soft_bound_logvar(raw: torch.Tensor, min_logvar: torch.Tensor, max_logvar: torch.Tensor) -> torch.Tensor:
    """MBPO's smooth clamp of ``raw`` into ``(min_logvar, max_logvar)`` (broadcast over the last
    dimension): ``lv = max - softplus(max - raw)``, then ``min + softplus(lv - min)``. Gradients
    flow to ``raw`` and to both bounds."""
    lv = max_logvar - F.softplus(max_logvar - raw)
    return min_logvar + F.softplus(lv - min_logvar)


class ProbabilisticEnsemble(nn.Module):
    """Gaussian ensemble dynamics model over ``[next_obs - obs, reward]`` (see module docstring).

    Args:
        obs_dim, act_dim: observation and action widths.
        hidden_dim, num_layers: ``num_layers`` hidden layers of ``hidden_dim`` units (DDPPO /
            MBPO: 4 x 200).
        ensemble_size: members ``E`` (7).
        num_elites: members used by :meth:`sample_elites` / ``predict`` (5), ``<= E``.
        activation: ``"silu"`` (Swish, default), ``"relu"`` or ``"tanh"``.
        spectral_norm: ``"none" | "hidden" | "all"`` passed to :class:`EnsembleMLP`.
        learn_reward: predict the reward as the last target column.
        logvar_bound_coef: coefficient of ``sum(max_logvar) - sum(min_logvar)`` (0.01).
        input_eps: floor of the input normaliser's std.
        normalize_targets: the network predicts standardised targets ``(y - mu_y) / sigma_y`` (per
            output, statistics of the training rows, set by the fitter at every fit like the input
            normaliser); :meth:`forward` maps mean and log-variance back to raw target units, so
            the NLL, ``predict`` and the gradient loss keep their meaning (the Gaussian NLL differs
            only by the constant ``sum log sigma_y``). The log-variance bounds then act in
            standardised units. Without it the mean head is in raw units (MBPO), which a network
            reaches only slowly when targets have large scales - a spectrally normalised one
            (hidden layers Lipschitz <= 1) hardly at all within a capped refit.
        backend: forwarded to the fastrp ops.
        precision: matmul input precision of the fused ops, ``"ieee"`` (default), ``"tf32"`` or
            ``"tf32x3"`` (see :class:`fastrp.nn.EnsembleMLP`; no effect on CPU): the forward and
            backward kernels of the network and the forward of its JVP (the gradient model's
            directional derivatives; the JVP's backward is torch matmuls in full precision).

    Attributes: ``net`` (the ``EnsembleMLP``), ``max_logvar`` / ``min_logvar`` (parameters
    ``[out]``), ``input_normalizer``, buffers ``elite_idx`` (int64 ``[num_elites]``) and
    ``holdout_mse`` (``[E]``, inf before the first fit; both set by the fitter).
    """

    def __init__(
        self,
        obs_dim: int,
        act_dim: int,
        hidden_dim: int = 200,
        num_layers: int = 4,
        ensemble_size: int = 7,
        num_elites: int = 5,
        activation: str = "silu",
        spectral_norm: str = "none",
        learn_reward: bool = True,
        logvar_bound_coef: float = 0.01,
        input_eps: float = 1e-6,
        backend: Optional[str] = None,
        precision: str = "ieee",
        normalize_targets: bool = False,
    ) -> None:
        super().__init__()
        int_at_least("obs_dim", obs_dim, 1)
        int_at_least("act_dim", act_dim, 1)
        int_at_least("ensemble_size", ensemble_size, 1)
        int_at_least("num_elites", num_elites, 1)
        if num_elites > ensemble_size:
            raise ValueError(f"num_elites must be <= ensemble_size={ensemble_size}, got {num_elites}")
        float_in("logvar_bound_coef", logvar_bound_coef, 0.0, math.inf)
        self.obs_dim, self.act_dim = obs_dim, act_dim
        self.in_dim = obs_dim + act_dim
        self.learn_reward = bool(learn_reward)
        self.out_dim = obs_dim + (1 if self.learn_reward else 0)
        self.ensemble_size, self.num_elites = ensemble_size, num_elites
        self.logvar_bound_coef = float(logvar_bound_coef)
        self.net = EnsembleMLP(self.in_dim, 2 * self.out_dim, hidden_dim, num_layers, ensemble_size,
                               activation=activation, spectral_norm=spectral_norm, backend=backend,
                               precision=precision)
        self.max_logvar = nn.Parameter(torch.full((self.out_dim,), 0.5))
        self.min_logvar = nn.Parameter(torch.full((self.out_dim,), -10.0))
        self.input_normalizer = RunningNormalizer(self.in_dim, eps=input_eps)
        self.normalize_targets = bool(normalize_targets)
        if self.normalize_targets:  # only then: checkpoints of raw-unit models keep their keys
            self.register_buffer("target_mean", torch.zeros(self.out_dim))
            self.register_buffer("target_std", torch.ones(self.out_dim))
        self.register_buffer("elite_idx", torch.arange(num_elites, dtype=torch.int64))
        self.register_buffer("holdout_mse", torch.full((ensemble_size,), math.inf))

    # ------------------------------------------------------------------------------------------
    def _check_pair(self, obs: torch.Tensor, act: torch.Tensor) -> None:
        check_tensor("obs", obs, shape=(None, self.obs_dim), dtypes=_FLOATS, device=self.elite_idx.device,
                     what=f"[B, obs_dim={self.obs_dim}] on the model's device")
        check_tensor("act", act, shape=(obs.shape[0], self.act_dim), dtypes=(obs.dtype,), device=obs.device,
                     what=f"[B, act_dim={self.act_dim}] (same B, dtype and device as obs)")

    def make_targets(self, obs: torch.Tensor, next_obs: torch.Tensor,
                     reward: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Training targets ``[N, out]``: ``next_obs - obs`` and, with ``learn_reward``, the
        reward (``[N]`` or ``[N, 1]``) as the last column."""
        delta = next_obs - obs
        if not self.learn_reward:
            return delta
        return torch.cat([delta, reward.reshape(-1, 1).to(delta.dtype)], dim=-1)

    def _split(self, out: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        mean, raw = out.split(self.out_dim, dim=-1)
        logvar = soft_bound_logvar(raw, self.min_logvar.to(raw.dtype), self.max_logvar.to(raw.dtype))
        if self.normalize_targets:
            std = self.target_std.to(raw.dtype)
            mean = mean * std + self.target_mean.to(raw.dtype)
            logvar = logvar + 2.0 * std.log()
        return mean, logvar

    @torch.no_grad()
    def fit_target_statistics(self, targets: torch.Tensor) -> None:
        """Standardisation of the targets (``normalize_targets``): mean and std (population,
        floored at 1e-6; 1 for a single row) of ``targets[N, out]``, the fit's training rows."""
        if not self.normalize_targets:
            return
        self.target_mean.copy_(targets.mean(dim=0))
        if targets.shape[0] > 1:
            self.target_std.copy_(targets.std(dim=0, unbiased=False).clamp_min(1e-6))
        else:
            self.target_std.fill_(1.0)

    def forward(self, x: torch.Tensor, members: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Gaussian over the target for raw inputs ``x = [obs, act]``.

        Args:
            x: ``[E, B, in]`` (own batch per member), ``[B, in]`` (every member), or ``[B, in]``
                with ``members`` int64 ``[B]`` (sample ``b`` through member ``members[b]`` only).

        Returns:
            ``(mean, logvar)``, each ``[E, B, out]`` (``[B, out]`` with ``members``), in raw
            target units.
        """
        return self._split(self.net(self.input_normalizer.normalize(x), members=members))

    def sample_elites(self, batch_size: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """``batch_size`` elite member indices drawn uniformly (int64 ``[B]`` on the model's
        device); ``generator`` must live on that device when given."""
        pick = torch.randint(self.num_elites, (batch_size,), generator=generator, device=self.elite_idx.device)
        return self.elite_idx[pick]

    def predict(
        self,
        obs: torch.Tensor,
        act: torch.Tensor,
        members: Union[None, str, torch.Tensor] = None,
        deterministic: bool = True,
        generator: Optional[torch.Generator] = None,
        noise: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """One model step, differentiable in ``obs``, ``act`` and the parameters.

        Args:
            obs: ``[B, obs_dim]``; act: ``[B, act_dim]``.
            members: None (moment-matched mixture of the elites: mean of their means, variance =
                mean of their variances + variance of their means; runs every member),
                ``"random"`` (one random elite per sample, :meth:`sample_elites`), or int64
                ``[B]`` member indices. With one member per sample only that member runs (the
                grouped :class:`EnsembleMLP` path).
            deterministic: return the mean; else ``mean + std * noise``.
            generator: for ``"random"`` members and for the noise when ``noise`` is None.
            noise: standard-normal ``[B, out_dim]`` to use when not deterministic (e.g. the
                same draw for a prediction and a gradient model).

        Returns:
            ``(next_obs[B, obs_dim], reward[B])``; ``reward`` is None without ``learn_reward``.
        """
        self._check_pair(obs, act)
        B = obs.shape[0]
        x = torch.cat([obs, act], dim=-1)
        if members is None:
            mean_e, logvar_e = self(x)
            mean_e, logvar_e = mean_e[self.elite_idx], logvar_e[self.elite_idx]
            mean = mean_e.mean(dim=0)
            var = logvar_e.exp().mean(dim=0) + mean_e.var(dim=0, unbiased=False)
        else:
            if isinstance(members, str):
                if members != "random":
                    raise ValueError(f"members must be None, 'random' or an int64 [B] tensor, got {members!r}")
                members = self.sample_elites(B, generator)
            check_tensor("members", members, shape=(B,), dtypes=(torch.int64,), device=obs.device,
                         what="[B] int64 member indices")
            mean, logvar = self(x, members=members)
            var = logvar.exp()
        if deterministic:
            pred = mean
        else:
            if noise is None:
                noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            else:
                check_tensor("noise", noise, shape=tuple(mean.shape), dtypes=(mean.dtype,), device=mean.device,
                             what="[B, out_dim] standard normal")
            pred = mean + var.sqrt() * noise
        next_obs = obs + pred[:, : self.obs_dim]
        reward = pred[:, self.obs_dim] if self.learn_reward else None
        return next_obs, reward

    def extra_repr(self) -> str:
        return (f"obs_dim={self.obs_dim}, act_dim={self.act_dim}, learn_reward={self.learn_reward}, "
                f"num_elites={self.num_elites}")

