"""fastrp.envs against gymnasium's own MuJoCo v5 envs: stepping, autoreset, seeding, set_state,
termination functions, true-dynamics Jacobians and check_env."""

import warnings

import numpy as np
import pytest
import torch

mujoco = pytest.importorskip("mujoco", reason="needs the simulator (the GPU machine has none)")
gymnasium = pytest.importorskip("gymnasium", reason="needs the simulator (the GPU machine has none)")
from gymnasium.utils.env_checker import check_env  # noqa: E402

from fastrp.envs import (
    ENV_IDS,
    ENV_NAMES,
    MujocoVectorEnv,
    dynamics_jacobians,
    make,
    make_single,
    termination_fn,
)
from fastrp.envs._physics import has_batch, mujoco_warnings

pytestmark = pytest.mark.filterwarnings("ignore:.*settotalmass.*")

OBS_DIMS = {"InvertedPendulum": 4, "Hopper": 11, "Walker2d": 17, "HalfCheetah": 17, "Ant": 27, "Humanoid": 45}
FULL_OBS_DIMS = {"Ant": 105, "Humanoid": 348}
TERMINATING = ("InvertedPendulum", "Hopper", "Walker2d", "Ant", "Humanoid")
PHYSICS = ["batch", "loop"] if has_batch() else ["loop"]
CASES = [(name, False) for name in ENV_NAMES] + [("Ant", True), ("Humanoid", True)]


@pytest.fixture(autouse=True)
def _in_tmp_dir(tmp_path, monkeypatch):
    """gymnasium's own reference envs leave MuJoCo's default warning handler in place, which appends
    to MUJOCO_LOG.TXT in the working directory: keep that file out of the checkout."""
    monkeypatch.chdir(tmp_path)


def gym_envs(env: MujocoVectorEnv, n: int, **kwargs):
    """gymnasium.make copies configured like ``env`` (same kwargs and time limit)."""
    return [gymnasium.make(env.task.env_id, max_episode_steps=env.max_episode_steps, **env.task.kwargs, **kwargs)
            for _ in range(n)]


def assert_reward_equal(reward, ref):
    """Rewards are computed in the same operation order as gymnasium's (bit-identical with the
    numpy used here); the tolerance only absorbs a numpy build that reduces in another order."""
    np.testing.assert_allclose(reward, ref, rtol=1e-12, atol=1e-12)


def step_like_gymnasium(env, refs, a):
    """``env.step(a)`` and ``refs[i].step(a[i])``: next_obs, reward, terminated and truncated must
    be equal.  Returns env.step's result and the observations the references reached."""
    out = env.step(a)
    _, reward, terminated, truncated, info = out
    reached = []
    for i, ref in enumerate(refs):
        r_obs, r_reward, r_term, r_trunc, _ = ref.step(a[i])
        np.testing.assert_array_equal(info["next_obs"][i], r_obs)
        assert_reward_equal(reward[i], r_reward)
        assert (terminated[i], truncated[i]) == (r_term, r_trunc)
        reached.append(r_obs)
    return out, reached


def random_actions(rng, env, n=None, scale=1.0):
    n = env.num_envs if n is None else n
    return (scale * rng.uniform(-1, 1, (n, env.act_dim))).astype(np.float32)


def unhealthy_qpos(name: str, qpos: np.ndarray) -> np.ndarray:
    """A qpos the task's healthy check rejects (z or pole angle out of range)."""
    q = qpos.copy()
    if name == "InvertedPendulum":
        q[1] = 0.5
    elif name in ("Hopper", "Walker2d"):
        q[1] = 0.1
    else:
        q[2] = 3.0
    return q


# ---- make ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ENV_NAMES)
def test_make_names_and_ids(name):
    env = make(name, num_envs=3)
    assert isinstance(env, gymnasium.vector.VectorEnv)
    assert env.name == name and env.num_envs == 3
    assert env.single_observation_space.shape == (OBS_DIMS[name],)
    assert env.observation_space.shape == (3, OBS_DIMS[name])
    by_id = make(ENV_IDS[ENV_NAMES.index(name)], num_envs=2)
    assert by_id.name == name and by_id.obs_dim == OBS_DIMS[name]
    if name in FULL_OBS_DIMS:
        assert make(name, full_obs=True).obs_dim == FULL_OBS_DIMS[name]
        assert make(name, include_cfrc_ext_in_observation=True).obs_dim > OBS_DIMS[name]
    obs, _ = env.reset(seed=0)
    assert obs.shape == (3, OBS_DIMS[name]) and obs.dtype == np.float64


def test_make_drops_only_the_settotalmass_warning(capfd):
    """MuJoCo >= 4.0 warns about the deprecated ``settotalmass`` attribute of gymnasium's own XML
    on every construction: make() drops that message, restores the warning handler afterwards and
    forwards any other MuJoCo warning."""
    before = mujoco.get_mju_user_warning()
    make("HalfCheetah", num_envs=1)
    out, err = capfd.readouterr()
    assert "settotalmass" not in out + err
    assert mujoco.get_mju_user_warning() is before
    with mujoco_warnings(), pytest.warns(RuntimeWarning, match="MuJoCo: other"):
        mujoco.get_mju_user_warning()("other warning")


def test_make_errors():
    with pytest.raises(ValueError, match="HalfCheetah.*Humanoid-v5"):
        make("Cheetah")
    with pytest.raises(ValueError, match="unknown environment"):
        make("HalfCheetah-v4")
    with pytest.raises(ValueError, match="num_envs"):
        make("Hopper", num_envs=0)
    with pytest.raises(ValueError, match="kwargs: not_a_kwarg"):
        make("Hopper", not_a_kwarg=1)
    with pytest.raises(ValueError, match="max_episode_steps"):
        make("Hopper", max_episode_steps=0)
    with pytest.raises(ValueError, match="physics"):
        make("Hopper", physics="gpu")
    env = make("Hopper", num_envs=2)
    with pytest.raises(RuntimeError, match="reset"):
        env.step(np.zeros((2, 3)))
    env.reset(seed=0)
    with pytest.raises(ValueError, match=r"actions: expected shape \(2, 3\)"):
        env.step(np.zeros((3, 3)))
    with pytest.raises(ValueError, match="actions: expected a float"):
        env.step(np.zeros((2, 3), dtype=np.int64))
    with pytest.raises(ValueError, match=r"qpos: expected shape \(1, 6\)"):
        env.set_state(np.zeros((1, 5)), np.zeros((1, 6)), env_ids=[1])
    with pytest.raises(ValueError, match="env_ids"):
        env.set_state(np.zeros((1, 6)), np.zeros((1, 6)), env_ids=[2])
    with pytest.raises(ValueError, match="states"):
        dynamics_jacobians(env, np.zeros((2, 3)), states=np.zeros((2, 4)))
    with pytest.raises(ValueError, match="actions"):
        dynamics_jacobians(env, np.zeros((1, 3)))
    with pytest.raises(ValueError, match="unknown environment"):
        termination_fn("Pendulum")


@pytest.mark.parametrize("name,kwargs,match", [
    ("HalfCheetah", {"ctrl_cost_weight": "abc"}, "ctrl_cost_weight: expected a finite float"),
    ("HalfCheetah", {"ctrl_cost_weight": float("nan")}, "ctrl_cost_weight: expected a finite float"),
    ("Hopper", {"healthy_reward": float("inf")}, "healthy_reward: expected a finite float"),
    ("Hopper", {"forward_reward_weight": True}, "forward_reward_weight: expected a finite float"),
    ("Hopper", {"terminate_when_unhealthy": "no"}, "terminate_when_unhealthy: expected a bool"),
    ("Hopper", {"healthy_z_range": 0.7}, r"healthy_z_range: expected a \(low, high\) pair"),
    ("Hopper", {"healthy_z_range": (0.7,)}, r"healthy_z_range: expected a \(low, high\) pair"),
    ("Hopper", {"healthy_z_range": (2.0, 1.0)}, "healthy_z_range: .*low <= high"),
    ("Hopper", {"healthy_z_range": (float("nan"), 1.0)}, "healthy_z_range: .*not NaN"),
    ("Walker2d", {"frame_skip": 0}, "frame_skip: expected a positive int"),
    ("Walker2d", {"frame_skip": 2.5}, "frame_skip: expected a positive int"),
    ("Ant", {"main_body": 1.0}, "main_body: expected an int index or a str name"),
    ("Ant", {"main_body": "nobody"}, "main_body: expected a body name or index"),
    ("InvertedPendulum", {"xml_file": "no_such_model.xml"}, "xml_file: expected an existing MuJoCo XML file"),
    ("Humanoid", {"full_obs": "yes"}, "full_obs: expected a bool"),
])
def test_make_rejects_bad_task_kwarg_values(name, kwargs, match):
    """Values gymnasium's constructor takes and then fails on (in numpy, at the first step) or
    misreads are refused by make and by termination_fn, in one line naming the argument."""
    with pytest.raises(ValueError, match=match) as info:
        make(name, **kwargs)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match=match):
        termination_fn(name, **kwargs)


def test_make_accepts_task_kwargs_gymnasium_accepts():
    """numpy scalars, an int for a float and infinite range ends (as in gymnasium's own defaults)
    pass, and act exactly as in gymnasium."""
    kwargs = {"ctrl_cost_weight": np.float32(0.01), "forward_reward_weight": 2,
              "healthy_z_range": (0.5, float("inf")), "terminate_when_unhealthy": np.bool_(True)}
    env = make("Hopper", 1, seed=0, **kwargs)
    ref = gymnasium.make("Hopper-v5", **kwargs)
    np.testing.assert_array_equal(env.reset()[0][0], ref.reset(seed=0)[0])
    a = np.full((1, 3), 0.5, dtype=np.float32)
    _, reward, _, _, info = env.step(a)
    r_obs, r_reward, _, _, _ = ref.step(a[0])
    np.testing.assert_array_equal(info["next_obs"][0], r_obs)
    assert_reward_equal(reward[0], r_reward)
    assert make("Ant", main_body="torso").obs_dim == OBS_DIMS["Ant"]


@pytest.mark.parametrize("num_threads", [0, 1.5, "2", True])
def test_make_rejects_bad_num_threads(num_threads):
    with pytest.raises(ValueError, match="num_threads: expected None or a positive int"):
        make("Hopper", 2, num_threads=num_threads)


@pytest.mark.parametrize("physics", PHYSICS)
def test_mujoco_warnings_become_python_warnings_not_a_log_file(physics, tmp_path, monkeypatch):
    """MuJoCo's default warning handler appends to MUJOCO_LOG.TXT in the working directory; the
    env's MuJoCo calls route its warnings to Python instead (or to the user's own handler) and
    leave the handler as it was."""
    monkeypatch.chdir(tmp_path)
    before = mujoco.get_mju_user_warning()
    env = make("HalfCheetah", 2, seed=0, physics=physics)
    env.reset()
    nan_action = np.zeros((2, 6))
    nan_action[1, 0] = np.nan
    with pytest.warns(RuntimeWarning, match="MuJoCo: Nan, Inf or huge value in CTRL"):
        env.step(nan_action)
    qvel = env.qvel
    qvel[0] = 1e10  # accepted by set_state, too fast for the integrator
    env.set_state(env.qpos, qvel)
    with pytest.warns(RuntimeWarning, match="MuJoCo: Nan, Inf or huge value in QACC"):
        env.step(np.zeros((2, 6)))
    states = env.get_state()
    states[:, 1 + env.model.nq] = 1e10  # time, qpos, then qvel
    with pytest.warns(RuntimeWarning, match="MuJoCo: Nan, Inf or huge value in Q"):
        dynamics_jacobians(env, np.zeros((2, 6)), states=states)
    assert mujoco.get_mju_user_warning() is before
    assert list(tmp_path.iterdir()) == []
    received = []
    env = make("HalfCheetah", 2, seed=0, physics=physics)  # MuJoCo warns once per simulation until a reset
    env.reset()
    mujoco.set_mju_user_warning(received.append)
    try:
        env.step(nan_action)
    finally:
        mujoco.set_mju_user_warning(before)
    assert any("CTRL" in message for message in received)
    assert list(tmp_path.iterdir()) == []


# ---- equality with gymnasium -------------------------------------------------------------------
@pytest.mark.parametrize("physics", PHYSICS)
@pytest.mark.parametrize("name,full_obs", CASES)
def test_step_matches_gymnasium(name, full_obs, physics):
    """obs, reward, terminated, truncated and the autoreset observations equal gymnasium's, bit
    for bit, over episodes that end by termination and by the time limit."""
    n, seed = 3, 5
    env = make(name, n, seed=seed, full_obs=full_obs, max_episode_steps=25, physics=physics)
    refs = gym_envs(env, n)
    obs, _ = env.reset()
    np.testing.assert_array_equal(obs, np.stack([r.reset(seed=seed + i)[0] for i, r in enumerate(refs)]))
    rng = np.random.default_rng(0)
    ends = {"terminated": 0, "truncated": 0}
    for _ in range(60):
        a = random_actions(rng, env)
        a[0] *= 0.05  # env 0 acts gently and reaches the time limit
        (obs, _, terminated, truncated, info), reached = step_like_gymnasium(env, refs, a)
        for i, ref in enumerate(refs):
            r_obs = reached[i]
            if terminated[i] or truncated[i]:
                ends["terminated"] += terminated[i]
                ends["truncated"] += truncated[i]
                np.testing.assert_array_equal(info["final_obs"][i], r_obs)
                r_obs, _ = ref.reset()
            np.testing.assert_array_equal(obs[i], r_obs)
    assert ends["truncated"] > 0
    if name in ("InvertedPendulum", "Hopper", "Walker2d", "Humanoid"):
        assert ends["terminated"] > 0


@pytest.mark.parametrize("name,full_obs", CASES)
def test_set_state_matches_gymnasium(name, full_obs):
    """set_state then step equals gymnasium's set_state then step, also into unhealthy states;
    get_state rows are MuJoCo's mjSTATE_INTEGRATION states."""
    n = 2
    env = make(name, n, seed=1, full_obs=full_obs)
    refs = gym_envs(env, n)
    env.reset()
    for i, ref in enumerate(refs):
        ref.reset(seed=1 + i)
    rng = np.random.default_rng(1)
    for _ in range(3):
        a = random_actions(rng, env, scale=0.3)
        env.step(a)
        for i, ref in enumerate(refs):
            ref.step(a[i])
    raw = [ref.unwrapped for ref in refs]
    for i, r in enumerate(raw):
        row = np.empty(mujoco.mj_stateSize(r.model, env.state_spec))
        mujoco.mj_getState(r.model, r.data, row, env.state_spec)
        np.testing.assert_array_equal(env.get_state()[i], row)
    qpos = np.stack([r.data.qpos for r in raw])
    qvel = np.stack([r.data.qvel for r in raw]) * 1.5
    qpos[1] = unhealthy_qpos(name, qpos[1])
    new_obs = env.set_state(qpos, qvel)
    for i, r in enumerate(raw):
        r.set_state(qpos[i], qvel[i])
        np.testing.assert_array_equal(new_obs[i], r._get_obs())
    np.testing.assert_array_equal(env.obs, new_obs)
    a = random_actions(rng, env, scale=0.3)
    _, reward, terminated, _, info = env.step(a)
    for i, ref in enumerate(refs):
        r_obs, r_reward, r_term, _, _ = ref.step(a[i])
        np.testing.assert_array_equal(info["next_obs"][i], r_obs)
        assert_reward_equal(reward[i], r_reward)
        assert terminated[i] == r_term
    if name in TERMINATING:
        assert terminated[1]


def test_set_state_subset_keeps_others():
    env = make("Hopper", 3, seed=0)
    obs, _ = env.reset()
    qpos, qvel = env.qpos, env.qvel
    new = env.set_state(qpos[1:2] + 0.01, qvel[1:2], env_ids=[1])
    np.testing.assert_array_equal(env.obs[[0, 2]], obs[[0, 2]])
    np.testing.assert_array_equal(env.obs[1], new[0])
    np.testing.assert_array_equal(env.qpos[1], qpos[1] + 0.01)


@pytest.mark.parametrize("physics", PHYSICS)
@pytest.mark.parametrize("arg,value", [("qpos", np.nan), ("qpos", np.inf), ("qvel", -np.inf), ("qvel", np.nan),
                                       ("qpos", -2e10), ("qvel", 1e11)])
def test_set_state_rejects_values_mujoco_would_reset(physics, arg, value):
    """MuJoCo replaces a simulation holding NaN, inf or |x| > 1e10 (mjMAXVAL) by its default state,
    silently (batch physics at once, loop physics at the next step): set_state refuses such
    values in one line naming the argument and changes nothing."""
    env = make("Hopper", 2, seed=0, physics=physics)
    env.reset()
    state, obs = env.get_state(), env.obs
    qpos, qvel = env.qpos, env.qvel
    (qpos if arg == "qpos" else qvel)[1, 2] = value
    with pytest.raises(ValueError, match=rf"^{arg}: expected finite values within \+-1e\+10 .*index \[1, 2\]") as info:
        env.set_state(qpos, qvel)
    assert "\n" not in str(info.value)
    np.testing.assert_array_equal(env.get_state(), state)
    np.testing.assert_array_equal(env.obs, obs)
    single = make_single("Hopper", seed=0, physics=physics)
    single.reset()
    with pytest.raises(ValueError, match=f"^{arg}: expected finite"):
        single.set_state(qpos[1], qvel[1])
    qvel = env.qvel
    qvel[1, 2] = 1e10  # the largest magnitude MuJoCo keeps
    env.set_state(env.qpos, qvel)
    assert env.qvel[1, 2] == 1e10


def test_set_state_rows_follow_env_ids_order():
    env = make("Hopper", 3, seed=0)
    env.reset()
    qpos, qvel = env.qpos, env.qvel
    new = env.set_state(qpos[[2, 0]] + np.array([[0.01], [0.02]]), qvel[[2, 0]], env_ids=[2, 0])
    np.testing.assert_array_equal(env.qpos[2], qpos[2] + 0.01)
    np.testing.assert_array_equal(env.qpos[0], qpos[0] + 0.02)
    np.testing.assert_array_equal(env.qpos[1], qpos[1])
    np.testing.assert_array_equal(new, env.obs[[2, 0]])


# ---- autoreset and seeding ---------------------------------------------------------------------
@pytest.mark.parametrize("name", ["HalfCheetah", "InvertedPendulum"])
def test_autoreset_returns_true_final_obs(name):
    n = 4
    env = make(name, n, seed=2, max_episode_steps=8)
    assert str(env.metadata["autoreset_mode"]) in ("AutoresetMode.SAME_STEP", "SameStep")
    env.reset()
    rng = np.random.default_rng(2)
    finished = 0
    for _ in range(16):
        before = env.obs
        a = random_actions(rng, env)
        tr = env.step_transition(a)
        np.testing.assert_array_equal(tr.obs, before)
        np.testing.assert_array_equal(tr.action, a)
        done = tr.terminated | tr.truncated
        now = env.obs
        np.testing.assert_array_equal(now[~done], tr.next_obs[~done])
        for i in np.flatnonzero(done):
            finished += 1
            # the transition keeps the reached observation; the env continues from a reset one
            assert not np.array_equal(tr.next_obs[i], now[i])
    assert finished >= n
    ref = gymnasium.make(env.task.env_id, max_episode_steps=8)
    ref.reset(seed=2)
    env2 = make(name, 1, seed=2, max_episode_steps=8)
    env2.reset()
    rng = np.random.default_rng(3)
    for _ in range(12):
        a = random_actions(rng, env2)
        obs, _, term, trunc, info = env2.step(a)
        r_obs, _, r_term, r_trunc, _ = ref.step(a[0])
        np.testing.assert_array_equal(info["next_obs"][0], r_obs)
        if r_term or r_trunc:
            assert info["_final_obs"][0] and info["_episode"][0]
            np.testing.assert_array_equal(info["final_obs"][0], r_obs)
            assert info["episode"]["l"][0] >= 1
            r_obs, _ = ref.reset()
        np.testing.assert_array_equal(obs[0], r_obs)


def test_seeding_is_reproducible():
    def rollout(seed, reset_seed=None):
        env = make("Walker2d", 3, seed=seed)
        obs, _ = env.reset(seed=reset_seed)
        rng = np.random.default_rng(0)
        out = [obs]
        for _ in range(40):
            out.append(env.step(random_actions(rng, env))[0])
        return np.stack(out)

    a, b = rollout(7), rollout(7)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, rollout(None, reset_seed=7))
    assert not np.array_equal(a[0], rollout(8)[0])
    env = make("Walker2d", 3)
    o1, _ = env.reset(seed=[4, 5, 6])
    o2, _ = make("Walker2d", 3, seed=4).reset()
    np.testing.assert_array_equal(o1, o2)
    o3, _ = env.reset(seed=4)
    np.testing.assert_array_equal(o3, o2)
    env.reset(options={"reset_mask": np.array([False, True, False])})


@pytest.mark.parametrize("seed", [-1, 1.5, "3", True, np.float64(2.0), np.array(4), [0, -1, 2], [0, 1.5, 2], [0, 1],
                                  [[0, 1, 2]], [0, [1, 2], 3], "abc"])
def test_reset_rejects_bad_seeds(seed):
    """A seed that is not None, a non-negative int or a list of one per env is refused in one line
    naming it (gymnasium's seeding would raise its own error type, or list() a TypeError), and
    nothing is reset."""
    env = make("Hopper", 3, seed=0)
    env.reset()
    env.step(np.full((3, 3), 0.1))
    obs = env.obs
    with pytest.raises(ValueError, match=r"^seed(\[\d\])?: expected") as info:
        env.reset(seed=seed)
    assert "\n" not in str(info.value)
    np.testing.assert_array_equal(env.obs, obs)
    with pytest.raises(ValueError, match=r"^seed: expected"):
        make_single("Hopper").reset(seed=seed)
    if not isinstance(seed, list):
        with pytest.raises(ValueError, match=r"^seed: expected"):
            make("Hopper", 3, seed=seed)


def test_reset_accepts_numpy_integer_seeds():
    env = make("Walker2d", 3)
    ref, _ = env.reset(seed=4)
    for seed in (np.int64(4), np.uint32(4), np.array([4, 5, 6]), [np.int32(4), 5, np.uint8(6)], (4, 5, 6)):
        np.testing.assert_array_equal(env.reset(seed=seed)[0], ref)
    np.testing.assert_array_equal(make("Walker2d", 3, seed=np.int64(4)).reset()[0], ref)
    np.testing.assert_array_equal(make_single("Walker2d").reset(seed=np.int16(4))[0], ref[0])
    obs, _ = env.reset(seed=[None, 5, 6])  # None: fresh entropy for that env
    np.testing.assert_array_equal(obs[1:], ref[1:])


def test_reset_envs_continues_each_envs_generator():
    """reset_envs resets the chosen envs as gymnasium's unseeded env.reset() does after the same
    history (the same generator stream), restarts their episode clocks and returns, and leaves the
    other envs alone; a state_dict taken before it resets the same way."""
    n, seed, limit = 3, 4, 6
    env = make("Hopper", n, seed=seed, max_episode_steps=limit)
    refs = gym_envs(env, n)
    env.reset()
    for i, ref in enumerate(refs):
        ref.reset(seed=seed + i)
    rng = np.random.default_rng(0)
    for _ in range(3):
        step_like_gymnasium(env, refs, random_actions(rng, env, scale=0.1))
    saved = env.state_dict()
    obs = env.obs
    fresh = env.reset_envs([2, 0])
    np.testing.assert_array_equal(fresh, np.stack([refs[2].reset()[0], refs[0].reset()[0]]))
    np.testing.assert_array_equal(env.obs[[2, 0]], fresh)
    np.testing.assert_array_equal(env.obs[1], obs[1])
    twin = make("Hopper", n, seed=99, max_episode_steps=limit)
    twin.load_state_dict(saved)
    np.testing.assert_array_equal(twin.reset_envs(np.array([True, False, True])), fresh[::-1])
    ended = {}
    for t in range(limit):
        (_, _, terminated, truncated, info), _ = step_like_gymnasium(env, refs, random_actions(rng, env, scale=0.1))
        for i, ref in enumerate(refs):
            if terminated[i] or truncated[i]:
                ended[i] = (t, int(info["episode"]["l"][i]))
                ref.reset()
    # env 1 reaches the limit 3 steps on; envs 0 and 2 restarted their clocks at reset_envs
    assert ended == {1: (2, limit), 0: (limit - 1, limit), 2: (limit - 1, limit)}
    assert env.reset_envs([]).shape == (0, env.obs_dim)
    with pytest.raises(ValueError, match="env_ids"):
        env.reset_envs([3])
    with pytest.raises(ValueError, match="env_ids"):
        env.reset_envs([1, 1])
    with pytest.raises(RuntimeError, match="reset"):
        make("Hopper", 2).reset_envs([0])


# ---- non-finite actions and unstable states ---------------------------------------------------
@pytest.mark.filterwarnings("ignore:.*reward is a NaN value")  # gymnasium's env checker
@pytest.mark.parametrize("physics", PHYSICS)
def test_nan_action_gives_nan_reward_and_finite_next_obs_as_in_gymnasium(physics):
    """A NaN action (a policy that emitted NaN): MuJoCo warns, zeroes that simulation's controls
    and steps on, so next_obs is the zero-control step -- finite -- while the reward, whose control
    cost squares the action, is NaN; the transition keeps the NaN action.  All as gymnasium's
    env.step.  This is how a non-finite transition comes out of the public API."""
    env = make("HalfCheetah", 2, seed=3, physics=physics)
    refs = gym_envs(env, 2)
    env.reset()
    for i, ref in enumerate(refs):
        ref.reset(seed=3 + i)
    a = random_actions(np.random.default_rng(0), env)
    a[1, 2] = np.nan
    with pytest.warns(RuntimeWarning, match="MuJoCo: Nan, Inf or huge value in CTRL"):
        tr = env.step_transition(a)
    with mujoco_warnings(), pytest.warns(RuntimeWarning, match="CTRL"):
        ref_out = [ref.step(a[i]) for i, ref in enumerate(refs)]
    assert np.isnan(tr.action[1, 2]) and np.isnan(tr.reward[1]) and np.isnan(ref_out[1][1])
    assert np.isfinite(tr.obs).all() and np.isfinite(tr.next_obs).all() and np.isfinite(tr.reward[0])
    for i in range(2):
        np.testing.assert_array_equal(tr.next_obs[i], ref_out[i][0])
    assert_reward_equal(tr.reward[0], ref_out[0][1])
    assert not (tr.terminated.any() or tr.truncated.any())
    twin = make("HalfCheetah", 2, seed=3, physics=physics)
    twin.reset()
    zero = a.copy()
    zero[1] = 0.0
    np.testing.assert_array_equal(twin.step_transition(zero).next_obs, tr.next_obs)


@pytest.mark.parametrize("physics", PHYSICS)
def test_unstable_state_is_reset_by_mujoco_within_the_step_as_in_gymnasium(physics):
    """A state MuJoCo cannot integrate (here qvel 1e10, the largest set_state accepts): mj_step
    warns, resets that simulation to the model's default state (qpos0, zero qvel, time 0) and
    finishes the step from there, as gymnasium's env.step does.  The transition is finite --
    next_obs and reward describe that jump, not the physics -- and the episode clock runs on."""
    env = make("Hopper", 2, seed=3, physics=physics, max_episode_steps=2)
    refs = gym_envs(env, 2)
    env.reset()
    for i, ref in enumerate(refs):
        ref.reset(seed=3 + i)
    qpos, qvel = env.qpos, env.qvel
    qvel[0] = 1e10
    env.set_state(qpos, qvel)
    for i, ref in enumerate(refs):
        ref.unwrapped.set_state(qpos[i], qvel[i])
    a = np.zeros((2, 3))
    for t in range(2):
        with pytest.warns(RuntimeWarning, match="MuJoCo: Nan, Inf or huge value in QACC") if t == 0 else \
                warnings.catch_warnings():
            tr = env.step_transition(a)
        with mujoco_warnings(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref_out = [ref.step(a[i]) for i, ref in enumerate(refs)]
        for i in range(2):
            np.testing.assert_array_equal(tr.next_obs[i], ref_out[i][0])
            assert_reward_equal(tr.reward[i], ref_out[i][1])
            assert (tr.terminated[i], tr.truncated[i]) == ref_out[i][2:4]
        assert all(np.isfinite(x).all() for x in tr[:4])
        if t == 0:  # the 1e10 velocity is gone: env 0 went on from rest
            assert np.abs(env.qvel[0]).max() < 1.0
    assert tr.truncated.all()  # both reached the 2-step limit: the reset inside the step kept the clock


# ---- termination functions ---------------------------------------------------------------------
@pytest.mark.parametrize("name", ENV_NAMES)
def test_termination_fn_matches_env(name):
    """On transitions of real rollouts (random actions, and states pushed out of the healthy
    range), the torch termination function equals the env's ``terminated`` exactly."""
    n = 16
    env = make(name, n, seed=0)
    fn = termination_fn(name)
    env.reset()
    rng = np.random.default_rng(0)
    obs, next_obs, acts, terms = [], [], [], []
    for t in range(120):
        if t % 30 == 29:  # push half the envs out of the healthy range
            qpos = env.qpos
            for i in range(0, n, 2):
                qpos[i] = unhealthy_qpos(name, qpos[i])
            env.set_state(qpos, env.qvel)
        a = random_actions(rng, env)
        tr = env.step_transition(a)
        obs.append(tr.obs), next_obs.append(tr.next_obs), acts.append(a), terms.append(tr.terminated)
    obs, next_obs, acts, terms = (np.concatenate(x) for x in (obs, next_obs, acts, terms))
    pred = fn(torch.from_numpy(obs), torch.from_numpy(acts), torch.from_numpy(next_obs))
    assert pred.dtype == torch.bool and pred.shape == (obs.shape[0],)
    np.testing.assert_array_equal(pred.numpy(), terms)
    if name in TERMINATING:
        assert 0 < terms.sum() < terms.size
    pred32 = fn(torch.from_numpy(obs).float(), torch.from_numpy(acts), torch.from_numpy(next_obs).float())
    mismatch = (pred32.numpy() != terms).mean()
    assert mismatch < 0.01  # float32 rounding can flip a state exactly at a range boundary
    # any leading batch shape
    pred3 = fn(torch.from_numpy(obs[:24]).view(4, 6, -1), torch.from_numpy(acts[:24]).view(4, 6, -1),
               torch.from_numpy(next_obs[:24]).view(4, 6, -1))
    np.testing.assert_array_equal(pred3.reshape(-1).numpy(), terms[:24])


@pytest.mark.parametrize("name,kwargs", [
    ("Hopper", {"terminate_when_unhealthy": False}),
    ("Walker2d", {"healthy_z_range": (0.5, 2.5)}),
    ("Hopper", {"exclude_current_positions_from_observation": False}),
    ("Ant", {"exclude_current_positions_from_observation": False, "healthy_z_range": (0.3, 0.9)}),
    ("Humanoid", {"full_obs": True}),
])
def test_termination_fn_follows_kwargs(name, kwargs):
    n = 8
    env = make(name, n, seed=1, **kwargs)
    fn = termination_fn(name, **kwargs)
    env.reset()
    rng = np.random.default_rng(1)
    for t in range(60):
        if t % 20 == 19:
            qpos = env.qpos
            for i in range(0, n, 2):
                qpos[i] = unhealthy_qpos(name, qpos[i])
            env.set_state(qpos, env.qvel)
        a = random_actions(rng, env)
        tr = env.step_transition(a)
        pred = fn(torch.from_numpy(tr.obs), torch.from_numpy(a), torch.from_numpy(tr.next_obs))
        np.testing.assert_array_equal(pred.numpy(), tr.terminated)


@pytest.mark.parametrize("name,kwargs,width", [
    ("InvertedPendulum", {}, 4), ("Hopper", {}, 11), ("HalfCheetah", {}, 17), ("Ant", {}, 27),
    ("Ant", {"full_obs": True}, 105), ("Humanoid", {}, 45),
    ("Hopper", {"exclude_current_positions_from_observation": False}, 12),
    ("Walker2d", {"terminate_when_unhealthy": False}, 17),
])
def test_termination_fn_rejects_wrong_observation_width(name, kwargs, width):
    """An observation of another width (another task, or another observation switch) is an error
    naming the argument and the width, not a silently wrong column."""
    fn = termination_fn(name, **kwargs)
    act = torch.zeros(5, 3)
    good = torch.zeros(5, width)
    assert fn(good, act, good).shape == (5,)
    for bad in (width - 1, width + 1):
        with pytest.raises(ValueError, match=rf"^next_obs: expected shape \[\.\.\., {width}\] \({name} ") as info:
            fn(good, act, torch.zeros(5, bad))
        assert "\n" not in str(info.value)
        with pytest.raises(ValueError, match=rf"^obs: expected shape \[\.\.\., {width}\]"):
            fn(torch.zeros(5, bad), act, good)
    with pytest.raises(ValueError, match=r"^obs: expected shape .*got \[\]"):
        fn(torch.zeros(()), act, good)


def test_termination_fn_compiles_into_one_graph():
    """The width check reads static shapes only: each function traces into a single graph
    (fullgraph=True refuses a host sync or a branch on tensor values) and equals eager; compiled
    without fullgraph, a wrong width still raises the ValueError."""
    import torch._dynamo

    torch._dynamo.reset()
    try:
        for name in ("Hopper", "Ant", "HalfCheetah", "InvertedPendulum"):
            fn = termination_fn(name)
            obs = torch.randn(64, OBS_DIMS[name], generator=torch.Generator().manual_seed(0))
            obs[:, 0] += 1.25
            act = torch.zeros(64, 3)
            compiled = torch.compile(fn, backend="eager", fullgraph=True)
            torch.testing.assert_close(compiled(obs, act, obs), fn(obs, act, obs))
        loose = torch.compile(termination_fn("Hopper"), backend="eager")
        with pytest.raises(ValueError, match="^next_obs: expected shape"):
            loose(torch.zeros(4, 11), torch.zeros(4, 3), torch.zeros(4, 12))
    finally:
        torch._dynamo.reset()


@pytest.mark.cuda
def test_termination_fn_cuda():
    fn = termination_fn("Hopper")
    next_obs = torch.randn(1000, 11, device="cuda")
    next_obs[:, 0] += 1.2
    out = fn(next_obs, torch.zeros(1000, 3, device="cuda"), next_obs)
    assert out.device.type == "cuda"
    torch.testing.assert_close(out.cpu(), fn(next_obs.cpu(), torch.zeros(1000, 3), next_obs.cpu()))


# ---- Jacobians ---------------------------------------------------------------------------------
def gym_step_fd(ref, state, action, kind, index, eps):
    """Central differences of gymnasium's env.step from full state ``state``, columns as in
    dynamics_jacobians: the qpos/qvel entry each obs entry reads, then the action entries."""
    model, data, spec = ref.model, ref.data, mujoco.mjtState.mjSTATE_INTEGRATION

    def f(row, a):
        mujoco.mj_setState(model, data, row, spec)
        return ref.step(a)[0]

    qpos_at = mujoco.mj_stateSize(model, mujoco.mjtState.mjSTATE_TIME)
    d_obs = np.zeros((len(kind), len(kind)))
    for j in np.flatnonzero(kind < 2):
        at = qpos_at + index[j] + (model.nq if kind[j] == 1 else 0)
        plus, minus = state.copy(), state.copy()
        plus[at] += eps
        minus[at] -= eps
        d_obs[:, j] = (f(plus, action) - f(minus, action)) / (2 * eps)
    d_act = np.zeros((len(kind), len(action)))
    for k in range(len(action)):
        plus, minus = action.copy(), action.copy()
        plus[k] += eps
        minus[k] -= eps
        d_act[:, k] = (f(state, plus) - f(state, minus)) / (2 * eps)
    return f(state, action), d_obs, d_act


@pytest.mark.parametrize("name,full_obs", CASES)
def test_jacobians_match_central_differences_of_env_step(name, full_obs):
    env = make(name, 2, seed=3, full_obs=full_obs)
    env.reset()
    rng = np.random.default_rng(3)
    for _ in range(4):
        env.step(random_actions(rng, env, scale=0.5))
    actions = rng.uniform(-0.5, 0.5, (2, env.act_dim))
    jac = dynamics_jacobians(env, actions, eps=1e-6, max_sims=200)  # small chunks: several launches
    assert jac.d_obs.shape == (2, env.obs_dim, env.obs_dim)
    assert jac.d_action.shape == (2, env.obs_dim, env.act_dim)
    ref = gymnasium.make(env.task.env_id, **env.task.kwargs).unwrapped
    ref.reset(seed=0)
    kind, index = env.task.obs_state_index()
    states = env.get_state()
    for b in range(2):
        next_obs, d_obs, d_act = gym_step_fd(ref, states[b], actions[b].copy(), kind, index, 1e-6)
        np.testing.assert_allclose(jac.next_obs[b], next_obs, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(jac.d_obs[b], d_obs, rtol=1e-7, atol=1e-6)
        np.testing.assert_allclose(jac.d_action[b], d_act, rtol=1e-7, atol=1e-6)
    assert not jac.d_obs[:, :, kind == 2].any()
    # the env itself was not disturbed
    np.testing.assert_array_equal(env.get_state(), states)


def test_jacobians_are_derivatives():
    """On the smooth InvertedPendulum the Jacobian predicts small finite steps to first order."""
    env = make("InvertedPendulum", 4, seed=0)
    env.reset()
    actions = np.random.default_rng(0).uniform(-0.5, 0.5, (4, 1))
    jac = dynamics_jacobians(env, actions)
    states = env.get_state()
    delta = np.array([1e-4, -2e-4, 1e-4, 3e-4])
    moved = states.copy()
    moved[:, 1:5] += delta  # qpos then qvel after the time entry
    jac2 = dynamics_jacobians(env, actions + 1e-4, states=moved)
    predicted = jac.next_obs + jac.d_obs @ delta + jac.d_action @ np.full(1, 1e-4)
    np.testing.assert_allclose(jac2.next_obs, predicted, atol=1e-6)
    coarse = dynamics_jacobians(env, actions, eps=1e-4)
    np.testing.assert_allclose(coarse.d_obs, jac.d_obs, rtol=1e-4, atol=1e-5)


def test_jacobians_reject_inputs_mujoco_would_not_simulate():
    """A NaN action (MuJoCo zeroes the controls), a state MuJoCo would reset, or an eps that is not
    a positive finite float would give silently wrong Jacobians: each is an error naming it."""
    env = make("Hopper", 2, seed=0)
    env.reset()
    states, actions = env.get_state(), np.zeros((2, 3))
    bad_actions = actions.copy()
    bad_actions[1, 0] = np.nan
    with pytest.raises(ValueError, match="^actions: expected finite values"):
        dynamics_jacobians(env, bad_actions)
    for entry, arg in ((1 + 2, "qpos"), (1 + env.model.nq + 1, "qvel")):  # time, qpos, qvel
        for value in (np.nan, np.inf, 2e10):
            bad = states.copy()
            bad[1, entry] = value
            with pytest.raises(ValueError, match=rf"^states \({arg} entries\): expected finite values"):
                dynamics_jacobians(env, actions, states=bad)
    for eps in (0.0, -1e-6, np.inf, np.nan):
        with pytest.raises(ValueError, match="^eps: expected a positive finite float"):
            dynamics_jacobians(env, actions, eps=eps)


@pytest.mark.skipif(not has_batch(), reason="needs mujoco.batch (mujoco>=4.0)")
@pytest.mark.parametrize("name,full_obs", [("Hopper", False), ("Ant", True)])
def test_jacobians_loop_physics_matches_batch(name, full_obs):
    envs = [make(name, 3, seed=1, full_obs=full_obs, physics=p) for p in ("batch", "loop")]
    actions = np.random.default_rng(0).uniform(-0.5, 0.5, (3, envs[0].act_dim))
    for env in envs:
        env.reset()
        for _ in range(3):
            env.step(actions)
    batch, loop = (dynamics_jacobians(env, actions, max_sims=300) for env in envs)
    for x, y in zip(batch, loop):
        np.testing.assert_array_equal(x, y)


# ---- gymnasium API -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ENV_NAMES)
def test_check_env_single(name):
    env = make_single(name, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check_env(env)
    obs, _ = env.reset(seed=1)
    ref = gymnasium.make(ENV_IDS[ENV_NAMES.index(name)], **env.unwrapped_vector.task.kwargs)
    np.testing.assert_array_equal(obs, ref.reset(seed=1)[0])
    a = env.action_space.sample()
    out, r_out = env.step(a), ref.step(a)
    np.testing.assert_array_equal(out[0], r_out[0])
    assert_reward_equal(out[1], r_out[1])
    assert out[2:4] == tuple(r_out[2:4])


def test_state_dict_round_trip_continues_exactly():
    a = make("Hopper", 3, seed=5)
    a.reset(seed=5)
    rng = np.random.default_rng(0)
    actions = rng.uniform(-1, 1, (60, 3, a.act_dim))
    for act in actions[:30]:
        a.step_transition(act)
    state = a.state_dict()
    b = make("Hopper", 3, seed=123)
    b.reset(seed=123)
    b.load_state_dict(state)
    for act in actions[30:]:  # episodes end and reset on the way: the generators must match too
        ta, tb = a.step_transition(act), b.step_transition(act)
        for x, y in zip(ta, tb):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    with pytest.raises(ValueError, match="state\\['sim'\\]"):
        c = make("HalfCheetah", 3, seed=0)
        c.reset(seed=0)
        c.load_state_dict(state)
    with pytest.raises(RuntimeError, match="first reset"):
        make("Hopper", 2).state_dict()


def _corrupt(state, key, value):
    bad = dict(state)
    if value is _MISSING:
        del bad[key]
    else:
        bad[key] = value
    return bad


_MISSING = object()


def test_load_state_dict_rejects_what_state_dict_cannot_give():
    """A key missing, an array of another shape or kind, generator states numpy cannot load or a
    non-finite position: one line naming the key, and the env is left exactly as it was."""
    src = make("Hopper", 3, seed=5)
    src.reset()
    for _ in range(4):
        src.step(np.full((3, 3), 0.2))
    state = src.state_dict()
    nan_sim = state["sim"].copy()
    nan_sim[2, 1 + 3] = np.nan  # time, then qpos: qpos[3] of env 2
    rngs = list(state["rngs"])
    cases = [
        ([state], r"^state: expected the dict"),
        *[(_corrupt(state, key, _MISSING), rf"^state: missing '{key}'")
          for key in ("sim", "obs", "elapsed", "returns", "needs_reset", "rngs")],
        (_corrupt(state, "obs", state["obs"][:, :10]), r"^state\['obs'\]: expected a float array of shape \(3, 11\)"),
        (_corrupt(state, "obs", state["obs"][:2]), r"^state\['obs'\]: expected a float array of shape \(3, 11\)"),
        (_corrupt(state, "sim", state["sim"][:, :-1]), r"^state\['sim'\]: expected a float array"),
        (_corrupt(state, "sim", nan_sim), r"^state\['sim'\]: expected finite qpos .* env 2"),
        (_corrupt(state, "elapsed", state["elapsed"].astype(float)), r"^state\['elapsed'\]: expected a int array"),
        (_corrupt(state, "returns", state["returns"][:2]), r"^state\['returns'\]: expected a float array of shape \(3,\)"),
        (_corrupt(state, "needs_reset", np.zeros(3, dtype=np.int64)), r"^state\['needs_reset'\]: expected a bool array"),
        (_corrupt(state, "rngs", rngs[:2]), r"^state\['rngs'\]: expected a list of 3 generator states"),
        (_corrupt(state, "rngs", None), r"^state\['rngs'\]: expected a list of 3"),
        (_corrupt(state, "rngs", [rngs[0], "x", rngs[2]]), r"^state\['rngs'\]\[1\]: expected a numpy bit generator state"),
        (_corrupt(state, "rngs", [rngs[0], rngs[1], {"bit_generator": "seed"}]), r"^state\['rngs'\]\[2\]"),
        (_corrupt(state, "rngs", [rngs[0], rngs[1], {**rngs[2], "state": 3}]), r"^state\['rngs'\]\[2\]"),
    ]
    dst = make("Hopper", 3, seed=1)
    dst.reset()
    dst.step(np.full((3, 3), -0.2))
    before = dst.state_dict()
    np_global = np.random.get_state()[1].copy()
    for bad, match in cases:
        with pytest.raises(ValueError, match=match) as info:
            dst.load_state_dict(bad)
        assert "\n" not in str(info.value)
        after = dst.state_dict()
        for key in ("sim", "obs", "elapsed", "returns", "needs_reset"):
            np.testing.assert_array_equal(after[key], before[key])
        assert after["rngs"] == before["rngs"]
    np.testing.assert_array_equal(np.random.get_state()[1], np_global)
    # never reset: load_state_dict alone restores everything, and the run continues exactly
    fresh = make("Hopper", 3)
    fresh.load_state_dict(state)
    actions = np.random.default_rng(1).uniform(-1, 1, (40, 3, 3))
    for act in actions:
        for x, y in zip(src.step_transition(act), fresh.step_transition(act)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
