"""Environment steps per second: fastrp.envs against gymnasium's SyncVectorEnv and AsyncVectorEnv.

    python bench/envs.py                       # HalfCheetah, 1/8/64/256 envs
    python bench/envs.py --env Humanoid --envs 8,64 --json bench/results/envs_humanoid.json

Each provider steps ``N`` copies of the task with uniform random actions (drawn before timing)
for about ``--seconds``; the measurement is repeated ``--repeats`` times, providers interleaved so
that a change in machine load hits them alike, and the median is reported.  ``vs sync`` is the
median over repeats of a provider's steps/s over SyncVectorEnv's in the same repeat.  ``cpu
us/step`` is the process CPU time per env step (all threads), a measure of the work that does not
depend on how busy the machine is; it is not reported for AsyncVectorEnv, whose workers are other
processes.  AsyncVectorEnv runs one process per env
(forked), so it is skipped above ``--async-max-envs``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import gymnasium  # noqa: E402
import mujoco  # noqa: E402
from common import cpu_name, fmt_num, format_table, parse_list  # noqa: E402

from fastrp.envs import make  # noqa: E402


def gym_vector(kind: str, env_id: str, num_envs: int, kwargs: dict):
    fns = [lambda: gymnasium.make(env_id, **kwargs) for _ in range(num_envs)]
    if kind == "sync":
        return gymnasium.vector.SyncVectorEnv(fns)
    return gymnasium.vector.AsyncVectorEnv(fns, context="fork")


def steps_per_second(env, actions: np.ndarray, seconds: float):
    """``(steps/s, CPU microseconds per env step)`` of ``env.step`` cycling through
    ``actions [T, N, act_dim]`` for about ``seconds``.  The CPU time is this process's (all its
    threads; an AsyncVectorEnv's workers are other processes and not included)."""
    n = actions.shape[1]
    for a in actions[:5]:
        env.step(a)
    calls = 0
    c0, t0 = time.process_time(), time.perf_counter()
    while True:
        env.step(actions[calls % len(actions)])
        calls += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds and calls >= 5:
            return calls * n / elapsed, (time.process_time() - c0) * 1e6 / (calls * n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--env", default="HalfCheetah", help="task name (fastrp.envs.ENV_NAMES)")
    ap.add_argument("--envs", default="1,8,64,256", help="comma-separated numbers of envs")
    ap.add_argument("--seconds", type=float, default=0.5, help="timed stepping per measurement")
    ap.add_argument("--repeats", type=int, default=5, help="measurements per provider (median reported)")
    ap.add_argument("--threads", type=int, default=None, help="fastrp stepping threads (default: all CPUs)")
    ap.add_argument("--async-max-envs", type=int, default=256, help="largest N run with AsyncVectorEnv")
    ap.add_argument("--json", default=None, help="write the results to this JSON file")
    args = ap.parse_args()
    warnings.filterwarnings("ignore", message=".*settotalmass.*")

    rows, results = [], []
    for n in parse_list(args.envs):
        fast = make(args.env, n, seed=0, num_threads=args.threads)
        env_id, kwargs = fast.task.env_id, fast.task.kwargs
        providers = {"fastrp": fast, "gym-sync": gym_vector("sync", env_id, n, kwargs)}
        if n <= args.async_max_envs:
            providers["gym-async"] = gym_vector("async", env_id, n, kwargs)
        rng = np.random.default_rng(0)
        low, high = fast.single_action_space.low, fast.single_action_space.high
        actions = rng.uniform(low, high, size=(64, n, fast.act_dim)).astype(np.float32)
        samples = {name: [] for name in providers}
        cpu_us = {name: [] for name in providers}
        for env in providers.values():
            env.reset(seed=0)
        for _ in range(args.repeats):
            for name, env in providers.items():
                sps, us = steps_per_second(env, actions, args.seconds)
                samples[name].append(sps)
                cpu_us[name].append(us)
        speed = {name: float(np.median(s)) for name, s in samples.items()}
        cpu = {name: None if name == "gym-async" else float(np.median(u)) for name, u in cpu_us.items()}
        # ratios of back-to-back measurements: robust to machine load that drifts between repeats
        ratio = {name: float(np.median(np.array(s) / np.array(samples["gym-sync"]))) for name, s in samples.items()}
        for env in providers.values():
            env.close()
        for name, value in speed.items():
            results.append({"env": args.env, "num_envs": n, "provider": name, "steps_per_s": value,
                            "samples": samples[name], "ratio_vs_sync": ratio[name], "cpu_us_per_step": cpu[name]})
            rows.append({"envs": str(n), "provider": name, "steps/s": fmt_num(value), "vs sync": f"{ratio[name]:.2f}x",
                         "cpu us/step": "-" if cpu[name] is None else f"{cpu[name]:.1f}"})
        print(f"{args.env} N={n}: " + ", ".join(f"{k} {fmt_num(v)}" for k, v in speed.items()), flush=True)

    threads = args.threads or os.cpu_count()
    load = os.getloadavg()
    print(f"\n{args.env}, env steps/s (median of {args.repeats}); cpu: {cpu_name()}, {os.cpu_count()} cores, "
          f"load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}")
    print(format_table(rows, ["envs", "provider", "steps/s", "vs sync", "cpu us/step"]))
    if args.json:
        out = {"cpu": cpu_name(), "cores": os.cpu_count(), "load_average": load, "python": platform.python_version(),
               "mujoco": mujoco.__version__, "gymnasium": gymnasium.__version__, "threads": threads,
               "command": " ".join([os.path.basename(sys.executable)] + sys.argv), "results": results}
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
            f.write("\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
