// kf_head_select: final RMSNorm + output head + token selection of the Block Decoder
// (kelix-ar.md sections 4.6, 5.6, 8 #3) without an [M, V] logits matrix.
//
// Three launches on the caller's stream; grids and shared memory come from sizes only:
//   1. head_select_norm_kernel, one CTA per row: the RMSNorm'd rows u [M, D] in T, written to the
//      workspace (M x D x 2 bytes in bf16: a few KB).
//   2. head_select_scores_kernel, grid (row chunks, vocabulary slices): a CTA stages its chunk of
//      u in shared memory and streams a contiguous slice of head rows. Each warp scores kGroup
//      consecutive head rows at a time: lanes stride over D in 16-byte vectors, so one warp-wide
//      load reads 512 contiguous bytes of one head row, and every u vector read from shared
//      memory feeds kGroup rows (shared-memory traffic = chunk / kGroup times the head's). The
//      per-lane float32 partial dots are summed with xor shuffles; then each lane scores, masks
//      and packs the (row, head row) items it owns into int64 keys and keeps their maximum; the
//      CTA merges them with shared-memory atomicMax and writes one key per (row, slice).
//   3. head_select_reduce_kernel, one warp per row: the max key over the slices -> ids.
//
// Keys (as the Triton kernel's): the high half is the order-preserving int32 of the float32
// score (-0.0 first mapped to 0.0), the low half 2^31 - 1 - id, so the largest key is the largest
// score with the lowest id: one integer max is the exact first-index tie rule of argmax.
//
// Sizing for the production head (V = 217,472, D = 4,096, bf16: 1.78 GB per call, a GEMV at
// M = 1): the floor is the head's bandwidth. 256 threads (8 warps x 4 head rows = a 32-row tile
// per CTA pass) keep 4 x 16 bytes of head loads in flight per thread; vocabulary slices are whole
// tiles, kTargetSplits of them at most (971 slices of 224 rows for the production head). At
// M <= 2 a CTA needs 64-80 registers per thread and <= 16 KB of shared memory: 3-4 CTAs per SM,
// ~50 KB of loads in flight per SM (Little's law asks ~20 KB at 3.35 TB/s), ~2 waves. A 16-row
// chunk holds 112 KB of normed rows (bf16, D = 4096: 14 rows fit) and is held to 128 registers
// by its launch bounds (ptxas reports a 92-byte spill; 159 registers unbounded) so that 2 CTAs
// share an SM, ~4 waves. The per-(row, slice) keys are M x 971 int64. FMA throughput: each head
// element costs M float32 FMAs, so the kernel is bandwidth-bound at M = 1 only. Measured on an
// H200 (commit 265be71, greedy, bf16): 0.437 ms at M = 1 (96% of copy bandwidth; Triton 0.457),
// 0.925 at M = 8, 3.16 at M = 32, 11.1 at M = 128, where the Triton kernel's tensor cores stay
// near the bandwidth floor (0.460, 0.491, 0.671 ms). kelix_fast's Python API therefore offers this
// kernel for one row only (ops._cuda.can_run_head_select); the C API stays correct for any M.
//
// The GPU tests are in tests/ops/test_cuda_backends.py.
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "dtype.cuh"
#include "kelix_fast/kernels.h"
#include "status.h"

namespace kelix_fast {
namespace {

constexpr int kThreads = 256;  // scores kernel
constexpr int kWarps = kThreads / 32;
constexpr int kGroup = 4;  // head rows one warp scores at once
constexpr int kTileRows = kWarps * kGroup;
constexpr int64_t kTargetSplits = 1056;  // 8 per SM on 132 SMs
constexpr int kMaxChunk = 16;            // rows per CTA (the accumulators: kMaxChunk x kGroup)
constexpr int kSmemBudget = 112 * 1024;  // normed rows per CTA: 2 CTAs per SM fit in 228 KB
constexpr int kNormThreads = 256;
constexpr int kReduceWarps = 8;
constexpr uint32_t kIndexMax = 0x7fffffffu;  // low half of a key: kIndexMax - id (ids < 2^31)
constexpr long long kSentinel = LLONG_MIN;   // below every real key, -inf scores included
constexpr uint32_t kMixA = 0x21f0aaadu;      // lowbias32 multipliers, as triton_kernels
constexpr uint32_t kMixB = 0x735a2d97u;
constexpr uint32_t kSeedSalt = 0x9e3779b9u;
constexpr unsigned kFullMask = 0xffffffffu;

static_assert(kMaxChunk <= 32, "the range test gives each chunk row one lane");
static_assert((kGroup & (kGroup - 1)) == 0, "items per lane assume power-of-two counts");

// ---- the selection arithmetic of triton_kernels/head_select.py (host-callable for checks) ----

// lowbias32 (wrapping uint32 multiplies), triton's _mix32.
__host__ __device__ inline uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= kMixA;
  x ^= x >> 15;
  x *= kMixB;
  x ^= x >> 15;
  return x;
}

// triton's row_keys: both halves of the int64 seed count.
__host__ __device__ inline uint32_t row_key(int64_t seed) {
  const uint64_t bits = static_cast<uint64_t>(seed);
  const uint32_t high = mix32(static_cast<uint32_t>(bits >> 32) ^ kSeedSalt);
  return mix32(static_cast<uint32_t>(bits) ^ high);
}

// The Gumbel uniform of (row, id) from 23 hashed bits, bit for bit the Triton kernel's formula:
// (2^23 - 1) + 0.5 is exact in float32, so U < 1 always (24 bits would round the top value up to 1).
__host__ __device__ inline float gumbel_uniform(uint32_t key, int64_t id) {
  const uint32_t hashed = mix32(key ^ mix32(static_cast<uint32_t>(id)));
  return (static_cast<float>(hashed >> 9) + 0.5f) * (1.0f / 8388608.0f);
}

__host__ __device__ inline long long pack_key(float score, int64_t id) {
  if (score == 0.f) score = 0.f;  // -0.0 == 0.0 for argmax: one key for both
  int32_t bits;
  memcpy(&bits, &score, sizeof(bits));
  // Order-preserving: negative floats have their magnitude bits flipped.
  const int32_t ordered = bits < 0 ? bits ^ 0x7fffffff : bits;
  const uint64_t high = static_cast<uint64_t>(static_cast<uint32_t>(ordered)) << 32;
  return static_cast<long long>(high | (kIndexMax - static_cast<uint32_t>(id)));
}

__host__ __device__ inline int64_t key_id(long long key) {
  return static_cast<int64_t>(kIndexMax - static_cast<uint32_t>(key & 0xffffffffLL));
}

// ---- device helpers -----------------------------------------------------------------------------

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) x += __shfl_xor_sync(kFullMask, x, offset);
  return x;
}

template <typename T>
__device__ __forceinline__ void unpack(const uint4& raw, float (&out)[16 / sizeof(T)]) {
  T values[16 / sizeof(T)];
  memcpy(values, &raw, sizeof(raw));
#pragma unroll
  for (int e = 0; e < 16 / static_cast<int>(sizeof(T)); ++e) out[e] = to_float(values[e]);
}

// What the scores kernel needs besides the public parameters.
struct ScoresArgs {
  const void* head;
  const uint4* normed;  // [n_rows, dim] in T, contiguous (workspace)
  const int64_t* ranges;
  const int64_t* seeds;
  long long* keys;  // [n_rows, num_splits] (workspace)
  int64_t n_rows;
  int64_t vocab;
  int64_t head_row_stride;
  int64_t ranges_row_stride;
  int64_t ranges_range_stride;
  int64_t slice;  // head rows per CTA: a multiple of kTileRows
  int32_t dim;
  int32_t n_ranges;
  int32_t rows_per_chunk;
  int32_t num_splits;
  float logit_divisor;
  bool gumbel;
};

__device__ __forceinline__ const int64_t* range_of(const ScoresArgs& a, int64_t row, int r) {
  return a.ranges + row * a.ranges_row_stride + r * a.ranges_range_stride;
}

// Whether row may pick an id in [begin, end).
__device__ bool row_overlaps(const ScoresArgs& a, int64_t row, int64_t begin, int64_t end) {
  for (int r = 0; r < a.n_ranges; ++r) {
    const int64_t* range = range_of(a, row, r);
    if (max(range[0], begin) < min(range[1], end)) return true;
  }
  return false;
}

__device__ bool row_allows(const ScoresArgs& a, int64_t row, int64_t id) {
  for (int r = 0; r < a.n_ranges; ++r) {
    const int64_t* range = range_of(a, row, r);
    if (range[0] <= id && id < range[1]) return true;
  }
  return false;
}

// ---- kernels ------------------------------------------------------------------------------------

// u[row] = T(T(y[row] * rstd) * w) (kelix_fast.ops.rms_norm), one CTA per row. The _rn
// intrinsics pin the float32 rounding of each step (no contraction, whatever the flags).
template <typename T>
__global__ void __launch_bounds__(kNormThreads)
    head_select_norm_kernel(const T* __restrict__ y, const T* __restrict__ weight,
                            T* __restrict__ normed, int64_t y_row_stride, int dim, float eps) {
  __shared__ float partial[kNormThreads / 32];
  const int64_t row = blockIdx.x;
  const T* y_row = y + row * y_row_stride;
  float sumsq = 0.f;
  for (int k = threadIdx.x; k < dim; k += kNormThreads) {
    const float v = to_float(y_row[k]);
    sumsq = fmaf(v, v, sumsq);
  }
  sumsq = warp_sum(sumsq);
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = sumsq;
  __syncthreads();
  float total = 0.f;
#pragma unroll
  for (int w = 0; w < kNormThreads / 32; ++w) total += partial[w];
  // 1 / sqrt_rn: the correctly rounded pair torch's CPU rsqrt gives (as the Triton kernel).
  const float rstd =
      __fdiv_rn(1.f, __fsqrt_rn(__fadd_rn(__fdiv_rn(total, static_cast<float>(dim)), eps)));
  T* out = normed + row * dim;
  for (int k = threadIdx.x; k < dim; k += kNormThreads) {
    const float scaled = round_to<T>(__fmul_rn(to_float(y_row[k]), rstd));
    out[k] = from_float<T>(__fmul_rn(scaled, to_float(weight[k])));
  }
}

// One key per (row of the chunk, vocabulary slice): see the file comment. kChunk >= the chunk's
// row count n; rows m >= n are skipped by warp-uniform branches.
template <typename T, int kChunk>
__global__ void __launch_bounds__(kThreads, kChunk >= 16 ? 2 : 1)
    head_select_scores_kernel(const ScoresArgs a) {
  constexpr int kVec = 16 / sizeof(T);
  constexpr int kItems = kChunk * kGroup;     // (row, head row) pairs of one warp step
  constexpr int kRounds = (kItems + 31) / 32;  // items per lane
  extern __shared__ uint4 normed_s[];          // [n, dim / kVec]
  __shared__ long long best_s[kChunk];

  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * a.rows_per_chunk;
  const int n = static_cast<int>(min(static_cast<int64_t>(a.rows_per_chunk), a.n_rows - row0));
  const int64_t split = blockIdx.y;
  const int64_t v_begin = split * a.slice;
  const int64_t v_end = min(v_begin + a.slice, a.vocab);
  long long* keys = a.keys + row0 * a.num_splits + split;  // keys[m * num_splits]

  // Every id of the slice scores at least -inf, and the slice's first id wins among those: the
  // key of (-inf, v_begin) is what the Triton kernel's -inf lanes reduce to.
  const long long floor_key = pack_key(-INFINITY, v_begin);
  if (threadIdx.x < n) best_s[threadIdx.x] = floor_key;
  // A slice no row of the chunk may pick is never read (finished rows in the decode loop allow
  // [q_eos, q_eos + 1) only): no staging, no head traffic.
  bool needed = a.n_ranges == 0;
  for (int m = threadIdx.x; !needed && m < n; m += kThreads) {
    needed = row_overlaps(a, row0 + m, v_begin, v_end);
  }
  if (!__syncthreads_or(needed)) {
    if (threadIdx.x < n) keys[threadIdx.x * static_cast<int64_t>(a.num_splits)] = floor_key;
    return;
  }

  const int row_vecs = a.dim / kVec;
  const uint4* normed_g = a.normed + row0 * row_vecs;
  for (int i = threadIdx.x; i < n * row_vecs; i += kThreads) normed_s[i] = normed_g[i];
  __syncthreads();

  // Lane-owned items: in round k, lane owns item (lane + 32k) mod kItems = (row m, head row g of
  // the warp's group). The same rows every step, so the running maxima stay in registers. With
  // kItems < 32 several lanes own one item (a harmless duplicate).
  int item_row[kRounds];
  uint32_t item_key[kRounds];
  long long best[kRounds];
#pragma unroll
  for (int k = 0; k < kRounds; ++k) {
    item_row[k] = ((lane + 32 * k) % kItems) / kGroup;
    item_key[k] = a.gumbel && item_row[k] < n ? row_key(a.seeds[row0 + item_row[k]]) : 0u;
    best[k] = kSentinel;
  }

  const T* head = static_cast<const T*>(a.head);
  for (int64_t v0 = v_begin + warp * kGroup; v0 < v_end; v0 += kTileRows) {
    const int64_t v_stop = min(v0 + kGroup, v_end);
    if (a.n_ranges > 0) {
      // Groups no row may pick are skipped too (warp-uniform: every lane takes the branch).
      const bool hit = lane < n && row_overlaps(a, row0 + lane, v0, v_stop);
      if (!__any_sync(kFullMask, hit)) continue;
    }
    const uint4* rows[kGroup];
#pragma unroll
    for (int g = 0; g < kGroup; ++g) {
      // Past the slice's end (last slice only), re-read its last row; those items are dropped.
      const int64_t v = min(v0 + g, v_end - 1);
      rows[g] = reinterpret_cast<const uint4*>(head + v * a.head_row_stride);
    }
    float acc[kChunk][kGroup];
#pragma unroll
    for (int m = 0; m < kChunk; ++m) {
#pragma unroll
      for (int g = 0; g < kGroup; ++g) acc[m][g] = 0.f;
    }
#pragma unroll 2
    for (int j = lane; j < row_vecs; j += 32) {
      float h[kGroup][kVec];
#pragma unroll
      for (int g = 0; g < kGroup; ++g) unpack<T>(__ldg(rows[g] + j), h[g]);
#pragma unroll
      for (int m = 0; m < kChunk; ++m) {
        if (m < n) {
          float u[kVec];
          unpack<T>(normed_s[m * row_vecs + j], u);
#pragma unroll
          for (int g = 0; g < kGroup; ++g) {
#pragma unroll
            for (int e = 0; e < kVec; ++e) acc[m][g] = fmaf(u[e], h[g][e], acc[m][g]);
          }
        }
      }
    }
#pragma unroll
    for (int m = 0; m < kChunk; ++m) {
      if (m < n) {
#pragma unroll
        for (int g = 0; g < kGroup; ++g) acc[m][g] = warp_sum(acc[m][g]);
      }
    }

#pragma unroll
    for (int k = 0; k < kRounds; ++k) {
      const int item = (lane + 32 * k) % kItems;
      // Every lane holds every sum; pick this lane's with selects (register arrays must be
      // indexed by constants). Round k owns items [32k, 32k + 32) when kItems >= 32.
      float logit = 0.f;
#pragma unroll
      for (int c = 0; c < kItems; ++c) {
        if (c / 32 == k && c == item) logit = acc[c / kGroup][c % kGroup];
      }
      const int m = item / kGroup;
      const int64_t v = v0 + item % kGroup;
      if (m < n && v < v_end) {
        float score = logit;
        if (a.gumbel) {
          // Triton: div_rn by (t + 1e-5), then minus log(-log(U)).
          score = __fdiv_rn(score, a.logit_divisor);
          score = score - logf(-logf(gumbel_uniform(item_key[k], v)));
        }
        if (a.n_ranges > 0 && !row_allows(a, row0 + m, v)) score = -INFINITY;
        best[k] = max(best[k], pack_key(score, v));
      }
    }
  }

#pragma unroll
  for (int k = 0; k < kRounds; ++k) {
    if (item_row[k] < n) atomicMax(&best_s[item_row[k]], best[k]);
  }
  __syncthreads();
  if (threadIdx.x < n) keys[threadIdx.x * static_cast<int64_t>(a.num_splits)] = best_s[threadIdx.x];
}

// ids[row] = the id of the largest key of keys[row, :], one warp per row.
__global__ void __launch_bounds__(kReduceWarps * 32)
    head_select_reduce_kernel(const long long* __restrict__ keys, int64_t n_rows, int num_splits,
                              int64_t* __restrict__ ids) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kReduceWarps + threadIdx.x / 32;
  if (row >= n_rows) return;  // whole warps
  const int lane = threadIdx.x % 32;
  long long best = kSentinel;
  for (int s = lane; s < num_splits; s += 32) best = max(best, keys[row * num_splits + s]);
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    best = max(best, __shfl_xor_sync(kFullMask, best, offset));
  }
  if (lane == 0) ids[row] = key_id(best);
}

// ---- host side ----------------------------------------------------------------------------------

size_t element_size(kf_dtype dtype) { return dtype == KF_DTYPE_FLOAT32 ? 4 : 2; }

bool float_dtype(kf_dtype dtype) {
  return dtype == KF_DTYPE_BFLOAT16 || dtype == KF_DTYPE_FLOAT16 || dtype == KF_DTYPE_FLOAT32;
}

size_t align_up(size_t bytes, size_t alignment) {
  return (bytes + alignment - 1) / alignment * alignment;
}

bool misaligned(const void* pointer, size_t alignment) {
  return reinterpret_cast<uintptr_t>(pointer) % alignment != 0;
}

// Grid, chunking and workspace layout, from sizes only.
struct Plan {
  int64_t slice;       // head rows per vocabulary slice
  int32_t num_splits;  // vocabulary slices
  int32_t rows_per_chunk;
  int64_t num_chunks;
  size_t normed_bytes;  // workspace: normed rows first, 256-byte aligned, then the keys
  size_t workspace_bytes;
  size_t smem_bytes;  // scores kernel, dynamic
};

kf_status check_sizes(int64_t n_rows, int32_t dim, int64_t vocab, kf_dtype dtype) {
  if (n_rows < 0 || dim < 1 || vocab < 1 || vocab > kIndexMax) return KF_ERR_INVALID_ARGUMENT;
  if (!float_dtype(dtype)) return KF_ERR_UNSUPPORTED;
  const size_t row_bytes = static_cast<size_t>(dim) * element_size(dtype);
  if (row_bytes % 16 != 0 || row_bytes > static_cast<size_t>(kSmemBudget)) {
    return KF_ERR_UNSUPPORTED;
  }
  // Row chunks along grid.x (2^31 - 1 CTAs), and every launch's row count within int64 math.
  if (n_rows > 0x7fffffffLL) return KF_ERR_UNSUPPORTED;
  return KF_OK;
}

// Sizes must have passed check_sizes.
Plan make_plan(int64_t n_rows, int32_t dim, int64_t vocab, kf_dtype dtype) {
  Plan plan{};
  const int64_t tiles = (vocab + kTileRows - 1) / kTileRows;
  const int64_t tiles_per_split = (tiles + kTargetSplits - 1) / kTargetSplits;
  plan.slice = tiles_per_split * kTileRows;
  plan.num_splits = static_cast<int32_t>((vocab + plan.slice - 1) / plan.slice);
  const size_t row_bytes = static_cast<size_t>(dim) * element_size(dtype);
  const int64_t cap =
      std::min<int64_t>(kMaxChunk, static_cast<int64_t>(kSmemBudget / row_bytes));
  // Balanced chunks (e.g. 33 rows -> 11 + 11 + 11 rather than 16 + 16 + 1); the chunk count is
  // recomputed from the chunk size so that no chunk is empty.
  const int64_t wanted_chunks = std::max<int64_t>(1, (n_rows + cap - 1) / cap);
  plan.rows_per_chunk = static_cast<int32_t>(
      std::max<int64_t>(1, (n_rows + wanted_chunks - 1) / wanted_chunks));
  plan.num_chunks = (n_rows + plan.rows_per_chunk - 1) / plan.rows_per_chunk;
  plan.normed_bytes = align_up(static_cast<size_t>(n_rows) * row_bytes, 256);
  plan.workspace_bytes = plan.normed_bytes + static_cast<size_t>(n_rows) * plan.num_splits * 8;
  plan.smem_bytes = static_cast<size_t>(plan.rows_per_chunk) * row_bytes;
  return plan;
}

template <typename T, int kChunk>
cudaError_t launch_scores(const ScoresArgs& args, const Plan& plan, cudaStream_t stream) {
  auto* kernel = head_select_scores_kernel<T, kChunk>;
  if (plan.smem_bytes > 48 * 1024) {
    // Above 48 KiB a kernel must opt in; a host-side attribute (no sync, legal under capture).
    // Always the whole budget, so that concurrent callers with other dims never shrink it.
    const cudaError_t error =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBudget);
    if (error != cudaSuccess) return error;
  }
  const dim3 grid(static_cast<unsigned>(plan.num_chunks), static_cast<unsigned>(plan.num_splits));
  kernel<<<grid, kThreads, plan.smem_bytes, stream>>>(args);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch(const kf_head_select_params& p, const Plan& plan, cudaStream_t stream) {
  unsigned char* workspace = static_cast<unsigned char*>(p.workspace);
  T* normed = reinterpret_cast<T*>(workspace);
  long long* keys = reinterpret_cast<long long*>(workspace + plan.normed_bytes);

  head_select_norm_kernel<T><<<static_cast<unsigned>(p.n_rows), kNormThreads, 0, stream>>>(
      static_cast<const T*>(p.y), static_cast<const T*>(p.norm_weight), normed, p.y_row_stride,
      p.dim, p.eps);
  cudaError_t error = cudaGetLastError();
  if (error != cudaSuccess) return error;

  ScoresArgs args{};
  args.head = p.head;
  args.normed = reinterpret_cast<const uint4*>(normed);
  args.ranges = p.n_ranges > 0 ? p.ranges : nullptr;
  args.seeds = p.seeds;
  args.keys = keys;
  args.n_rows = p.n_rows;
  args.vocab = p.vocab;
  args.head_row_stride = p.head_row_stride;
  args.ranges_row_stride = p.ranges_row_stride;
  args.ranges_range_stride = p.ranges_range_stride;
  args.slice = plan.slice;
  args.dim = p.dim;
  args.n_ranges = p.n_ranges;
  args.rows_per_chunk = plan.rows_per_chunk;
  args.num_splits = plan.num_splits;
  args.logit_divisor = p.logit_divisor;
  args.gumbel = p.mode == KF_HEAD_SELECT_GUMBEL;
  // The smallest instantiation that holds the chunk: unused accumulators cost registers, and
  // few registers is what lets 8 CTAs share an SM at small M.
  const int rows = plan.rows_per_chunk;
  if (rows <= 1) {
    error = launch_scores<T, 1>(args, plan, stream);
  } else if (rows <= 2) {
    error = launch_scores<T, 2>(args, plan, stream);
  } else if (rows <= 4) {
    error = launch_scores<T, 4>(args, plan, stream);
  } else if (rows <= 8) {
    error = launch_scores<T, 8>(args, plan, stream);
  } else {
    error = launch_scores<T, 16>(args, plan, stream);
  }
  if (error != cudaSuccess) return error;

  const unsigned reduce_blocks =
      static_cast<unsigned>((p.n_rows + kReduceWarps - 1) / kReduceWarps);
  head_select_reduce_kernel<<<reduce_blocks, kReduceWarps * 32, 0, stream>>>(
      keys, p.n_rows, plan.num_splits, p.ids);
  return cudaGetLastError();
}

}  // namespace
}  // namespace kelix_fast

extern "C" kf_status kf_head_select_workspace_size(int64_t n_rows, int32_t dim, int64_t vocab,
                                                   kf_dtype dtype, size_t* bytes) {
  using namespace kelix_fast;
  if (bytes == nullptr) return KF_ERR_INVALID_ARGUMENT;
  const kf_status status = check_sizes(n_rows, dim, vocab, dtype);
  if (status != KF_OK) return status;
  *bytes = make_plan(n_rows, dim, vocab, dtype).workspace_bytes;
  return KF_OK;
}

extern "C" kf_status kf_head_select(const kf_head_select_params* params, kf_stream stream) {
  using namespace kelix_fast;
  if (params == nullptr) return KF_ERR_INVALID_ARGUMENT;
  const kf_head_select_params& p = *params;
  const kf_status sizes = check_sizes(p.n_rows, p.dim, p.vocab, p.dtype);
  if (sizes != KF_OK) return sizes;
  if (p.y_row_stride < 0 || p.head_row_stride < 0 || p.n_ranges < 0 ||
      p.ranges_row_stride < 0 || p.ranges_range_stride < 0 ||
      !(std::isfinite(p.eps) && p.eps >= 0.f)) {
    return KF_ERR_INVALID_ARGUMENT;
  }
  if (p.mode != KF_HEAD_SELECT_GREEDY && p.mode != KF_HEAD_SELECT_GUMBEL) {
    return KF_ERR_UNSUPPORTED;
  }
  if (p.mode == KF_HEAD_SELECT_GUMBEL &&
      !(std::isfinite(p.logit_divisor) && p.logit_divisor > 0.f)) {
    return KF_ERR_INVALID_ARGUMENT;
  }
  const size_t element = element_size(p.dtype);
  // 16-byte head loads: every head row must start on a 16-byte boundary.
  if (p.vocab > 1 && (static_cast<size_t>(p.head_row_stride) * element) % 16 != 0) {
    return KF_ERR_UNSUPPORTED;
  }
  if (p.n_rows == 0) return KF_OK;
  if (p.y == nullptr || p.norm_weight == nullptr || p.head == nullptr || p.ids == nullptr ||
      p.workspace == nullptr || (p.mode == KF_HEAD_SELECT_GUMBEL && p.seeds == nullptr) ||
      (p.ranges == nullptr) != (p.n_ranges == 0)) {
    return KF_ERR_INVALID_ARGUMENT;
  }
  if (misaligned(p.head, 16)) return KF_ERR_UNSUPPORTED;
  if (misaligned(p.y, element) || misaligned(p.norm_weight, element) || misaligned(p.ids, 8) ||
      misaligned(p.ranges, 8) || misaligned(p.seeds, 8) || misaligned(p.workspace, 16)) {
    return KF_ERR_INVALID_ARGUMENT;
  }
  const Plan plan = make_plan(p.n_rows, p.dim, p.vocab, p.dtype);
  if (p.workspace_size < plan.workspace_bytes) return KF_ERR_INVALID_ARGUMENT;
  cudaError_t error;
  switch (p.dtype) {
    case KF_DTYPE_BFLOAT16:
      error = launch<__nv_bfloat16>(p, plan, stream);
      break;
    case KF_DTYPE_FLOAT16:
      error = launch<__half>(p, plan, stream);
      break;
    default:
      error = launch<float>(p, plan, stream);
      break;
  }
  return cuda_status(error);
}
