"""Kernel resource report without a GPU: every Triton kernel compiled ahead of time for a GPU target.

    python bench/kernel_report.py                                   # sm_90a (H100 / H200), fp32
    python bench/kernel_report.py --arch 90,80 --dtype float32,float64 \\
        --json bench/results/kernel-report.json | tee bench/results/kernel-report.txt

The kernels are compiled through their real host launchers (``fastrp.kernels.*``) at the shapes
the trainer runs: the 7-member model (23 -> 4x200 SiLU -> 36, B = 256, dense and grouped by
member as in the unroll), the policy (17 -> 2x256 ReLU -> 12), the twin critic (23 -> 2x256 ReLU
-> 1), the JVP of the model with K = 5 and 25 tangents, and the power iteration of the model's
hidden layers. Nothing runs: a stub Triton driver reports the target GPU, the launchers size their
tiles and grids for its SM count (``--sms``, 132 on an H200), and each launch only compiles.

Per launch: the layers it runs (``all`` for the fused row kernels, or the one layer of a launch
whose columns are split across programs, where the launchers split a network whose fused grid
leaves SMs idle; ``--layout fused`` reports one fused launch per network instead), registers per
thread, spill stores + loads (bytes per thread, from ``ptxas -v``), shared memory, grid size against the SM count, warps, and the global loads by width (SASS
``LDG`` / ``LDGSTS`` instructions of 128, 64 and 32 bits). Run with the GPU machine's triton
version for figures that match it (the JSON records the version). Must run without
``TRITON_INTERPRET=1`` (the interpreter compiles nothing).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from typing import Dict, List

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("kernel_report.py: unset TRITON_INTERPRET (the interpreter compiles no kernel)")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

COLUMNS = ["case", "kernel", "layers", "dtype", "arch", "regs", "spill B", "smem B", "grid", "fills SMs", "warps",
           "loads 128/64/32 bit"]


# --------------------------------------------------------------------------------------------
# Compiling without a device
# --------------------------------------------------------------------------------------------
class Compiler:
    """Makes every ``@triton.jit`` launch compile for ``arch`` and record the compiled kernel."""

    def __init__(self, arch: int):
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.backends.driver import DriverBase
        from triton.runtime.driver import driver
        from triton.runtime.jit import JITFunction

        target = GPUTarget("cuda", arch, 32)

        class StubDriver(DriverBase):
            @classmethod
            def is_active(cls):
                return False

            def map_python_to_cpp_type(self, ty):
                raise NotImplementedError("compile only")

            def get_current_target(self):
                return target

            def get_current_device(self):
                return 0

            def get_current_stream(self, device=None):
                return 0

            def get_active_torch_device(self):
                return torch.device("cpu")

            def get_benchmarker(self):
                raise NotImplementedError("compile only")

        self.triton, self.driver, self.jit = triton, driver, JITFunction
        self.stub = StubDriver()
        self.records: List[dict] = []

    def __enter__(self):
        self._previous = self.driver._active
        self.driver.set_active(self.stub)
        self._run = real = self.jit.run
        records, fresh = self.records, set()

        def run(fn, *args, grid, warmup, **kwargs):
            if id(fn) not in fresh:  # drop binders and kernels cached for another target
                fresh.add(id(fn))
                fn.device_caches.clear()
            kernel = real(fn, *args, grid=grid, warmup=True, **kwargs)
            first, last = kwargs.get("FIRST"), kwargs.get("LAST")
            layers = "all" if first is None else str(first) if last == first + 1 else f"{first}-{last - 1}"
            records.append({"kernel": fn.fn.__name__, "grid": tuple(grid), "compiled": kernel, "layers": layers})
            return kernel

        self.jit.run = run
        return self

    def __exit__(self, *exc):
        self.jit.run = self._run
        self.driver._active = self._previous


def _tool(name: str) -> str:
    import triton

    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return bundled if os.path.exists(bundled) else (shutil.which(name) or name)


def resources(compiled, arch: int) -> dict:
    """Registers, spills (``ptxas -v`` on the kernel's PTX), shared memory and load widths."""
    gpu = "sm_90a" if arch == 90 else f"sm_{arch}"
    out = {"smem": int(compiled.metadata.shared), "warps": int(compiled.metadata.num_warps)}
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        info = subprocess.run([_tool("ptxas"), "-v", f"--gpu-name={gpu}", ptx, "-o", os.path.join(tmp, "k.o")],
                              capture_output=True, text=True).stderr
        regs = re.search(r"Used (\d+) registers", info)
        spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", info)
        out["regs"] = int(regs.group(1)) if regs else None
        out["spill_stores"] = int(spill.group(1)) if spill else None
        out["spill_loads"] = int(spill.group(2)) if spill else None
        cubin = os.path.join(tmp, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        sass = subprocess.run([_tool("cuobjdump"), "-sass", cubin], capture_output=True, text=True).stdout
    widths = {128: 0, 64: 0, 32: 0}
    for m in re.finditer(r"\b(LDG|LDGSTS)\.E((?:\.[A-Z0-9_]+)*)", sass):
        mods = m.group(2)
        widths[128 if ".128" in mods else 64 if ".64" in mods else 32] += 1
    out["loads"] = widths
    return out


# --------------------------------------------------------------------------------------------
# The trainer's shapes, through the real launchers
# --------------------------------------------------------------------------------------------
def _mlp(E, dims, dtype, gen, scales="all"):
    ws = [torch.randn(E, a, b, dtype=dtype, generator=gen) for a, b in zip(dims[:-1], dims[1:])]
    bs = [torch.randn(E, b, dtype=dtype, generator=gen) for b in dims[1:]]
    ss = [torch.rand(E, dtype=dtype, generator=gen) + 0.5 if scales == "all" or l < len(dims) - 2 else None
          for l in range(len(dims) - 1)] if scales else [None] * (len(dims) - 1)
    return ws, bs, ss


def cases(dtype: torch.dtype, precision: str):
    """``(case name, thunk)``: each thunk calls host launchers (which only compile here)."""
    from fastrp.kernels import ensemble_mlp as mlp
    from fastrp.kernels import ensemble_mlp_jvp as jvp
    from fastrp.kernels import spectral_norm as sn

    gen = torch.Generator().manual_seed(0)
    model = (23, 200, 200, 200, 200, 36)
    out = []

    def dense(name, E, dims, B, act, sn_hidden):
        ws, bs, ss = _mlp(E, dims, dtype, gen, scales="hidden" if sn_hidden else None)

        def thunk():
            x = torch.randn(E * B, dims[0], dtype=dtype)
            y, z = mlp.mlp_forward(x, None, ws, bs, ss, act, precision)
            mlp.mlp_backward(torch.randn_like(y), x, None, ws, ss, z, act, precision, True, True)
        out.append((name, thunk))

    dense(f"model E=7 {'x'.join(map(str, model))} B=256", 7, model, 256, "silu", True)
    dense("policy E=1 17x256x256x12 B=256", 1, (17, 256, 256, 12), 256, "relu", True)
    dense("critic E=2 23x256x256x1 B=256", 2, (23, 256, 256, 1), 256, "relu", False)

    ws, bs, ss = _mlp(7, model, dtype, gen, scales="hidden")

    def grouped():
        R = 256
        seg = torch.tensor([0, 37, 73, 110, 146, 183, 219, 256])
        x = torch.randn(R, model[0], dtype=dtype)
        y, z = mlp.mlp_forward(x, seg, ws, bs, ss, "silu", precision)
        mlp.mlp_backward(torch.randn_like(y), x, seg, ws, ss, z, "silu", precision, True, True)
    out.append(("unroll model grouped by member, 256 rows", grouped))

    for K in (5, 25):
        def jvp_case(K=K):
            x = torch.randn(7, 256, model[0], dtype=dtype)
            t = torch.randn(7, 256, K, model[0], dtype=dtype)
            jvp.mlp_jvp_forward(x, t, ws, bs, ss, "silu", precision)
        out.append((f"JVP model K={K} B=256", jvp_case))

    def power_iteration():
        vs = [torch.randn(7, w.shape[1], dtype=dtype) for w in ws[:-1]]
        sn.spectral_norm_layers_fwd(ws[:-1], vs, [], 1, 1e-12)
    out.append(("power iteration, model hidden layers", power_iteration))
    return out


def report(arches: List[int], dtypes: List[torch.dtype], precision: str, sms: int, layout: str = "auto") -> List[dict]:
    from fastrp.kernels import ensemble_mlp as mlp
    from fastrp.kernels._target import compile_for

    forced = {"auto": None, "fused": False}[layout]  # fused: one launch per network, as before the split

    rows = []
    for arch in arches:
        for dtype in dtypes:
            prec = precision if dtype == torch.float32 else "ieee"
            for name, thunk in cases(dtype, prec):
                with Compiler(arch) as comp, compile_for(sms), mlp.forced_layout(forced):
                    thunk()
                for rec in comp.records:
                    res = resources(rec["compiled"], arch)
                    programs = 1
                    for g in rec["grid"]:
                        programs *= int(g)
                    rows.append({"case": name, "kernel": rec["kernel"], "layers": rec["layers"], "dtype": str(dtype).replace("torch.", ""),
                                 "arch": f"sm_{arch}{'a' if arch == 90 else ''}", "precision": prec,
                                 "grid": list(rec["grid"]), "programs": programs, "sms": sms, **res})
                print(f"  compiled {name} ({dtype}, sm_{arch}): {len(comp.records)} kernels", file=sys.stderr,
                      flush=True)
    return rows


def table(rows: List[dict]) -> str:
    out = []
    for r in rows:
        spill = None if r["spill_stores"] is None else r["spill_stores"] + r["spill_loads"]
        out.append({"case": r["case"], "kernel": r["kernel"].lstrip("_"), "layers": r.get("layers", "all"), "dtype": r["dtype"], "arch": r["arch"],
                    "regs": str(r["regs"]), "spill B": str(spill), "smem B": str(r["smem"]),
                    "grid": "x".join(map(str, r["grid"])),
                    "fills SMs": f"{r['programs']}/{r['sms']}" + (" yes" if r["programs"] >= r["sms"] else " no"),
                    "warps": str(r["warps"]),
                    "loads 128/64/32 bit": "/".join(str(r["loads"][w]) for w in (128, 64, 32))})
    return common.format_table(out, COLUMNS)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="90,80", help="compute capabilities, e.g. 90 (sm_90a) and 80")
    ap.add_argument("--dtype", default="float32", help="comma list of float32, float64")
    ap.add_argument("--precision", default="ieee", choices=("ieee", "tf32", "tf32x3"),
                    help="tl.dot input precision of the float32 kernels")
    ap.add_argument("--layout", default="auto", choices=("auto", "fused"),
                    help="row kernels as the launchers choose (auto), or always one fused launch per network")
    ap.add_argument("--sms", type=int, default=132, help="streaming multiprocessors of the target (H200: 132)")
    ap.add_argument("--json", default=None, help="write the rows to this JSON file")
    args = ap.parse_args(argv)
    try:
        arches = common.parse_list(args.arch, int)
        dtypes = [{"float32": torch.float32, "float64": torch.float64}[d] for d in common.parse_list(args.dtype, str)]
    except (KeyError, ValueError) as exc:
        print(f"kernel_report.py: bad --arch/--dtype ({exc}); e.g. --arch 90,80 --dtype float32,float64",
              file=sys.stderr)
        return 2
    import triton

    rows = report(arches, dtypes, args.precision, args.sms, args.layout)
    print(f"# Triton {triton.__version__}, torch {torch.__version__}; compiled ahead of time, {args.sms} SMs, "
          f"precision {args.precision}, layout {args.layout}")
    print(table(rows))
    fp32 = [r for r in rows if r["dtype"] == "float32"]
    spilling = sorted({f"{r['kernel']} ({r['case']})" for r in fp32 if (r["spill_stores"] or 0) > 0})
    print(f"\nfp32 kernels that spill: {len(spilling)}" + ("".join(f"\n  {s}" for s in spilling)))
    if args.json:
        common.write_json(args.json, torch.device("cpu"), rows, target_sms=args.sms, precision=args.precision,
                          layout=args.layout,
                          note="compiled ahead of time without a GPU; device/threads fields describe the host")
    return 0


if __name__ == "__main__":
    sys.exit(main())
