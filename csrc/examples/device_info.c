/* An embedder's view: calls libkelix_fast_kernels through the C API, without Python.
 *
 * Build: cmake -B build -DKELIX_FAST_BUILD_EXAMPLES=ON && cmake --build build
 * Run:   ./build/kf_example_device_info
 * Prints the C API version and the number of CUDA devices, or why it could not count them
 * (exit code 1). */
#include <stdio.h>

#include "kelix_fast/kernels.h"

int main(void) {
  printf("kelix_fast C API version %d (header %d)\n", kf_api_version(), KF_API_VERSION);
  int count = 0;
  const kf_status status = kf_device_count(&count);
  if (status != KF_OK) {
    printf("kf_device_count: %s", kf_status_string(status));
    if (status == KF_ERR_CUDA) {
      const int error = kf_last_cuda_error();
      printf(" %d (%s)", error, kf_cuda_error_string(error));
    }
    printf("\n");
    return 1;
  }
  printf("CUDA devices: %d\n", count);
  return 0;
}
