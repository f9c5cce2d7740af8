"""Every benchmark in one command, then the performance targets checked against the results.

    python bench/all.py --device cuda                     # GPU: all four benchmarks, then the targets
    python bench/all.py --device cuda --sizes targets     # only the sizes the targets name (faster)
    python bench/all.py --device cuda --only unroll       # one benchmark (e.g. under a time limit)
    python bench/all.py --summary                         # the targets, from the JSON files already there
    python bench/all.py --quick                           # smoke test: tiny sizes, into a temporary folder

Runs ``bench/unroll.py``, ``bench/knn.py``, ``bench/update.py`` and ``bench/envs.py`` one after
the other, each in its own process (a crash or an out-of-memory in one does not stop the others),
with their output streamed.  Each writes ``OUT/TAG-NAME.json`` (``OUT`` = ``bench/results``;
``TAG`` = the device: ``h200``, ``a100``, ... or ``cpu``).  Then the targets table: each target,
the measured ratio, and "met" / "short" / "not measured".  The targets are the H200's:

* unroll, H = 3 and H = 10, B = 256, forward + backward: best fastrp provider >= 10x ``eager`` and
  >= 2x the best ``torch.compile`` mode (and the % of the float32 peak it reaches);
* kNN, N = Q = 1e5, d = 23, k = 10: ``fastrp`` >= 20x chunked ``cdist`` + ``topk``, and >= 1x
  faiss flat search when faiss is importable;
* one ``ddppo-sn`` update: the best fastrp provider >= 5x ``eager``.

On a CPU the table is printed too, for reference: the CPU runs the torch formulas (not the GPU
kernels), so its ratios say little about the targets.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import common  # noqa: E402

BENCHES = ("unroll", "knn", "update", "envs")
UNROLL_TARGETS = ((3, 256), (10, 256))
KNN_TARGET = dict(n=100_000, q=100_000, d=23)
TARGETS = {"unroll_vs_eager": 10.0, "unroll_vs_compile": 2.0, "knn_vs_cdist": 20.0, "knn_vs_faiss": 1.0,
           "update_vs_eager": 5.0}


def device_tag(device) -> str:
    """A short file-name tag for the device: ``h200``, ``a100``, ``rtx-4090``, ... or ``cpu``."""
    import torch

    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower()
    name = re.sub(r"^(nvidia|amd)\s+", "", name)
    name = re.sub(r"\b(geforce|tesla)\s+", "", name)
    tag = re.sub(r"[^a-z0-9]+", "-", name).strip("-")
    return tag.split("-")[0] if re.match(r"^[a-z]\d+", tag) else tag  # "h200-nvl" -> "h200"


def bench_args(name: str, device: str, sizes: str, quick: bool, threads: Optional[int] = None) -> List[str]:
    """Command-line arguments of ``bench/NAME.py`` for this run (JSON path added by the caller)."""
    dev = [] if name == "envs" else ["--device", device]
    if threads and name != "envs":  # envs.py's --threads are stepping threads, not torch's
        dev += ["--threads", str(threads)]
    if quick:
        return dev + {"unroll": ["--quick"],
                      "knn": ["--n", "2000", "--d", "23", "--q", "64,N", "--time", "0.1"],
                      "update": ["--quick"],
                      "envs": ["--envs", "1,4", "--seconds", "0.1", "--repeats", "1", "--async-max-envs", "0"]}[name]
    if sizes == "targets":
        return dev + {"unroll": ["--horizons", "3,10", "--batches", "256", "--phases"],
                      "knn": ["--n", "1e5", "--d", "23", "--q", "256,N"],
                      "update": [],
                      "envs": ["--envs", "1,64"]}[name]
    return dev + {"unroll": ["--phases"], "knn": [], "update": [], "envs": []}[name]


def run_bench(name: str, args: List[str], json_path: str, timeout: Optional[float]) -> dict:
    """Run ``bench/NAME.py ARGS --json JSON_PATH`` in its own process (and process group), output
    streamed. A result file from an earlier run is removed first, so that a run which fails before
    writing leaves no stale numbers to be read back; on ``timeout`` the whole process group (the
    script and its workers) is killed."""
    cmd = [sys.executable, os.path.join(HERE, f"{name}.py")] + args + ["--json", json_path]
    if os.path.exists(json_path):
        os.remove(json_path)
    print(f"\n==== {name}: {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, start_new_session=True)
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        rc = "timeout"
    except BaseException:  # Ctrl-C: take the script's process group down too
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    wall = time.perf_counter() - t0
    print(f"==== {name}: exit {rc}, {wall:.0f} s", flush=True)
    return {"bench": name, "exit": rc, "wall_s": wall, "json": json_path}


# --------------------------------------------------------------------------------------------
# Targets, read back from the JSON files
# --------------------------------------------------------------------------------------------
def _load(path: str) -> Optional[dict]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _verdict(ratio: Optional[float], target: float) -> str:
    if ratio is None:
        return "not measured"
    return "met" if ratio >= target else "short"


def _row(what: str, ratio: Optional[float], target: float, detail: str) -> Dict[str, str]:
    return {"target": what, "measured": f"{ratio:.2f}x" if ratio is not None else "-", "goal": f">= {target:g}x",
            "verdict": _verdict(ratio, target), "detail": detail}


def unroll_rows(data: Optional[dict]) -> List[Dict[str, str]]:
    rows = []
    ok = [r for r in (data or {}).get("results", []) if "median_ms" in r]
    for H, B in UNROLL_TARGETS:
        at = {r["provider"]: r for r in ok if r["H"] == H and r["B"] == B}
        fast = min((r for p, r in at.items() if p.startswith("fastrp")), key=lambda r: r["median_ms"], default=None)
        eager = at.get("eager")
        compiled = min((r for p, r in at.items() if p.startswith("compile")), key=lambda r: r["median_ms"], default=None)
        vs_eager = eager["median_ms"] / fast["median_ms"] if fast and eager else None
        vs_compile = compiled["median_ms"] / fast["median_ms"] if fast and compiled else None
        detail = ""
        if fast:
            detail = f"{fast['provider']} {common.fmt_ms(fast['median_ms'])} ms"
            if fast.get("pct_peak") is not None:
                detail += f", {fast['pct_peak']:.1f} % of fp32 peak"
        rows.append(_row(f"unroll H={H} B={B} vs eager", vs_eager, TARGETS["unroll_vs_eager"],
                         detail + (f"; eager {common.fmt_ms(eager['median_ms'])} ms" if eager else "")))
        rows.append(_row(f"unroll H={H} B={B} vs best torch.compile", vs_compile, TARGETS["unroll_vs_compile"],
                         f"{compiled['provider']} {common.fmt_ms(compiled['median_ms'])} ms" if compiled
                         else "no torch.compile provider timed"))
    return rows


def knn_rows(data: Optional[dict]) -> List[Dict[str, str]]:
    at = {r["provider"]: r for r in (data or {}).get("results", [])
          if "median_ms" in r and r.get("n") == KNN_TARGET["n"] and r.get("q") == KNN_TARGET["q"]
          and r.get("d") == KNN_TARGET["d"]}
    fast, cdist, faiss = at.get("fastrp"), at.get("torch-cdist"), at.get("faiss-flat")
    where = "N = Q = 1e5, d = 23"
    rows = [_row(f"knn {where} vs cdist+topk", cdist["median_ms"] / fast["median_ms"] if fast and cdist else None,
                 TARGETS["knn_vs_cdist"], f"fastrp {common.fmt_ms(fast['median_ms'])} ms" if fast else "")]
    faiss_row = next((r for r in (data or {}).get("results", []) if r.get("provider") == "faiss-flat"), None)
    rows.append(_row(f"knn {where} vs faiss flat", faiss["median_ms"] / fast["median_ms"] if fast and faiss else None,
                     TARGETS["knn_vs_faiss"],
                     faiss_row["status"] if faiss_row is not None and not faiss else ""))
    return rows


def update_rows(data: Optional[dict]) -> List[Dict[str, str]]:
    res = {r["provider"]: r for r in (data or {}).get("results", []) if "update" in r}
    eager = res.get("eager")
    fast = min((r for p, r in res.items() if p.startswith("fastrp")), key=lambda r: r["update"]["median_ms"], default=None)
    ratio = eager["update"]["median_ms"] / fast["update"]["median_ms"] if eager and fast else None
    detail = f"{fast['provider']} {fast['updates_per_s']:.3g} updates/s" if fast else ""
    if data and data.get("model_max_epochs") is not None:
        detail += f" (refits <= {data['model_max_epochs']} epochs)"
    if data and data.get("preset", "paper") != "paper":  # the target is about the paper-size update
        ratio, detail = None, f"{data['preset']} preset, not the paper's sizes"
    return [_row("ddppo-sn update vs eager", ratio, TARGETS["update_vs_eager"], detail)]


def summary(out_dir: str, tag: str) -> str:
    path = lambda name: os.path.join(out_dir, f"{tag}-{name}.json")  # noqa: E731
    unroll, knn, update = (_load(path(n)) for n in ("unroll", "knn", "update"))
    device = next((d["device"] for d in (unroll, knn, update) if d), "no results")
    if not (unroll or knn or update):
        return f"no results in {out_dir}/{tag}-{{unroll,knn,update}}.json"
    rows = unroll_rows(unroll) + knn_rows(knn) + update_rows(update)
    head = f"targets (H200) against {device}, from {out_dir}/{tag}-*.json"
    partial = [n for n, d in zip(("unroll", "knn", "update"), (unroll, knn, update)) if d and d.get("complete") is False]
    if partial:
        head += f"\n(partial results: {', '.join(partial)} stopped before its last size)"
    if device.startswith("cpu"):
        head += "\n(CPU: the torch formulas run, not the GPU kernels; ratios for reference only)"
    return head + "\n" + common.format_table(rows, ["target", "measured", "goal", "verdict", "detail"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--only", default=",".join(BENCHES), help=f"comma list of {', '.join(BENCHES)} (default: all)")
    ap.add_argument("--sizes", default="full", choices=["full", "targets"],
                    help="full: each script's defaults for the device; targets: only the sizes the targets name")
    ap.add_argument("--out", default=None, help="results folder (default: bench/results; with --quick a temporary one)")
    ap.add_argument("--tag", default=None, help="file-name prefix (default: from the device, e.g. h200 or cpu)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads of unroll / knn / update (default: torch's choice)")
    ap.add_argument("--timeout", type=float, default=None, help="seconds allowed per benchmark script")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test of every script")
    ap.add_argument("--summary", action="store_true", help="only print the targets from the JSON files in --out")
    args = ap.parse_args(argv)

    only = [b.strip() for b in args.only.split(",") if b.strip()]
    unknown = [b for b in only if b not in BENCHES]
    if unknown:
        ap.error(f"--only: unknown {', '.join(unknown)}; choose from {', '.join(BENCHES)}")
    if args.summary and args.quick:
        ap.error("--summary reads existing results; --quick runs the scripts into a new temporary folder: give one")
    device = common.pick_device(args.device)
    tag = args.tag or device_tag(device)
    out_dir = args.out or (tempfile.mkdtemp(prefix="fastrp-bench-") if args.quick else os.path.join(HERE, "results"))
    os.makedirs(out_dir, exist_ok=True)
    if args.quick and not args.out:
        print(f"--quick: results go to {out_dir} (left there to look at)")
    runs = []
    if not args.summary:
        for name in only:
            runs.append(run_bench(name, bench_args(name, device.type, args.sizes, args.quick, args.threads),
                                  os.path.join(out_dir, f"{tag}-{name}.json"), args.timeout))
        print("\n" + common.format_table(
            [{"benchmark": r["bench"], "exit": str(r["exit"]), "wall s": f"{r['wall_s']:.0f}", "json": r["json"]} for r in runs],
            ["benchmark", "exit", "wall s", "json"]))
    text = summary(out_dir, tag)
    print("\n" + text)
    if args.summary and text.startswith("no results"):
        return 1
    failed = [r["bench"] for r in runs if r["exit"] != 0]
    if failed:
        print(f"\nfailed: {', '.join(failed)} (see their output above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
