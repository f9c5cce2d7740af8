// CPU kernel of fastrp_C::knn: exact k nearest neighbours, tiled, OpenMP over query blocks.
//
// For a block of queries and a block of points the kernel forms the tile
//   S[q, p] = |p - c|^2 - 2 (q - c).(p - c)          (c: the mean of the points)
// with one GEMM on augmented operands A = [-2 (q - c), 1], B = [p - c, |p - c|^2]. S differs
// from |q - p|^2 by |q - c|^2, a per-query constant, so it ranks the points of a query exactly
// like the distance. Each query keeps a bounded max-heap of its k best candidates and a running
// threshold (the k-th best so far); almost every candidate is rejected by one vectorised compare
// against it. At the end the kept k distances are recomputed as sum((q - p)^2) (accumulated in
// double) and sorted ascending, so returned distances do not carry the GEMM's cancellation error.
// Centering on c keeps that cancellation small for the selection itself: candidates closer than
// ~1e-6 * (|q - c|^2 + |p - c|^2) in float32 may be ranked either way, like in any GEMM-based kNN.
//
// Non-finite values: a point is a neighbour only when its exact squared distance to the query is
// finite. NaN and inf tile values never pass the threshold (+inf until the heap is full), and
// candidates whose recomputed distance is not finite are dropped, so NaN or inf rows are never
// returned; slots left without a candidate hold +inf and index -1 (as in the CUDA kernel).
//
// Extra memory: the centred copies A and B (O((Q + N) d)) and one tile of
// kQueryBlock x kPointBlock values per thread; the heaps live in the output tensors.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>
#include <vector>

#include "knn_common.h"
#include "knn_heap.h"

namespace fastrp {
namespace {

constexpr int64_t kQueryBlock = 128;  // queries per tile (rows of the GEMM)
constexpr int64_t kPointBlock = 512;  // points per tile (columns of the GEMM)
constexpr int64_t kScanWidth = 16;    // candidates tested against the threshold at once

// Bounded max-heap of (key, index) pairs stored in caller-owned arrays of length cap.
template <typename T>
struct BoundedHeap {
  T* key;
  int64_t* idx;
  int64_t cap;
  int64_t size;

  // Keys below this value enter the heap: +inf until the heap is full, then the k-th best.
  T threshold() const { return size < cap ? std::numeric_limits<T>::infinity() : key[0]; }

  void insert(T v, int64_t i) {
    bounded_heap_insert(key, idx, size, cap, v, i);
    if (size < cap) ++size;
  }
};

// Offer the nb candidates s[0..nb) (points p0 .. p0 + nb - 1) to one query's heap.
template <typename T>
void scan_row(const T* s, int64_t nb, int64_t p0, int64_t excluded, BoundedHeap<T>& heap) {
  T th = heap.threshold();
  int64_t j = 0;
  for (; j + kScanWidth <= nb; j += kScanWidth) {
    int any = 0;
#pragma omp simd reduction(| : any)
    for (int64_t l = 0; l < kScanWidth; ++l) any |= static_cast<int>(s[j + l] < th);
    if (!any) continue;
    for (int64_t l = j; l < j + kScanWidth; ++l) {
      if (s[l] < th && p0 + l != excluded) {
        heap.insert(s[l], p0 + l);
        th = heap.threshold();
      }
    }
  }
  for (; j < nb; ++j) {
    if (s[j] < th && p0 + j != excluded) {
      heap.insert(s[j], p0 + j);
      th = heap.threshold();
    }
  }
}

template <typename T>
double squared_distance(const T* a, const T* b, int64_t d) {
  double acc = 0.0;
  for (int64_t c = 0; c < d; ++c) {
    const double diff = static_cast<double>(a[c]) - static_cast<double>(b[c]);
    acc += diff * diff;
  }
  return acc;
}

// Replace the heap's keys by exact distances, drop the candidates whose exact distance is not
// finite, sort the rest ascending (ties by index), and mark the unused slots with +inf and -1
// (fewer than k candidates at a finite distance: NaN or inf rows).
template <typename T>
void finalize_row(const T* query, const T* points, int64_t d, BoundedHeap<T>& heap,
                  std::vector<std::pair<T, int64_t>>& scratch) {
  scratch.clear();
  for (int64_t e = 0; e < heap.size; ++e) {
    const int64_t p = heap.idx[e];
    const T dist = static_cast<T>(squared_distance(query, points + p * d, d));
    if (std::isfinite(dist)) scratch.emplace_back(dist, p);
  }
  std::sort(scratch.begin(), scratch.end());
  const int64_t kept = static_cast<int64_t>(scratch.size());
  for (int64_t e = 0; e < kept; ++e) {
    heap.key[e] = scratch[e].first;
    heap.idx[e] = scratch[e].second;
  }
  for (int64_t e = kept; e < heap.cap; ++e) {
    heap.key[e] = std::numeric_limits<T>::infinity();
    heap.idx[e] = -1;
  }
}

template <typename T>
void knn_cpu_impl(const at::Tensor& queries, const at::Tensor& points, int64_t k, const int64_t* exclude,
                  at::Tensor& dist, at::Tensor& idx) {
  const int64_t Q = queries.size(0);
  const int64_t N = points.size(0);
  const int64_t d = queries.size(1);

  // A NaN or inf point would make the mean non-finite and poison every tile: centre those
  // columns on 0 instead (centring only serves precision).
  const at::Tensor mean = points.mean(0, /*keepdim=*/true);
  const at::Tensor center = at::where(at::isfinite(mean), mean, at::zeros_like(mean));
  const at::Tensor pc = points - center;
  const at::Tensor qc = queries - center;
  const at::Tensor B = at::cat({pc, (pc * pc).sum(1, /*keepdim=*/true)}, 1).contiguous();
  const at::Tensor A = at::cat({qc * -2, at::ones({Q, 1}, qc.options())}, 1).contiguous();

  const int nthreads = std::max(1, at::get_num_threads());
  // Small Q: shrink the query block so that every thread gets work.
  const int64_t qblock = std::max<int64_t>(1, std::min<int64_t>(kQueryBlock, (Q + nthreads - 1) / nthreads));
  const int64_t nblocks = (Q + qblock - 1) / qblock;

  const T* qptr = queries.data_ptr<T>();
  const T* pptr = points.data_ptr<T>();
  T* dptr = dist.data_ptr<T>();
  int64_t* iptr = idx.data_ptr<int64_t>();

#pragma omp parallel num_threads(nthreads)
  {
    std::vector<T> tile(static_cast<size_t>(qblock * kPointBlock));
    std::vector<BoundedHeap<T>> heaps(qblock);
    std::vector<std::pair<T, int64_t>> scratch;
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < nblocks; ++b) {
      const int64_t q0 = b * qblock;
      const int64_t nq = std::min(qblock, Q - q0);
      for (int64_t i = 0; i < nq; ++i) heaps[i] = {dptr + (q0 + i) * k, iptr + (q0 + i) * k, k, 0};
      const at::Tensor a_blk = A.narrow(0, q0, nq);
      for (int64_t p0 = 0; p0 < N; p0 += kPointBlock) {
        const int64_t nb = std::min(kPointBlock, N - p0);
        at::Tensor s = at::from_blob(tile.data(), {nq, nb}, A.options());
        at::mm_out(s, a_blk, B.narrow(0, p0, nb).t());
        for (int64_t i = 0; i < nq; ++i) {
          const int64_t excluded = exclude ? exclude[q0 + i] : -1;
          scan_row(tile.data() + i * nb, nb, p0, excluded, heaps[i]);
        }
      }
      for (int64_t i = 0; i < nq; ++i) finalize_row(qptr + (q0 + i) * d, pptr, d, heaps[i], scratch);
    }
  }
}

std::tuple<at::Tensor, at::Tensor> knn_cpu(const at::Tensor& queries, const at::Tensor& points, int64_t k,
                                           const std::optional<at::Tensor>& exclude) {
  check_knn_args(queries, points, k, exclude);
  TORCH_CHECK(queries.device().is_cpu(), "knn (CPU kernel): expected CPU tensors");
  const at::Tensor q = queries.contiguous();
  const at::Tensor p = points.contiguous();
  const int64_t Q = q.size(0);
  const int64_t N = p.size(0);
  at::Tensor ex;
  const int64_t* ex_ptr = nullptr;
  if (exclude.has_value()) {
    ex = exclude->contiguous();
    ex_ptr = ex.data_ptr<int64_t>();
    bool any_real = false;
    for (int64_t i = 0; i < Q; ++i) {
      TORCH_CHECK(ex_ptr[i] >= -1 && ex_ptr[i] < N, "knn: exclude[", i, "] = ", ex_ptr[i],
                  " is not in [-1, N=", N, ")");
      any_real = any_real || ex_ptr[i] >= 0;
    }
    TORCH_CHECK(!any_real || k <= N - 1, "knn: k must be at most N - 1 = ", N - 1,
                " when exclude removes a point, got ", k);
  }
  at::Tensor dist = at::empty({Q, k}, q.options());
  at::Tensor idx = at::empty({Q, k}, q.options().dtype(at::kLong));
  if (Q == 0) return {dist, idx};
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "fastrp_knn_cpu",
                             [&] { knn_cpu_impl<scalar_t>(q, p, k, ex_ptr, dist, idx); });
  return {dist, idx};
}

}  // namespace
}  // namespace fastrp

TORCH_LIBRARY_IMPL(fastrp_C, CPU, m) { m.impl("knn", &fastrp::knn_cpu); }
