/* An embedder's view of kf_codebook_argmin: C, the CUDA runtime and libkelix_fast_kernels, no
 * Python.
 *
 * Build: cmake -B build -DKELIX_FAST_BUILD_EXAMPLES=ON && cmake --build build
 * Run:   ./build/kf_example_codebook_argmin
 * Quantizes N random float32 queries against G random codebooks in exact mode, checks the ids
 * against a brute-force CPU search and prints the result. Exit code 0 when they match, 1 when a
 * CUDA or kelix_fast call fails (e.g. no GPU), 2 when ids differ. The library only enqueues work:
 * allocation, copies and the synchronization are the embedder's (here: this file's). */
#include <cuda_runtime_api.h>
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "kelix_fast/kernels.h"

enum { N = 7, G = 2, K = 300, D = 32 };
#define EPS 1e-5f
#define VOCAB_OFFSET 1000

static float uniform(unsigned* state) {
  *state = *state * 1664525u + 1013904223u;
  return (float)(*state >> 8) / (float)(1u << 24) - 0.5f;
}

/* ids[r][g] by brute force: LayerNorm in float, then the first code with the least |c|^2 - 2 u.c.
 * Exact ties between distinct random codes are unlikely; a near-tie could in principle make the
 * GPU's different summation order pick another code, which this example would report. */
static void cpu_argmin(const float* z, const float* w, const float* b, const float* codes,
                       int64_t* ids) {
  for (int r = 0; r < N; ++r) {
    for (int g = 0; g < G; ++g) {
      const float* x = z + (size_t)r * G * D + (size_t)g * D;
      float mean = 0.f, var = 0.f, u[D];
      for (int k = 0; k < D; ++k) mean += x[k];
      mean /= D;
      for (int k = 0; k < D; ++k) var += (x[k] - mean) * (x[k] - mean);
      const float rstd = 1.f / sqrtf(var / D + EPS);
      for (int k = 0; k < D; ++k) u[k] = (x[k] - mean) * rstd * w[g * D + k] + b[g * D + k];
      float best = FLT_MAX;
      int best_k = 0;
      for (int c = 0; c < K; ++c) {
        const float* code = codes + ((size_t)g * K + c) * D;
        float sq = 0.f, dot = 0.f;
        for (int k = 0; k < D; ++k) {
          sq += code[k] * code[k];
          dot += u[k] * code[k];
        }
        if (sq - 2.f * dot < best) {
          best = sq - 2.f * dot;
          best_k = c;
        }
      }
      ids[r * G + g] = VOCAB_OFFSET + (int64_t)g * K + best_k;
    }
  }
}

static int cuda_failed(cudaError_t error, const char* what) {
  if (error == cudaSuccess) return 0;
  fprintf(stderr, "%s: CUDA error %d (%s)\n", what, (int)error, cudaGetErrorString(error));
  return 1;
}

int main(void) {
  static float z[N * G * D], w[G * D], b[G * D], codes[G * K * D];
  static int64_t ids[N * G], expected[N * G];
  unsigned state = 12345u;
  for (int i = 0; i < N * G * D; ++i) z[i] = 4.f * uniform(&state);
  for (int i = 0; i < G * D; ++i) w[i] = 1.f + 0.2f * uniform(&state);
  for (int i = 0; i < G * D; ++i) b[i] = 0.1f * uniform(&state);
  for (int i = 0; i < G * K * D; ++i) codes[i] = 2.f * uniform(&state);

  float *z_d = NULL, *w_d = NULL, *b_d = NULL, *codes_d = NULL;
  int64_t* ids_d = NULL;
  int status = 1;
  if (cuda_failed(cudaMalloc((void**)&z_d, sizeof(z)), "cudaMalloc z") ||
      cuda_failed(cudaMalloc((void**)&w_d, sizeof(w)), "cudaMalloc ln_weight") ||
      cuda_failed(cudaMalloc((void**)&b_d, sizeof(b)), "cudaMalloc ln_bias") ||
      cuda_failed(cudaMalloc((void**)&codes_d, sizeof(codes)), "cudaMalloc codebooks") ||
      cuda_failed(cudaMalloc((void**)&ids_d, sizeof(ids)), "cudaMalloc ids") ||
      cuda_failed(cudaMemcpy(z_d, z, sizeof(z), cudaMemcpyHostToDevice), "copy z") ||
      cuda_failed(cudaMemcpy(w_d, w, sizeof(w), cudaMemcpyHostToDevice), "copy ln_weight") ||
      cuda_failed(cudaMemcpy(b_d, b, sizeof(b), cudaMemcpyHostToDevice), "copy ln_bias") ||
      cuda_failed(cudaMemcpy(codes_d, codes, sizeof(codes), cudaMemcpyHostToDevice),
                  "copy codebooks")) {
    goto done;
  }

  kf_codebook_argmin_params params = {0};
  params.z = z_d;                 /* [N, G*D] float32 */
  params.ln_weight = w_d;         /* [G, D] */
  params.ln_bias = b_d;           /* [G, D] */
  params.codebooks = codes_d;     /* [G, K, D] float32 */
  params.codebook_sqnorms = NULL; /* exact mode computes |c|^2 itself when NULL */
  params.ids = ids_d;             /* [N, G] int64, out */
  params.n_rows = N;
  params.z_row_stride = G * D;
  params.n_groups = G;
  params.n_codes = K;
  params.dim = D;
  params.vocab_offset = VOCAB_OFFSET;
  params.dtype = KF_DTYPE_FLOAT32;
  params.mode = KF_ARGMIN_EXACT;
  params.eps = EPS;
  const kf_status launched = kf_codebook_argmin(&params, NULL /* legacy default stream */);
  if (launched != KF_OK) {
    fprintf(stderr, "kf_codebook_argmin: %s", kf_status_string(launched));
    if (launched == KF_ERR_CUDA) {
      const int error = kf_last_cuda_error();
      fprintf(stderr, " %d (%s)", error, kf_cuda_error_string(error));
    }
    fprintf(stderr, "\n");
    goto done;
  }
  if (cuda_failed(cudaMemcpy(ids, ids_d, sizeof(ids), cudaMemcpyDeviceToHost), "copy ids")) {
    goto done;
  }

  cpu_argmin(z, w, b, codes, expected);
  status = 0;
  for (int i = 0; i < N * G; ++i) {
    printf("ids[%d][%d] = %lld (cpu %lld)\n", i / G, i % G, (long long)ids[i],
           (long long)expected[i]);
    if (ids[i] != expected[i]) status = 2;
  }
  printf(status == 0 ? "all ids match\n" : "MISMATCH\n");

done:
  cudaFree(ids_d);
  cudaFree(codes_d);
  cudaFree(b_d);
  cudaFree(w_d);
  cudaFree(z_d);
  return status;
}
