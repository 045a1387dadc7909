/* The kelix_fast C API: the only header an embedder includes.
 *
 * Every function is torch-free and returns a kf_status (or a plain value that cannot fail). The
 * library never allocates behind the caller's back, synchronizes, prints or exits: a failing CUDA
 * call becomes KF_ERR_CUDA, and its raw cudaError_t is kept for kf_last_cuda_error().
 * Link against libkelix_fast_kernels.so.
 */
#ifndef KELIX_FAST_KERNELS_H_
#define KELIX_FAST_KERNELS_H_

/* Bumped on every change to this header's declarations; kf_api_version() returns the value the
 * library was built with, so an embedder can compare it with the header it compiled against. */
#define KF_API_VERSION 3

#include <stddef.h>
#include <stdint.h>

#if defined(__GNUC__) || defined(__clang__)
#define KF_API __attribute__((visibility("default")))
#else
#define KF_API
#endif

#ifdef __cplusplus
extern "C" {
#endif

typedef enum { KF_OK = 0, KF_ERR_INVALID_ARGUMENT, KF_ERR_UNSUPPORTED, KF_ERR_CUDA } kf_status;

typedef enum {
  KF_DTYPE_FLOAT32 = 0,
  KF_DTYPE_BFLOAT16 = 1,
  KF_DTYPE_FLOAT16 = 2,
  KF_DTYPE_INT64 = 3
} kf_dtype;

/* A CUDA stream: the very type of cudaStream_t (struct CUstream_st*), declared here so that the
 * header needs no CUDA include; pass a cudaStream_t, or NULL for the legacy default stream. */
typedef struct CUstream_st* kf_stream;

/* Short English name of a status, e.g. "invalid argument".
 *
 * Returns a static string; values outside kf_status give "unknown status". Never fails. */
KF_API const char* kf_status_string(kf_status status);

/* Raw cudaError_t of the last call on this thread that returned KF_ERR_CUDA.
 *
 * Thread-local and sticky like errno: successful calls leave it alone. 0 (cudaSuccess) until the
 * first CUDA failure on this thread. */
KF_API int kf_last_cuda_error(void);

/* CUDA's own description of a raw cudaError_t (cudaGetErrorString), e.g. for kf_last_cuda_error().
 *
 * Returns a static string; unknown codes give CUDA's "unrecognized error code" text. Lets an
 * embedder report errors without including CUDA headers. */
KF_API const char* kf_cuda_error_string(int error);

/* KF_API_VERSION as it was when the library was built. Never fails. */
KF_API int kf_api_version(void);

/* Number of CUDA devices visible to this process (cudaGetDeviceCount).
 *
 * Args: count: out, written only on KF_OK.
 * Returns KF_OK; KF_ERR_INVALID_ARGUMENT when count is NULL; KF_ERR_CUDA when the runtime fails,
 * for example error 35 (cudaErrorInsufficientDriver) on a machine without a CUDA driver. */
KF_API kf_status kf_device_count(int* count);

/* ----------------------------------------------------------------------------------------------
 * codebook_argmin: multi-sub-codebook nearest neighbour (kelix-ar.md section 3.5, fusion target 1)
 *
 *   u[r]      = LayerNorm_g(z[r, g*d:(g+1)*d]) with ln_weight[g], ln_bias[g], eps
 *   ids[r, g] = vocab_offset + g*K + argmin_k dist(u[r], codebooks[g, k])     (first k on ties)
 *
 * KF_ARGMIN_EXACT: dist = |c|^2 - 2 u.c in float32 (u in float32).
 * KF_ARGMIN_REFERENCE: the official torch.cdist(u, C)**2 arithmetic in the dtype T of z:
 *   u rounded to T; |u|^2, |c|^2 = T(sum_f32(T(x*x))); s = T(sum_f32(-2u*c) + |u|^2 + |c|^2);
 *   dist = T(T(sqrt(max(s, T(1e-30))))^2). For float32 this is the float32 formula. */
typedef enum { KF_ARGMIN_REFERENCE = 0, KF_ARGMIN_EXACT = 1 } kf_argmin_mode;

typedef struct {
  const void* z;                 /* [n_rows, n_groups*dim], dtype; row stride z_row_stride */
  const float* ln_weight;        /* [n_groups, dim] contiguous */
  const float* ln_bias;          /* [n_groups, dim] contiguous */
  const void* codebooks;         /* [n_groups, n_codes, dim] contiguous, dtype */
  const float* codebook_sqnorms; /* [n_groups, n_codes] contiguous |c|^2, or NULL (see below) */
  int64_t* ids;                  /* [n_rows, n_groups] contiguous, out */
  int64_t n_rows;
  int64_t z_row_stride; /* elements between rows of z, >= 0 (0 broadcasts one row) */
  int32_t n_groups;     /* G, <= 65535 */
  int32_t n_codes;      /* K, >= 1 */
  int32_t dim;          /* d: a multiple of 16, <= 256 */
  int64_t vocab_offset;
  kf_dtype dtype; /* of z and codebooks: KF_DTYPE_BFLOAT16, KF_DTYPE_FLOAT16 or KF_DTYPE_FLOAT32 */
  kf_argmin_mode mode;
  float eps; /* LayerNorm epsilon */
} kf_codebook_argmin_params;

/* Fills params->ids; one launch for all groups, no [n, K] matrix in memory, no workspace.
 *
 * codebook_sqnorms is read only in KF_ARGMIN_EXACT mode; NULL there means "compute |c|^2 in the
 * kernel" (float32, per tile). REFERENCE mode always computes the rounded T(sum T(c*c)) itself.
 * Returns KF_ERR_INVALID_ARGUMENT for a NULL params, negative n_rows or z_row_stride, n_groups,
 * n_codes or dim < 1, a NULL or misaligned pointer (checked only when n_rows > 0);
 * KF_ERR_UNSUPPORTED for dim not a multiple of 16 or > 256, n_groups > 65535, another dtype or
 * mode value; KF_ERR_CUDA when the launch fails. Sizes are checked before pointers, and nothing
 * touches CUDA before every check has passed. n_rows == 0 returns KF_OK and launches nothing.
 * Asynchronous on stream. */
KF_API kf_status kf_codebook_argmin(const kf_codebook_argmin_params* params, kf_stream stream);

/* ----------------------------------------------------------------------------------------------
 * block_embed: the Block Encoder's group embedding (kelix-ar.md section 4.4, fusion target 2)
 *
 * For each group r with slots s = ids[r, 0 .. n_slots-1] (the last slot never counts):
 *   rows_j = s[j] if s[0] >= text_vocab (visual group) else s[0] (text group: k * E[s[0]])
 *   out[r] = sum over j < (first j with s[j] == q_eos, or n_slots-1) of table[rows_j]
 * summed in float32 in slot order, rounded once to the table's dtype. */
typedef struct {
  const int64_t* ids; /* [n_rows, n_slots] contiguous (n_rows = B*L, n_slots = G+1) */
  const void* table;  /* [n_table_rows, dim], dtype; row stride table_row_stride */
  void* out;          /* [n_rows, dim] contiguous, dtype of table, out */
  int64_t n_rows;
  int32_t n_slots; /* >= 2 */
  int64_t n_table_rows;
  int64_t dim;
  int64_t table_row_stride; /* elements between rows of table, >= dim */
  int64_t q_eos;
  int64_t text_vocab;
  kf_dtype dtype; /* of table and out: KF_DTYPE_BFLOAT16, KF_DTYPE_FLOAT16 or KF_DTYPE_FLOAT32 */
} kf_block_embed_params;

/* Fills params->out. Ids outside [0, n_table_rows) are the caller's to reject; the kernel clamps
 * them into range so that it never reads outside the table (the result is then meaningless).
 * Uses 16-byte loads and stores when table, out, dim and the row stride allow it, else element
 * loads (same result, slower). Returns KF_ERR_INVALID_ARGUMENT for NULL pointers (when there is
 * work), negative sizes, n_slots < 2, n_table_rows < 1 or table_row_stride < dim;
 * KF_ERR_UNSUPPORTED for another dtype; KF_ERR_CUDA when the launch fails. Empty work returns
 * KF_OK. Asynchronous on stream. */
KF_API kf_status kf_block_embed(const kf_block_embed_params* params, kf_stream stream);

/* ----------------------------------------------------------------------------------------------
 * head_select: final RMSNorm + output head + token selection of the Block Decoder (kelix-ar.md
 * sections 4.6, 5.6, 8 #3), without an [n_rows, vocab] logits matrix in memory.
 *
 *   u[r]         = T(T(y[r] * rstd) * norm_weight),  rstd = 1 / sqrt_rn(mean_f32(y[r]^2) + eps)
 *                  (kelix_fast.ops.rms_norm: float32, rounded to T, times the weight in T)
 *   logits[r, v] = sum_d u[r, d] * head[v, d]        accumulated in float32
 *   score[r, v]  = KF_HEAD_SELECT_GREEDY: logits[r, v]
 *                  KF_HEAD_SELECT_GUMBEL: logits[r, v] / logit_divisor - log(-log(U(r, v)))
 *                  and -inf for every v outside the row's ranges (when ranges are given)
 *   ids[r]       = argmax_v score[r, v], the lowest v among equal maxima (-0.0 equals 0.0)
 *
 * U(r, v) = ((h >> 8) + 0.5) / 2^24 with h = mix32(key_r ^ mix32(v)), mix32 the lowbias32 hash
 * and key_r = mix32(lo32(seed_r) ^ mix32(hi32(seed_r) ^ 0x9E3779B9)): the counter-based uniforms
 * of the Triton backend (kelix_fast/triton_kernels/head_select.py, row_keys and _mix32), so both
 * backends draw the same ids up to float32 rounding of the scores. The Gumbel-max draw samples
 * softmax(logits / logit_divisor) over the allowed ids (no top-k or top-p filter). U is formed in
 * float32 as Triton does: for h >> 8 = 2^24 - 1 the sum rounds up to 2^24, U = 1 and that id
 * scores +inf (probability 2^-24 per id, ~1.3% of rows at V = 217,472). */
typedef enum { KF_HEAD_SELECT_GREEDY = 0, KF_HEAD_SELECT_GUMBEL = 1 } kf_head_select_mode;

typedef struct {
  const void* y;           /* [n_rows, dim], dtype; row stride y_row_stride, last dim contiguous */
  const void* norm_weight; /* [dim] contiguous, dtype */
  const void* head;        /* [vocab, dim], dtype; row stride head_row_stride, last dim contiguous;
                              16-byte aligned rows (see below) */
  const int64_t* ranges;   /* [n_rows, n_ranges, 2] half-open id ranges [low, high) with
                              0 <= low <= high <= vocab; strides ranges_row_stride and
                              ranges_range_stride, each [low, high] pair contiguous. NULL (with
                              n_ranges = 0) allows every id */
  const int64_t* seeds;    /* [n_rows] contiguous; read in KF_HEAD_SELECT_GUMBEL mode only */
  int64_t* ids;            /* [n_rows] contiguous, out */
  void* workspace;         /* kf_head_select_workspace_size() bytes, 16-byte aligned */
  size_t workspace_size;   /* bytes available at workspace */
  int64_t n_rows;
  int64_t y_row_stride;        /* elements between rows of y, >= 0 (0 broadcasts one row) */
  int64_t vocab;               /* 1 .. 2^31 - 1 */
  int64_t head_row_stride;     /* elements between rows of head, >= 0 */
  int64_t ranges_row_stride;   /* elements between rows of ranges, >= 0 */
  int64_t ranges_range_stride; /* elements between the ranges of one row, >= 0 */
  int32_t dim;                 /* D >= 1 */
  int32_t n_ranges;            /* ranges per row, >= 0; 0 when ranges is NULL */
  kf_dtype dtype; /* of y, norm_weight and head: KF_DTYPE_BFLOAT16, _FLOAT16 or _FLOAT32 */
  kf_head_select_mode mode;
  float eps;           /* RMSNorm epsilon, finite, >= 0 */
  float logit_divisor; /* KF_HEAD_SELECT_GUMBEL: finite, > 0 (1 for no temperature scaling;
                          the runtime passes temperature + 1e-5 rounded to float) */
} kf_head_select_params;

/* Workspace bytes kf_head_select needs for these sizes (the normed rows and one int64 key per
 * row and vocabulary slice: n_rows * dim * sizeof(T) + about 8 KiB per row).
 *
 * Args: bytes: out, written only on KF_OK. Returns KF_ERR_INVALID_ARGUMENT for a NULL bytes,
 * n_rows < 0, dim < 1 or vocab outside 1 .. 2^31 - 1; KF_ERR_UNSUPPORTED for another dtype or a
 * dim kf_head_select does not take (see there). Never touches CUDA. */
KF_API kf_status kf_head_select_workspace_size(int64_t n_rows, int32_t dim, int64_t vocab,
                                               kf_dtype dtype, size_t* bytes);

/* Fills params->ids: three launches on stream (RMSNorm pre-pass, split-vocabulary scoring, a
 * per-row merge), no allocation, no synchronization, nothing sized from tensor values.
 *
 * Vocabulary slices that no row may pick (outside every row's ranges) are never read. Rows are
 * scored in chunks of at most 16 whose normed rows fit in 112 KiB of shared memory; chunks of
 * the same slice are launched side by side so that they share the head's reads in L2. Scores on
 * CUDA cores: built for n_rows == 1 (measured on an H200 at V = 217,472, D = 4,096, bf16: 0.437
 * ms, 96% of copy bandwidth), correct for any n_rows, but its time grows with n_rows (3.16 ms at
 * 32), so kelix_fast's Python API offers it for one row only (a tensor-core kernel serves more).
 * Returns KF_ERR_INVALID_ARGUMENT for a NULL params, negative sizes or strides, vocab outside
 * 1 .. 2^31 - 1, eps or logit_divisor out of range; when n_rows > 0 also for a NULL or
 * misaligned pointer, ranges NULL with n_ranges > 0 (or the reverse) and a workspace smaller
 * than kf_head_select_workspace_size; KF_ERR_UNSUPPORTED for another dtype or mode, dim *
 * sizeof(T) not a multiple of 16 or above 112 KiB, head or head_row_stride * sizeof(T) not
 * 16-byte aligned (the kernel's vector loads); KF_ERR_CUDA when a launch fails. The ranges'
 * values are the caller's to validate. n_rows == 0 returns KF_OK and launches nothing.
 * Asynchronous on stream. */
KF_API kf_status kf_head_select(const kf_head_select_params* params, kf_stream stream);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* KELIX_FAST_KERNELS_H_ */
