// Private to libkelix_fast_kernels (not installed, not for embedders): how every launcher turns a
// cudaError_t into a kf_status.
#ifndef KELIX_FAST_STATUS_H_
#define KELIX_FAST_STATUS_H_

#include <cuda_runtime_api.h>

#include "kelix_fast/kernels.h"

namespace kelix_fast {

// KF_OK for cudaSuccess; otherwise keeps the raw code for kf_last_cuda_error() and returns
// KF_ERR_CUDA. Use after every runtime call and after every launch:
//   return cuda_status(cudaGetLastError());
kf_status cuda_status(cudaError_t error);

}  // namespace kelix_fast

#endif  // KELIX_FAST_STATUS_H_
