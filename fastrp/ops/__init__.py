"""fastrp.ops: the kernel library.

Public ops (see the README for the contract). Each op takes
``backend=None`` (auto: the fastest correct backend for the tensors' device) or one of
``"torch"`` (reference), ``"triton"``, ``"cpp"``, ``"cuda"``. A pure-torch reference sits beside
each op (``*_ref``); tests and benchmarks import it from here.
"""

from .linear import ensemble_linear, ensemble_linear_ref
from .mlp import ensemble_mlp, ensemble_mlp_ref
from .spectral import spectral_norm, spectral_norm_layers, spectral_norm_ref
from .jvp import ensemble_mlp_jvp, ensemble_mlp_jvp_ref
from .knn import fd_targets, fd_targets_ref, knn, knn_ref

__all__ = [
    "ensemble_linear",
    "ensemble_mlp",
    "spectral_norm",
    "spectral_norm_layers",
    "ensemble_mlp_jvp",
    "knn",
    "fd_targets",
    "ensemble_linear_ref",
    "ensemble_mlp_ref",
    "spectral_norm_ref",
    "ensemble_mlp_jvp_ref",
    "knn_ref",
    "fd_targets_ref",
]
