// Private to libkelix_fast_kernels: the float <-> storage-type conversions every kernel shares.
#ifndef KELIX_FAST_DTYPE_CUH_
#define KELIX_FAST_DTYPE_CUH_

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace kelix_fast {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

// Round-to-nearest-even, as torch rounds a float32 result into a bf16/fp16 tensor.
template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}

// x rounded to T and widened back: one torch op "computes in float32, stores T".
template <typename T>
__device__ __forceinline__ float round_to(float x) {
  return to_float(from_float<T>(x));
}

}  // namespace kelix_fast

#endif  // KELIX_FAST_DTYPE_CUH_
