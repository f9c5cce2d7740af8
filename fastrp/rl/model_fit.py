"""Fitting a dynamics ensemble to real transitions (MBPO's procedure, with DDPPO's extra term).

:class:`ModelFitter` owns what training a :class:`fastrp.nn.model.ProbabilisticEnsemble` needs
beyond the network: its Adam (per-layer weight decay on the weights), the holdout split, the
bootstrap resamples, early stopping, the per-member best snapshots and the elite choice. The
loss is :func:`fastrp.algos.losses.model_nll_loss`; an optional extra term (DDPPO's
directional-derivative loss, :class:`FDTerm`) is passed in by the algorithm that wants it.

:func:`guarded_fit` wraps one refit for the trainer: a fit that leaves non-finite weights or a
non-finite loss is undone.
"""

from __future__ import annotations

import copy
import math
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from fastrp.algos.losses import fd_gradient_loss, model_nll_loss
from fastrp.nn.model import ProbabilisticEnsemble
from fastrp._validate import float_in, int_at_least, optional_int
from fastrp.ops._common import check_tensor
from fastrp.ops.knn import fd_targets

__all__ = ["MBPO_WEIGHT_DECAY", "ModelFitter", "FDTerm", "guarded_fit"]

# MBPO's per-layer L2 coefficients for its 4x200 model (4 hidden layers + output layer).
MBPO_WEIGHT_DECAY = (2.5e-5, 5e-5, 7.5e-5, 7.5e-5, 1e-4)


def layer_decays(weight_decay: Union[None, float, Sequence[float]], num_linear: int) -> Tuple[float, ...]:
    """Per-linear-layer L2 coefficients: None = MBPO's values for a 5-layer net, else
    ``linspace(2.5e-5, 1e-4)`` over the layers; a float for every layer; or one per layer."""
    if weight_decay is None:
        if num_linear == len(MBPO_WEIGHT_DECAY):
            return MBPO_WEIGHT_DECAY
        return tuple(torch.linspace(2.5e-5, 1e-4, num_linear, dtype=torch.float64).tolist())
    if isinstance(weight_decay, (int, float)) and not isinstance(weight_decay, bool):
        return (float_in("weight_decay", weight_decay, 0.0, math.inf),) * num_linear
    decays = tuple(weight_decay)
    if len(decays) != num_linear:
        raise ValueError(f"weight_decay must be a float or {num_linear} floats (one per linear layer), "
                         f"got {len(decays)}")
    return tuple(float_in("weight_decay", d, 0.0, math.inf) for d in decays)


class FDTerm:
    """DDPPO's gradient-model term ``weight * sum_e R_e`` (paper 003, eq. 9-10).

    Once per fit (:meth:`prepare`) the pool is the last ``window`` rows of the fit's data (oldest
    first, DDPPO: 10 000) and the ``k`` nearest neighbours of every pool row are found with
    :func:`fastrp.ops.fd_targets` on the inputs divided by the model's fitted normaliser std
    (exact kNN, self excluded). Each training step (:meth:`__call__`) draws ``batch_size`` pool
    rows as queries, shared by all members, and returns
    :func:`fastrp.algos.losses.fd_gradient_loss` per member.
    """

    def __init__(self, weight: float, k: int, window: int, batch_size: int):
        self.weight = float_in("fd_weight", weight, 0.0, math.inf)
        self.k = int_at_least("fd_k", k, 1)
        self.window = int_at_least("fd_window", window, 2)
        self.batch_size = int_at_least("fd_batch_size", batch_size, 1)
        self._pool: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None

    @torch.no_grad()
    def prepare(self, model: ProbabilisticEnsemble, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        """Neighbours of the last ``window`` rows of ``inputs[N, in]`` / ``targets[N, out]``."""
        N = inputs.shape[0]
        window = min(self.window, N)
        if self.k > window - 1:
            raise ValueError(f"fd_k must be <= min(fd_window, N) - 1 = {window - 1}, got {self.k}")
        pool_x, pool_y = inputs[N - window:], targets[N - window:]
        scale = model.input_normalizer.std.to(pool_x.dtype)
        _, _, nbr = fd_targets(pool_x, pool_y, torch.arange(window, device=inputs.device), self.k, scale=scale)
        self._pool = (pool_x, pool_y, nbr)

    def __call__(self, model: ProbabilisticEnsemble, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """``R_e`` per member ``[E]`` on ``batch_size`` random pool queries."""
        if self._pool is None:
            raise RuntimeError("FDTerm.prepare() must run before the term is evaluated")
        pool_x, pool_y, nbr = self._pool
        q = torch.randint(pool_x.shape[0], (self.batch_size,), generator=generator, device=pool_x.device)
        directions = pool_x[nbr[q]] - pool_x[q].unsqueeze(1)
        deltas = pool_y[nbr[q]] - pool_y[q].unsqueeze(1)
        return fd_gradient_loss(model, pool_x[q], directions, deltas, per_member=True)

    def release(self) -> None:
        """Drop the pool (it holds a copy of the data between fits otherwise)."""
        self._pool = None


class ModelFitter:
    """Trains ``model`` on real transitions until early stopping (MBPO), see :meth:`fit`.

    Args:
        model: the ensemble to train.
        lr: Adam learning rate (1e-3).
        weight_decay: None (MBPO's per-layer values for a 5-layer net, else ``linspace(2.5e-5,
            1e-4)`` over the layers), a float for every layer, or one float per linear layer.
            Coupled L2 through Adam's ``weight_decay``, on the weights only.

    Attributes: ``optimizer`` (Adam over all of ``model``'s parameters) and ``weight_decay``.
    """

    def __init__(self, model: ProbabilisticEnsemble, lr: float = 1e-3,
                 weight_decay: Union[None, float, Sequence[float]] = None) -> None:
        float_in("lr", lr, 0.0, math.inf, lo_open=True)
        self.model = model
        self.weight_decay = layer_decays(weight_decay, model.net.num_layers + 1)
        groups: List[Dict[str, object]] = [{"params": [w], "weight_decay": wd}
                                           for w, wd in zip(model.net.weights, self.weight_decay)]
        groups.append({"params": list(model.net.biases) + [model.max_logvar, model.min_logvar], "weight_decay": 0.0})
        self.optimizer = torch.optim.Adam(groups, lr=float(lr))

    def state_dict(self) -> Dict[str, object]:
        return {"optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: Dict[str, object]) -> None:
        self.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))

    # ------------------------------------------------------------------------------------------
    def _member_tensors(self) -> List[torch.Tensor]:
        """Every tensor with a leading member dimension (weights, biases, SN vectors)."""
        return list(self.model.net.parameters()) + list(self.model.net.buffers())

    @torch.no_grad()
    def holdout_mse(self, x: torch.Tensor, y: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
        """Per-member MSE of the mean head on ``(x[N, in], y[N, out])`` in eval mode: ``[E]``."""
        model = self.model
        was_training = model.training
        model.eval()
        total = torch.zeros(model.ensemble_size, device=x.device, dtype=torch.float64)
        for start in range(0, x.shape[0], chunk):
            mean, _ = model(x[start:start + chunk])
            total += (mean - y[start:start + chunk]).square().sum(dim=(1, 2)).to(torch.float64)
        model.train(was_training)
        return (total / (x.shape[0] * model.out_dim)).to(model.holdout_mse.dtype)

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
        extra_term: Optional[FDTerm] = None,
        generator: Optional[torch.Generator] = None,
    ) -> Dict[str, object]:
        """Train on transitions ``(obs, act) -> (next_obs, reward)`` (rows in buffer order,
        oldest first) until early stopping.

        Procedure (MBPO, plus an extra term such as DDPPO's gradient loss):

        1. random holdout split of ``min(int(N * holdout_ratio), max_holdout)`` rows (none when
           that is 0: holdout scores are then taken on the training rows);
        2. the model's input normaliser (and, with ``normalize_targets``, its target statistics) is
           refit on the training rows (then ``extra_term.prepare`` sees the whole data);
        3. each member trains on its own bootstrap resample of the training rows (plain copies
           when ``bootstrap=False``), reshuffled every epoch, in minibatches of ``batch_size``
           rows per member; loss per step = :func:`fastrp.algos.losses.model_nll_loss`
           ``+ extra_term.weight * sum_e extra_term(model)_e``;
        4. after each epoch the per-member holdout MSE of the mean head (eval mode); a member
           improves when its MSE drops below 0.99x its best, and then its parameters (and SN
           vectors) are snapshotted; training stops after ``patience`` epochs without any member
           improving, or at ``max_epochs`` / ``max_steps``;
        5. every member is restored to its best snapshot, ``model.holdout_mse`` is set to the
           best scores and ``model.elite_idx`` to the ``num_elites`` lowest.

        The only host synchronisation is one per epoch (the early-stopping decision).
        ``generator`` (on the data's device) drives the split, bootstrap, shuffles and the extra
        term's queries.

        Returns:
            ``{"train_nll": float (last epoch, mean over members and batches), "holdout_mse":
            float (mean over elites), "holdout_mse_members": list of E floats, "epochs": int,
            "steps": int, "fd_loss": float (last epoch, mean over members and batches of the
            extra term; 0.0 without one), "num_train": int, "num_holdout": int}``.
        """
        model = self.model
        model._check_pair(obs, act)
        N = obs.shape[0]
        check_tensor("next_obs", next_obs, shape=(N, model.obs_dim), dtypes=(obs.dtype,), device=obs.device,
                     what="[N, obs_dim] (same N, dtype and device as obs)")
        if model.learn_reward:
            if reward is None:
                raise ValueError("reward must be given ([N] or [N, 1]) when learn_reward=True")
            if reward.dim() == 2:
                check_tensor("reward", reward, shape=(N, 1), dtypes=(obs.dtype,), device=obs.device, what="[N] or [N, 1]")
            else:
                check_tensor("reward", reward, shape=(N,), dtypes=(obs.dtype,), device=obs.device, what="[N] or [N, 1]")
        float_in("holdout_ratio", holdout_ratio, 0.0, 1.0)
        optional_int("max_epochs", max_epochs, 1)
        int_at_least("batch_size", batch_size, 1)
        int_at_least("patience", patience, 1)
        int_at_least("max_holdout", max_holdout, 0)
        optional_int("max_steps", max_steps, 1)
        dev = obs.device
        E = model.ensemble_size

        with torch.no_grad():
            inputs = torch.cat([obs, act], dim=-1).detach()
            targets = model.make_targets(obs, next_obs, reward).detach()
            num_hold = min(int(N * holdout_ratio), max_holdout)
            num_train = N - num_hold
            if num_train < 1:
                raise ValueError(f"holdout_ratio={holdout_ratio} leaves no training rows out of N={N}")
            perm = torch.randperm(N, generator=generator, device=dev)
            x_train, y_train = inputs[perm[num_hold:]], targets[perm[num_hold:]]
            x_hold, y_hold = (inputs[perm[:num_hold]], targets[perm[:num_hold]]) if num_hold else (x_train, y_train)
            model.input_normalizer.reset()
            model.input_normalizer.update(x_train)
            model.fit_target_statistics(y_train)
            if bootstrap:
                rows = torch.randint(num_train, (E, num_train), generator=generator, device=dev)
            else:
                rows = torch.arange(num_train, device=dev).expand(E, num_train)
        if extra_term is not None:
            extra_term.prepare(model, inputs, targets)

        was_training = model.training
        model.train()
        best = torch.full((E,), math.inf, device=dev, dtype=model.holdout_mse.dtype)
        snapshot = [t.detach().clone() for t in self._member_tensors()]
        epochs = steps = stale = 0
        nll_sum = extra_sum = torch.zeros((), device=dev)
        batches = 0
        try:
            while True:
                order = torch.argsort(torch.rand(E, num_train, generator=generator, device=dev), dim=1)
                epoch_rows = rows.gather(1, order)
                nll_sum = torch.zeros((), device=dev)
                extra_sum = torch.zeros((), device=dev)
                batches = 0
                for start in range(0, num_train, batch_size):
                    idx = epoch_rows[:, start:start + batch_size]
                    loss, nll = model_nll_loss(model, x_train[idx], y_train[idx])
                    if extra_term is not None:
                        extra = extra_term(model, generator)
                        loss = loss + extra_term.weight * extra.sum()
                        extra_sum = extra_sum + extra.detach().mean()
                    self.optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    self.optimizer.step()
                    nll_sum = nll_sum + nll.detach().mean()
                    batches += 1
                    steps += 1
                    if max_steps is not None and steps >= max_steps:
                        break
                epochs += 1
                mse = self.holdout_mse(x_hold, y_hold)
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
        finally:
            if extra_term is not None:
                extra_term.release()

        with torch.no_grad():
            for snap, cur in zip(snapshot, self._member_tensors()):
                cur.copy_(snap)
            model.holdout_mse.copy_(best)
            model.elite_idx.copy_(torch.argsort(best)[: model.num_elites])
        model.train(was_training)
        return {
            "train_nll": float(nll_sum / max(batches, 1)),
            "holdout_mse": float(best[model.elite_idx].mean()),
            "holdout_mse_members": best.tolist(),
            "epochs": epochs,
            "steps": steps,
            "fd_loss": float(extra_sum / max(batches, 1)),
            "num_train": num_train,
            "num_holdout": num_hold,
        }


def _finite(model: torch.nn.Module) -> bool:
    checks = [torch.isfinite(p).all() for p in model.parameters()]
    checks += [~torch.isnan(b).any() for b in model.buffers() if b.is_floating_point()]
    return bool(torch.stack(checks).all()) if checks else True


def guarded_fit(fitter: ModelFitter, data, cfg, extra_term: Optional[FDTerm] = None) -> Tuple[Dict[str, object], bool]:
    """Refit ``fitter.model`` on the transitions ``data`` (a :class:`fastrp.rl.buffer.Batch`,
    oldest first, as the FD window expects) with the run config's model settings. If the fit
    leaves non-finite weights or a non-finite loss, the model and its optimizer are put back as
    they were before the fit; returns ``(fit stats, ok)``."""
    model = fitter.model
    backup = (copy.deepcopy(model.state_dict()), copy.deepcopy(fitter.optimizer.state_dict()))
    stats = fitter.fit(data.obs, data.action, data.next_obs, data.reward, holdout_ratio=cfg.model_holdout,
                       max_epochs=cfg.model_max_epochs, max_steps=cfg.model_max_steps or None,
                       batch_size=cfg.model_batch_size, patience=cfg.model_patience, extra_term=extra_term)
    ok = _finite(model) and math.isfinite(stats["train_nll"]) and math.isfinite(stats["fd_loss"])
    if not ok:
        model.load_state_dict(backup[0])
        fitter.optimizer.load_state_dict(backup[1])
    return stats, ok
