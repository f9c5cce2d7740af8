// Bounded max-heap of (key, index) pairs used by both kNN kernels (csrc/knn_cpu.cpp and
// csrc/cuda/knn_kernel.cu). Free of torch and CUDA headers: it compiles with the host compiler
// alone and, under nvcc, as a __host__ __device__ function.
#pragma once

#include <cstdint>

#ifndef FASTRP_HD
#ifdef __CUDACC__
#define FASTRP_HD __host__ __device__
#else
#define FASTRP_HD
#endif
#endif

namespace fastrp {

// Insert (v, i) into the max-heap key[0..size), idx[0..size) of capacity cap (caller-owned
// arrays). Below capacity the pair is sifted up into slot `size` (the caller then counts one more
// entry); when full the root (largest key) is replaced and sifted down, so the caller must only
// offer v < key[0] in that case.
template <typename T>
FASTRP_HD inline void bounded_heap_insert(T* key, int64_t* idx, int64_t size, int64_t cap, T v, int64_t i) {
  int64_t pos;
  if (size < cap) {
    pos = size;
    while (pos > 0) {
      const int64_t parent = (pos - 1) / 2;
      if (key[parent] >= v) break;
      key[pos] = key[parent];
      idx[pos] = idx[parent];
      pos = parent;
    }
  } else {
    pos = 0;
    while (true) {
      int64_t child = 2 * pos + 1;
      if (child >= size) break;
      if (child + 1 < size && key[child + 1] > key[child]) ++child;
      if (key[child] <= v) break;
      key[pos] = key[child];
      idx[pos] = idx[child];
      pos = child;
    }
  }
  key[pos] = v;
  idx[pos] = i;
}

}  // namespace fastrp
