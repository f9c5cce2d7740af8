"""Many simulations of one MuJoCo model, stepped together.

:class:`BatchPhysics` steps them on MuJoCo's own C++ thread pool (``mujoco.batch.Batch``, MuJoCo
>= 4.0), whose results are bit-identical to a loop of ``mj_step`` over one ``MjData`` per
simulation.  :class:`LoopPhysics` is that loop, in Python, for older MuJoCo releases: exact, but
single-threaded.  :func:`make_physics` picks the first available.

Both keep each simulation's state as its ``mjSTATE_INTEGRATION`` row and expose the MjData fields
the task maps read.  ``cfrc_ext`` is special: gymnasium computes it with ``mj_rnePostConstraint``
after ``mj_step`` (from the last RK4 stage's contacts), which no batched call does, so simulations
of tasks that read it keep one ``MjData`` each (``persistent=True``) and run that call per
simulation after the threaded step -- a few microseconds each.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from typing import Dict, Optional, Sequence

import mujoco
import numpy as np

STATE_SPEC = mujoco.mjtState.mjSTATE_INTEGRATION
# MuJoCo treats a qpos, qvel or qacc entry that is NaN or beyond +-MAXVAL as unstable: it warns and
# resets the simulation to the model's default state (mj_checkPos / mj_checkVel / mj_checkAcc).
MAXVAL = float(getattr(mujoco, "mjMAXVAL", 1e10))


@contextlib.contextmanager
def mujoco_warnings():
    """Send MuJoCo's warnings to Python while inside, instead of MuJoCo's default handler (which
    prints them and appends them to ``MUJOCO_LOG.TXT`` in the current working directory).

    Each warning becomes a ``RuntimeWarning("MuJoCo: <message>")``, or goes to the handler the
    caller had installed (``mujoco.set_mju_user_warning``), which is restored on exit.  MuJoCo's
    (>= 4.0) notice that the ``settotalmass`` compiler attribute is deprecated is dropped: gymnasium's
    own XML files carry it, so it would come with every env construction and nobody using the env can
    act on it.  The handler may run on ``mujoco.batch`` worker threads (it takes the GIL)."""
    if not hasattr(mujoco, "set_mju_user_warning"):
        yield
        return
    previous = mujoco.get_mju_user_warning()

    def handler(message: str) -> None:
        if "settotalmass" in message:
            return
        if previous is not None:
            previous(message)
        else:
            # stacklevel 1: on mujoco.batch worker threads there is no Python caller to point at
            warnings.warn(f"MuJoCo: {message}", RuntimeWarning, stacklevel=1)

    mujoco.set_mju_user_warning(handler)
    try:
        yield
    finally:
        mujoco.set_mju_user_warning(previous)


def _with_mujoco_warnings(method):
    """Run ``method`` inside :func:`mujoco_warnings` (for every call that runs MuJoCo)."""

    @functools.wraps(method)
    def wrapped(*args, **kwargs):
        with mujoco_warnings():
            return method(*args, **kwargs)

    return wrapped


def check_simulable(arr: np.ndarray, name: str) -> None:
    """ValueError unless every entry is one MuJoCo simulates: finite and within +-MAXVAL (MuJoCo
    resets a simulation holding anything else to its default state)."""
    bad = ~(np.abs(arr) <= MAXVAL)
    if bad.any():
        at = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"{name}: expected finite values within +-{MAXVAL:g} (MuJoCo resets a simulation "
                         f"beyond that), got {arr[at]} at index {list(at)}")


def has_batch() -> bool:
    """True when this MuJoCo ships ``mujoco.batch`` (4.0 and later)."""
    try:
        from mujoco import batch  # noqa: F401
    except ImportError:
        return False
    return True


def state_offset(model, component) -> int:
    """Offset of a state component (e.g. ``mjSTATE_QPOS``) inside an ``mjSTATE_INTEGRATION`` row:
    components are stored in the order of their bits."""
    lower = int(STATE_SPEC) & (int(component) - 1)
    return mujoco.mj_stateSize(model, lower)


def default_threads(nsim: int) -> int:
    return max(1, min(nsim, os.cpu_count() or 1))


class BatchPhysics:
    """``nsim`` simulations on ``mujoco.batch.Batch`` with ``nthread`` threads.

    ``fields`` are the derived MjData outputs to expose (``xpos``, ``xipos``, ...);
    ``cfrc_ext`` adds gymnasium's post-step ``mj_rnePostConstraint`` contact forces.
    """

    def __init__(self, model, nsim: int, nthread: int, fields: Sequence[str] = (), cfrc_ext: bool = False):
        from mujoco.batch import Batch

        self.model = model
        self.nsim = nsim
        self._batch = Batch(model, nsim, nthread=nthread, persistent=cfrc_ext)
        self.state = self._batch.state
        self.qpos = self._batch.bind("qpos")
        self.qvel = self._batch.bind("qvel")
        self.ctrl = self._batch.bind("ctrl")
        self._fields = {name: self._batch.bind(name) for name in fields}
        self._cfrc_ext = np.zeros((nsim, model.nbody, 6)) if cfrc_ext else None
        self._scratch = mujoco.MjData(model) if cfrc_ext else None

    def derived(self) -> Dict[str, np.ndarray]:
        """Live ``[nsim, ...]`` arrays of the derived fields (refreshed by every call)."""
        out = dict(self._fields)
        if self._cfrc_ext is not None:
            out["cfrc_ext"] = self._cfrc_ext
        return out

    @_with_mujoco_warnings
    def step(self, ctrl: np.ndarray, nstep: int) -> None:
        """Set every simulation's ``ctrl`` and advance it ``nstep`` substeps (``mj_step``)."""
        self.ctrl[:] = ctrl
        self._batch.step(nstep=nstep)
        if self._cfrc_ext is not None:
            data = self._scratch
            for i in range(self.nsim):
                self._batch.get_data(i, data)
                mujoco.mj_rnePostConstraint(self.model, data)
                self._cfrc_ext[i] = data.cfrc_ext

    @_with_mujoco_warnings
    def reset(self, ids: np.ndarray, qpos: np.ndarray, qvel: np.ndarray) -> None:
        """``mj_resetData``, then ``qpos``/``qvel`` rows for sorted ``ids``, then ``mj_forward``."""
        self._batch.reset(ids, stage=mujoco.mjtStage.mjSTAGE_NONE)
        self.set_qpos_qvel(ids, qpos, qvel)
        if self._cfrc_ext is not None:
            self._cfrc_ext[ids] = 0.0

    @_with_mujoco_warnings
    def set_qpos_qvel(self, ids: np.ndarray, qpos: np.ndarray, qvel: np.ndarray) -> None:
        """Write ``qpos``/``qvel`` of sorted ``ids`` and run ``mj_forward`` on them."""
        self.qpos[ids] = qpos
        self.qvel[ids] = qvel
        self._batch.forward(ids)

    def get_state(self) -> np.ndarray:
        return self.state.copy()

    def set_state(self, rows: np.ndarray) -> None:
        """Overwrite every simulation's integration state (derived fields follow at the next call)."""
        self.state[:] = rows


class LoopPhysics:
    """The same interface as :class:`BatchPhysics` over a Python loop of ``MjData`` (exact, one
    thread; ``nthread`` is accepted for the common signature and ignored)."""

    def __init__(self, model, nsim: int, nthread: int = 1, fields: Sequence[str] = (), cfrc_ext: bool = False):
        self.model = model
        self.nsim = nsim
        self._datas = [mujoco.MjData(model) for _ in range(nsim)]
        self._field_names = tuple(fields) + (("cfrc_ext",) if cfrc_ext else ())
        self._cfrc = cfrc_ext
        self.nstate = mujoco.mj_stateSize(model, STATE_SPEC)
        self._refresh()

    def _refresh(self, ids: Optional[np.ndarray] = None) -> None:
        if ids is None:
            self.qpos = np.stack([d.qpos for d in self._datas])
            self.qvel = np.stack([d.qvel for d in self._datas])
            self._fields = {name: np.stack([getattr(d, name) for d in self._datas]) for name in self._field_names}
            return
        for i in ids:
            d = self._datas[i]
            self.qpos[i], self.qvel[i] = d.qpos, d.qvel
            for name in self._field_names:
                self._fields[name][i] = getattr(d, name)

    def derived(self) -> Dict[str, np.ndarray]:
        return self._fields

    @_with_mujoco_warnings
    def step(self, ctrl: np.ndarray, nstep: int) -> None:
        for i, d in enumerate(self._datas):
            d.ctrl[:] = ctrl[i]
            mujoco.mj_step(self.model, d, nstep)
            if self._cfrc:
                mujoco.mj_rnePostConstraint(self.model, d)
        self._refresh()

    @_with_mujoco_warnings
    def reset(self, ids: np.ndarray, qpos: np.ndarray, qvel: np.ndarray) -> None:
        for i in ids:
            mujoco.mj_resetData(self.model, self._datas[i])
        self.set_qpos_qvel(ids, qpos, qvel)

    @_with_mujoco_warnings
    def set_qpos_qvel(self, ids: np.ndarray, qpos: np.ndarray, qvel: np.ndarray) -> None:
        for k, i in enumerate(ids):
            d = self._datas[i]
            d.qpos[:] = qpos[k]
            d.qvel[:] = qvel[k]
            mujoco.mj_forward(self.model, d)
        self._refresh(ids)

    def get_state(self) -> np.ndarray:
        rows = np.empty((self.nsim, self.nstate))
        for i, d in enumerate(self._datas):
            mujoco.mj_getState(self.model, d, rows[i], STATE_SPEC)
        return rows

    @_with_mujoco_warnings
    def set_state(self, rows: np.ndarray) -> None:
        for i, d in enumerate(self._datas):
            mujoco.mj_setState(self.model, d, np.ascontiguousarray(rows[i]), STATE_SPEC)
        self._refresh()


def make_physics(model, nsim: int, nthread: Optional[int] = None, fields: Sequence[str] = (),
                 cfrc_ext: bool = False, backend: Optional[str] = None):
    """``BatchPhysics`` when ``mujoco.batch`` exists (or ``backend="batch"``), else ``LoopPhysics``
    (or ``backend="loop"``)."""
    if backend not in (None, "batch", "loop"):
        raise ValueError(f"physics: expected None, 'batch' or 'loop', got {backend!r}")
    if backend == "batch" and not has_batch():
        raise ValueError("physics='batch' needs mujoco>=4.0 (mujoco.batch); this is mujoco " + mujoco.__version__)
    if nthread is None:
        nthread = default_threads(nsim)
    elif not isinstance(nthread, (int, np.integer)) or isinstance(nthread, (bool, np.bool_)) or nthread < 1:
        raise ValueError(f"num_threads: expected None or a positive int, got {nthread!r}")
    nthread = int(nthread)
    if backend == "loop" or (backend is None and not has_batch()):
        return LoopPhysics(model, nsim, nthread, fields, cfrc_ext)
    return BatchPhysics(model, nsim, nthread, fields, cfrc_ext)
