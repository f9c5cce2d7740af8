"""Soft import of the compiled extension ``fastrp._C``.

Without it every op still works: ``knn``/``fd_targets`` fall back to the torch reference (slower
on CPU, and on CUDA when the CUDA sources were not built). Set ``FASTRP_DISABLE_EXT=1`` to ignore
a built extension (used by the test suite to check the fallback path).
"""

import os
import warnings

_C = None
_IMPORT_ERROR = None
_warned = False

if os.environ.get("FASTRP_DISABLE_EXT", "0") == "1":
    _IMPORT_ERROR = "disabled by FASTRP_DISABLE_EXT=1"
else:
    try:
        import torch  # noqa: F401  (loads libtorch before the extension)

        from . import _C  # type: ignore[attr-defined,no-redef]
    except ImportError as exc:  # pragma: no cover - depends on the build
        _C = None
        _IMPORT_ERROR = "not built" if "cannot import name '_C'" in str(exc) else str(exc)


def has_ext() -> bool:
    """True when the compiled extension ``fastrp._C`` is loaded."""
    return _C is not None


def has_cuda_ext() -> bool:
    """True when the extension was built with its CUDA sources."""
    return _C is not None and bool(getattr(_C, "with_cuda", lambda: False)())


def warn_missing_ext() -> None:
    """Warn once, clearly, that the compiled extension is missing and what is slower."""
    global _warned
    if _C is not None or _warned:
        return
    _warned = True
    warnings.warn(
        f"fastrp: compiled extension fastrp._C not available ({_IMPORT_ERROR}); "
        "fastrp.ops.knn and fd_targets use the chunked torch reference instead (exact, but several "
        "times slower). Reinstall with torch already installed to build it: "
        "pip install --no-build-isolation -e .",
        RuntimeWarning,
        stacklevel=3,
    )
