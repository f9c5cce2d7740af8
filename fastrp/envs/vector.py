"""Vectorized MuJoCo v5 environments stepped on C++ threads.

:func:`make` returns a :class:`MujocoVectorEnv`, a ``gymnasium.vector.VectorEnv`` whose
``num_envs`` copies of one task are stepped by MuJoCo's thread pool (``mujoco.batch``), with
observations, rewards and terminations computed in numpy over the whole batch.  For the same
physics state and actions the results equal gymnasium's ``env.step`` bit for bit (tested for
every task).  :func:`make_single` wraps one copy as a plain ``gymnasium.Env`` (for
``gymnasium.utils.env_checker.check_env`` and single-env code).

Autoreset (``AutoresetMode.SAME_STEP``): an env that terminates or truncates is reset inside the
same :meth:`MujocoVectorEnv.step` call.  The returned ``obs`` is what to act on next, so its rows
for finished envs are the new episodes' first observations; the true observation reached by the
step is ``info["next_obs"]`` (every row), and also ``info["final_obs"]`` for finished rows
(gymnasium's convention).  :meth:`MujocoVectorEnv.step_transition` returns the exact transition
``(obs, action, reward, next_obs, terminated, truncated)`` for the replay buffer, and
:meth:`MujocoVectorEnv.reset_envs` resets chosen envs (from their own seeded generators) outside
of that cycle.

MuJoCo's warnings (an unstable simulation it resets, non-finite controls it zeroes) come as
``RuntimeWarning("MuJoCo: ...")`` or go to a handler installed with ``mujoco.set_mju_user_warning``;
MuJoCo warns once per kind of warning and simulation, until that simulation is reset.
"""

from __future__ import annotations

from typing import Any, Dict, NamedTuple, Optional, Sequence, Tuple, Union

import gymnasium
import mujoco
import numpy as np
from gymnasium.utils import seeding
from gymnasium.vector import VectorEnv
from gymnasium.vector.utils import batch_space

from ._physics import STATE_SPEC, check_simulable, make_physics, state_offset
from ._tasks import Task

try:  # gymnasium >= 1.1
    from gymnasium.vector import AutoresetMode

    _SAME_STEP = AutoresetMode.SAME_STEP
except ImportError:  # pragma: no cover - gymnasium 1.0
    _SAME_STEP = "SameStep"


class Transition(NamedTuple):
    """One vector step as it belongs in a replay buffer (``[N, ...]`` numpy arrays).

    ``next_obs`` is always the observation the step reached, also for envs that finished and were
    reset; ``obs`` is the observation the actions were chosen on.
    """

    obs: np.ndarray
    action: np.ndarray
    reward: np.ndarray
    next_obs: np.ndarray
    terminated: np.ndarray
    truncated: np.ndarray


def _ids(env_ids, num_envs: int, name: str = "env_ids") -> np.ndarray:
    """Unique int64 env indices from None (all, in order), ints (in the order given) or a bool mask
    (in order)."""
    if env_ids is None:
        return np.arange(num_envs)
    ids = np.asarray(env_ids)
    if ids.dtype == bool:
        if ids.shape != (num_envs,):
            raise ValueError(f"{name}: a bool mask must have shape ({num_envs},), got {ids.shape}")
        return np.flatnonzero(ids)
    ids = np.atleast_1d(ids)
    if ids.shape == (0,):
        return np.zeros(0, dtype=np.int64)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{name}: expected a 1-D array of int env indices or a bool mask, got {ids.dtype} {ids.shape}")
    if ids.size and (ids.min() < 0 or ids.max() >= num_envs):
        raise ValueError(f"{name}: indices must be in [0, {num_envs}), got {ids.tolist()}")
    if np.unique(ids).size != ids.size:
        raise ValueError(f"{name}: indices must be unique, got {ids.tolist()}")
    return ids.astype(np.int64)


def _rows(x, n: int, width: int, name: str) -> np.ndarray:
    """``x`` as a float64 ``[n, width]`` array (a single ``[width]`` row is accepted for n == 1)."""
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a float array of shape ({n}, {width}), got {type(x).__name__}") from None
    if arr.ndim == 1 and n == 1:
        arr = arr[None]
    if arr.shape != (n, width):
        raise ValueError(f"{name}: expected shape ({n}, {width}), got {np.shape(x)}")
    return arr


def _check_seed(seed, name: str = "seed") -> Optional[int]:
    """``seed`` as None or a Python int; ValueError unless it is None or a non-negative int."""
    if seed is None:
        return None
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, (bool, np.bool_)) or seed < 0:
        raise ValueError(f"{name}: expected None or a non-negative int, got {seed!r}")
    return int(seed)


_STATE_KEYS = ("sim", "obs", "elapsed", "returns", "needs_reset", "rngs")
_DTYPE_KINDS = {"f": "float", "iu": "int", "b": "bool"}
_BIT_GENERATORS = ("PCG64", "PCG64DXSM", "MT19937", "Philox", "SFC64")


def _state_array(state: Dict[str, Any], key: str, shape: Tuple[int, ...], kinds: str, where: str) -> np.ndarray:
    """``state[key]`` as an array of ``shape`` whose dtype kind is in ``kinds``, else ValueError."""
    try:
        arr = np.asarray(state[key])
    except (TypeError, ValueError):  # e.g. ragged nested lists
        arr = np.empty(0, dtype=object)
    if arr.shape != shape or arr.dtype.kind not in kinds:
        raise ValueError(f"state[{key!r}]: expected a {_DTYPE_KINDS[kinds]} array of shape {shape} {where}, "
                         f"got {arr.dtype} {arr.shape}")
    return arr


def _generator(bit_state, name: str) -> np.random.Generator:
    """A generator continuing from ``bit_state`` (a ``Generator.bit_generator.state`` dict)."""
    kind = bit_state.get("bit_generator") if isinstance(bit_state, dict) else None
    try:
        if kind not in _BIT_GENERATORS:
            raise ValueError(kind)
        bit_generator = getattr(np.random, kind)()
        bit_generator.state = bit_state
    except (TypeError, ValueError, KeyError) as exc:
        raise ValueError(f"{name}: expected a numpy bit generator state (rng.bit_generator.state), "
                         f"got {str(bit_state)[:80]}") from exc
    return np.random.Generator(bit_generator)


class MujocoVectorEnv(VectorEnv):
    """``num_envs`` copies of a MuJoCo v5 task stepped together on MuJoCo's C++ thread pool.

    Args:
        name: ``InvertedPendulum, Hopper, Walker2d, HalfCheetah, Ant, Humanoid`` or the matching
            gymnasium id (``"Hopper-v5"``).
        num_envs: number of copies N.
        seed: default seed of the first :meth:`reset` (env i is seeded with ``seed + i``, as
            gymnasium's vector envs do); None draws fresh entropy.
        full_obs: Ant/Humanoid observe gymnasium's full 105 / 348 dims instead of MBPO's
            truncated 27 / 45 (the default, for the short names and the ids alike).
        max_episode_steps: time limit (``truncated``); None uses the gymnasium registry's (1000).
        num_threads: stepping threads; None uses ``min(num_envs, os.cpu_count())``.
        physics: ``None`` (``mujoco.batch`` when available, else a Python loop), ``"batch"`` or
            ``"loop"``.
        **kwargs: gymnasium v5 constructor arguments (``ctrl_cost_weight``, ``healthy_z_range``,
            ``include_cfrc_ext_in_observation``, ...); they take precedence over ``full_obs``.

    Observations are float64 ``[N, obs_dim]``, rewards float64 ``[N]``, terminated/truncated
    bool ``[N]``; actions ``[N, act_dim]`` (float32 or float64, not clipped, as in gymnasium).
    """

    def __init__(
        self,
        name: str,
        num_envs: int = 1,
        seed: Optional[int] = None,
        *,
        full_obs: bool = False,
        max_episode_steps: Optional[int] = None,
        num_threads: Optional[int] = None,
        physics: Optional[str] = None,
        _autoreset: bool = True,
        **kwargs,
    ):
        if not isinstance(num_envs, (int, np.integer)) or isinstance(num_envs, bool) or num_envs < 1:
            raise ValueError(f"num_envs: expected a positive int, got {num_envs!r}")
        seed = _check_seed(seed)
        self.task = Task.build(name, full_obs=full_obs, **kwargs)
        if max_episode_steps is None:
            max_episode_steps = self.task.max_episode_steps
        bad_limit = not isinstance(max_episode_steps, (int, np.integer)) or max_episode_steps < 1
        if max_episode_steps is not None and bad_limit:
            raise ValueError(f"max_episode_steps: expected None or a positive int, got {max_episode_steps!r}")
        self.num_envs = int(num_envs)
        self.max_episode_steps = None if max_episode_steps is None else int(max_episode_steps)
        self.name = self.task.name
        self.spec = None
        self.render_mode = None
        self.metadata = {"autoreset_mode": _SAME_STEP, "render_modes": []}
        self.single_observation_space = self.task.observation_space
        self.single_action_space = self.task.action_space
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self.action_space = batch_space(self.single_action_space, self.num_envs)
        self.obs_dim = int(self.single_observation_space.shape[0])
        self.act_dim = int(self.single_action_space.shape[0])
        self.physics_backend = physics
        self.num_threads = num_threads
        self._physics = make_physics(
            self.task.model, self.num_envs, num_threads, self.task.derived_fields,
            cfrc_ext=self.task.needs_cfrc_ext, backend=physics,
        )
        self._autoreset = _autoreset
        self._default_seed = seed
        self._rngs: Optional[list] = None
        self._obs = np.zeros((self.num_envs, self.obs_dim))
        self._elapsed = np.zeros(self.num_envs, dtype=np.int64)
        self._returns = np.zeros(self.num_envs)
        self._needs_reset = np.ones(self.num_envs, dtype=bool)

    # ---- seeding and reset -------------------------------------------------------------------
    def _seed(self, seed: Union[None, int, Sequence[Optional[int]]]) -> None:
        if seed is None:
            if self._rngs is not None:
                return
            seed = self._default_seed
        if seed is None or isinstance(seed, (int, np.integer, bool, np.bool_)):
            seed = _check_seed(seed)
            seeds = [None if seed is None else seed + i for i in range(self.num_envs)]
        else:
            one_per_env = isinstance(seed, (list, tuple)) or (isinstance(seed, np.ndarray) and seed.ndim == 1)
            if not one_per_env or len(seed) != self.num_envs:
                raise ValueError(f"seed: expected None, a non-negative int or a list of {self.num_envs} of them "
                                 f"(one per env), got {seed!r}")
            seeds = [_check_seed(s, f"seed[{i}]") for i, s in enumerate(seed)]
        self._rngs = [seeding.np_random(s)[0] for s in seeds]

    def _reset_envs(self, ids: np.ndarray) -> None:
        if ids.size == 0:
            return
        ids = np.sort(ids)
        task = self.task
        qpos = np.empty((ids.size, task.model.nq))
        qvel = np.empty((ids.size, task.model.nv))
        for k, i in enumerate(ids):
            qpos[k], qvel[k] = task.reset_state(self._rngs[i])
        self._physics.reset(ids, qpos, qvel)
        self._obs[ids] = self._observe(ids)
        self._elapsed[ids] = 0
        self._returns[ids] = 0.0
        self._needs_reset[ids] = False

    def _observe(self, ids: Optional[np.ndarray] = None) -> np.ndarray:
        ph = self._physics
        derived = ph.derived()
        if ids is None:
            return self.task.observe(ph.qpos, ph.qvel, derived)
        return self.task.observe(ph.qpos[ids], ph.qvel[ids], {k: v[ids] for k, v in derived.items()})

    def reset(self, *, seed: Union[None, int, Sequence[Optional[int]]] = None,
              options: Optional[Dict[str, Any]] = None) -> Tuple[np.ndarray, Dict[str, Any]]:
        """Reset all envs (or those in ``options["reset_mask"]``, a bool ``[N]``) and return
        ``(obs [N, obs_dim], info)``.

        ``seed``: an int seeds env i with ``seed + i``; a list gives one seed per env; None keeps
        the current generators (the first reset uses ``make``'s seed).  Reset noise is drawn from
        each env's generator exactly as gymnasium's ``reset_model`` does, so a gymnasium env reset
        with the same seed starts in the same state.
        """
        self._seed(seed)
        mask = None if options is None else options.get("reset_mask")
        self._reset_envs(_ids(mask, self.num_envs, "options['reset_mask']"))
        return self._obs.copy(), {}

    def reset_envs(self, env_ids) -> np.ndarray:
        """Reset only the envs ``env_ids`` (int indices, or a bool mask ``[N]``) and return their
        first observations ``[n, obs_dim]``, row k for ``env_ids[k]`` (mask: in env order).

        Each env draws its reset noise from its own generator, continuing the stream that
        :meth:`reset` seeded, as gymnasium's ``env.reset()`` without a seed does; the generators
        are part of :meth:`state_dict`, so a resumed run resets the same way.  The envs' episode
        clocks and returns restart (no ``info["episode"]`` is reported for the abandoned
        episodes); the other envs are not touched.  For dropping an env copy whose episode must not
        go on -- e.g. one that produced a non-finite transition -- without ending the others'.
        """
        if self._rngs is None:
            raise RuntimeError("call reset() before reset_envs()")
        ids = _ids(env_ids, self.num_envs)
        self._reset_envs(ids)
        return self._obs[ids].copy()

    # ---- stepping ----------------------------------------------------------------------------
    def _check_actions(self, actions) -> np.ndarray:
        a = np.asarray(actions)
        if a.shape != (self.num_envs, self.act_dim):
            raise ValueError(f"actions: expected shape ({self.num_envs}, {self.act_dim}), got {a.shape}")
        if not np.issubdtype(a.dtype, np.floating):
            raise ValueError(f"actions: expected a float array, got {a.dtype}")
        return a

    def step(self, actions) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, Dict[str, Any]]:
        """Step every env with ``actions [N, act_dim]``.

        Returns ``(obs, reward, terminated, truncated, info)``.  ``obs`` is the observation to
        act on next: for envs that finished in this step, the first observation of their new
        episode.  ``info["next_obs"]`` is the observation each env's step reached (the true final
        observation for finished envs); finished envs also get ``info["final_obs"]`` (object
        array, None elsewhere) and ``info["_final_obs"]`` (bool mask) as gymnasium's same-step
        autoreset reports them, and ``info["episode"] = {"r": return, "l": length}`` with mask
        ``info["_episode"]``.
        """
        if self._rngs is None or (self._autoreset and self._needs_reset.any()):
            raise RuntimeError("call reset() before step()")
        a = self._check_actions(actions)
        task, ph = self.task, self._physics
        before = task.position(ph.qpos, ph.derived())
        ph.step(a.astype(np.float64), task.frame_skip)
        derived = ph.derived()
        next_obs = task.observe(ph.qpos, ph.qvel, derived)
        reward, terminated = task.reward_terminated(before, ph.qpos, ph.qvel, next_obs, derived, a)
        self._elapsed += 1
        self._returns += reward
        if self.max_episode_steps is None:
            truncated = np.zeros(self.num_envs, dtype=bool)
        else:
            truncated = self._elapsed >= self.max_episode_steps
        info: Dict[str, Any] = {"next_obs": next_obs}
        done = terminated | truncated
        self._obs = next_obs.copy()
        if done.any():
            final = np.empty(self.num_envs, dtype=object)
            for i in np.flatnonzero(done):
                final[i] = next_obs[i]
            info["final_obs"], info["_final_obs"] = final, done.copy()
            info["episode"] = {"r": np.where(done, self._returns, 0.0), "l": np.where(done, self._elapsed, 0)}
            info["_episode"] = done.copy()
            self._needs_reset |= done
            if self._autoreset:
                self._reset_envs(np.flatnonzero(done))
        return self._obs.copy(), reward, terminated, truncated, info

    def step_transition(self, actions) -> Transition:
        """Step like :meth:`step` and return the replay-buffer transition.

        ``Transition.obs`` is the observation the actions were taken in and ``next_obs`` the one
        reached -- never a reset observation.  The observation to act on next is :attr:`obs`.
        """
        obs = self._obs.copy()
        _, reward, terminated, truncated, info = self.step(actions)
        return Transition(obs, np.asarray(actions), reward, info["next_obs"], terminated, truncated)

    @property
    def obs(self) -> np.ndarray:
        """The current observations ``[N, obs_dim]`` (what to act on next)."""
        return self._obs.copy()

    # ---- state access ------------------------------------------------------------------------
    @property
    def qpos(self) -> np.ndarray:
        """Joint positions ``[N, nq]`` (a copy)."""
        return np.array(self._physics.qpos)

    @property
    def qvel(self) -> np.ndarray:
        """Joint velocities ``[N, nv]`` (a copy)."""
        return np.array(self._physics.qvel)

    def set_state(self, qpos, qvel, env_ids=None) -> np.ndarray:
        """Set ``qpos [n, nq]`` and ``qvel [n, nv]`` of envs ``env_ids`` (None: all N; row k goes
        to ``env_ids[k]``), as gymnasium's ``MujocoEnv.set_state`` does (then ``mj_forward``; the
        episode clocks keep running), and return their new observations ``[n, obs_dim]``.

        Entries that are NaN, infinite or beyond +-1e10 (``mujoco.mjMAXVAL``: MuJoCo replaces a
        simulation holding them by its default state) raise ValueError; nothing is changed then."""
        if self._rngs is None:
            raise RuntimeError("call reset() before set_state()")
        ids = _ids(env_ids, self.num_envs)
        model = self.task.model
        qpos = _rows(qpos, ids.size, model.nq, "qpos")
        qvel = _rows(qvel, ids.size, model.nv, "qvel")
        check_simulable(qpos, "qpos")
        check_simulable(qvel, "qvel")
        order = np.argsort(ids)
        self._physics.set_qpos_qvel(ids[order], qpos[order], qvel[order])
        self._obs[ids] = self._observe(ids)
        return self._obs[ids].copy()

    def get_state(self) -> np.ndarray:
        """Full simulator states ``[N, mj_stateSize(model, mjSTATE_INTEGRATION)]`` (a copy):
        time, qpos, qvel, act, warm start, ctrl, ... -- what :func:`dynamics_jacobians` takes."""
        return np.array(self._physics.get_state())

    def state_dict(self) -> Dict[str, Any]:
        """Everything needed to continue exactly (for checkpoints): the full simulator
        integration states, episode clocks and returns, the pending resets, the reset generators
        and the current observations (numpy arrays and generator states, picklable)."""
        if self._rngs is None:
            raise RuntimeError("state_dict() before the first reset(): the env has no state yet")
        return {
            "sim": self.get_state(),
            "obs": self._obs.copy(),
            "elapsed": self._elapsed.copy(),
            "returns": self._returns.copy(),
            "needs_reset": self._needs_reset.copy(),
            "rngs": [rng.bit_generator.state for rng in self._rngs],
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore :meth:`state_dict` into an env of the same task and size.

        A ``state`` that is not such a dict -- a key missing, an array of another shape or kind,
        generator states numpy cannot load, non-finite positions or velocities -- raises
        ValueError naming the key, and the env is left as it was."""
        n, model = self.num_envs, self.task.model
        if not isinstance(state, dict):
            raise ValueError(f"state: expected the dict of MujocoVectorEnv.state_dict(), got {type(state).__name__}")
        missing = [key for key in _STATE_KEYS if key not in state]
        if missing:
            raise ValueError(f"state: missing {', '.join(repr(k) for k in missing)}; expected the keys "
                             f"{', '.join(_STATE_KEYS)} of MujocoVectorEnv.state_dict()")
        where = f"(task {self.task.name!r}, {n} envs)"
        nstate = mujoco.mj_stateSize(model, STATE_SPEC)
        sim = _state_array(state, "sim", (n, nstate), "f", where)
        obs = _state_array(state, "obs", (n, self.obs_dim), "f", where)
        elapsed = _state_array(state, "elapsed", (n,), "iu", where)
        returns = _state_array(state, "returns", (n,), "f", where)
        needs_reset = _state_array(state, "needs_reset", (n,), "b", where)
        for part, width in (("QPOS", model.nq), ("QVEL", model.nv)):
            at = state_offset(model, getattr(mujoco.mjtState, f"mjSTATE_{part}"))
            bad = np.flatnonzero(~np.isfinite(sim[:, at:at + width]).all(axis=1))
            if bad.size:
                raise ValueError(f"state['sim']: expected finite {part.lower()} in every row (MuJoCo would reset "
                                 f"the simulation), got non-finite values in env {int(bad[0])}")
        rng_states = state["rngs"]
        if not isinstance(rng_states, (list, tuple)) or len(rng_states) != n:
            raise ValueError(f"state['rngs']: expected a list of {n} generator states {where}, got "
                             f"{len(rng_states) if isinstance(rng_states, (list, tuple)) else type(rng_states).__name__}")
        rngs = [_generator(bit_state, f"state['rngs'][{i}]") for i, bit_state in enumerate(rng_states)]

        ids = np.arange(n)
        self._physics.set_state(sim)
        self._physics.set_qpos_qvel(ids, self.qpos, self.qvel)  # mj_forward: the derived fields
        self._obs[:] = obs
        self._elapsed[:] = elapsed
        self._returns[:] = returns
        self._needs_reset[:] = needs_reset
        self._rngs = rngs

    @property
    def state_spec(self):
        """The ``mujoco.mjtState`` spec of :meth:`get_state` rows."""
        return STATE_SPEC

    @property
    def model(self):
        """The task's ``mujoco.MjModel`` (shared; do not modify)."""
        return self.task.model

    @property
    def dt(self) -> float:
        return self.task.dt

    def render(self):
        return None

    def close_extras(self, **kwargs) -> None:
        self._physics = None

    def __repr__(self) -> str:
        return (f"MujocoVectorEnv({self.name!r}, num_envs={self.num_envs}, obs_dim={self.obs_dim}, "
                f"act_dim={self.act_dim})")


class MujocoSingleEnv(gymnasium.Env):
    """One copy of a task as a plain ``gymnasium.Env`` (no autoreset; time limit included).

    Same arguments as :class:`MujocoVectorEnv` without ``num_envs``; ``step`` returns
    ``(obs [obs_dim], reward float, terminated bool, truncated bool, info)``.
    """

    metadata = {"render_modes": []}

    def __init__(self, name: str, seed: Optional[int] = None, **kwargs):
        self._core = MujocoVectorEnv(name, 1, seed, num_threads=1, _autoreset=False, **kwargs)
        self.observation_space = self._core.single_observation_space
        self.action_space = self._core.single_action_space
        self._default_seed = seed
        self._done = True

    def reset(self, *, seed: Optional[int] = None, options: Optional[Dict[str, Any]] = None):
        seed = _check_seed(seed)
        if seed is None and self._np_random is None:
            seed = self._default_seed
        super().reset(seed=seed)
        self._core._rngs = [self.np_random]
        self._core._reset_envs(np.zeros(1, dtype=np.int64))
        self._done = False
        return self._core.obs[0], {}

    def step(self, action):
        if self._done:
            raise RuntimeError("call reset() before step() (the episode is over)")
        a = np.asarray(action)
        if a.shape != self.action_space.shape:
            raise ValueError(f"action: expected shape {self.action_space.shape}, got {a.shape}")
        obs, reward, terminated, truncated, _ = self._core.step(a[None])
        self._done = bool(terminated[0] or truncated[0])
        return obs[0], float(reward[0]), bool(terminated[0]), bool(truncated[0]), {}

    def set_state(self, qpos, qvel) -> np.ndarray:
        """Set ``qpos [nq]`` and ``qvel [nv]`` (then ``mj_forward``); returns the observation."""
        return self._core.set_state(np.asarray(qpos)[None], np.asarray(qvel)[None])[0]

    @property
    def unwrapped_vector(self) -> MujocoVectorEnv:
        """The one-env :class:`MujocoVectorEnv` underneath."""
        return self._core


def make(name: str, num_envs: int = 1, seed: Optional[int] = None, **kwargs) -> MujocoVectorEnv:
    """A :class:`MujocoVectorEnv` of ``num_envs`` copies of task ``name`` (see its docstring for
    ``full_obs``, ``max_episode_steps``, ``num_threads``, ``physics`` and gymnasium kwargs).

    ``name`` is one of ``InvertedPendulum, Hopper, Walker2d, HalfCheetah, Ant, Humanoid`` or a
    gymnasium id such as ``"HalfCheetah-v5"``; anything else raises ``ValueError`` listing them.
    """
    return MujocoVectorEnv(name, num_envs, seed, **kwargs)


def make_single(name: str, seed: Optional[int] = None, **kwargs) -> MujocoSingleEnv:
    """One env of task ``name`` as a ``gymnasium.Env`` (what ``check_env`` runs on)."""
    return MujocoSingleEnv(name, seed, **kwargs)
