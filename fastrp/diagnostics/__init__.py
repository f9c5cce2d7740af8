"""Gradient diagnostics: what papers 000 and 003 are about, measured on fastrp runs.

* **Gradient variance** (:mod:`fastrp.diagnostics.variance`, paper 000): trace of the covariance
  and mean norm of the model-based RP policy gradient over independent minibatches of a fixed
  pool of real start states, for unroll lengths H = 1 .. 10 - with and without spectral norm.
* **Model gradient error** (:mod:`fastrp.diagnostics.jacobian`, paper 003): relative error of the
  prediction and gradient models' Jacobians ``ds'/ds``, ``ds'/da`` against MuJoCo's true ones
  (:func:`fastrp.envs.dynamics_jacobians`) on held-out real transitions, and their prediction
  error.
* :mod:`fastrp.diagnostics.run`: loading a run directory's checkpoint, agent-level measurements,
  and the training-time hook writing ``<run_dir>/diagnostics.csv`` every ``--diag-every`` steps.

Command line: ``python -m fastrp.diagnostics variance RUN_DIR...`` and
``python -m fastrp.diagnostics jacobian RUN_DIR`` (``--help`` for the options).
"""

from fastrp.diagnostics.jacobian import (HeldOut, collect_transitions, ensemble_jacobian_errors, input_jacobians,
                                         jacobian_errors, state_columns)
from fastrp.diagnostics.run import (COLUMNS, DIAG_CSV, LoadedRun, RunError, Settings, TrainingDiagnostics,
                                    jacobian_rows, load_run, variance_rows)
from fastrp.diagnostics.variance import (GradientStats, flat_gradient, frozen_modules, gradient_covariance_trace,
                                         rp_gradient_stats, rp_gradient_variance)

__all__ = [
    "COLUMNS", "DIAG_CSV", "GradientStats", "HeldOut", "LoadedRun", "RunError", "Settings", "TrainingDiagnostics",
    "collect_transitions", "ensemble_jacobian_errors", "flat_gradient", "frozen_modules", "gradient_covariance_trace",
    "input_jacobians", "jacobian_errors", "jacobian_rows", "load_run", "rp_gradient_stats", "rp_gradient_variance",
    "state_columns", "variance_rows",
]
