// CUDA kernel of fastrp_C::knn (see knn_kernel.cuh for the contract).
//
// One warp per query, kWarps queries per block. The block stages a tile of kTileP points x kTileD
// dimensions in shared memory (padded against bank conflicts); each lane accumulates the exact
// squared distance sum((q - p)^2) of kPerLane points of the tile, chunk by chunk over d, so the
// Q x N distance matrix never exists in global memory. Selection: the warp keeps its query's k
// best candidates in a bounded max-heap stored in the output row (global memory, cached; any k
// works) and a warp-uniform threshold, the k-th best so far. A ballot finds the lanes whose
// candidates beat it; only those (rare once the heap is full) are pushed, one at a time, by lane
// 0. Ties at the threshold keep the earlier candidate.
//
// Non-finite values: a point is a candidate only when its squared distance to the query is
// finite (NaN and +inf never compare below the threshold), so NaN or inf rows are never selected
// and slots left without a candidate keep +inf and index -1.
#include <climits>

#include "../knn_heap.h"
#include "knn_kernel.cuh"

namespace fastrp {
namespace cuda {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kTileP = 128;
constexpr int kTileD = 32;
constexpr int kPerLane = kTileP / 32;
constexpr unsigned kFullMask = 0xffffffffu;

template <typename T>
__device__ __forceinline__ T positive_infinity();

template <>
__device__ __forceinline__ float positive_infinity<float>() {
  return __int_as_float(0x7f800000);
}

template <>
__device__ __forceinline__ double positive_infinity<double>() {
  return __longlong_as_double(0x7ff0000000000000LL);
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    knn_kernel(const T* __restrict__ queries, const T* __restrict__ points, const int64_t* __restrict__ exclude,
               int64_t Q, int64_t N, int64_t d, int64_t k, int64_t split_size, T* __restrict__ dist,
               int64_t* __restrict__ idx) {
  __shared__ T tile[kTileP][kTileD + 1];
  __shared__ T qchunk[kWarps][kTileD];

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int64_t q = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  const bool active = q < Q;  // warp-uniform
  const int64_t excluded = (active && exclude != nullptr) ? exclude[q] : -1;
  const int64_t p_begin = static_cast<int64_t>(blockIdx.y) * split_size;
  const int64_t p_end = min(N, p_begin + split_size);
  const int64_t row_stride = static_cast<int64_t>(gridDim.y) * k;
  T* heap_key = dist + (active ? q : 0) * row_stride + static_cast<int64_t>(blockIdx.y) * k;
  int64_t* heap_idx = idx + (active ? q : 0) * row_stride + static_cast<int64_t>(blockIdx.y) * k;

  int64_t count = 0;                   // heap size, warp-uniform
  T threshold = positive_infinity<T>();  // warp-uniform

  for (int64_t p0 = p_begin; p0 < p_end; p0 += kTileP) {
    T acc[kPerLane];
#pragma unroll
    for (int m = 0; m < kPerLane; ++m) acc[m] = T(0);

    for (int64_t d0 = 0; d0 < d; d0 += kTileD) {
      const int dc = static_cast<int>(min(static_cast<int64_t>(kTileD), d - d0));
      __syncthreads();  // the previous chunk has been consumed by every warp
      for (int e = threadIdx.x; e < kTileP * kTileD; e += kThreads) {
        const int r = e / kTileD;
        const int c = e % kTileD;
        const int64_t p = p0 + r;
        tile[r][c] = (p < p_end && c < dc) ? points[p * d + d0 + c] : T(0);
      }
      if (lane < kTileD) qchunk[warp][lane] = (active && lane < dc) ? queries[q * d + d0 + lane] : T(0);
      __syncthreads();
      for (int c = 0; c < dc; ++c) {
        const T qv = qchunk[warp][c];
#pragma unroll
        for (int m = 0; m < kPerLane; ++m) {
          const T diff = qv - tile[lane + 32 * m][c];
          acc[m] = fma(diff, diff, acc[m]);
        }
      }
    }
    if (!active) continue;  // no barrier below: inactive warps go on to the next tile's loads

#pragma unroll
    for (int m = 0; m < kPerLane; ++m) {
      const int64_t p = p0 + lane + 32 * m;
      const bool pass = p < p_end && p != excluded && acc[m] < threshold;
      unsigned mask = __ballot_sync(kFullMask, pass);
      while (mask != 0) {
        const int src = __ffs(mask) - 1;
        mask &= mask - 1;
        const T v = __shfl_sync(kFullMask, acc[m], src);
        const long long pi = __shfl_sync(kFullMask, static_cast<long long>(p), src);
        if (v < threshold) {
          if (lane == 0) bounded_heap_insert(heap_key, heap_idx, count, k, v, static_cast<int64_t>(pi));
          if (count < k) ++count;
          if (count == k) {
            const T root = lane == 0 ? heap_key[0] : T(0);
            threshold = __shfl_sync(kFullMask, root, 0);
          }
        }
      }
    }
  }
  if (!active) return;
  for (int64_t e = count + lane; e < k; e += 32) {
    heap_key[e] = positive_infinity<T>();
    heap_idx[e] = -1;
  }
}

}  // namespace

int64_t knn_split_size(int64_t N, int64_t splits) {
  const int64_t per_split = (N + splits - 1) / splits;
  return (per_split + kTileP - 1) / kTileP * kTileP;
}

template <typename T>
cudaError_t launch_knn(const T* queries, const T* points, const int64_t* exclude, int64_t Q, int64_t N, int64_t d,
                       int64_t k, int64_t splits, T* dist, int64_t* idx, cudaStream_t stream) {
  if (Q == 0) return cudaSuccess;
  const int64_t blocks = (Q + kWarps - 1) / kWarps;
  if (blocks > INT_MAX || splits < 1 || splits > 65535) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(splits));
  knn_kernel<T><<<grid, kThreads, 0, stream>>>(queries, points, exclude, Q, N, d, k, knn_split_size(N, splits),
                                                dist, idx);
  return cudaGetLastError();
}

template cudaError_t launch_knn<float>(const float*, const float*, const int64_t*, int64_t, int64_t, int64_t, int64_t,
                                       int64_t, float*, int64_t*, cudaStream_t);
template cudaError_t launch_knn<double>(const double*, const double*, const int64_t*, int64_t, int64_t, int64_t,
                                        int64_t, int64_t, double*, int64_t*, cudaStream_t);

}  // namespace cuda
}  // namespace fastrp
