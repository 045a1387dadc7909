// Status plumbing and library information of the C API (kelix_fast/kernels.h). No kernels here.
#include <cuda_runtime_api.h>

#include "kelix_fast/kernels.h"
#include "status.h"

namespace kelix_fast {
namespace {

thread_local int last_cuda_error = 0;  // cudaSuccess

}  // namespace

kf_status cuda_status(cudaError_t error) {
  if (error == cudaSuccess) return KF_OK;
  last_cuda_error = static_cast<int>(error);
  // A failing runtime call also sets the runtime's per-thread "last error"; clear it so that the
  // next launcher's cudaGetLastError() does not report this failure a second time. (Sticky errors,
  // such as an illegal address, cannot be cleared and will keep being reported, as they should.)
  cudaGetLastError();
  return KF_ERR_CUDA;
}

}  // namespace kelix_fast

extern "C" {

const char* kf_status_string(kf_status status) {
  switch (status) {
    case KF_OK:
      return "ok";
    case KF_ERR_INVALID_ARGUMENT:
      return "invalid argument";
    case KF_ERR_UNSUPPORTED:
      return "unsupported";
    case KF_ERR_CUDA:
      return "CUDA error";
  }
  return "unknown status";
}

int kf_last_cuda_error(void) { return kelix_fast::last_cuda_error; }

const char* kf_cuda_error_string(int error) {
  return cudaGetErrorString(static_cast<cudaError_t>(error));
}

int kf_api_version(void) { return KF_API_VERSION; }

kf_status kf_device_count(int* count) {
  if (count == nullptr) return KF_ERR_INVALID_ARGUMENT;
  int device_count = 0;
  const kf_status status = kelix_fast::cuda_status(cudaGetDeviceCount(&device_count));
  if (status == KF_OK) *count = device_count;
  return status;
}

}  // extern "C"
