"""Host overhead of the registered ops: their dispatch against eager torch at tiny shapes.

    python bench/overhead.py                     # CPU, one thread, 5 rounds
    python bench/overhead.py --rounds 9 --json bench/results/cpu-overhead.json

At RL sizes every op call on a GPU is bound by the host, so a fused op must cost no more host time
than the eager torch it replaces. On the CPU at tiny shapes (E = 7 members, every width 2, B = 2
rows, 5 layers, SiLU, one thread) the maths costs next to nothing and what is left is dispatch.
One call = forward + ``torch.autograd.grad`` of ``y.sum()`` over ``x``, weights and biases:

* ``eager``   :func:`fastrp.ops.ensemble_mlp_ref` (what a user writes: ``bmm`` + bias + SiLU, autograd)
* ``op``      :func:`fastrp.ops.ensemble_mlp` with ``backend="torch"``: the registered op's path
              (one autograd node, validation, the explicit backward), the path CUDA takes
* ``op-jvp`` / ``eager-jvp``  the same for :func:`fastrp.ops.ensemble_mlp_jvp` (K = 2 tangents)

Each round times every provider over ``--calls`` back-to-back calls, interleaved round-robin (load
from other processes hits them alike); the table gives min and median per-call microseconds over
rounds and the ratio op / eager (target: at most 1.3 for the MLP). ``--breakdown`` adds a
per-phase split of one ``op`` call: validation (cached signature look-up), forward, backward.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Callable, Dict, List

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from fastrp.ops import ensemble_mlp, ensemble_mlp_jvp, ensemble_mlp_jvp_ref, ensemble_mlp_ref  # noqa: E402

E, WIDTH, B, LAYERS, K = 7, 2, 2, 5, 2
TARGET = 1.3


def problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ws = [torch.randn(E, WIDTH, WIDTH, generator=g).requires_grad_() for _ in range(LAYERS)]
    bs = [torch.randn(E, WIDTH, generator=g).requires_grad_() for _ in range(LAYERS)]
    x = torch.randn(E, B, WIDTH, generator=g).requires_grad_()
    t = torch.randn(E, B, K, WIDTH, generator=g)
    return x, t, ws, bs


def providers(x, t, ws, bs) -> Dict[str, Callable[[], object]]:
    params = [x] + ws + bs
    none = [None] * LAYERS

    def op():
        return torch.autograd.grad(ensemble_mlp(x, ws, bs, none, "silu", backend="torch").sum(), params)

    def eager():
        return torch.autograd.grad(ensemble_mlp_ref(x, ws, bs, none, "silu").sum(), params)

    def op_jvp():
        y, jy = ensemble_mlp_jvp(x, t, ws, bs, none, "silu", backend="torch")
        return torch.autograd.grad(y.sum() + jy.sum(), params)

    def eager_jvp():
        y, jy = ensemble_mlp_jvp_ref(x, t, ws, bs, none, "silu")
        return torch.autograd.grad(y.sum() + jy.sum(), params)

    return {"eager": eager, "op": op, "eager-jvp": eager_jvp, "op-jvp": op_jvp}


def time_rounds(fns: Dict[str, Callable[[], object]], rounds: int, calls: int) -> Dict[str, List[float]]:
    """Per-call microseconds of each provider, one sample per round."""
    for fn in fns.values():
        for _ in range(max(10, calls // 10)):
            fn()
    out: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            out[name].append((time.perf_counter() - t0) / calls * 1e6)
    return out


def breakdown(x, ws, bs, calls: int) -> Dict[str, float]:
    """Median microseconds of the phases of one ``op`` call."""
    from fastrp.ops import mlp

    none = [None] * LAYERS
    params = [x] + ws + bs
    phases: Dict[str, List[float]] = {"validation": [], "forward": [], "backward": []}
    for _ in range(calls):
        t0 = time.perf_counter()
        mlp._prepare(x, ws, bs, none, "silu", None, "torch", "ieee")
        t1 = time.perf_counter()
        y = ensemble_mlp(x, ws, bs, none, "silu", backend="torch")
        t2 = time.perf_counter()
        torch.autograd.grad(y.sum(), params)
        t3 = time.perf_counter()
        phases["validation"].append((t1 - t0) * 1e6)
        phases["forward"].append((t2 - t1) * 1e6)
        phases["backward"].append((t3 - t2) * 1e6)
    return {k: statistics.median(v) for k, v in phases.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds (min and median are reported)")
    ap.add_argument("--calls", type=int, default=300, help="calls per provider per round")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--breakdown", action="store_true", help="also split one op call into its phases")
    ap.add_argument("--json", default=None, help="write the results to this JSON file")
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.calls < 1:
        print("overhead.py: --rounds and --calls must be >= 1", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    x, t, ws, bs = problem()
    samples = time_rounds(providers(x, t, ws, bs), args.rounds, args.calls)
    rows, results = [], []
    for name, times in samples.items():
        base = samples["eager-jvp" if name.endswith("jvp") else "eager"]
        ratio_min, ratio_med = min(times) / min(base), statistics.median(times) / statistics.median(base)
        rows.append({"provider": name, "min us": f"{min(times):.0f}", "median us": f"{statistics.median(times):.0f}",
                     "vs eager (min)": f"{ratio_min:.2f}x", "vs eager (median)": f"{ratio_med:.2f}x"})
        results.append({"provider": name, "us_per_call": times, "min_us": min(times),
                        "median_us": statistics.median(times), "ratio_min": ratio_min, "ratio_median": ratio_med})
    print(f"# {common.device_name(device)}, torch {torch.__version__}; E={E}, widths {WIDTH}, B={B}, {LAYERS} layers, "
          f"SiLU; forward + autograd.grad per call; {args.rounds} rounds x {args.calls} calls")
    print(common.format_table(rows, ["provider", "min us", "median us", "vs eager (min)", "vs eager (median)"]))
    op = next(r for r in results if r["provider"] == "op")
    print(f"\nensemble_mlp dispatch budget: op / eager = {op['ratio_min']:.2f}x (min), {op['ratio_median']:.2f}x "
          f"(median); target <= {TARGET}x")
    extra = {}
    if args.breakdown:
        extra["breakdown_us"] = parts = breakdown(x, ws, bs, args.calls)
        print("op call breakdown (median us): " + ", ".join(f"{k} {v:.1f}" for k, v in parts.items()))
    if args.json:
        common.write_json(args.json, device, results, shape={"E": E, "width": WIDTH, "B": B, "layers": LAYERS, "K": K},
                          rounds=args.rounds, calls=args.calls, target_ratio=TARGET, **extra)
    return 0


if __name__ == "__main__":
    sys.exit(main())
