"""Shared helpers for the benchmark scripts: timing, NVTX ranges, tables, JSON, device peaks.

Timing follows one rule on every device: a provider is called once to warm up (compilation,
autotuning, caches), then repeatedly; the result is the median and the 20th / 80th percentiles of
the per-call wall time in milliseconds.  On CUDA that is ``triton.testing.do_bench`` (CUDA events,
L2 flushed between calls); on CPU ``time.perf_counter`` around each call.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

QUANTILES = (0.5, 0.2, 0.8)

# Dense float32 peak without tensor cores (TFLOP/s), from the vendors' data sheets (boost clock).
# Keys are substrings of ``torch.cuda.get_device_name()``, matched in order: put the more
# specific name first.  An unknown device gets no "% of peak" column rather than a made-up one.
PEAK_FP32_TFLOPS: Dict[str, float] = {
    "H200": 67.0,
    "H100 PCIe": 51.2,
    "H100": 67.0,
    "GH200": 67.0,
    "A100": 19.5,
    "L40S": 91.6,
    "L4": 30.3,
    "A10": 31.2,
    "RTX 4090": 82.6,
    "RTX 3090": 35.6,
    "V100": 15.7,
    "T4": 8.1,
}


def pick_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU exits with a message."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device is available to this torch build")
    return torch.device(name)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({cpu_name()}, {torch.get_num_threads()} threads)"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def peak_tflops(device: torch.device) -> Optional[float]:
    """float32 (non-tensor-core) peak of ``device`` from :data:`PEAK_FP32_TFLOPS`, or None."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_FP32_TFLOPS.items():
        if key in name:
            return value
    return None


def metadata(device: torch.device) -> dict:
    """What every JSON result file records about the run."""
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_name(),
        "threads": torch.get_num_threads(),
        "load_average_1min": load_average(),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
    }


def load_average() -> Optional[float]:
    """1-minute load average of the machine (other processes competing for the cores), or None."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def write_json(path: str, device: torch.device, results: List[dict], quiet: bool = False, **extra) -> None:
    """Write ``{device, torch, triton, python, date, cpu, ..., results}`` to ``path`` (through a
    temporary file and a rename: a run killed while writing leaves the previous file whole).
    Scripts with many sizes call it after each size with ``complete=False`` (and ``quiet``), so a
    run stopped by a time limit keeps what it measured."""
    out = metadata(device)
    out.update(extra)
    out["results"] = results
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(out, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)
    if not quiet:
        print(f"wrote {path}")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], object], device: torch.device, target_s: float = 1.0, max_reps: int = 50) -> dict:
    """Time ``fn`` and return ``{"median_ms", "p20_ms", "p80_ms", "reps"}``.

    CUDA: ``triton.testing.do_bench`` with quantiles (0.5, 0.2, 0.8), about ``target_s`` of
    repetitions.  CPU: one warm-up call, then as many calls as fit in ``target_s`` (at least 3,
    at most ``max_reps``); a call slower than ``target_s`` on its own is measured by that single
    warm-up-excluded run, or by the warm-up itself when it exceeds ``4 * target_s`` (so a
    minute-long baseline costs one minute, not three).
    """
    if device.type == "cuda":
        from triton.testing import do_bench

        fn()
        torch.cuda.synchronize(device)
        med, p20, p80 = do_bench(fn, warmup=max(25, int(100 * target_s)), rep=int(1000 * target_s), quantiles=list(QUANTILES))
        return {"median_ms": med, "p20_ms": p20, "p80_ms": p80, "reps": None}
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    if first > 4 * target_s:
        samples = [first]
    else:
        reps = 1 if first > target_s else int(min(max_reps, max(3, target_s / max(first, 1e-9))))
        samples = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
    q = torch.quantile(torch.tensor(samples, dtype=torch.float64) * 1e3, torch.tensor(QUANTILES, dtype=torch.float64))
    return {"median_ms": q[0].item(), "p20_ms": q[1].item(), "p80_ms": q[2].item(), "reps": len(samples)}


def measure_interleaved(fns: Dict[str, Callable[[], object]], device: torch.device, target_s: float = 1.0,
                        max_rounds: int = 50) -> Dict[str, dict]:
    """Time several providers of the same work; results as :func:`measure`.

    On CUDA each is timed in turn with :func:`measure` (the device is not shared).  On CPU the
    calls are interleaved round-robin (one warm-up each, then rounds of one call per provider), so
    that load from other processes on a shared machine hits every provider alike instead of
    whichever happened to run at the wrong moment."""
    if device.type == "cuda":
        return {name: measure(fn, device, target_s) for name, fn in fns.items()}
    first = {}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        fn()
        first[name] = time.perf_counter() - t0
    rounds = int(min(max_rounds, max(3, target_s * len(fns) / max(sum(first.values()), 1e-9))))
    samples = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
    out = {}
    for name, times in samples.items():
        q = torch.quantile(torch.tensor(times, dtype=torch.float64) * 1e3, torch.tensor(QUANTILES, dtype=torch.float64))
        out[name] = {"median_ms": q[0].item(), "p20_ms": q[1].item(), "p80_ms": q[2].item(), "reps": len(times)}
    return out


@contextlib.contextmanager
def nvtx_range(name: str):
    """An NVTX range for Nsight Systems on CUDA; a no-op on CPU."""
    if torch.cuda.is_available():
        torch.cuda.nvtx.range_push(name)
        try:
            yield
        finally:
            torch.cuda.nvtx.range_pop()
    else:
        yield


def parse_list(text: str, kind=int) -> List:
    """``"1,3,1e4"`` -> ``[1, 3, 10000]`` (numbers in e-notation allowed for ints)."""
    out = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        out.append(int(float(item)) if kind is int else kind(item))
    return out


def fmt_ms(ms: Optional[float]) -> str:
    if ms is None:
        return "-"
    if ms >= 100:
        return f"{ms:.0f}"
    if ms >= 10:
        return f"{ms:.1f}"
    if ms >= 1:
        return f"{ms:.2f}"
    return f"{ms:.3f}"


def fmt_num(x: Optional[float]) -> str:
    """Compact engineering format: 1234567 -> ``1.23M``."""
    if x is None:
        return "-"
    for div, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g}{unit}"
    return f"{x:.3g}"


def format_table(rows: Sequence[Dict[str, str]], columns: Sequence[str]) -> str:
    """Markdown table of ``rows`` (dicts of strings) with the given ``columns``."""
    widths = [max(len(c), *(len(str(r.get(c, ""))) for r in rows)) if rows else len(c) for c in columns]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    out = [line(columns), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line([r.get(c, "") for c in columns]) for r in rows]
    return "\n".join(out)
