// pybind11 module kelix_fast._C: every exported function of the native library, in one file.
//
// Ops are bound with device pointers (uintptr_t) and the CUDA stream as an integer, so the module
// never includes torch headers and one build serves every torch version. A kf_status other than
// KF_OK becomes a Python RuntimeError through check(), the single status -> exception mapping.
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "kelix_fast/kernels.h"

namespace py = pybind11;

namespace kelix_fast {
namespace {

// Raises RuntimeError for any status other than KF_OK, with the C function's name first:
//   "kf_codebook_argmin: unsupported (dtype=fp16)"
//   "kf_device_count: CUDA error 35 (CUDA driver version is insufficient for CUDA runtime version)"
// detail, when given, says which argument or value the status is about.
void check(kf_status status, const char* function, const std::string& detail = "") {
  if (status == KF_OK) return;
  std::string message = std::string(function) + ": ";
  if (status == KF_ERR_CUDA) {
    const int error = kf_last_cuda_error();
    message += "CUDA error " + std::to_string(error) + " (" + kf_cuda_error_string(error) + ")";
  } else {
    message += kf_status_string(status);
  }
  if (!detail.empty()) message += " (" + detail + ")";
  throw std::runtime_error(message);
}

int device_count() {
  int count = 0;
  check(kf_device_count(&count), "kf_device_count");
  return count;
}

}  // namespace
}  // namespace kelix_fast

PYBIND11_MODULE(_C, m) {
  m.doc() = "CUDA kernels of kelix_fast (libkelix_fast_kernels), bound with pybind11.";

  m.def(
      "api_version", &kf_api_version,
      "Version of the C API (KF_API_VERSION in kelix_fast/kernels.h) the library was built with.");
  m.def(
      "status_string",
      [](int status) { return std::string(kf_status_string(static_cast<kf_status>(status))); },
      py::arg("status"), "Name of a kf_status value, e.g. status_string(1) == 'invalid argument'.");
  m.def("device_count", &kelix_fast::device_count,
        "Number of visible CUDA devices; raises RuntimeError ('kf_device_count: CUDA error N "
        "(...)') when the CUDA runtime fails, e.g. without a driver.");
}
