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


def _write(path, results, **extra):
    path.write_text(json.dumps({"device": "test device", **extra, "results": results}))


def test_all_summary_reads_the_targets(tmp_path, capsys):
    """``bench/all.py --summary`` turns result files into the targets table: ratios over the right
    baselines, met / short / not measured."""
    all_ = _bench_module("all")
    unroll = [{"H": 3, "B": 256, "provider": p, "median_ms": ms, "status": "ok", "pct_peak": 5.0}
              for p, ms in (("eager", 10.0), ("compile-default", 3.0), ("compile-reduce-overhead", 2.0),
                            ("fastrp", 1.5), ("fastrp-cudagraph", 0.5), ("trainer", 0.1))]
    unroll += [{"H": 10, "B": 256, "provider": "eager", "median_ms": 30.0, "status": "ok"},
               {"H": 10, "B": 256, "provider": "fastrp", "median_ms": 10.0, "status": "ok"},
               {"H": 10, "B": 1024, "provider": "fastrp", "median_ms": 0.01, "status": "ok"}]
    _write(tmp_path / "x-unroll.json", unroll)
    knn = [{"provider": "fastrp", "n": 100_000, "q": 100_000, "d": 23, "median_ms": 10.0},
           {"provider": "torch-cdist", "n": 100_000, "q": 100_000, "d": 23, "median_ms": 250.0},
           {"provider": "torch-cdist", "n": 100_000, "q": 256, "d": 23, "median_ms": 1.0},
           {"provider": "faiss-flat", "n": 100_000, "q": 100_000, "d": 23, "status": "unavailable: faiss not importable"}]
    _write(tmp_path / "x-knn.json", knn)
    update = [{"provider": "eager", "update": {"median_ms": 100.0}, "updates_per_s": 10.0},
              {"provider": "fastrp", "update": {"median_ms": 25.0}, "updates_per_s": 40.0},
              {"provider": "fastrp-cudagraph", "error": "CUDA only"}]
    _write(tmp_path / "x-update.json", update, preset="paper", model_max_epochs=20)
    assert all_.main(["--summary", "--out", str(tmp_path), "--tag", "x"]) == 0
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "target" not in line}
    assert rows["unroll H=3 B=256 vs eager"][:3] == ["20.00x", ">= 10x", "met"]  # fastrp-cudagraph, not trainer
    assert rows["unroll H=3 B=256 vs best torch.compile"][:3] == ["4.00x", ">= 2x", "met"]
    assert rows["unroll H=10 B=256 vs eager"][:3] == ["3.00x", ">= 10x", "short"]  # B=1024 row ignored
    assert rows["unroll H=10 B=256 vs best torch.compile"][2] == "not measured"
    assert rows["knn N = Q = 1e5, d = 23 vs cdist+topk"][:3] == ["25.00x", ">= 20x", "met"]
    assert rows["knn N = Q = 1e5, d = 23 vs faiss flat"][2:] == ["not measured", "unavailable: faiss not importable"]
    assert rows["ddppo-sn update vs eager"][:3] == ["4.00x", ">= 5x", "short"]


def test_all_runs_every_script(tmp_path):
    """``bench/all.py --quick`` runs the scripts in their own processes and each writes its JSON
    (unroll and knn at tiny sizes are covered above: update and envs here)."""
    all_ = _bench_module("all")
    assert all_.main(["--quick", "--device", "cpu", "--only", "update,envs", "--out", str(tmp_path)]) == 0
    for name in ("update", "envs"):
        data = json.loads((tmp_path / f"cpu-{name}.json").read_text())
        assert data["results"], name
    update = {r["provider"]: r for r in json.loads((tmp_path / "cpu-update.json").read_text())["results"]}
    assert update["fastrp"]["updates_per_s"] > 0 and update["fastrp-cudagraph"]["error"] == "CUDA only"
    with pytest.raises(SystemExit):
        all_.main(["--only", "unroll,nope"])


def test_unroll_writes_partial_results_after_each_size(tmp_path, monkeypatch):
    """unroll.py rewrites its JSON after every size (``complete: false`` until the end), so a run
    stopped by a time limit keeps what it measured; all.py flags such a file."""
    unroll = _bench_module("unroll")
    out = tmp_path / "x-unroll.json"
    seen = []
    real = unroll.common.write_json

    def spy(path, device, results, quiet=False, **extra):
        seen.append((len(results), extra["complete"]))
        real(path, device, results, quiet=quiet, **extra)

    monkeypatch.setattr(unroll.common, "write_json", spy)
    unroll.main(["--device", "cpu", "--horizons", "1,2", "--batches", "5", "--time", "0.02",
                 "--providers", "eager,fastrp", "--json", str(out)])
    assert seen == [(2, False), (4, False), (4, True)]
    data = json.loads(out.read_text())
    data["complete"] = False
    out.write_text(json.dumps(data))
    all_ = _bench_module("all")
    assert "partial results: unroll" in all_.summary(str(tmp_path), "x")


def test_all_drops_stale_results_and_stops_a_script_at_its_timeout(tmp_path, monkeypatch):
    """A result file from an earlier run is removed before its script runs (a failed run leaves no
    stale numbers behind), --timeout kills the script, --summary without results exits 1."""
    import time

    all_ = _bench_module("all")
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    (scripts / "unroll.py").write_text("import time\ntime.sleep(120)\n")
    monkeypatch.setattr(all_, "HERE", str(scripts))
    stale = tmp_path / "x-unroll.json"
    stale.write_text("{}")
    t0 = time.perf_counter()
    run = all_.run_bench("unroll", [], str(stale), timeout=1.0)
    assert run["exit"] == "timeout" and time.perf_counter() - t0 < 60 and not stale.exists()
    assert all_.main(["--summary", "--out", str(tmp_path / "empty"), "--tag", "x"]) == 1
    with pytest.raises(SystemExit):
        all_.main(["--summary", "--quick"])


def test_update_providers_and_partial_results(monkeypatch):
    """update.py: fastrp-compile is the trainer's --compile without CUDA graphs; each provider is
    timed right after its warm-up, then round-robin; progress reports partial results; a failing
    provider keeps its error; the torch.compile counters each provider's calls moved are its own."""
    update = _bench_module("update")
    from torch._dynamo.utils import counters

    base = {"env": "HalfCheetah", "algo": "ddppo-sn", "preset": "tiny", "device": "cpu"}
    flags = {p: (update.resolve({**base, "compile": p in ("fastrp-compile", "fastrp-cudagraph"),
                                 "cuda_graphs": p == "fastrp-cudagraph"})) for p in ("fastrp", "fastrp-compile")}
    assert (flags["fastrp-compile"].compile, flags["fastrp-compile"].cuda_graphs) == (True, False)
    calls = []

    class FakeRunner:
        def __init__(self, provider, base_cfg, buffer, device, seed, synthetic=False):
            self.provider = provider
            if provider == "eager":
                raise RuntimeError("broken provider")

        def repeat(self):
            calls.append(self.provider)
            if self.provider == "fastrp-compile":
                counters["inductor"]["fake_compiles"] += 1
            return {"model": 250.0, "grad_model": 250.0, "critic": 1.0, "policy": 2.0}

    monkeypatch.setattr(update, "Runner", FakeRunner)
    monkeypatch.setitem(counters, "inductor", counters["inductor"].copy())  # restored afterwards
    seen = []
    results = update.run(["eager", "fastrp", "fastrp-compile", "fastrp-cudagraph"], base, None,
                         torch.device("cpu"), 3, 0, progress=lambda r, complete: seen.append(
                             {k: v.get("repeats") for k, v in r.items()}))
    assert calls == ["fastrp", "fastrp", "fastrp-compile", "fastrp-compile"] + ["fastrp", "fastrp-compile"] * 2
    assert results["eager"]["error"].startswith("RuntimeError: broken provider")
    assert results["fastrp-cudagraph"]["error"] == "CUDA only"
    assert results["fastrp"]["repeats"] == 3 and results["fastrp"]["update"]["median_ms"] == 3.0 + 500.0 / 50
    assert results["fastrp-compile"]["counters"] == {"inductor": {"fake_compiles": 4}}
    assert "counters" not in results["fastrp"]
    assert [[s[p] for p in ("eager", "fastrp", "fastrp-compile")] for s in seen] == \
        [[None, None, None], [None, 1, None], [None, 1, 1], [None, 2, 2], [None, 3, 3]]
