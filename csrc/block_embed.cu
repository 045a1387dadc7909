// kf_block_embed: the Block Encoder's gather-sum of up to G embedding rows per group
// (kelix-ar.md section 4.4, fusion target 2). One CTA per group; its threads stride over the
// embedding dim in 16-byte vectors (or single elements when alignment forbids vectors).
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>

#include "dtype.cuh"
#include "kelix_fast/kernels.h"
#include "status.h"

namespace kelix_fast {
namespace {

constexpr int kThreads = 128;

template <typename T, int kVec>
__global__ void __launch_bounds__(kThreads) block_embed_kernel(const kf_block_embed_params p) {
  const int64_t r = blockIdx.x;
  const int64_t* slots = p.ids + r * p.n_slots;
  const T* table = static_cast<const T*>(p.table);
  T* out = static_cast<T*>(p.out) + r * p.dim;
  const int64_t first = slots[0];
  const bool visual = first >= p.text_vocab;
  // Slots strictly before the first q_eos count; the last slot (end of block) never does.
  int n_valid = 0;
  while (n_valid < p.n_slots - 1 && slots[n_valid] != p.q_eos) ++n_valid;

  for (int64_t col = static_cast<int64_t>(threadIdx.x) * kVec; col < p.dim;
       col += static_cast<int64_t>(kThreads) * kVec) {
    float acc[kVec];
#pragma unroll
    for (int e = 0; e < kVec; ++e) acc[e] = 0.f;
    // Slot order, one float32 add per slot, like the reference's acc += E[row_j]: bit-identical
    // sums (a text group adds E[t] k times rather than multiplying by k).
    for (int j = 0; j < n_valid; ++j) {
      int64_t row = visual ? slots[j] : first;
      // The caller validates ids; clamping only keeps a bad id from reading outside the table.
      row = row < 0 ? 0 : (row >= p.n_table_rows ? p.n_table_rows - 1 : row);
      const T* source = table + row * p.table_row_stride + col;
      T values[kVec];
      if (kVec > 1) {
        const uint4 v = *reinterpret_cast<const uint4*>(source);
        memcpy(values, &v, sizeof(v));
      } else {
        values[0] = source[0];
      }
#pragma unroll
      for (int e = 0; e < kVec; ++e) acc[e] += to_float(values[e]);
    }
    T rounded[kVec];
#pragma unroll
    for (int e = 0; e < kVec; ++e) rounded[e] = from_float<T>(acc[e]);
    if (kVec > 1) {
      uint4 v;
      memcpy(&v, rounded, sizeof(v));
      *reinterpret_cast<uint4*>(out + col) = v;
    } else {
      out[col] = rounded[0];
    }
  }
}

template <typename T>
cudaError_t launch(const kf_block_embed_params& p, cudaStream_t stream) {
  // 16-byte vectors need the table and out bases, the dim and the table's row pitch in whole
  // vectors; torch tensors nearly always qualify, odd slices fall back to element loads.
  const bool vec = reinterpret_cast<uintptr_t>(p.table) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(p.out) % 16 == 0 && (p.dim * sizeof(T)) % 16 == 0 &&
                   (p.table_row_stride * sizeof(T)) % 16 == 0;
  const dim3 grid(static_cast<unsigned>(p.n_rows));
  if (vec) {
    block_embed_kernel<T, 16 / sizeof(T)><<<grid, kThreads, 0, stream>>>(p);
  } else {
    block_embed_kernel<T, 1><<<grid, kThreads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

}  // namespace
}  // namespace kelix_fast

extern "C" kf_status kf_block_embed(const kf_block_embed_params* params, kf_stream stream) {
  using namespace kelix_fast;
  if (params == nullptr) return KF_ERR_INVALID_ARGUMENT;
  const kf_block_embed_params& p = *params;
  if (p.n_rows < 0 || p.n_slots < 2 || p.n_table_rows < 1 || p.dim < 0 ||
      p.table_row_stride < p.dim) {
    return KF_ERR_INVALID_ARGUMENT;
  }
  if (p.dtype != KF_DTYPE_BFLOAT16 && p.dtype != KF_DTYPE_FLOAT16 && p.dtype != KF_DTYPE_FLOAT32) {
    return KF_ERR_UNSUPPORTED;
  }
  if (p.n_rows > 0x7fffffff) return KF_ERR_UNSUPPORTED;  // one CTA per group: grid.x limit
  if (p.n_rows == 0 || p.dim == 0) return KF_OK;
  if (p.ids == nullptr || p.table == nullptr || p.out == nullptr) return KF_ERR_INVALID_ARGUMENT;
  const size_t element = p.dtype == KF_DTYPE_FLOAT32 ? 4 : 2;
  if (reinterpret_cast<uintptr_t>(p.ids) % 8 != 0 ||
      reinterpret_cast<uintptr_t>(p.table) % element != 0 ||
      reinterpret_cast<uintptr_t>(p.out) % element != 0) {
    return KF_ERR_INVALID_ARGUMENT;
  }
  cudaError_t error;
  switch (p.dtype) {
    case KF_DTYPE_BFLOAT16:
      error = launch<__nv_bfloat16>(p, stream);
      break;
    case KF_DTYPE_FLOAT16:
      error = launch<__half>(p, stream);
      break;
    default:
      error = launch<float>(p, stream);
      break;
  }
  return cuda_status(error);
}
