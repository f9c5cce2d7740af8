// CUDA kernel registration of fastrp_C::knn: launches knn_kernel.cu on the current stream and
// merges the per-split candidates with a row-wise top-k (sorted ascending).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>

#include "../knn_common.h"
#include "knn_kernel.cuh"

namespace fastrp {
namespace {

// Split the points over several blocks per query group when there are too few query groups to
// fill the GPU; each split keeps k candidates, so splits also bound the temporary memory to
// min(64, N / max(4 k, 2048)) x Q x k.
int64_t choose_splits(int64_t Q, int64_t N, int64_t k, int device) {
  const int64_t query_blocks = (Q + 7) / 8;
  int sm_count = 0;
  if (cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
    (void)cudaGetLastError();  // clear the error; fall back to a typical count
    sm_count = 100;
  }
  const int64_t sms = sm_count;
  const int64_t wanted = (4 * sms + query_blocks - 1) / query_blocks;
  const int64_t most = N / std::max<int64_t>(4 * k, 2048);
  return std::max<int64_t>(1, std::min<int64_t>({wanted, most, 64}));
}

std::tuple<at::Tensor, at::Tensor> knn_cuda(const at::Tensor& queries, const at::Tensor& points, int64_t k,
                                            const std::optional<at::Tensor>& exclude) {
  check_knn_args(queries, points, k, exclude);
  TORCH_CHECK(queries.is_cuda(), "knn (CUDA kernel): expected CUDA tensors");
  const c10::cuda::CUDAGuard guard(queries.device());
  const at::Tensor q = queries.contiguous();
  const at::Tensor p = points.contiguous();
  const at::Tensor ex = exclude.has_value() ? exclude->contiguous() : at::Tensor();
  const int64_t Q = q.size(0);
  const int64_t N = p.size(0);
  const int64_t d = q.size(1);
  if (Q == 0) {
    return {at::empty({0, k}, q.options()), at::empty({0, k}, q.options().dtype(at::kLong))};
  }
  const int64_t splits = choose_splits(Q, N, k, q.get_device());
  at::Tensor cand_dist = at::empty({Q, splits * k}, q.options());
  at::Tensor cand_idx = at::empty({Q, splits * k}, q.options().dtype(at::kLong));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(q.get_device()).stream();
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "fastrp_knn_cuda", [&] {
    const cudaError_t err = cuda::launch_knn<scalar_t>(
        q.data_ptr<scalar_t>(), p.data_ptr<scalar_t>(), ex.defined() ? ex.data_ptr<int64_t>() : nullptr, Q, N, d, k,
        splits, cand_dist.data_ptr<scalar_t>(), cand_idx.data_ptr<int64_t>(), stream);
    TORCH_CHECK(err == cudaSuccess, "fastrp knn CUDA kernel launch failed: ", cudaGetErrorString(err));
  });
  at::Tensor dist, order;
  if (splits == 1) {
    std::tie(dist, order) = at::sort(cand_dist, /*dim=*/1);
  } else {
    std::tie(dist, order) = at::topk(cand_dist, k, /*dim=*/1, /*largest=*/false, /*sorted=*/true);
  }
  return {dist, cand_idx.gather(1, order)};
}

}  // namespace
}  // namespace fastrp

TORCH_LIBRARY_IMPL(fastrp_C, CUDA, m) { m.impl("knn", &fastrp::knn_cuda); }
