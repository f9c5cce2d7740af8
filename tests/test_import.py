"""The package imports with and without the compiled extension, and says once what is slower."""

import os
import subprocess
import sys

import pytest


def _run(code, **env):
    full = dict(os.environ, **env)
    return subprocess.run([sys.executable, "-W", "default", "-c", code], capture_output=True, text=True, env=full, timeout=300)


def test_import_without_extension_warns_once():
    code = "import fastrp, fastrp.ops, fastrp.nn; import fastrp; print('has_ext', fastrp.has_ext())"
    r = _run(code, FASTRP_DISABLE_EXT="1")
    assert r.returncode == 0, r.stderr
    assert "has_ext False" in r.stdout
    assert r.stderr.count("compiled extension fastrp._C not available") == 1, r.stderr
    assert "knn" in r.stderr  # says what is slower


def test_import_with_extension_is_quiet():
    import fastrp

    if not fastrp.has_ext():
        pytest.skip("extension not built in this install")
    r = _run("import fastrp, fastrp.ops; print('ok')")
    assert r.returncode == 0, r.stderr
    assert "not available" not in r.stderr


def test_public_ops_exist():
    import fastrp.ops as ops

    for name in ["ensemble_linear", "spectral_norm", "ensemble_mlp", "ensemble_mlp_jvp", "knn", "fd_targets"]:
        assert callable(getattr(ops, name))
        assert callable(getattr(ops, name + "_ref"))


def test_unknown_backend_is_a_value_error():
    import torch

    import fastrp.ops as ops

    with pytest.raises(ValueError, match="backend"):
        ops.knn(torch.randn(3, 2), torch.randn(5, 2), 1, backend="fortran")
