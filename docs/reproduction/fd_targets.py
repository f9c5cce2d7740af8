"""How good are DDPPO's finite-difference targets at a given amount of data?

    python docs/reproduction/fd_targets.py RUN_DIR [--pools 1000,10000,100000] [--queries 256] [--k 1,10,25]

The gradient model of paper 003 learns its Jacobian from finite differences between replay-buffer
neighbours: for a query ``x = [s, a]`` and each of its ``k`` nearest neighbours ``x_i`` (searched
on ``x / std``, as fastrp's model fitter does), the direction is ``v_i = x_i - x`` and the target
``d_i = y_i - y`` with ``y = s' - s``. The loss asks ``J(x) v_i = d_i``. This script measures how
far those targets are from the true directional derivatives ``J_true(x) v_i`` (MuJoCo's Jacobian
of ``y`` at the query, ``[ds'/ds - I, ds'/da]``, central differences of the real step), for pools of
real transitions of the run's own (stochastic) policy of several sizes:

* ``target_err = sqrt(sum ||d_i - J_true v_i||^2 / sum ||J_true v_i||^2)`` over queries and
  neighbours (0: the targets are the true directional derivatives; 1: no better than zero),
* ``median per-pair error``: the median over pairs of ``||d_i - J_true v_i|| / ||J_true v_i||``,
* ``share``: the fraction of ``sum ||d_i - J_true v_i||^2`` carried by the worst 5 % of the pairs,
* ``cosine``: the mean and median cosine between ``d_i`` and ``J_true v_i``,
* ``distance``: the median neighbour distance in the normalised input space.

A target error near or above 1 means the loss teaches the gradient model noise: neighbours are
too far apart for the first-order expansion (or straddle contacts). It needs MuJoCo and a run
directory with a checkpoint (its policy picks the states and actions).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("--pools", default="1000,10000,100000", help="pool sizes (transitions)")
    parser.add_argument("--queries", type=int, default=256)
    parser.add_argument("--k", default="10", help="neighbours per query (fastrp's fd_k; paper 003's n), a list")
    parser.add_argument("--num-envs", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    pools = [int(p) for p in args.pools.split(",")]
    ks = [int(k) for k in args.k.split(",")]

    from fastrp.diagnostics.jacobian import collect_transitions
    from fastrp.diagnostics.run import RunError, load_run
    from fastrp.envs import dynamics_jacobians, make
    from fastrp.ops import fd_targets

    try:
        run = load_run(args.run_dir, device="cpu")
    except RunError as err:
        print(f"fd_targets.py: {err}", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    policy = run.agent.policy
    policy.eval()
    env = make(run.cfg.env, args.num_envs, seed=args.seed + 12345)
    env.reset()
    gen = torch.Generator().manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    largest = max(pools)
    # warm the envs up with the policy so that the pool holds the states it visits, then record
    collect_transitions(env, policy, 1, 100, gen, rng)
    held = collect_transitions(env, policy, largest, -(-largest // args.num_envs), gen, rng)
    obs, act, nxt = held.obs, held.actions, held.next_obs
    o = obs.shape[1]
    x_all = np.concatenate([obs, act], axis=1)
    y_all = nxt - obs
    print(f"{run.cfg.env} ({run.cfg.algo}, seed {run.cfg.seed}, checkpoint at {run.step} env steps), "
          f"{args.queries} queries")
    print("| pool | k | target_err | median per-pair error | share of the squared error in the worst 5 % of pairs "
          "| mean cosine | median cosine | median neighbour distance |")
    print("|---|---|---|---|---|---|---|---|")
    for n in pools:
        pick = rng.choice(largest, size=n, replace=False)
        x = torch.as_tensor(x_all[pick], dtype=torch.float64)
        y = torch.as_tensor(y_all[pick], dtype=torch.float64)
        q = torch.as_tensor(rng.choice(n, size=min(args.queries, n), replace=False), dtype=torch.int64)
        scale = x.std(dim=0).clamp_min(1e-6)
        jac = dynamics_jacobians(env, act[pick][q.numpy()], held.states[pick][q.numpy()])
        j_y = torch.as_tensor(np.concatenate([jac.d_obs - np.eye(o)[None], jac.d_action], axis=2))  # [Q, o, o + a]
        for k in ks:
            dirs, deltas, _ = fd_targets(x, y, q, k, scale=scale, backend="torch")
            true = torch.einsum("qij,qkj->qki", j_y, dirs)  # [Q, k, o]: J_true v_i
            err = (deltas - true).square().sum() / true.square().sum()
            cos = torch.nn.functional.cosine_similarity(deltas.flatten(0, 1), true.flatten(0, 1), dim=1)
            rel = (deltas - true).norm(dim=-1) / true.norm(dim=-1).clamp_min(1e-12)
            dist = (dirs / scale).norm(dim=-1).median()
            sq = (deltas - true).square().sum(-1).flatten().sort(descending=True).values
            worst = sq[: max(1, len(sq) // 20)].sum() / sq.sum()
            print(f"| {n} | {k} | {err.sqrt().item():.2f} | {rel.median().item():.2f} | {worst.item():.2f} | "
                  f"{cos.mean().item():.2f} | {cos.median().item():.2f} | {dist.item():.2f} |")
    # the models' state Jacobians at held-out transitions of the same policy, per transition
    from fastrp.diagnostics.jacobian import input_jacobians, state_columns

    q = rng.choice(largest, size=min(args.queries, largest), replace=False)
    jac = dynamics_jacobians(env, act[q], held.states[q])
    cols = np.flatnonzero(state_columns(env))
    true = torch.as_tensor(jac.d_obs[:, :, cols])
    den = true.flatten(1).norm(dim=1)
    obs_q = torch.as_tensor(obs[q], dtype=torch.float32)
    act_q = torch.as_tensor(act[q], dtype=torch.float32)
    rel = lambda j: (j - true).flatten(1).norm(dim=1) / den  # noqa: E731
    rows = {"identity (ds'/ds = I)": rel(torch.eye(o, dtype=torch.float64)[:, cols].expand_as(true))}
    for name in ("model", "grad_model"):
        model = getattr(run.agent, name, None)
        if model is None:
            continue
        model.eval()
        per = []
        for m in model.elite_idx.tolist():
            members = torch.full((obs_q.shape[0],), int(m), dtype=torch.int64)
            _, d_obs, _ = input_jacobians(
                lambda s, a, members=members: model.predict(s, a, members=members, deterministic=True)[0], obs_q, act_q)
            per.append(rel(d_obs.double()[:, :, cols]))
        rows["prediction model" if name == "model" else "gradient model"] = torch.stack(per).mean(0)
    print(f"\nRelative error ||J - J_true||_F / ||J_true||_F of ds'/ds at {len(q)} transitions of the policy "
          "(models: each transition's error averaged over the elites, as in diagnostics.csv):")
    print("| Jacobian | mean | median | 90th percentile |")
    print("|---|---|---|---|")
    for name, err in rows.items():
        print(f"| {name} | {err.mean().item():.2f} | {err.median().item():.2f} | {err.quantile(0.9).item():.2f} |")
    env.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
