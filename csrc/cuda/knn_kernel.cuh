// CUDA kernel of fastrp_C::knn, kept free of torch headers so that it compiles with the CUDA
// toolkit alone (tests/test_cuda_compile.py checks it with nvcc on machines without CUDA torch).
// The torch-facing glue lives in knn_cuda.cpp.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace fastrp {
namespace cuda {

// For each query row q of queries[Q, d], find the k smallest squared Euclidean distances to the
// rows of points[N, d] (both row-major, contiguous), skipping the point exclude[q] when exclude is
// not null and exclude[q] >= 0.
//
// The points are cut into `splits` contiguous ranges searched by separate thread blocks (more
// parallelism when Q is small); dist and idx are [Q, splits * k] and receive, for split s, the k
// best of that range in columns [s * k, (s + 1) * k), UNSORTED. The caller merges and sorts
// (top-k over each row). A point is a candidate only when its squared distance to the query is
// finite, so rows holding NaN or inf are never selected; slots of a split with fewer than k
// candidates (a short range, non-finite distances, the excluded point) hold +inf and -1.
template <typename T>
cudaError_t launch_knn(const T* queries, const T* points, const int64_t* exclude, int64_t Q, int64_t N, int64_t d,
                       int64_t k, int64_t splits, T* dist, int64_t* idx, cudaStream_t stream);

// Number of point rows a split covers (a multiple of the kernel's point tile).
int64_t knn_split_size(int64_t N, int64_t splits);

}  // namespace cuda
}  // namespace fastrp
