"""kNN benchmark: ``fastrp.ops.knn`` / ``fd_targets`` against what a user would otherwise write.

    python bench/knn.py                                   # CPU defaults, a few minutes
    python bench/knn.py --device cuda --n 1e4,1e5,1e6 --json bench/results/h200-knn.json

The workload is DDPPO's finite-difference targets: for Q query rows of a replay buffer of N
state-action points in d dimensions (23 / 35 / 62 = HalfCheetah / Ant / Humanoid state+action),
the k = 10 nearest other rows (self excluded).  Q = N is "every point of the buffer", Q = 256 one
minibatch.  Providers, in one process on the same data:

* ``fastrp``         ``fastrp.ops.knn(points[qidx], points, k, exclude=qidx)`` (auto backend)
* ``fastrp-fd``      ``fastrp.ops.fd_targets(inputs, outputs, qidx, k)``: the search plus the
                     gathered directions / deltas the gradient-model loss consumes
* ``torch-cdist``    chunked ``torch.cdist`` + ``topk`` (what one writes in PyTorch)
* ``scipy-kdtree``   ``scipy.spatial.cKDTree`` build + query with all CPU workers (``--threads``
                     when given), on CPU copies
                     of the data also when ``--device cuda`` (what DDPPO's code does); the build
                     is included, since the buffer changes between queries
* ``faiss-flat``     faiss ``IndexFlatL2`` (GPU index on CUDA when faiss has GPU support), when
                     faiss is importable

Every provider's distances are checked against a float64 brute force on a subset of queries
before it is timed; a provider that disagrees is reported as such and not timed.  Slow providers
are skipped per size when the cost extrapolated from their smaller sizes exceeds ``--budget``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

# d -> (env, obs_dim, act_dim): the state+action widths of the benchmark's three environments.
ENV_OF_DIM = {23: ("HalfCheetah", 17, 6), 35: ("Ant", 27, 8), 62: ("Humanoid", 45, 17)}
ALL_PROVIDERS = ("fastrp", "fastrp-fd", "torch-cdist", "scipy-kdtree", "faiss-flat")
CHECK_QUERIES = 128


def cdist_topk(queries: torch.Tensor, points: torch.Tensor, k: int, exclude: torch.Tensor, chunk_elems: int = 1 << 25):
    """k nearest rows of ``points`` for each query, self excluded, with chunked cdist + topk."""
    n = points.shape[0]
    rows = max(1, chunk_elems // n)
    dists, idxs = [], []
    for start in range(0, queries.shape[0], rows):
        d2 = torch.cdist(queries[start : start + rows], points).square_()
        ex = exclude[start : start + rows]
        d2[torch.arange(ex.shape[0], device=d2.device), ex] = float("inf")
        val, idx = torch.topk(d2, k, dim=1, largest=False, sorted=True)
        dists.append(val)
        idxs.append(idx)
    return torch.cat(dists), torch.cat(idxs)


def drop_self(dist2: np.ndarray, idx: np.ndarray, qidx: np.ndarray, k: int):
    """From k+1 neighbours that include the query itself, keep the k others (ascending)."""
    keep = idx != qidx[:, None]
    first_k = np.cumsum(keep, axis=1) <= k
    keep &= first_k
    return dist2[keep].reshape(-1, k), idx[keep].reshape(-1, k)


def exact_dist2(points: torch.Tensor, qidx: torch.Tensor, k: int, chunk: int = 1 << 16) -> torch.Tensor:
    """float64 brute-force k smallest squared distances (self excluded) for the given queries,
    chunked over the points (``|q|^2 + |p|^2 - 2 q.p`` in float64: exact to ~1e-14 here)."""
    p = points.double()
    q = p[qidx]
    qn = q.square().sum(-1, keepdim=True)
    best = torch.full((q.shape[0], 0), float("inf"), dtype=torch.float64, device=p.device)
    for start in range(0, p.shape[0], chunk):
        pc = p[start : start + chunk]
        d2 = (qn + pc.square().sum(-1) - 2.0 * q @ pc.T).clamp_min_(0.0)
        hit = (qidx >= start) & (qidx < start + pc.shape[0])
        d2[hit.nonzero()[:, 0], qidx[hit] - start] = float("inf")
        best = torch.cat([best, d2], 1).topk(min(k, best.shape[1] + d2.shape[1]), dim=1, largest=False, sorted=True).values
    return best


def make_providers(names, device, points, outputs, qidx, k, workers=-1):
    """Callables returning ``dist2`` (a float tensor or array, [Q, k]) for each available provider.

    Unavailable ones map to a string saying why."""
    providers = {}
    queries = points[qidx]
    for name in names:
        if name in ("fastrp", "fastrp-fd"):
            try:
                from fastrp.ops.knn import fd_targets, knn
            except Exception as exc:
                providers[name] = f"unavailable: {type(exc).__name__}: {exc}"
                continue
            if name == "fastrp":
                providers[name] = lambda: knn(queries, points, k, exclude=qidx)[0]
            else:
                providers[name] = lambda: _fd_dist2(fd_targets(points, outputs, qidx, k))
        elif name == "torch-cdist":
            chunk = 1 << (27 if device.type == "cuda" else 25)
            providers[name] = lambda: cdist_topk(queries, points, k, qidx, chunk)[0]
        elif name == "scipy-kdtree":  # on CPU copies of the data, also when device is CUDA
            try:
                from scipy.spatial import cKDTree
            except ImportError:
                providers[name] = "unavailable: scipy not installed"
                continue
            pts = points.cpu().numpy()
            qi = qidx.cpu().numpy()

            def kdtree(pts=pts, qi=qi, tree_cls=cKDTree):
                dist, idx = tree_cls(pts).query(pts[qi], k=k + 1, workers=workers)
                return drop_self(dist**2, idx, qi, k)[0]

            providers[name] = kdtree
        elif name == "faiss-flat":
            try:
                import faiss
            except ImportError:
                providers[name] = "unavailable: faiss not importable"
                continue
            providers[name] = _faiss_provider(faiss, device, points, qidx, k)
        else:
            providers[name] = f"unknown provider (choose from {', '.join(ALL_PROVIDERS)})"
    return providers


def _fd_dist2(result):
    directions = result[0]
    return directions.square().sum(-1)


def _faiss_provider(faiss, device, points, qidx, k):
    pts = points.cpu().numpy()
    qi = qidx.cpu().numpy()
    use_gpu = device.type == "cuda" and hasattr(faiss, "StandardGpuResources")
    res = faiss.StandardGpuResources() if use_gpu else None

    def run():
        index = faiss.IndexFlatL2(pts.shape[1])
        if use_gpu:
            index = faiss.index_cpu_to_gpu(res, torch.cuda.current_device(), index)
        index.add(pts)
        dist, idx = index.search(pts[qi], k + 1)
        return drop_self(dist, idx, qi, k)[0]

    return run


def load_data(kind: str, n: int, d: int, seed: int, device: torch.device):
    """``(inputs[N, d], outputs[N, o])`` float32 on ``device``: random normal data, or standardised
    state-action / (next-state change, reward) pairs from random-action rollouts of the env whose
    state+action width is ``d``."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "random":
        o = ENV_OF_DIM[d][1] + 1 if d in ENV_OF_DIM else d
        return torch.randn(n, d, generator=gen).to(device), torch.randn(n, o, generator=gen).to(device), "random normal"
    if d not in ENV_OF_DIM:
        raise SystemExit(f"--data env: d must be one of {sorted(ENV_OF_DIM)} (state+action width of an env), got {d}")
    env_name = ENV_OF_DIM[d][0]
    x, y, source = collect_transitions(env_name, n, seed)
    x = (x - x.mean(0)) / x.std(0).clamp_min(1e-6)
    return x.float().to(device), y.float().to(device), source


def collect_transitions(env_name: str, n: int, seed: int, num_envs: int = 64):
    """``n`` transitions of uniformly random actions from ``fastrp.envs.make`` (MuJoCo v5, MBPO
    observations): ``[s, a]`` and ``[s' - s, r]`` as float64 tensors."""
    from fastrp import envs

    env = envs.make(env_name, num_envs, seed)
    env.reset(seed=seed)
    rng = np.random.default_rng(seed)
    low, high = env.single_action_space.low, env.single_action_space.high
    xs, ys, count = [], [], 0
    while count < n:
        tr = env.step_transition(rng.uniform(low, high, size=(num_envs, env.act_dim)))
        xs.append(np.concatenate([tr.obs, tr.action], 1))
        ys.append(np.concatenate([tr.next_obs - tr.obs, tr.reward[:, None]], 1))
        count += num_envs
    env.close()
    x = torch.from_numpy(np.concatenate(xs)[:n]).double()
    y = torch.from_numpy(np.concatenate(ys)[:n]).double()
    return x, y, f"fastrp.envs {env_name} random-action rollouts ({num_envs} envs, standardised)"


def check(dist2, ref: torch.Tensor, rtol: float = 1e-3) -> float:
    """Largest error of a provider's first rows of ``dist2`` against the float64 brute force,
    relative to ``1 + |ref|``."""
    got = torch.as_tensor(np.asarray(dist2.cpu() if torch.is_tensor(dist2) else dist2))[: ref.shape[0]].double()
    if got.shape != ref.shape:
        return float("inf")
    return ((got - ref).abs() / (1 + ref.abs())).max().item()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--n", default=None, help="buffer sizes, comma separated (default: 1e4,1e5 on CPU, 1e4,1e5,1e6 on CUDA)")
    ap.add_argument("--d", default="23,35,62", help="point widths (23/35/62 = HalfCheetah/Ant/Humanoid state+action)")
    ap.add_argument("--q", default="256,N", help="query counts; 'N' means every point of the buffer")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--providers", default=",".join(ALL_PROVIDERS))
    ap.add_argument("--data", default="random", choices=["random", "env"])
    ap.add_argument("--budget", type=float, default=90.0, help="skip a provider at a size whose extrapolated time per call exceeds this many seconds")
    ap.add_argument("--time", type=float, default=1.0, help="seconds of repetitions per measurement")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write the results to this JSON file")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads, also the KD-tree's workers (default: torch's choice; all workers)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    device = common.pick_device(args.device)
    ns = common.parse_list(args.n or ("1e4,1e5,1e6" if device.type == "cuda" else "1e4,1e5"))
    ds = common.parse_list(args.d)
    names = [p.strip() for p in args.providers.split(",") if p.strip()]
    print(f"device: {common.device_name(device)}  torch {torch.__version__}  k={args.k}  data={args.data}")
    try:
        import fastrp

        print(f"fastrp compiled extension: {'yes' if fastrp.has_ext() else 'no'} (CUDA part: {'yes' if fastrp.has_cuda_ext() else 'no'})")
    except Exception as exc:
        print(f"fastrp import failed: {exc}")

    results, rows = [], []
    # provider -> [(q, n, cost units, seconds)]: the time of a new size is extrapolated (x N*Q*d)
    # from the measured size with the most queries (small Q under-uses the cores)
    history = {}
    for d in ds:
        for n in ns:
            inputs, outputs, source = load_data(args.data, n, d, args.seed, device)
            qs = sorted({n if q.strip() == "N" else min(n, int(float(q))) for q in args.q.split(",")})
            for q in qs:
                gen = torch.Generator().manual_seed(args.seed + q)
                qidx = torch.arange(n) if q == n else torch.randperm(n, generator=gen)[:q]
                qidx = qidx.to(device)
                ref = exact_dist2(inputs.cpu(), qidx[:CHECK_QUERIES].cpu(), args.k)
                providers = make_providers(names, device, inputs, outputs, qidx, args.k, workers=args.threads or -1)
                units = float(n) * q * d
                base_ms = {}
                for name in names:
                    entry = {"provider": name, "n": n, "d": d, "q": q, "k": args.k, "data": source}
                    fn = providers[name]
                    if isinstance(fn, str):
                        entry["status"] = fn
                    elif name in history and _predict(history[name], units) > args.budget:
                        entry["status"] = f"skipped (budget: ~{_predict(history[name], units):.0f} s)"
                    else:
                        entry.update(_run_provider(fn, ref, device, args.time))
                        if "median_ms" in entry:
                            history.setdefault(name, []).append((q, n, units, entry["median_ms"] / 1e3))
                            base_ms[name] = entry["median_ms"]
                    entry["load_avg_1min"] = common.load_average()
                    results.append(entry)
                for entry in results[-len(names):]:
                    rows.append(_row(entry, base_ms))
                print(common.format_table(rows[-len(names):], COLUMNS))
                print()
                if args.json:  # what is measured so far survives a run stopped by a time limit
                    common.write_json(args.json, device, results, quiet=True, complete=False, k=args.k, data=args.data)
    print(common.format_table(rows, COLUMNS))
    if args.json:
        common.write_json(args.json, device, results, complete=True, k=args.k, data=args.data)


COLUMNS = ["N", "d", "Q", "provider", "median ms", "p20 ms", "p80 ms", "queries/s", "vs torch-cdist", "fastrp faster by", "note"]


def _predict(measured, units) -> float:
    """Seconds per call at ``units = N*Q*d``, scaled from the measurement with the largest Q."""
    q, n, u, sec = max(measured)
    return sec * units / u


def _run_provider(fn, ref, device, target_s):
    try:
        t0 = time.perf_counter()
        out = fn()
        common.synchronize(device)
        first_s = time.perf_counter() - t0
        err = check(out, ref)
        if not err <= 1e-3:
            return {"status": f"disagrees with float64 brute force (rel. err {err:.2e}); not timed", "check_err": err}
        del out
        if first_s >= 4 * target_s and device.type == "cuda":
            # the first call may have compiled kernels: time a second one before deciding
            t0 = time.perf_counter()
            fn()
            common.synchronize(device)
            first_s = time.perf_counter() - t0
        # a call much slower than target_s is timed once (do_bench would make ~7 calls of it)
        timing = common.measure(fn, device, target_s=target_s) if first_s < 4 * target_s else {
            "median_ms": first_s * 1e3, "p20_ms": first_s * 1e3, "p80_ms": first_s * 1e3, "reps": 1}
        timing["check_err"] = err
        timing["status"] = "ok"
        return timing
    except Exception as exc:
        traceback.print_exc()
        return {"status": f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"}


def _row(entry, base_ms):
    row = {"N": common.fmt_num(entry["n"]), "d": str(entry["d"]), "Q": common.fmt_num(entry["q"]), "provider": entry["provider"]}
    if "median_ms" not in entry:
        row["note"] = entry["status"]
        return row
    med = entry["median_ms"]
    row.update({"median ms": common.fmt_ms(med), "p20 ms": common.fmt_ms(entry["p20_ms"]), "p80 ms": common.fmt_ms(entry["p80_ms"]),
                "queries/s": common.fmt_num(entry["q"] / (med / 1e3))})
    if "torch-cdist" in base_ms:
        row["vs torch-cdist"] = f"{base_ms['torch-cdist'] / med:.2f}x"
    if "fastrp" in base_ms and entry["provider"] != "fastrp":
        row["fastrp faster by"] = f"{med / base_ms['fastrp']:.2f}x"
    row["note"] = f"{entry['reps']} reps" if entry.get("reps") is not None and entry["reps"] < 3 else ""
    entry["speedup_vs_torch_cdist"] = base_ms["torch-cdist"] / med if "torch-cdist" in base_ms else None
    return row


if __name__ == "__main__":
    main()
