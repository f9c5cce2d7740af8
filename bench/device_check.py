"""The timed part of ``bench/device_check.sh``: ensemble_mlp four ways, kNN at N = Q = 1e6.

    python bench/device_check.py --out bench/results/device-check      # on the GPU
    python bench/device_check.py --dry-run --out /tmp/dc                # CPU: tiny sizes, no timing claims

Timings use CUDA events around the timed region itself: ``--iters`` back-to-back calls between two
events (no cache clear inside, unlike ``triton.testing.do_bench``, whose 256 MB clear hides the
launch cost of host-bound calls), median over ``--repeats`` such regions. ``ensemble_mlp`` forward +
backward at the model's reference shape (E = 7, 23 -> 4x200 SiLU -> 36, B = 256, SN scales):

* ``eager``        :func:`fastrp.ops.ensemble_mlp_ref` under autograd
* ``fused``        :func:`fastrp.ops.ensemble_mlp` (Triton forward, two-launch backward)
* ``eager-graph``  ``eager`` captured in one CUDA graph, replayed
* ``fused-graph``  ``fused`` captured in one CUDA graph, replayed
* ``fused-1launch``, ``fused-1launch-graph``  the same with the row kernels forced to one launch
  per network (``fastrp.kernels.ensemble_mlp.forced_layout(False)``): at this shape the
  launchers split them into one launch per layer to fill the SMs, and these rows measure
  whether that pays

Writes ``device-check.json`` under ``--out`` with the device name, versions and date.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from fastrp.ops import ensemble_mlp, ensemble_mlp_ref, knn  # noqa: E402

MODEL = (23, 200, 200, 200, 200, 36)


def mlp_step(fn, x, ws, bs, ss):
    params = [x] + ws + bs

    def step():
        return torch.autograd.grad(fn(x, ws, bs, ss, "silu").square().sum(), params)
    return step


def one_launch(step):
    """``step`` with the row kernels fused into one launch per network."""
    from fastrp.kernels import ensemble_mlp as kern

    def run():
        with kern.forced_layout(False):
            return step()
    return run


def graphed(step):
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def time_region(fn, device, iters: int, repeats: int) -> dict:
    """Per-call milliseconds: ``iters`` calls between two CUDA events (CPU: perf_counter)."""
    fn()
    per_call = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                fn()
            end.record()
            end.synchronize()
            per_call.append(start.elapsed_time(end) / iters)
        else:
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            per_call.append((time.perf_counter() - t0) * 1e3 / iters)
    return {"median_ms": statistics.median(per_call), "min_ms": min(per_call), "iters": iters, "repeats": repeats}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for device-check.json")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: checks the script, times nothing real")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda and not args.dry_run:
        print("device_check.py: no CUDA device (use --dry-run to check the script on a CPU)", file=sys.stderr)
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    B, n_knn = (256, 1_000_000) if cuda else (8, 2_000)
    iters, repeats = (args.iters, args.repeats) if cuda else (2, 2)
    g = torch.Generator().manual_seed(0)
    ws = [(torch.randn(7, a, b, generator=g) / a ** 0.5).to(device).requires_grad_() for a, b in zip(MODEL[:-1], MODEL[1:])]
    bs = [torch.zeros(7, b, device=device).requires_grad_() for b in MODEL[1:]]
    ss = [torch.rand(7, generator=g).to(device) + 0.5 for _ in MODEL[2:]] + [None]
    x = torch.randn(7, B, MODEL[0], generator=g).to(device).requires_grad_()
    fused = ensemble_mlp if cuda else (lambda *a: ensemble_mlp(*a, backend="torch"))
    steps = {"eager": mlp_step(ensemble_mlp_ref, x, ws, bs, ss), "fused": mlp_step(fused, x, ws, bs, ss)}
    steps["fused-1launch"] = one_launch(steps["fused"])
    rows, results = [], []
    check = [a.sub(b).abs().max().item() for a, b in zip(steps["fused"](), steps["eager"]())]
    print(f"fused vs eager gradients: max abs diff {max(check):.2e}", flush=True)
    for name in ("eager", "fused", "eager-graph", "fused-graph", "fused-1launch", "fused-1launch-graph"):
        base = steps[name[:-len("-graph")] if name.endswith("-graph") else name]
        try:
            fn = graphed(base) if name.endswith("graph") and cuda else base
            if name.endswith("graph") and not cuda:
                raise RuntimeError("CUDA graphs need a GPU (dry run)")
            r = time_region(fn, device, iters, repeats)
        except Exception as exc:  # noqa: BLE001 - reported in the row
            r = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"}
        results.append({"bench": "ensemble_mlp fwd+bwd", "provider": name, "B": B, **r})
        rows.append({"bench": "ensemble_mlp fwd+bwd", "provider": name,
                     "median ms": common.fmt_ms(r.get("median_ms")), "note": r.get("error", "")})
    q = torch.randn(n_knn, 23, generator=g).to(device)
    try:
        r = time_region(lambda: knn(q, q, 10, torch.arange(n_knn, device=device)), device, 1, 2 if cuda else 1)
    except Exception as exc:  # noqa: BLE001
        r = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"}
    results.append({"bench": "knn k=10 d=23", "provider": "fastrp", "N": n_knn, "Q": n_knn, **r})
    rows.append({"bench": f"knn N=Q={n_knn:g} k=10", "provider": "fastrp", "median ms": common.fmt_ms(r.get("median_ms")),
                 "note": r.get("error", "")})
    print(common.format_table(rows, ["bench", "provider", "median ms", "note"]))
    os.makedirs(args.out, exist_ok=True)
    common.write_json(os.path.join(args.out, "device-check.json"), device, results, dry_run=args.dry_run,
                      timing="CUDA events around iters back-to-back calls, no cache clear" if cuda else "perf_counter")
    return 0


if __name__ == "__main__":
    sys.exit(main())
