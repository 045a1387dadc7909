// kf_codebook_argmin: per-group LayerNorm of the query + distance GEMM + argmin epilogue, every
// sub-codebook in one launch (kelix-ar.md section 3.5, fusion target 1).
//
// One CTA owns kRows query rows of one group g (grid = [ceil(n / kRows), G]):
//   1. each warp LayerNorms whole rows of z_g in float32 and stores u in shared memory;
//   2. the CTA walks the K codes of group g in tiles of kCodes rows staged in shared memory,
//      computes the [kRows, kCodes] dot tile (tensor cores for bf16/fp16 through WMMA, float32
//      FMA for fp32), turns it into distances and folds it into a running (min, index) kept in
//      registers by two threads per row. The [n, K] distance matrix never exists.
// The code tile is loaded synchronously (no cp.async double buffering yet): a correct first
// version; the loads are 16-byte vectors when the codebook allows it.
#include <cuda_runtime.h>
#include <mma.h>

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "dtype.cuh"
#include "kelix_fast/kernels.h"
#include "status.h"

namespace kelix_fast {
namespace {

constexpr int kRows = 64;   // query rows per CTA
constexpr int kCodes = 64;  // codes per shared-memory tile
constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxDim = 256;
constexpr int kDotLd = kCodes + 4;  // float row pitch of the dot tile; +4 spreads the banks

static_assert(kThreads == 2 * kRows, "the epilogue gives each query row two threads");
static_assert(kThreads == 2 * kCodes, "the |c|^2 pass gives each code two threads");
static_assert(kRows == 16 * kWarps, "each warp owns 16 rows of the WMMA tile");

__host__ __device__ constexpr size_t align128(size_t bytes) { return (bytes + 127) / 128 * 128; }

// Number of T-valued parts u is split into for the tensor-core GEMM. Reference mode rounds u to T
// anyway (one part). Exact mode wants the float32 u: u = u0 + u1 (+ u2), each part a T, so that
// sum_p u_p.c (every product exact in the float32 accumulator) is u.c to about float32 precision:
// bf16 keeps 8 significant bits, so three parts leave a 2^-24 relative remainder; fp16 keeps 11,
// so two parts leave 2^-22. float32 does not use tensor cores (one part, FMA).
template <typename T, bool kReference>
constexpr int split_parts() {
  if (kReference || std::is_same<T, float>::value) return 1;
  return std::is_same<T, __half>::value ? 2 : 3;
}

// Dynamic shared memory: u parts [kSplit][kRows][ld], code tile [kCodes][ld], dot tile
// [kRows][kDotLd] float, |c|^2 [kCodes] and |u|^2 [kRows] float. Every region starts 128-byte
// aligned (WMMA needs 32 bytes). ld pads rows by 16 bytes (tensor-core path: keeps WMMA's
// 32-byte fragment alignment for any d % 16 == 0 and staggers banks) or by one float (FMA path).
template <typename T, bool kReference>
struct Layout {
  static constexpr bool kMma = !std::is_same<T, float>::value;
  static constexpr int kSplit = split_parts<T, kReference>();

  __host__ __device__ static int ld(int dim) { return kMma ? dim + 8 : dim + 1; }
  __host__ __device__ static size_t u_bytes(int dim) {
    return align128(sizeof(T) * kSplit * kRows * ld(dim));
  }
  __host__ __device__ static size_t codes_bytes(int dim) {
    return align128(sizeof(T) * kCodes * ld(dim));
  }
  __host__ __device__ static size_t dot_bytes() { return align128(sizeof(float) * kRows * kDotLd); }
  __host__ __device__ static size_t total(int dim) {
    return u_bytes(dim) + codes_bytes(dim) + dot_bytes() + sizeof(float) * (kCodes + kRows);
  }
};

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// Step 1: u = LayerNorm_g(z[row, g]) for the CTA's rows, one warp per row, into u_s (split into
// kSplit parts of type T) and, in reference mode, |u|^2 = T(sum T(u*u)) into usq_s. Rows past
// n_rows get u = 0; their results are never written.
template <typename T, bool kReference>
__device__ void layer_norm_rows(const kf_codebook_argmin_params& p, int g, int64_t row0,
                                T* __restrict__ u_s, float* __restrict__ usq_s) {
  using L = Layout<T, kReference>;
  const int dim = p.dim;
  const int ld = L::ld(dim);
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const T* z = static_cast<const T*>(p.z);
  const float* weight = p.ln_weight + static_cast<int64_t>(g) * dim;
  const float* bias = p.ln_bias + static_cast<int64_t>(g) * dim;
  for (int r = warp; r < kRows; r += kWarps) {
    const int64_t row = row0 + r;
    const bool live = row < p.n_rows;
    const T* z_row = z + row * p.z_row_stride + static_cast<int64_t>(g) * dim;
    float x[kMaxDim / 32];
    float sum = 0.f;
#pragma unroll
    for (int j = 0; j < kMaxDim / 32; ++j) {
      const int k = lane + 32 * j;
      x[j] = (live && k < dim) ? to_float(z_row[k]) : 0.f;
      sum += x[j];
    }
    const float mean = warp_sum(sum) / dim;
    // Two-pass biased variance in float32, as torch's layer_norm; its Welford order differs in the
    // last float32 bits only.
    float sq = 0.f;
#pragma unroll
    for (int j = 0; j < kMaxDim / 32; ++j) {
      if (lane + 32 * j < dim) sq += (x[j] - mean) * (x[j] - mean);
    }
    const float rstd = rsqrtf(warp_sum(sq) / dim + p.eps);
    float usq = 0.f;
#pragma unroll
    for (int j = 0; j < kMaxDim / 32; ++j) {
      const int k = lane + 32 * j;
      if (k >= dim) continue;
      const float u = live ? (x[j] - mean) * rstd * weight[k] + bias[k] : 0.f;
      float rest = u;
#pragma unroll
      for (int part = 0; part < L::kSplit; ++part) {
        const T t = from_float<T>(rest);
        u_s[(part * kRows + r) * ld + k] = t;
        rest -= to_float(t);
      }
      if (kReference) {
        const float ut = round_to<T>(u);  // the T-valued u the official code squares
        usq += round_to<T>(ut * ut);
      }
    }
    if (kReference) {
      usq = warp_sum(usq);
      if (lane == 0) usq_s[r] = round_to<T>(usq);
    }
  }
}

// Stages codes [k0, k0 + kCodes) of the group into c_s (zeros past n_codes).
template <typename T, bool kReference>
__device__ void load_code_tile(const T* __restrict__ codes, int n_codes, int dim, int k0, bool vec,
                               T* __restrict__ c_s) {
  using L = Layout<T, kReference>;
  const int ld = L::ld(dim);
  if (vec) {
    // 16-byte global loads; d % 16 == 0 makes every code row a whole number of vectors.
    constexpr int kVec = 16 / sizeof(T);
    const int per_row = dim / kVec;
    for (int i = threadIdx.x; i < kCodes * per_row; i += kThreads) {
      const int c = i / per_row;
      const int col = (i % per_row) * kVec;
      uint4 v = make_uint4(0u, 0u, 0u, 0u);
      if (k0 + c < n_codes) {
        v = *reinterpret_cast<const uint4*>(codes + static_cast<int64_t>(k0 + c) * dim + col);
      }
      if (L::kMma) {
        // (d + 8) * sizeof(T) is a multiple of 16: the shared store is aligned too.
        *reinterpret_cast<uint4*>(c_s + c * ld + col) = v;
      } else {
        const T* t = reinterpret_cast<const T*>(&v);
#pragma unroll
        for (int e = 0; e < kVec; ++e) c_s[c * ld + col + e] = t[e];
      }
    }
  } else {
    for (int i = threadIdx.x; i < kCodes * dim; i += kThreads) {
      const int c = i / dim;
      const int col = i % dim;
      c_s[c * ld + col] =
          (k0 + c < n_codes) ? codes[static_cast<int64_t>(k0 + c) * dim + col] : from_float<T>(0.f);
    }
  }
}

// dot_s[r][c] = sum_k u[r][k] * code[c][k] over the staged tile, float32 accumulation.
template <typename T, bool kReference>
__device__ void dot_tile(const T* __restrict__ u_s, const T* __restrict__ c_s, int dim,
                         float* __restrict__ dot_s) {
  using L = Layout<T, kReference>;
  const int ld = L::ld(dim);
  if constexpr (L::kMma) {
    namespace wmma = nvcuda::wmma;
    const int warp = threadIdx.x / 32;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[kCodes / 16];
#pragma unroll
    for (int j = 0; j < kCodes / 16; ++j) wmma::fill_fragment(acc[j], 0.f);
    for (int part = 0; part < L::kSplit; ++part) {
      const T* a_base = u_s + (part * kRows + warp * 16) * ld;
      for (int kk = 0; kk < dim; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::load_matrix_sync(a, a_base + kk, ld);
#pragma unroll
        for (int j = 0; j < kCodes / 16; ++j) {
          // The code tile [kCodes][ld] read as the column-major [d x kCodes] B operand.
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b;
          wmma::load_matrix_sync(b, c_s + j * 16 * ld + kk, ld);
          wmma::mma_sync(acc[j], a, b, acc[j]);
        }
      }
    }
#pragma unroll
    for (int j = 0; j < kCodes / 16; ++j) {
      wmma::store_matrix_sync(dot_s + warp * 16 * kDotLd + j * 16, acc[j], kDotLd,
                              wmma::mem_row_major);
    }
  } else {
    // float32: a 4 x 8 register tile per thread (rows tr + 16i, codes tc + 8j); the odd pitch
    // d + 1 puts the 4 (resp. 8) rows a warp reads at once in distinct banks.
    const int tr = threadIdx.x / 8;
    const int tc = threadIdx.x % 8;
    float acc[4][8] = {};
    for (int k = 0; k < dim; ++k) {
      float a[4];
      float b[8];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = u_s[(tr + 16 * i) * ld + k];
#pragma unroll
      for (int j = 0; j < 8; ++j) b[j] = c_s[(tc + 8 * j) * ld + k];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
      }
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
      for (int j = 0; j < 8; ++j) dot_s[(tr + 16 * i) * kDotLd + tc + 8 * j] = acc[i][j];
    }
  }
}

template <typename T, bool kReference>
__global__ void __launch_bounds__(kThreads)
    codebook_argmin_kernel(const kf_codebook_argmin_params p, bool vec) {
  using L = Layout<T, kReference>;
  extern __shared__ __align__(128) unsigned char smem[];
  const int dim = p.dim;
  const int ld = L::ld(dim);
  T* u_s = reinterpret_cast<T*>(smem);
  T* c_s = reinterpret_cast<T*>(smem + L::u_bytes(dim));
  float* dot_s = reinterpret_cast<float*>(smem + L::u_bytes(dim) + L::codes_bytes(dim));
  float* csq_s = dot_s + L::dot_bytes() / sizeof(float);
  float* usq_s = csq_s + kCodes;

  const int g = blockIdx.y;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRows;
  const int n_codes = p.n_codes;
  const T* codes = static_cast<const T*>(p.codebooks) + static_cast<int64_t>(g) * n_codes * dim;
  const float* sqnorms = p.codebook_sqnorms == nullptr
                             ? nullptr
                             : p.codebook_sqnorms + static_cast<int64_t>(g) * n_codes;

  layer_norm_rows<T, kReference>(p, g, row0, u_s, usq_s);

  // Epilogue ownership: thread t scans columns [half * 32, half * 32 + 32) of row t / 2 in every
  // tile. Its indices only grow, so a strict < keeps its first minimum; the final merge of the
  // two halves prefers the smaller index on equal values: the first index overall wins ties.
  const int my_row = threadIdx.x / 2;
  const int half = threadIdx.x % 2;
  // T(1e-30): the clamp of the official cdist in T (0 in fp16, where 1e-30 underflows).
  const float clamp_min = round_to<T>(1e-30f);
  float best = INFINITY;
  int best_index = 0;

  for (int k0 = 0; k0 < n_codes; k0 += kCodes) {
    __syncthreads();  // u_s and usq_s written; the previous tile's readers are done
    load_code_tile<T, kReference>(codes, n_codes, dim, k0, vec, c_s);
    __syncthreads();

    // |c|^2 of the tile: two threads per code, each half of the dims, combined by a shuffle.
    {
      const int c = threadIdx.x / 2;
      float sum = 0.f;
      for (int k = threadIdx.x % 2; k < dim; k += 2) {
        const float v = to_float(c_s[c * ld + k]);
        sum += kReference ? round_to<T>(v * v) : v * v;
      }
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      if (threadIdx.x % 2 == 0) {
        if (kReference) {
          csq_s[c] = round_to<T>(sum);
        } else if (sqnorms != nullptr) {
          csq_s[c] = k0 + c < n_codes ? sqnorms[k0 + c] : 0.f;
        } else {
          csq_s[c] = sum;
        }
      }
    }

    dot_tile<T, kReference>(u_s, c_s, dim, dot_s);
    __syncthreads();

    const float usq = kReference ? usq_s[my_row] : 0.f;
    const int end = min(kCodes, n_codes - k0);
    for (int c = half * (kCodes / 2); c < (half + 1) * (kCodes / 2) && c < end; ++c) {
      const float dot = dot_s[my_row * kDotLd + c];
      float dist;
      if (kReference) {
        // [-2u, |u|^2, 1] . [c, 1, |c|^2] accumulated in float32, rounded to T; clamp, sqrt and
        // square each rounded to T (torch's cdist matmul path, kelix-ar.md section 3.5).
        const float s = fmaxf(round_to<T>(-2.f * dot + usq + csq_s[c]), clamp_min);
        const float root = round_to<T>(sqrtf(s));
        dist = round_to<T>(root * root);
      } else {
        dist = csq_s[c] - 2.f * dot;
      }
      if (dist < best) {
        best = dist;
        best_index = k0 + c;
      }
    }
  }

  const float other = __shfl_xor_sync(0xffffffffu, best, 1);
  const int other_index = __shfl_xor_sync(0xffffffffu, best_index, 1);
  if (other < best || (other == best && other_index < best_index)) best_index = other_index;
  const int64_t row = row0 + my_row;
  if (half == 0 && row < p.n_rows) {
    p.ids[row * p.n_groups + g] = p.vocab_offset + static_cast<int64_t>(g) * n_codes + best_index;
  }
}

template <typename T, bool kReference>
cudaError_t launch(const kf_codebook_argmin_params& p, cudaStream_t stream) {
  using L = Layout<T, kReference>;
  const size_t smem = L::total(p.dim);
  const bool vec = reinterpret_cast<uintptr_t>(p.codebooks) % 16 == 0;
  auto* kernel = codebook_argmin_kernel<T, kReference>;
  // Needed above 48 KiB (e.g. exact bf16 at d = 128: 3 u parts); a host-side attribute, no sync.
  const cudaError_t error = cudaFuncSetAttribute(
      kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (error != cudaSuccess) return error;
  const dim3 grid(static_cast<unsigned>((p.n_rows + kRows - 1) / kRows),
                  static_cast<unsigned>(p.n_groups));
  kernel<<<grid, kThreads, smem, stream>>>(p, vec);
  return cudaGetLastError();
}

template <bool kReference>
cudaError_t dispatch_dtype(const kf_codebook_argmin_params& p, cudaStream_t stream) {
  switch (p.dtype) {
    case KF_DTYPE_BFLOAT16:
      return launch<__nv_bfloat16, kReference>(p, stream);
    case KF_DTYPE_FLOAT16:
      return launch<__half, kReference>(p, stream);
    default:
      return launch<float, kReference>(p, stream);
  }
}

size_t element_size(kf_dtype dtype) { return dtype == KF_DTYPE_FLOAT32 ? 4 : 2; }

bool misaligned(const void* pointer, size_t alignment) {
  return reinterpret_cast<uintptr_t>(pointer) % alignment != 0;
}

}  // namespace
}  // namespace kelix_fast

extern "C" kf_status kf_codebook_argmin(const kf_codebook_argmin_params* params, kf_stream stream) {
  using namespace kelix_fast;
  if (params == nullptr) return KF_ERR_INVALID_ARGUMENT;
  const kf_codebook_argmin_params& p = *params;
  if (p.n_rows < 0 || p.z_row_stride < 0 || p.n_groups < 1 || p.n_codes < 1 || p.dim < 1) {
    return KF_ERR_INVALID_ARGUMENT;
  }
  if (p.dim % 16 != 0 || p.dim > kMaxDim || p.n_groups > 65535) return KF_ERR_UNSUPPORTED;
  if (p.dtype != KF_DTYPE_BFLOAT16 && p.dtype != KF_DTYPE_FLOAT16 && p.dtype != KF_DTYPE_FLOAT32) {
    return KF_ERR_UNSUPPORTED;
  }
  if (p.mode != KF_ARGMIN_REFERENCE && p.mode != KF_ARGMIN_EXACT) return KF_ERR_UNSUPPORTED;
  // grid.x is limited to 2^31 - 1 CTAs.
  if ((p.n_rows + kRows - 1) / kRows > 0x7fffffff) return KF_ERR_UNSUPPORTED;
  if (p.n_rows == 0) return KF_OK;
  if (p.z == nullptr || p.ln_weight == nullptr || p.ln_bias == nullptr || p.codebooks == nullptr ||
      p.ids == nullptr) {
    return KF_ERR_INVALID_ARGUMENT;
  }
  const size_t element = element_size(p.dtype);
  if (misaligned(p.z, element) || misaligned(p.codebooks, element) || misaligned(p.ln_weight, 4) ||
      misaligned(p.ln_bias, 4) || misaligned(p.codebook_sqnorms, 4) || misaligned(p.ids, 8)) {
    return KF_ERR_INVALID_ARGUMENT;
  }
  const cudaError_t error = p.mode == KF_ARGMIN_REFERENCE ? dispatch_dtype<true>(p, stream)
                                                          : dispatch_dtype<false>(p, stream);
  return cuda_status(error);
}
