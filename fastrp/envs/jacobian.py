"""True-dynamics Jacobians in observation coordinates, by central differences of the real step.

For a batch of B full simulator states ``x`` (rows of :meth:`MujocoVectorEnv.get_state`) and
actions ``a``, let ``f(x, a)`` be the observation after one env step (``frame_skip`` substeps of
``mj_step`` from exactly that state, warm start and time included).  :func:`dynamics_jacobians`
returns

* ``d_obs[b, i, j] = d f_i / d s_j`` where ``s_j`` is the ``qpos`` or ``qvel`` entry that
  observation entry ``j`` reads (rows: next_obs dims, columns: obs dims).  The observation map is
  not invertible -- it leaves out the x (and y) position and, for Humanoid/Ant with full
  observations, appends quantities derived from the state -- so the derivative is taken with
  respect to the state coordinates the observation shows, every other part of the state (the
  excluded positions, the warm start, ...) held at its actual value.  Columns of derived entries
  (contact forces, ``cinert``, ``cvel``, ``qfrc_actuator``) are zero: they are functions of the
  state, not independent coordinates.  Hopper/Walker2d observe ``clip(qvel, -10, 10)``: the
  column differentiates with respect to the unclipped ``qvel`` entry.  Quaternion entries
  (Ant/Humanoid) are perturbed as raw coordinates; MuJoCo normalises them inside the step.
* ``d_action[b, i, k] = d f_i / d a_k`` (rows: next_obs dims, columns: action dims).
* ``next_obs[b] = f(x_b, a_b)``.

Every perturbed copy (``2 * (n_state_columns + act_dim) + 1`` per state) is stepped in parallel on
MuJoCo's thread pool, in chunks of at most ``max_sims`` simulations (512 when each simulation
keeps its own ``MjData``: observations with contact forces, or the loop fallback).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import mujoco
import numpy as np

from ._physics import LoopPhysics, check_simulable, make_physics, state_offset

_MAX_PERSISTENT_SIMS = 512


class Jacobians(NamedTuple):
    """``next_obs [B, obs_dim]``, ``d_obs [B, obs_dim, obs_dim]``, ``d_action [B, obs_dim, act_dim]``."""

    next_obs: np.ndarray
    d_obs: np.ndarray
    d_action: np.ndarray


def dynamics_jacobians(env, actions, states: Optional[np.ndarray] = None, eps: float = 1e-6,
                       max_sims: int = 2048) -> Jacobians:
    """Central-difference Jacobians of ``env``'s true step (see the module docstring).

    Args:
        env: a :class:`~fastrp.envs.MujocoVectorEnv` (its task, kwargs and threads are used; its
            own simulations are not touched).
        actions: ``[B, act_dim]`` actions.
        states: ``[B, nstate]`` full states from ``env.get_state()``; None uses the env's current
            states (B = num_envs).
        eps: perturbation of each coordinate and action entry.
        max_sims: most simulations stepped in one threaded call.
    """
    task = env.task
    model = task.model
    if states is None:
        states = env.get_state()
    nstate = mujoco.mj_stateSize(model, env.state_spec)
    states = np.asarray(states, dtype=np.float64)
    if states.ndim != 2 or states.shape[1] != nstate:
        raise ValueError(f"states: expected shape (B, {nstate}) (rows of env.get_state()), got {states.shape}")
    B = states.shape[0]
    actions = np.asarray(actions, dtype=np.float64)
    if actions.shape != (B, env.act_dim):
        raise ValueError(f"actions: expected shape ({B}, {env.act_dim}), got {actions.shape}")
    if not np.isfinite(actions).all():
        raise ValueError("actions: expected finite values (MuJoCo zeroes non-finite controls)")
    qpos_at = state_offset(model, mujoco.mjtState.mjSTATE_QPOS)
    qvel_at = state_offset(model, mujoco.mjtState.mjSTATE_QVEL)
    check_simulable(states[:, qpos_at:qpos_at + model.nq], "states (qpos entries)")
    check_simulable(states[:, qvel_at:qvel_at + model.nv], "states (qvel entries)")
    if not (np.isfinite(eps) and eps > 0):
        raise ValueError(f"eps: expected a positive finite float, got {eps}")

    kind, index = task.obs_state_index()
    obs_cols = np.flatnonzero(kind < 2)
    state_entry = np.where(kind[obs_cols] == 0, qpos_at, qvel_at) + index[obs_cols]
    ncol = obs_cols.size + env.act_dim
    per_state = 1 + 2 * ncol
    contact = task.obs_reads_cfrc_ext
    if contact or isinstance(env._physics, LoopPhysics):
        # one MjData per simulation (see _physics): keep the chunk's memory bounded
        max_sims = min(max_sims, _MAX_PERSISTENT_SIMS)
    chunk = max(1, max_sims // per_state)
    nsim = min(B, chunk) * per_state

    # perturbation pattern of one state: sim 0 unperturbed, then +eps / -eps per column
    d_state = np.zeros((per_state, nstate))
    d_ctrl = np.zeros((per_state, env.act_dim))
    for c in range(ncol):
        for sign, sim in ((1.0, 1 + 2 * c), (-1.0, 2 + 2 * c)):
            if c < obs_cols.size:
                d_state[sim, state_entry[c]] = sign * eps
            else:
                d_ctrl[sim, c - obs_cols.size] = sign * eps

    physics = make_physics(model, nsim, env.num_threads, task.derived_fields, cfrc_ext=contact,
                           backend=env.physics_backend)
    next_obs = np.empty((B, env.obs_dim))
    d_obs = np.zeros((B, env.obs_dim, env.obs_dim))
    d_action = np.empty((B, env.obs_dim, env.act_dim))
    for start in range(0, B, chunk):
        stop = min(B, start + chunk)
        idx = np.minimum(np.arange(start, start + nsim // per_state), stop - 1)  # pad with the last state
        rows = (states[idx, None, :] + d_state).reshape(nsim, nstate)
        ctrl = (actions[idx, None, :] + d_ctrl).reshape(nsim, env.act_dim)
        physics.set_state(rows)
        physics.step(ctrl, task.frame_skip)
        out = task.observe(physics.qpos, physics.qvel, physics.derived()).reshape(-1, per_state, env.obs_dim)
        n = stop - start
        out = out[:n]
        diff = (out[:, 1::2] - out[:, 2::2]) / (2.0 * eps)  # [n, ncol, obs_dim]
        next_obs[start:stop] = out[:, 0]
        d_obs[start:stop][:, :, obs_cols] = diff[:, :obs_cols.size].transpose(0, 2, 1)
        d_action[start:stop] = diff[:, obs_cols.size:].transpose(0, 2, 1)
    return Jacobians(next_obs, d_obs, d_action)
