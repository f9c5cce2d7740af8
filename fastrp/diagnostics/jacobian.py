"""Model gradient error against MuJoCo's true Jacobians (paper 003's gradient error, on real tasks).

For held-out real transitions ``(s, a) -> s'`` and the true Jacobians ``ds'/ds``, ``ds'/da`` of the
simulator (:func:`fastrp.envs.dynamics_jacobians`), a model's errors are

* ``jac_state_err = mean_b ||J_s(b) - J_s_true(b)||_F / ||J_s_true(b)||_F`` over the state
  columns the observation shows (columns of derived observation entries are left out: the true
  Jacobian has zero columns there by construction),
* ``jac_action_err``: the same for the action block ``ds'/da``,
* ``pred_mse``: mean squared error of the predicted mean next observation against the real one,

where ``J`` is the Jacobian of the model's deterministic next-observation mean. Transitions whose
true block is exactly zero are skipped in that block's mean (a relative error is undefined there).

:func:`jacobian_errors` works on any ``predict_fn(obs, act) -> next_obs`` (testable without
MuJoCo); :func:`ensemble_jacobian_errors` averages it over a model's elite members (the policy
unroll sends each sample through one elite); :func:`collect_transitions` records held-out
transitions from fresh rollouts of a policy on a separate env.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, NamedTuple, Tuple

import numpy as np
import torch

__all__ = ["input_jacobians", "jacobian_errors", "ensemble_jacobian_errors", "HeldOut", "collect_transitions",
           "state_columns"]

PredictFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _as_tensor(name: str, x, shape, dtype=torch.float64) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")
    return t.to(dtype)


def input_jacobians(predict_fn: PredictFn, obs: torch.Tensor, act: torch.Tensor
                    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Jacobians of ``predict_fn`` w.r.t. its inputs, per row.

    ``predict_fn(obs[B, o], act[B, a]) -> next_obs[B, o']`` must treat rows independently (row
    ``b`` of the output depends only on row ``b`` of the inputs, as every model here does): the
    Jacobians of all rows are then obtained with one backward pass per output dimension.

    Returns:
        ``(next_obs[B, o'], d_obs[B, o', o], d_act[B, o', a])``, detached, in ``obs``'s dtype.
    """
    obs = obs.detach().clone().requires_grad_(True)
    act = act.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        out = predict_fn(obs, act)
        if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != obs.shape[0]:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"predict_fn must return next_obs [B={obs.shape[0]}, o], got {got}")
        d_obs = torch.zeros(obs.shape[0], out.shape[1], obs.shape[1], dtype=obs.dtype, device=obs.device)
        d_act = torch.zeros(obs.shape[0], out.shape[1], act.shape[1], dtype=obs.dtype, device=obs.device)
        if out.requires_grad:
            for i in range(out.shape[1]):
                g_obs, g_act = torch.autograd.grad(out[:, i].sum(), (obs, act), retain_graph=i + 1 < out.shape[1],
                                                   allow_unused=True)
                if g_obs is not None:
                    d_obs[:, i] = g_obs
                if g_act is not None:
                    d_act[:, i] = g_act
    return out.detach(), d_obs, d_act


def _relative_frobenius(diff: torch.Tensor, ref: torch.Tensor) -> float:
    """``mean_b ||diff_b||_F / ||ref_b||_F`` over rows with ``ref_b != 0`` (nan when there are none)."""
    num = torch.linalg.vector_norm(diff.flatten(1), dim=1)
    den = torch.linalg.vector_norm(ref.flatten(1), dim=1)
    keep = den > 0
    if not bool(keep.any()):
        return math.nan
    return float((num[keep] / den[keep]).mean())


def jacobian_errors(predict_fn: PredictFn, obs, act, d_obs_true, d_act_true, next_obs_true,
                    state_cols=None) -> Dict[str, float]:
    """Errors of one deterministic model against the true dynamics on ``B`` transitions.

    Args:
        predict_fn: ``fn(obs[B, o], act[B, a]) -> next_obs[B, o]``, differentiable, row-wise (see
            :func:`input_jacobians`); called with float32 tensors (the dtype and device of
            ``obs`` when it is a tensor).
        obs: ``[B, o]`` observations; act: ``[B, a]`` actions.
        d_obs_true: ``[B, o, o]`` true ``d next_obs / d obs``; d_act_true: ``[B, o, a]``.
        next_obs_true: ``[B, o]`` real next observations.
        state_cols: which obs columns are state coordinates (bool ``[o]`` mask or int indices;
            None: all). Only those columns of the state block are compared.

    Returns:
        ``{"jac_state_err", "jac_action_err", "pred_mse"}`` as floats (see the module docstring).
    """
    obs_t = obs if isinstance(obs, torch.Tensor) else torch.as_tensor(np.asarray(obs), dtype=torch.float32)
    if obs_t.dim() != 2:
        raise ValueError(f"obs: expected shape (B, obs_dim), got {tuple(obs_t.shape)}")
    if not obs_t.is_floating_point():
        obs_t = obs_t.float()
    B, o = obs_t.shape
    act_t = act if isinstance(act, torch.Tensor) else torch.as_tensor(np.asarray(act))
    if act_t.dim() != 2 or act_t.shape[0] != B:
        raise ValueError(f"act: expected shape ({B}, act_dim), got {tuple(act_t.shape)}")
    act_t = act_t.to(dtype=obs_t.dtype, device=obs_t.device)
    a = act_t.shape[1]
    true_obs = _as_tensor("d_obs_true", d_obs_true, (B, o, o))
    true_act = _as_tensor("d_act_true", d_act_true, (B, o, a))
    true_next = _as_tensor("next_obs_true", next_obs_true, (B, o))
    if state_cols is None:
        cols = torch.arange(o)
    else:
        cols_np = np.asarray(state_cols)
        if cols_np.dtype == bool:
            if cols_np.shape != (o,):
                raise ValueError(f"state_cols: a bool mask must have shape ({o},), got {cols_np.shape}")
            cols_np = np.flatnonzero(cols_np)
        if cols_np.ndim != 1 or cols_np.size == 0 or cols_np.min() < 0 or cols_np.max() >= o:
            raise ValueError(f"state_cols: expected a non-empty bool mask or indices in [0, {o}), got {state_cols!r}")
        cols = torch.as_tensor(cols_np, dtype=torch.int64)
    pred_next, d_obs, d_act = input_jacobians(predict_fn, obs_t, act_t)
    if tuple(pred_next.shape) != (B, o):
        raise ValueError(f"predict_fn must return next_obs [B={B}, o={o}], got {tuple(pred_next.shape)}")
    d_obs, d_act, pred_next = (t.detach().cpu().to(torch.float64) for t in (d_obs, d_act, pred_next))
    return {
        "jac_state_err": _relative_frobenius(d_obs[:, :, cols] - true_obs[:, :, cols], true_obs[:, :, cols]),
        "jac_action_err": _relative_frobenius(d_act - true_act, true_act),
        "pred_mse": float((pred_next - true_next).square().mean()),
    }


def ensemble_jacobian_errors(model, obs, act, d_obs_true, d_act_true, next_obs_true,
                             state_cols=None) -> Dict[str, float]:
    """:func:`jacobian_errors` of each elite member's mean next observation
    (``model.predict(obs, act, members=m)``), averaged over the elites.

    ``model`` is a :class:`~fastrp.nn.model.ProbabilisticEnsemble` (anything with ``elite_idx``
    and ``predict``); ``obs`` / ``act`` are moved to its device as float32. The caller chooses the
    module mode (use :func:`fastrp.diagnostics.variance.frozen_modules` for eval mode). Also
    returns ``"members"``, the number of members averaged.
    """
    device = model.elite_idx.device
    obs_t = torch.as_tensor(np.asarray(obs) if not isinstance(obs, torch.Tensor) else obs).to(device, torch.float32)
    act_t = torch.as_tensor(np.asarray(act) if not isinstance(act, torch.Tensor) else act).to(device, torch.float32)
    totals: Dict[str, float] = {}
    elites = [int(m) for m in model.elite_idx.tolist()]
    for m in elites:
        members = torch.full((obs_t.shape[0],), m, dtype=torch.int64, device=device)

        def predict(o: torch.Tensor, a: torch.Tensor, members: torch.Tensor = members) -> torch.Tensor:
            return model.predict(o, a, members=members, deterministic=True)[0]

        for key, value in jacobian_errors(predict, obs_t, act_t, d_obs_true, d_act_true, next_obs_true,
                                          state_cols).items():
            totals[key] = totals.get(key, 0.0) + value
    out = {key: value / len(elites) for key, value in totals.items()}
    out["members"] = float(len(elites))
    return out


class HeldOut(NamedTuple):
    """Held-out real transitions: ``states [B, nstate]`` (rows of ``env.get_state()``), ``obs
    [B, o]``, ``actions [B, a]`` and ``next_obs [B, o]`` (what the env step reached), float64
    numpy; the true Jacobians come from :func:`fastrp.envs.dynamics_jacobians` on ``(states,
    actions)`` (whose ``next_obs`` equals this one)."""

    states: np.ndarray
    obs: np.ndarray
    actions: np.ndarray
    next_obs: np.ndarray


def state_columns(env) -> np.ndarray:
    """Bool ``[obs_dim]`` mask of the observation entries that are qpos / qvel coordinates (the
    columns :func:`fastrp.envs.dynamics_jacobians` differentiates; derived entries are False)."""
    kind, _ = env.task.obs_state_index()
    return kind < 2


@torch.no_grad()
def collect_transitions(env, policy: torch.nn.Module, num_transitions: int, rollout_steps: int,
                        generator: torch.Generator, rng: np.random.Generator, device=None) -> HeldOut:
    """Run ``env`` (a reset :class:`~fastrp.envs.MujocoVectorEnv`, autoresetting) for
    ``rollout_steps`` steps with stochastic actions of ``policy`` (noise from ``generator``),
    recording the full simulator state, observation and action before every step, then keep
    ``num_transitions`` of the ``num_envs * rollout_steps`` records drawn uniformly without
    replacement by ``rng`` (all of them when there are fewer).

    The policy is called as given (put it in eval mode first so that a spectrally normalised
    policy does not update its vectors).
    """
    if isinstance(num_transitions, bool) or not isinstance(num_transitions, int) or num_transitions < 1:
        raise ValueError(f"num_transitions must be an int >= 1, got {num_transitions!r}")
    if isinstance(rollout_steps, bool) or not isinstance(rollout_steps, int) or rollout_steps < 1:
        raise ValueError(f"rollout_steps must be an int >= 1, got {rollout_steps!r}")
    device = torch.device("cpu") if device is None else torch.device(device)
    states, observations, actions, next_obs = [], [], [], []
    for _ in range(rollout_steps):
        obs = env.obs
        obs_t = torch.as_tensor(obs, dtype=torch.float32, device=device)
        noise = torch.randn(obs_t.shape[0], policy.act_dim, generator=generator, device=device)
        action, _ = policy(obs_t, noise=noise)
        action = action.cpu().numpy().astype(np.float64)
        states.append(env.get_state())
        observations.append(obs)
        actions.append(action)
        next_obs.append(env.step_transition(action).next_obs)
    records = [np.concatenate(x) for x in (states, observations, actions, next_obs)]
    total = records[0].shape[0]
    pick = np.sort(rng.choice(total, size=min(num_transitions, total), replace=False))
    return HeldOut(*(r[pick] for r in records))
