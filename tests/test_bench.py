"""The benchmark scripts (``bench/``) on CPU at tiny sizes: their providers agree before they are
timed, their JSON records what a result needs, and ``bench/all.py`` runs them and reads the targets
back."""

import importlib.util
import json
import os
import sys

import pytest
import torch

BENCH_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")


def _bench_module(name):
    if BENCH_DIR not in sys.path:
        sys.path.insert(0, BENCH_DIR)
    spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(BENCH_DIR, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_unroll_bench_fastrp_agrees_with_eager(tmp_path):
    """The benchmark's fastrp unroll (policy + 7-member model with members= + twin Q) gives the
    eager user code's loss and policy gradient; the trainer's own objective runs at the same H and
    B; CUDA-only providers are skipped on CPU."""
    unroll = _bench_module("unroll")
    out = tmp_path / "unroll.json"
    unroll.main(["--device", "cpu", "--horizons", "1,3", "--batches", "7", "--time", "0.05",
                 "--providers", "eager,fastrp,trainer,fastrp-cudagraph,compile-reduce-overhead", "--json", str(out)])
    data = json.loads(out.read_text())
    assert data["device"].startswith("cpu") and data["torch"] == torch.__version__ and "date" in data
    by = {(r["H"], r["provider"]): r for r in data["results"]}
    for H in (1, 3):
        assert by[(H, "fastrp")]["status"] == "ok", by[(H, "fastrp")]["status"]
        assert by[(H, "fastrp")]["median_ms"] > 0 and by[(H, "fastrp")]["speedup_vs_eager"] > 0
        assert by[(H, "trainer")]["status"] == "ok", by[(H, "trainer")]["status"]
        assert by[(H, "trainer")]["gflop"] > by[(H, "fastrp")]["gflop"]  # two models per step
        assert by[(H, "fastrp-cudagraph")]["status"] == "CUDA only"
        assert by[(H, "compile-reduce-overhead")]["status"] == "CUDA only"
    assert unroll.unroll_flops(10, 1024) == pytest.approx(13.7e9, rel=0.01)


def test_knn_bench_providers_agree(tmp_path):
    knn = _bench_module("knn")
    out = tmp_path / "knn.json"
    knn.main(["--device", "cpu", "--n", "600", "--d", "23", "--q", "64,N", "--time", "0.05",
              "--providers", "fastrp,fastrp-fd,torch-cdist,scipy-kdtree,faiss-flat", "--json", str(out)])
    results = json.loads(out.read_text())["results"]
    assert len(results) == 10
    for r in results:
        if r["provider"] == "faiss-flat":
            assert r["status"] == "ok" or r["status"].startswith("unavailable")
        elif r["provider"] == "scipy-kdtree" and r["status"].startswith("unavailable"):
            continue
        else:
            assert r["status"] == "ok", r
            assert r["check_err"] <= 1e-3

