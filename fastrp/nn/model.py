"""Probabilistic ensemble dynamics model (MBPO / DDPPO) and DDPPO's gradient-model loss.

:class:`ProbabilisticEnsemble` predicts a diagonal Gaussian over the target
``y = [next_obs - obs, reward]`` (``reward`` only with ``learn_reward=True``) from
``x = [obs, act]``:

* input normalisation: a :class:`RunningNormalizer` on ``x``, refit on the training split at the
  start of every :meth:`ProbabilisticEnsemble.fit` (std floored at ``input_eps``). The network
  sees ``x_n = (x - mean) / std``; its mean head is in the raw target units (no output scaling,
  as in MBPO), so ``next_obs = obs + mean[:obs_dim]``.
* network: one fused :class:`fastrp.nn.EnsembleMLP` ``in -> hidden x num_layers -> 2 * out``
  (mean and raw log-variance), spectral normalisation passed through (``"hidden"`` is RP-PGM's
  placement for the model).
* soft-bounded log-variance with learnable bounds (MBPO):
  ``lv = max_lv - softplus(max_lv - raw)``, then ``lv = min_lv + softplus(lv - min_lv)``; the
  bounds start at ``0.5`` / ``-10`` per output and are pulled together by
  ``logvar_bound_coef * (sum(max_lv) - sum(min_lv))``.
* loss: Gaussian NLL per member (:func:`gaussian_nll`), summed over members, plus that bound
  regulariser; weight decay per layer through Adam's (coupled, L2) ``weight_decay``, on weights
  only, MBPO's ``(2.5e-5, 5e-5, 7.5e-5, 7.5e-5, 1e-4)`` for its 5-layer net.
* training (:meth:`ProbabilisticEnsemble.fit`): random holdout split, bootstrap resample per
  member, shuffled minibatches, holdout MSE per member after every epoch, early stopping, best
  snapshot per member restored at the end, elites = the ``num_elites`` best members.

The same class serves as DDPPO's **gradient model**: ``fit(..., fd_weight=w, fd_k=n,
fd_window=W)`` adds ``w * R`` (paper 003, eq. 9-10) computed by :func:`fd_gradient_loss` on
finite-difference targets to the ``n`` nearest neighbours (:func:`fastrp.ops.fd_targets`) among
the last ``W`` rows of the data.

Modes: in training mode every forward of a spectrally normalised model runs a power iteration
and updates the SN buffers; put the model in ``eval()`` for rollouts and imagined unrolls
(``fit`` switches to training mode itself and restores the previous mode).

Checkpointing: ``state_dict()`` holds the network, the log-variance bounds, the normaliser, the
elite indices, the per-member holdout MSE and (as the module's extra state) the Adam state, so
``load_state_dict`` restores everything a resumed run needs.
"""

from __future__ import annotations

import copy
import math
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from fastrp.nn.ensemble import EnsembleMLP
from fastrp.nn.normalizer import RunningNormalizer
from fastrp.ops._common import check_tensor
from fastrp.ops.knn import fd_targets

__all__ = ["ProbabilisticEnsemble", "gaussian_nll", "soft_bound_logvar", "fd_gradient_loss"]

_LOG_2PI = math.log(2.0 * math.pi)
# MBPO's per-layer L2 coefficients for its 4x200 model (4 hidden layers + output layer).
MBPO_WEIGHT_DECAY = (2.5e-5, 5e-5, 7.5e-5, 7.5e-5, 1e-4)
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


def _int_at_least(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _optional_int(name: str, value, minimum: int) -> Optional[int]:
    return None if value is None else _int_at_least(name, value, minimum)


def _float_in(name: str, value, lo: float, hi: float, lo_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
        (lo < value if lo_open else lo <= value) and value <= hi
    ):
        bracket = "(" if lo_open else "["
        raise ValueError(f"{name} must be a float in {bracket}{lo}, {hi}], got {value!r}")
    return float(value)


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
        lr: Adam learning rate (1e-3).
        weight_decay: None (MBPO's per-layer values for a 5-layer net, else ``linspace(2.5e-5,
            1e-4)`` over the layers), a float for every layer, or one float per linear layer
            (``num_layers + 1``). Applied to the weights only.
        logvar_bound_coef: coefficient of ``sum(max_logvar) - sum(min_logvar)`` (0.01).
        input_eps: floor of the input normaliser's std.
        backend: forwarded to the fastrp ops.

    Attributes: ``net`` (the ``EnsembleMLP``), ``max_logvar`` / ``min_logvar`` (parameters
    ``[out]``), ``input_normalizer``, buffers ``elite_idx`` (int64 ``[num_elites]``) and
    ``holdout_mse`` (``[E]``, inf before the first fit), ``optimizer`` (Adam over all parameters).
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
        lr: float = 1e-3,
        weight_decay: Union[None, float, Sequence[float]] = None,
        logvar_bound_coef: float = 0.01,
        input_eps: float = 1e-6,
        backend: Optional[str] = None,
    ) -> None:
        super().__init__()
        _int_at_least("obs_dim", obs_dim, 1)
        _int_at_least("act_dim", act_dim, 1)
        _int_at_least("ensemble_size", ensemble_size, 1)
        _int_at_least("num_elites", num_elites, 1)
        if num_elites > ensemble_size:
            raise ValueError(f"num_elites must be <= ensemble_size={ensemble_size}, got {num_elites}")
        _float_in("lr", lr, 0.0, math.inf, lo_open=True)
        _float_in("logvar_bound_coef", logvar_bound_coef, 0.0, math.inf)
        self.obs_dim, self.act_dim = obs_dim, act_dim
        self.in_dim = obs_dim + act_dim
        self.learn_reward = bool(learn_reward)
        self.out_dim = obs_dim + (1 if self.learn_reward else 0)
        self.ensemble_size, self.num_elites = ensemble_size, num_elites
        self.logvar_bound_coef = float(logvar_bound_coef)
        self.net = EnsembleMLP(self.in_dim, 2 * self.out_dim, hidden_dim, num_layers, ensemble_size,
                               activation=activation, spectral_norm=spectral_norm, backend=backend)
        self.max_logvar = nn.Parameter(torch.full((self.out_dim,), 0.5))
        self.min_logvar = nn.Parameter(torch.full((self.out_dim,), -10.0))
        self.input_normalizer = RunningNormalizer(self.in_dim, eps=input_eps)
        self.register_buffer("elite_idx", torch.arange(num_elites, dtype=torch.int64))
        self.register_buffer("holdout_mse", torch.full((ensemble_size,), math.inf))
        self.weight_decay = self._layer_decays(weight_decay, num_layers + 1)
        groups = [{"params": [w], "weight_decay": wd} for w, wd in zip(self.net.weights, self.weight_decay)]
        groups.append({"params": list(self.net.biases) + [self.max_logvar, self.min_logvar], "weight_decay": 0.0})
        self.optimizer = torch.optim.Adam(groups, lr=float(lr))

    @staticmethod
    def _layer_decays(weight_decay, num_linear: int) -> Tuple[float, ...]:
        if weight_decay is None:
            if num_linear == len(MBPO_WEIGHT_DECAY):
                return MBPO_WEIGHT_DECAY
            return tuple(torch.linspace(2.5e-5, 1e-4, num_linear, dtype=torch.float64).tolist())
        if isinstance(weight_decay, (int, float)) and not isinstance(weight_decay, bool):
            return (_float_in("weight_decay", weight_decay, 0.0, math.inf),) * num_linear
        decays = tuple(weight_decay)
        if len(decays) != num_linear:
            raise ValueError(f"weight_decay must be a float or {num_linear} floats (one per linear layer), "
                             f"got {len(decays)}")
        return tuple(_float_in("weight_decay", d, 0.0, math.inf) for d in decays)

    # ------------------------------------------------------------------------------------------
    # checkpointing: the optimizer travels as the module's extra state
    def get_extra_state(self):
        return {"optimizer": self.optimizer.state_dict()}

    def set_extra_state(self, state) -> None:
        self.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))

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
        return mean, soft_bound_logvar(raw, self.min_logvar.to(raw.dtype), self.max_logvar.to(raw.dtype))

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

    # ------------------------------------------------------------------------------------------
    def _member_tensors(self):
        """Every tensor with a leading member dimension (weights, biases, SN vectors)."""
        return list(self.net.parameters()) + list(self.net.buffers())

    @torch.no_grad()
    def _eval_mse(self, x: torch.Tensor, y: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
        """Per-member MSE of the mean head on ``(x[N, in], y[N, out])`` in eval mode: ``[E]``."""
        was_training = self.training
        self.eval()
        total = torch.zeros(self.ensemble_size, device=x.device, dtype=torch.float64)
        for start in range(0, x.shape[0], chunk):
            mean, _ = self(x[start:start + chunk])
            total += (mean - y[start:start + chunk]).square().sum(dim=(1, 2)).to(torch.float64)
        self.train(was_training)
        return (total / (x.shape[0] * self.out_dim)).to(self.holdout_mse.dtype)

    def fit(
        self,
        obs: torch.Tensor,
        act: torch.Tensor,
        next_obs: torch.Tensor,
        reward: Optional[torch.Tensor] = None,
        holdout_ratio: float = 0.2,
        max_epochs: Optional[int] = None,
        batch_size: int = 256,
        patience: int = 5,
        max_holdout: int = 5000,
        max_steps: Optional[int] = None,
        bootstrap: bool = True,
        fd_weight: float = 0.0,
        fd_k: int = 5,
        fd_window: int = 10000,
        fd_batch_size: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
    ) -> Dict[str, object]:
        """Train on transitions ``(obs, act) -> (next_obs, reward)`` (rows in buffer order,
        oldest first) until early stopping.

        Procedure (MBPO, plus DDPPO's gradient loss when ``fd_weight > 0``):

        1. random holdout split of ``min(int(N * holdout_ratio), max_holdout)`` rows (none when
           that is 0: holdout scores are then taken on the training rows);
        2. the input normaliser is reset and fit on the training rows;
        3. each member trains on its own bootstrap resample of the training rows (plain copies
           when ``bootstrap=False``), reshuffled every epoch, in minibatches of ``batch_size``
           rows per member; loss per step = ``sum_e NLL_e + logvar_bound_coef * (sum max_lv -
           sum min_lv)`` ``+ fd_weight * sum_e R_e``;
        4. after each epoch the per-member holdout MSE of the mean head (eval mode); a member
           improves when its MSE drops below 0.99x its best, and then its parameters (and SN
           vectors) are snapshotted; training stops after ``patience`` epochs without any member
           improving, or at ``max_epochs`` / ``max_steps``;
        5. every member is restored to its best snapshot, ``holdout_mse`` is set to the best
           scores and ``elite_idx`` to the ``num_elites`` lowest.

        Gradient loss (``fd_weight > 0``, paper 003 eq. 9-10): the FD pool is the last
        ``fd_window`` rows (DDPPO: 10 000); the ``fd_k`` nearest neighbours of each pool row are
        found once per fit with :func:`fastrp.ops.fd_targets` on the inputs scaled by the fitted
        normaliser's std (exact kNN, self excluded). Each step draws ``fd_batch_size`` (default
        ``batch_size``) pool rows as queries, shared by all members, and adds
        :func:`fd_gradient_loss` per member.

        The only host synchronisation is one per epoch (the early-stopping decision).
        ``generator`` (on the data's device) drives the split, bootstrap, shuffles and FD
        queries.

        Returns:
            ``{"train_nll": float (last epoch, mean over members and batches), "holdout_mse":
            float (mean over elites), "holdout_mse_members": list of E floats, "epochs": int,
            "steps": int, "fd_loss": float (last epoch; 0.0 without the gradient loss),
            "num_train": int, "num_holdout": int}``.
        """
        self._check_pair(obs, act)
        N = obs.shape[0]
        check_tensor("next_obs", next_obs, shape=(N, self.obs_dim), dtypes=(obs.dtype,), device=obs.device,
                     what="[N, obs_dim] (same N, dtype and device as obs)")
        if self.learn_reward:
            if reward is None:
                raise ValueError("reward must be given ([N] or [N, 1]) when learn_reward=True")
            if reward.dim() == 2:
                check_tensor("reward", reward, shape=(N, 1), dtypes=(obs.dtype,), device=obs.device, what="[N] or [N, 1]")
            else:
                check_tensor("reward", reward, shape=(N,), dtypes=(obs.dtype,), device=obs.device, what="[N] or [N, 1]")
        _float_in("holdout_ratio", holdout_ratio, 0.0, 1.0)
        _optional_int("max_epochs", max_epochs, 1)
        _int_at_least("batch_size", batch_size, 1)
        _int_at_least("patience", patience, 1)
        _int_at_least("max_holdout", max_holdout, 0)
        _optional_int("max_steps", max_steps, 1)
        fd_weight = _float_in("fd_weight", fd_weight, 0.0, math.inf)
        fd_batch_size = _optional_int("fd_batch_size", fd_batch_size, 1) or batch_size
        dev = obs.device
        E = self.ensemble_size

        with torch.no_grad():
            inputs = torch.cat([obs, act], dim=-1).detach()
            targets = self.make_targets(obs, next_obs, reward).detach()
            num_hold = min(int(N * holdout_ratio), max_holdout)
            num_train = N - num_hold
            if num_train < 1:
                raise ValueError(f"holdout_ratio={holdout_ratio} leaves no training rows out of N={N}")
            perm = torch.randperm(N, generator=generator, device=dev)
            x_train, y_train = inputs[perm[num_hold:]], targets[perm[num_hold:]]
            x_hold, y_hold = (inputs[perm[:num_hold]], targets[perm[:num_hold]]) if num_hold else (x_train, y_train)
            self.input_normalizer.reset()
            self.input_normalizer.update(x_train)
            if bootstrap:
                rows = torch.randint(num_train, (E, num_train), generator=generator, device=dev)
            else:
                rows = torch.arange(num_train, device=dev).expand(E, num_train)

            fd_pool = None
            if fd_weight > 0:
                window = min(_int_at_least("fd_window", fd_window, 2), N)
                _int_at_least("fd_k", fd_k, 1)
                if fd_k > window - 1:
                    raise ValueError(f"fd_k must be <= min(fd_window, N) - 1 = {window - 1}, got {fd_k}")
                pool_x, pool_y = inputs[N - window:], targets[N - window:]
                scale = self.input_normalizer.std.to(pool_x.dtype)
                _, _, nbr = fd_targets(pool_x, pool_y, torch.arange(window, device=dev), fd_k, scale=scale)
                fd_pool = (pool_x, pool_y, nbr)

        was_training = self.training
        self.train()
        best = torch.full((E,), math.inf, device=dev, dtype=self.holdout_mse.dtype)
        snapshot = [t.detach().clone() for t in self._member_tensors()]
        epochs = steps = stale = 0
        nll_sum = fd_sum = torch.zeros((), device=dev)
        batches = 0
        while True:
            order = torch.argsort(torch.rand(E, num_train, generator=generator, device=dev), dim=1)
            epoch_rows = rows.gather(1, order)
            nll_sum = torch.zeros((), device=dev)
            fd_sum = torch.zeros((), device=dev)
            batches = 0
            for start in range(0, num_train, batch_size):
                idx = epoch_rows[:, start:start + batch_size]
                mean, logvar = self(x_train[idx])
                nll = gaussian_nll(mean, logvar, y_train[idx])
                loss = nll.sum() + self.logvar_bound_coef * (self.max_logvar.sum() - self.min_logvar.sum())
                if fd_pool is not None:
                    pool_x, pool_y, nbr = fd_pool
                    q = torch.randint(pool_x.shape[0], (fd_batch_size,), generator=generator, device=dev)
                    directions = pool_x[nbr[q]] - pool_x[q].unsqueeze(1)
                    deltas = pool_y[nbr[q]] - pool_y[q].unsqueeze(1)
                    fd = fd_gradient_loss(self, pool_x[q], directions, deltas, per_member=True)
                    loss = loss + fd_weight * fd.sum()
                    fd_sum = fd_sum + fd.detach().mean()
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                nll_sum = nll_sum + nll.detach().mean()
                batches += 1
                steps += 1
                if max_steps is not None and steps >= max_steps:
                    break
            epochs += 1
            mse = self._eval_mse(x_hold, y_hold)
            improved = mse < best * 0.99
            best = torch.where(improved, mse, best)
            with torch.no_grad():
                for snap, cur in zip(snapshot, self._member_tensors()):
                    snap.copy_(torch.where(improved.view(-1, *([1] * (cur.dim() - 1))), cur, snap))
            stale = 0 if bool(improved.any()) else stale + 1
            if stale >= patience or (max_epochs is not None and epochs >= max_epochs) or (
                max_steps is not None and steps >= max_steps
            ):
                break

        with torch.no_grad():
            for snap, cur in zip(snapshot, self._member_tensors()):
                cur.copy_(snap)
            self.holdout_mse.copy_(best)
            self.elite_idx.copy_(torch.argsort(best)[: self.num_elites])
        self.train(was_training)
        member_mse = best.tolist()
        return {
            "train_nll": float(nll_sum / max(batches, 1)),
            "holdout_mse": float(best[self.elite_idx].mean()),
            "holdout_mse_members": member_mse,
            "epochs": epochs,
            "steps": steps,
            "fd_loss": float(fd_sum / max(batches, 1)),
            "num_train": num_train,
            "num_holdout": num_hold,
        }

    def extra_repr(self) -> str:
        return (f"obs_dim={self.obs_dim}, act_dim={self.act_dim}, learn_reward={self.learn_reward}, "
                f"num_elites={self.num_elites}")


def fd_gradient_loss(
    model: ProbabilisticEnsemble,
    inputs: torch.Tensor,
    directions: torch.Tensor,
    deltas: torch.Tensor,
    per_member: bool = False,
) -> torch.Tensor:
    """DDPPO's directional-derivative loss ``R`` (paper 003, eq. 9) on the model's mean head.

    For each query ``x`` and neighbour ``x_i`` with direction ``v_i = x_i - x`` and
    finite-difference target ``d_i = y_i - y`` (from :func:`fastrp.ops.fd_targets`),
    ``R = mean_x (1/n) sum_i (1/d) || J(x) v_i - d_i ||^2`` with ``J`` the Jacobian of the
    predicted target mean with respect to the raw input ``x = [obs, act]``, ``n`` neighbours and
    ``d`` outputs (the paper's ``1/n`` and ``1/d``, expectation over the queries) - i.e. the mean
    of the squared residual over queries, neighbours and outputs, per member.

    Coordinates: the network sees ``x_n = (x - mean) / std``, so ``J(x) v = J_n(x_n) (v / std)``:
    the directions enter :meth:`EnsembleMLP.forward_jvp` divided by the normaliser std (no
    shift), all ``n`` of them as tangents of one fused pass. The mean head is in raw target units,
    so the deltas are used as they are.

    Args:
        model: a :class:`ProbabilisticEnsemble` (its fitted input normaliser is used).
        inputs: ``[Q, in]`` raw query rows ``[obs, act]``.
        directions: ``[Q, n, in]`` raw ``x_i - x``.
        deltas: ``[Q, n, out]`` target differences ``y_i - y`` (``y = [next_obs - obs, reward]``).
        per_member: return ``[E]`` instead of the mean over members.

    Returns:
        Scalar (mean over members) or ``[E]``; differentiable in the model parameters.
    """
    check_tensor("inputs", inputs, shape=(None, model.in_dim), dtypes=_FLOATS, device=model.elite_idx.device,
                 what=f"[Q, in={model.in_dim}] on the model's device")
    Q = inputs.shape[0]
    check_tensor("directions", directions, shape=(Q, None, model.in_dim), dtypes=(inputs.dtype,), device=inputs.device,
                 what=f"[Q, n, in={model.in_dim}] like inputs")
    check_tensor("deltas", deltas, shape=(Q, directions.shape[1], model.out_dim), dtypes=(inputs.dtype,),
                 device=inputs.device, what=f"[Q, n, out={model.out_dim}] like directions")
    norm = model.input_normalizer
    _, jy = model.net.forward_jvp(norm.normalize(inputs), norm.scale(directions))
    residual = jy[..., : model.out_dim] - deltas
    per = residual.square().flatten(1).mean(dim=1)
    return per if per_member else per.mean()
