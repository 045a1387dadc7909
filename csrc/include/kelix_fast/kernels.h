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
#define KF_API_VERSION 1

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

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* KELIX_FAST_KERNELS_H_ */
