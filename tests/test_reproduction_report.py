"""docs/reproduction/report.py: the README's reproduction tables from run directories, checked
against values computed here from hand-written diagnostics rows."""

import csv
import importlib.util
import json
import os

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def report():
    spec = importlib.util.spec_from_file_location("repro_report", os.path.join(ROOT, "docs", "reproduction", "report.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


COLUMNS = ["env_steps", "kind", "model", "horizon", "trace_cov", "trace_cov_norm", "action_trace_cov",
           "jac_state_err", "jac_action_err", "pred_mse", "model_lip_bound", "policy_lip_bound", "step_jac_norm",
           "unroll_jac_norm"]


def _run(tmp_path, name, algo, seed, variance, jacobian=(), **cfg):
    """A run directory; ``variance[(step, h)] = (trace_cov, trace_cov_norm, action_trace_cov)``,
    ``jacobian[(step, model)] = (state_err, action_err, pred_mse)``."""
    d = tmp_path / name
    d.mkdir()
    config = dict(env="Hopper", algo=algo, seed=seed, fd_k=10, fd_weight=50.0, policy_spectral_norm=algo.endswith("sn"),
                  policy_sn_layers="hidden")
    config.update(cfg)
    (d / "config.json").write_text(json.dumps({"config": config}))
    (d / "metrics.csv").write_text("env_steps,eval_return_mean\n1000,1.0\n10000,%s\n" % (100.0 * (seed + 1)))
    with open(d / "diagnostics.csv", "w", newline="") as f:
        w = csv.DictWriter(f, COLUMNS)
        w.writeheader()
        model = "gradient" if algo.startswith("ddppo") else "prediction"
        for (step, h), (tc, tcn, atc) in variance.items():
            w.writerow(dict(env_steps=step, kind="variance", model=model, horizon=h, trace_cov=tc, trace_cov_norm=tcn,
                            action_trace_cov=atc))
        for (step, m), (se, ae, mse) in dict(jacobian).items():
            w.writerow(dict(env_steps=step, kind="jacobian", model=m, horizon="", jac_state_err=se, jac_action_err=ae,
                            pred_mse=mse))
    return str(d)


def test_growth_summary_is_the_median_of_the_per_measurement_ratios(report, tmp_path):
    rng = np.random.default_rng(0)
    dirs, ratios10, ratios20, level = [], [], [], []
    for seed in range(3):
        variance = {}
        for step in (5000, 10000, 15000):
            v1, v10, v20 = rng.uniform(1, 10), rng.uniform(10, 100), rng.uniform(100, 1000)
            for h, v in ((1, v1), (10, v10), (20, v20)):
                variance[(step, h)] = (v, v / 7.0, 2 * v)
            if step >= 10000:  # the 5k rows are before first_step and must be left out
                ratios10.append(v10 / v1)
                ratios20.append(v20 / v1)
                level.append(v20 / 7.0)
        dirs.append(_run(tmp_path, f"maac_s{seed}", "maac", seed, variance))
    runs = report.collect(dirs)
    assert list(runs) == [("Hopper", "maac")]
    table = report.growth_summary(runs).splitlines()
    row = [line for line in table if line.startswith("| Hopper")][0]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == "6"
    assert cells[3] == f"{np.median(ratios10):.3g} [{np.percentile(ratios10, 25):.2g}-{np.percentile(ratios10, 75):.2g}]"
    assert cells[4].startswith(f"{np.median(ratios20):.3g} [")
    # action_trace_cov = 2 * trace_cov in every row: the same growth
    assert cells[5] == cells[3] and cells[6] == cells[4]
    assert cells[7].startswith(f"{np.median(level):.3g} [")


def test_labels_name_the_sn_placement_and_the_fd_settings(report, tmp_path):
    v = {(10000, 1): (1.0, 1.0, 1.0)}
    dirs = [_run(tmp_path, "a", "rp-sn", 0, v, policy_sn_layers="all"),
            _run(tmp_path, "b", "rp-sn", 0, v),
            _run(tmp_path, "c", "ddppo", 0, v),  # Hopper's preset weight 50: no suffix
            _run(tmp_path, "d", "ddppo", 0, v, fd_k=1, fd_weight=5.0),
            _run(tmp_path, "e", "ddppo", 0, v, env="HalfCheetah", fd_weight=1.0)]
    assert sorted(report.collect(dirs)) == [("HalfCheetah", "ddppo"), ("Hopper", "ddppo"), ("Hopper", "ddppo n=1 w=5"),
                                            ("Hopper", "rp-sn"), ("Hopper", "rp-sn all")]


def test_jacobian_table_mean_and_std_over_seeds(report, tmp_path):
    errs = {0: (0.9, 0.5), 1: (0.7, 0.3)}
    dirs = [_run(tmp_path, f"s{s}", "ddppo", s, {}, {(10000, "prediction"): (p, 0.2, 0.01),
                                                    (10000, "gradient"): (g, 0.1, 0.02)})
            for s, (p, g) in errs.items()]
    row = [line for line in report.jacobian_table(report.collect(dirs)).splitlines() if line.startswith("| Hopper")][0]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == "10k"
    assert cells[3] == "0.80 ± 0.10"  # prediction model's state error: mean and (population) std of 0.9, 0.7
    assert cells[4] == "0.40 ± 0.10"  # gradient model's
    assert cells[5] == "0.20 ± 0.00" and cells[6] == "0.10 ± 0.00"
    assert cells[9] == "150 ± 50"  # the eval return at that step: 100 and 200
