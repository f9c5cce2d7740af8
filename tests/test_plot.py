"""``python -m fastrp.plot`` (learning curves) and the diagnostics figures."""

import csv
import json

import numpy as np
import pytest

from fastrp import train
from fastrp.plot import group_curves, group_labels, jacobian_figure, main, read_run, variance_figure
from fastrp.rl.logger import COLUMNS

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _fake_run(path, env, algo, seed, rows, **config):
    """A run directory with config.json (env, algo, seed and ``config``) and a metrics.csv holding
    ``rows`` (dicts of some columns)."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"env": env, "algo": algo, "seed": seed, **config}))
    with open(path / "metrics.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in COLUMNS})
    return str(path)


def _is_png(path, limit=150_000):
    data = open(path, "rb").read()
    return data[:8] == PNG_MAGIC and len(data) < limit


def test_plot_cli_two_seeds_of_one_algo(tmp_path, capsys):
    common = ["--env", "InvertedPendulum", "--preset", "tiny", "--progress", "false", "--algo", "sac", "--steps", "100",
              "--eval-every", "50", "--logdir", str(tmp_path)]
    for seed in ("0", "1"):
        assert train.main([*common, "--seed", seed, "--run-name", f"s{seed}"]) == 0
    out = tmp_path / "fig" / "curves.png"
    assert main([str(tmp_path / "s0"), str(tmp_path / "s1"), "--out", str(out)]) == 0
    assert _is_png(out) and "wrote" in capsys.readouterr().out
    assert main([str(tmp_path / "s0"), str(tmp_path / "s1"), "--out", str(tmp_path / "w.png"), "--x", "wall_time",
                 "--metric", "critic_loss"]) == 0
    assert _is_png(tmp_path / "w.png")


def test_group_curves_mean_and_std_over_seeds(tmp_path):
    a = _fake_run(tmp_path / "a", "Hopper", "maac", 0, [
        {"env_steps": 1000, "wall_time": 10, "eval_return_mean": 1.0},
        {"env_steps": 2000, "wall_time": 20},  # no evaluation in this row: skipped
        {"env_steps": 3000, "wall_time": 30, "eval_return_mean": 5.0}])
    b = _fake_run(tmp_path / "b", "Hopper", "maac", 1, [
        {"env_steps": 1000, "wall_time": 14, "eval_return_mean": 3.0}])
    c = _fake_run(tmp_path / "c", "Hopper", "rp-sn", 0, [{"env_steps": 1000, "wall_time": 5, "eval_return_mean": 7.0}])
    groups = group_curves([read_run(p, "eval_return_mean") for p in (a, b, c)])
    maac = groups[("Hopper", "maac")]
    np.testing.assert_array_equal(maac["x"], [1000, 3000])
    np.testing.assert_allclose(maac["mean"], [2.0, 5.0])
    np.testing.assert_allclose(maac["std"], [1.0, 0.0])
    np.testing.assert_array_equal(maac["count"], [2, 1])
    np.testing.assert_array_equal(maac["seeds"], [0, 1])
    np.testing.assert_allclose(groups[("Hopper", "rp-sn")]["mean"], [7.0])
    wall = group_curves([read_run(p, "eval_return_mean") for p in (a, b)], x="wall_time")[("Hopper", "maac")]
    np.testing.assert_allclose(wall["x"], [12.0, 30.0])
    out = tmp_path / "two_envs.png"
    d = _fake_run(tmp_path / "d", "Walker2d", "maac", 0, [{"env_steps": 1000, "eval_return_mean": 2.0}])
    assert main([a, b, c, d, "--out", str(out)]) == 0 and _is_png(out)


def test_runs_differing_in_other_config_fields_are_not_averaged(tmp_path):
    row = [{"env_steps": 1000, "wall_time": 1.0, "eval_return_mean": 1.0}]

    def run(name, env="Hopper", algo="maac", seed=0, value=1.0, **config):
        return _fake_run(tmp_path / name, env, algo, seed, [{**row[0], "eval_return_mean": value}], **config)

    bookkeeping = dict(logdir="elsewhere", device="cpu", eval_every=5000, log_every=1000, steps=7000, diag_every=0,
                       progress=False, checkpoint_every=2000)
    dirs = [
        run("a", seed=0, value=1.0, hidden_dim=256, run_name="a", obs_norm=True),
        run("b", seed=1, value=3.0, hidden_dim=256, run_name="b", obs_norm=True, **bookkeeping),  # same group as a
        run("c", seed=0, value=10.0, hidden_dim=64, obs_norm=True),
        run("d", seed=0, value=20.0, hidden_dim=64, obs_norm=False),
        run("e", seed=1, value=30.0, hidden_dim=64),  # an old run without obs_norm: it had none -> with d
        # rp-sn's spectral-norm flags come with the algorithm: not in its label
        run("f", algo="rp-sn", hidden_dim=256, obs_norm=True, policy_spectral_norm=True, model_spectral_norm=True),
        run("g", env="Walker2d", hidden_dim=64, fd_weight=10),  # one run of its env: just the algo
    ]
    runs = [read_run(d, "eval_return_mean") for d in dirs]
    assert group_labels(runs) == [
        ("Hopper", "maac hidden_dim=256 obs_norm=True"), ("Hopper", "maac hidden_dim=256 obs_norm=True"),
        ("Hopper", "maac hidden_dim=64 obs_norm=True"), ("Hopper", "maac hidden_dim=64 obs_norm=False"),
        ("Hopper", "maac hidden_dim=64 obs_norm=False"), ("Hopper", "rp-sn hidden_dim=256 obs_norm=True"),
        ("Walker2d", "maac")]
    groups = group_curves(runs)
    assert len(groups) == 5
    np.testing.assert_allclose(groups[("Hopper", "maac hidden_dim=256 obs_norm=True")]["mean"], [2.0])
    np.testing.assert_array_equal(groups[("Hopper", "maac hidden_dim=256 obs_norm=True")]["seeds"], [0, 1])
    np.testing.assert_allclose(groups[("Hopper", "maac hidden_dim=64 obs_norm=False")]["mean"], [25.0])
    np.testing.assert_allclose(groups[("Hopper", "maac hidden_dim=64 obs_norm=True")]["mean"], [10.0])
    assert groups[("Walker2d", "maac")]["algo"] == "maac"

    # a field the algorithm presets set is shown when it differs within one algorithm; 10 and 10.0 are equal
    more = [run("h", hidden_dim=256, fd_weight=10), run("i", hidden_dim=256, fd_weight=10.0, policy_spectral_norm=True),
            run("j", algo="rp-sn", fd_weight=10.0, policy_spectral_norm=True, model_spectral_norm=True)]
    labels = group_labels([read_run(d, "eval_return_mean") for d in more])
    assert labels == [("Hopper", "maac policy_spectral_norm=False"), ("Hopper", "maac policy_spectral_norm=True"),
                      ("Hopper", "rp-sn policy_spectral_norm=True")]
    out = tmp_path / "groups.png"
    assert main([*dirs, "--out", str(out)]) == 0 and _is_png(out)

    # the size presets' per-algorithm values (sac's own cpu sizes, mbpo's real_ratio) come with the
    # algorithm too; a field no preset ties to an algorithm (num_layers) is still shown
    sizes = [run("k", algo="sac", seed=0, hidden_dim=256, actor_lr=3e-4, real_ratio=1.0),
             run("l", algo="sac", seed=1, hidden_dim=256, actor_lr=3e-4, real_ratio=1.0),
             run("m", algo="mbpo", hidden_dim=128, actor_lr=1e-4, real_ratio=0.5),
             run("n", algo="ddppo", hidden_dim=128, actor_lr=1e-4, real_ratio=1.0, num_layers=2),
             run("o", algo="ddppo", seed=1, hidden_dim=128, actor_lr=1e-4, real_ratio=1.0, num_layers=3)]
    assert group_labels([read_run(d, "eval_return_mean") for d in sizes]) == [
        ("Hopper", "sac num_layers=2"), ("Hopper", "sac num_layers=2"), ("Hopper", "mbpo num_layers=2"),
        ("Hopper", "ddppo num_layers=2"), ("Hopper", "ddppo num_layers=3")]


@pytest.mark.parametrize("case, message", [
    ("missing", "no such run directory"),
    ("no_metrics", "no metrics.csv"),
    ("metric", "--metric: 'no_such_column' is not a column"),
    ("empty", "no run has a value of 'eval_return_mean'"),
    ("x", "invalid choice: 'time'"),
    ("no_out", "the following arguments are required: --out"),
])
def test_plot_cli_bad_input(tmp_path, capsys, case, message):
    run = _fake_run(tmp_path / "r", "Hopper", "sac", 0, [{"env_steps": 1000, "wall_time": 1.0}])
    (tmp_path / "bare").mkdir()
    out = ["--out", str(tmp_path / "f.png")]
    argv = {
        "missing": [str(tmp_path / "nope"), *out],
        "no_metrics": [str(tmp_path / "bare"), *out],
        "metric": [run, *out, "--metric", "no_such_column"],
        "empty": [run, *out],
        "x": [run, *out, "--x", "time"],
        "no_out": [run],
    }[case]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert not (tmp_path / "f.png").exists()


def test_diagnostics_figures(tmp_path):
    out = variance_figure([("maac s0 @3000", [1, 2, 3], [1e-2, 1e-1, 5.0], [0.1, 0.3, 2.0]),
                           ("rp-sn s0 @3000", [1, 2, 3], [1e-3, 2e-3, 0.0], [0.1, 0.1, 0.1])],
                          str(tmp_path / "v.png"), title="t")
    assert _is_png(out)
    history = [{"env_steps": "1000", "model": m, "jac_state_err": "0.5", "jac_action_err": "0.7", "pred_mse": "0.01"}
               for m in ("prediction", "gradient")]
    history += [{"env_steps": "2000", "model": m, "jac_state_err": "0.4", "jac_action_err": "nan", "pred_mse": "0.02"}
                for m in ("prediction", "gradient")]
    points = [{"env_steps": 2000, "model": "prediction", "jac_state_err": 0.4, "jac_action_err": 0.6,
               "pred_mse": 0.02}]
    assert _is_png(jacobian_figure(history, points, str(tmp_path / "j.png")))
    assert _is_png(jacobian_figure([], points, str(tmp_path / "j0.png")))  # no training-time rows yet
