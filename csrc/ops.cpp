// Module init and op schemas of the compiled extension fastrp._C.
//
// The ops live in the torch library namespace `fastrp_C` (Python custom ops use `fastrp::`).
// Their kernels are registered per device: CPU in knn_cpu.cpp, CUDA in cuda/knn_cuda.cpp
// (compiled only in CUDA builds, which define FASTRP_WITH_CUDA).
#include <torch/extension.h>
#include <torch/library.h>

TORCH_LIBRARY(fastrp_C, m) {
  // Exact squared-Euclidean k nearest neighbours of each query row among the point rows,
  // ascending by distance. exclude[q] >= 0 is a point index skipped for query q; -1 skips
  // nothing. Returns (dist2[Q, k], idx[Q, k] int64). Values are not checked for NaN or inf: a
  // point is a neighbour only at a finite squared distance, and slots left without one (NaN or
  // inf rows) hold dist2 = +inf and idx = -1, on every device.
  m.def("knn(Tensor queries, Tensor points, int k, Tensor? exclude) -> (Tensor, Tensor)");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastrp compiled kernels; the ops are registered as torch.ops.fastrp_C.*";
  m.def(
      "with_cuda",
      [] {
#ifdef FASTRP_WITH_CUDA
        return true;
#else
        return false;
#endif
      },
      "True when the extension was compiled with its CUDA sources (FASTRP_WITH_CUDA).");
}
