// Invariants shared by the CPU and CUDA kernels of fastrp_C::knn.
//
// The Python wrapper (fastrp/ops/knn.py) validates arguments first and raises ValueError; these
// TORCH_CHECKs guard direct calls of torch.ops.fastrp_C.knn. Finiteness is not checked here (it
// would cost a pass over the data): both kernels return only points at a finite squared distance
// and pad the remaining slots with dist2 = +inf, idx = -1 (NaN or inf rows).
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace fastrp {

inline void check_knn_args(const at::Tensor& queries, const at::Tensor& points, int64_t k,
                           const std::optional<at::Tensor>& exclude) {
  TORCH_CHECK(queries.dim() == 2, "knn: queries must be [Q, d], got ", queries.sizes());
  TORCH_CHECK(points.dim() == 2, "knn: points must be [N, d], got ", points.sizes());
  TORCH_CHECK(queries.size(1) == points.size(1), "knn: queries and points must have the same d, got ",
              queries.size(1), " and ", points.size(1));
  TORCH_CHECK(queries.size(1) >= 1, "knn: d must be at least 1");
  TORCH_CHECK(queries.scalar_type() == points.scalar_type(), "knn: queries and points must have the same dtype");
  TORCH_CHECK(queries.scalar_type() == at::kFloat || queries.scalar_type() == at::kDouble,
              "knn: expected float32 or float64 inputs, got ", queries.scalar_type());
  TORCH_CHECK(queries.device() == points.device(), "knn: queries and points must be on the same device");
  TORCH_CHECK(k >= 1 && k <= points.size(0), "knn: k must be in [1, N=", points.size(0), "], got ", k);
  if (exclude.has_value()) {
    const at::Tensor& ex = *exclude;
    TORCH_CHECK(ex.dim() == 1 && ex.size(0) == queries.size(0), "knn: exclude must be [Q=", queries.size(0),
                "], got ", ex.sizes());
    TORCH_CHECK(ex.scalar_type() == at::kLong, "knn: exclude must be int64, got ", ex.scalar_type());
    TORCH_CHECK(ex.device() == queries.device(), "knn: exclude must be on the device of queries");
  }
}

}  // namespace fastrp
