// pybind11 module kelix_fast._C: every exported function of the native library, in one file.
//
// Ops are bound with device pointers (uintptr_t) and the CUDA stream as an integer, so the module
// never includes torch headers and one build serves every torch version. A kf_status other than
// KF_OK becomes a Python RuntimeError through check(), the single status -> exception mapping.
#include <pybind11/pybind11.h>

#include <cstdint>
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

const char* dtype_name(int dtype) {
  switch (dtype) {
    case KF_DTYPE_FLOAT32:
      return "float32";
    case KF_DTYPE_BFLOAT16:
      return "bfloat16";
    case KF_DTYPE_FLOAT16:
      return "float16";
    case KF_DTYPE_INT64:
      return "int64";
  }
  return "unknown";
}

template <typename Pointer>
Pointer* as_pointer(uintptr_t address) {
  return reinterpret_cast<Pointer*>(address);
}

kf_stream as_stream(uintptr_t stream) { return reinterpret_cast<kf_stream>(stream); }

// ids [n_rows, n_groups] (out) <- z [n_rows, n_groups*dim] (row stride z_row_stride),
// ln_weight/ln_bias [n_groups, dim] float32, codebooks [n_groups, n_codes, dim],
// codebook_sqnorms [n_groups, n_codes] float32 or 0.
void codebook_argmin(uintptr_t z, uintptr_t ln_weight, uintptr_t ln_bias, uintptr_t codebooks,
                     uintptr_t codebook_sqnorms, uintptr_t ids, int64_t n_rows,
                     int64_t z_row_stride, int32_t n_groups, int32_t n_codes, int32_t dim,
                     int64_t vocab_offset, int dtype, int mode, float eps, uintptr_t stream) {
  kf_codebook_argmin_params params{};
  params.z = as_pointer<const void>(z);
  params.ln_weight = as_pointer<const float>(ln_weight);
  params.ln_bias = as_pointer<const float>(ln_bias);
  params.codebooks = as_pointer<const void>(codebooks);
  params.codebook_sqnorms = as_pointer<const float>(codebook_sqnorms);
  params.ids = as_pointer<int64_t>(ids);
  params.n_rows = n_rows;
  params.z_row_stride = z_row_stride;
  params.n_groups = n_groups;
  params.n_codes = n_codes;
  params.dim = dim;
  params.vocab_offset = vocab_offset;
  params.dtype = static_cast<kf_dtype>(dtype);
  params.mode = static_cast<kf_argmin_mode>(mode);
  params.eps = eps;
  const std::string detail = "n_rows=" + std::to_string(n_rows) +
                             ", n_groups=" + std::to_string(n_groups) +
                             ", n_codes=" + std::to_string(n_codes) +
                             ", dim=" + std::to_string(dim) + ", dtype=" + dtype_name(dtype) +
                             ", mode=" + (mode == KF_ARGMIN_EXACT ? "exact" : "reference");
  check(kf_codebook_argmin(&params, as_stream(stream)), "kf_codebook_argmin", detail);
}

// out [n_rows, dim] (out) <- ids [n_rows, n_slots] int64, table [n_table_rows, dim] (row stride
// table_row_stride).
void block_embed(uintptr_t ids, uintptr_t table, uintptr_t out, int64_t n_rows, int32_t n_slots,
                 int64_t n_table_rows, int64_t dim, int64_t table_row_stride, int64_t q_eos,
                 int64_t text_vocab, int dtype, uintptr_t stream) {
  kf_block_embed_params params{};
  params.ids = as_pointer<const int64_t>(ids);
  params.table = as_pointer<const void>(table);
  params.out = as_pointer<void>(out);
  params.n_rows = n_rows;
  params.n_slots = n_slots;
  params.n_table_rows = n_table_rows;
  params.dim = dim;
  params.table_row_stride = table_row_stride;
  params.q_eos = q_eos;
  params.text_vocab = text_vocab;
  params.dtype = static_cast<kf_dtype>(dtype);
  const std::string detail = "n_rows=" + std::to_string(n_rows) +
                             ", n_slots=" + std::to_string(n_slots) +
                             ", dim=" + std::to_string(dim) + ", dtype=" + dtype_name(dtype);
  check(kf_block_embed(&params, as_stream(stream)), "kf_block_embed", detail);
}

// Bytes of workspace kf_head_select needs for these sizes.
size_t head_select_workspace_size(int64_t n_rows, int32_t dim, int64_t vocab, int dtype) {
  size_t bytes = 0;
  const std::string detail = "n_rows=" + std::to_string(n_rows) + ", dim=" + std::to_string(dim) +
                             ", vocab=" + std::to_string(vocab) + ", dtype=" + dtype_name(dtype);
  check(kf_head_select_workspace_size(n_rows, dim, vocab, static_cast<kf_dtype>(dtype), &bytes),
        "kf_head_select_workspace_size", detail);
  return bytes;
}

// ids [n_rows] (out) <- y [n_rows, dim] (row stride y_row_stride), norm_weight [dim],
// head [vocab, dim] (row stride head_row_stride), ranges [n_rows, n_ranges, 2] int64 or 0,
// seeds [n_rows] int64 or 0, workspace of workspace_size bytes.
void head_select(uintptr_t y, uintptr_t norm_weight, uintptr_t head, uintptr_t ranges,
                 uintptr_t seeds, uintptr_t ids, uintptr_t workspace, size_t workspace_size,
                 int64_t n_rows, int64_t y_row_stride, int32_t dim, int64_t vocab,
                 int64_t head_row_stride, int32_t n_ranges, int64_t ranges_row_stride,
                 int64_t ranges_range_stride, int dtype, int mode, float eps, float logit_divisor,
                 uintptr_t stream) {
  kf_head_select_params params{};
  params.y = as_pointer<const void>(y);
  params.norm_weight = as_pointer<const void>(norm_weight);
  params.head = as_pointer<const void>(head);
  params.ranges = as_pointer<const int64_t>(ranges);
  params.seeds = as_pointer<const int64_t>(seeds);
  params.ids = as_pointer<int64_t>(ids);
  params.workspace = as_pointer<void>(workspace);
  params.workspace_size = workspace_size;
  params.n_rows = n_rows;
  params.y_row_stride = y_row_stride;
  params.vocab = vocab;
  params.head_row_stride = head_row_stride;
  params.ranges_row_stride = ranges_row_stride;
  params.ranges_range_stride = ranges_range_stride;
  params.dim = dim;
  params.n_ranges = n_ranges;
  params.dtype = static_cast<kf_dtype>(dtype);
  params.mode = static_cast<kf_head_select_mode>(mode);
  params.eps = eps;
  params.logit_divisor = logit_divisor;
  const char* mode_name = mode == KF_HEAD_SELECT_GREEDY   ? "greedy"
                          : mode == KF_HEAD_SELECT_GUMBEL ? "gumbel"
                                                          : "unknown";
  const std::string detail = "n_rows=" + std::to_string(n_rows) + ", dim=" + std::to_string(dim) +
                             ", vocab=" + std::to_string(vocab) +
                             ", n_ranges=" + std::to_string(n_ranges) +
                             ", dtype=" + dtype_name(dtype) + ", mode=" + mode_name;
  check(kf_head_select(&params, as_stream(stream)), "kf_head_select", detail);
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

  // kf_dtype, kf_argmin_mode and kf_head_select_mode values, for the Python adapters
  // (kelix_fast/ops/_cuda.py).
  m.attr("DTYPE_FLOAT32") = static_cast<int>(KF_DTYPE_FLOAT32);
  m.attr("DTYPE_BFLOAT16") = static_cast<int>(KF_DTYPE_BFLOAT16);
  m.attr("DTYPE_FLOAT16") = static_cast<int>(KF_DTYPE_FLOAT16);
  m.attr("DTYPE_INT64") = static_cast<int>(KF_DTYPE_INT64);
  m.attr("ARGMIN_REFERENCE") = static_cast<int>(KF_ARGMIN_REFERENCE);
  m.attr("ARGMIN_EXACT") = static_cast<int>(KF_ARGMIN_EXACT);
  m.attr("HEAD_SELECT_GREEDY") = static_cast<int>(KF_HEAD_SELECT_GREEDY);
  m.attr("HEAD_SELECT_GUMBEL") = static_cast<int>(KF_HEAD_SELECT_GUMBEL);

  // --- csrc/codebook_argmin.cu ---
  m.def("codebook_argmin", &kelix_fast::codebook_argmin, py::arg("z"), py::arg("ln_weight"),
        py::arg("ln_bias"), py::arg("codebooks"), py::arg("codebook_sqnorms"), py::arg("ids"),
        py::arg("n_rows"), py::arg("z_row_stride"), py::arg("n_groups"), py::arg("n_codes"),
        py::arg("dim"), py::arg("vocab_offset"), py::arg("dtype"), py::arg("mode"), py::arg("eps"),
        py::arg("stream"),
        "kf_codebook_argmin on device addresses (ints): fills ids [n_rows, n_groups] (out). "
        "Asynchronous on stream (a cudaStream_t as int, 0 = legacy default); raises "
        "RuntimeError('kf_codebook_argmin: <status> (...)') when the C API refuses or CUDA fails.");

  // --- csrc/block_embed.cu ---
  m.def("block_embed", &kelix_fast::block_embed, py::arg("ids"), py::arg("table"), py::arg("out"),
        py::arg("n_rows"), py::arg("n_slots"), py::arg("n_table_rows"), py::arg("dim"),
        py::arg("table_row_stride"), py::arg("q_eos"), py::arg("text_vocab"), py::arg("dtype"),
        py::arg("stream"),
        "kf_block_embed on device addresses (ints): fills out [n_rows, dim] (out). Asynchronous "
        "on stream; raises RuntimeError('kf_block_embed: <status> (...)') on failure.");

  // --- csrc/head_select.cu ---
  m.def("head_select_workspace_size", &kelix_fast::head_select_workspace_size, py::arg("n_rows"),
        py::arg("dim"), py::arg("vocab"), py::arg("dtype"),
        "kf_head_select_workspace_size: bytes of workspace head_select needs (no CUDA call); "
        "raises RuntimeError('kf_head_select_workspace_size: <status> (...)') for sizes it "
        "refuses.");
  m.def("head_select", &kelix_fast::head_select, py::arg("y"), py::arg("norm_weight"),
        py::arg("head"), py::arg("ranges"), py::arg("seeds"), py::arg("ids"), py::arg("workspace"),
        py::arg("workspace_size"), py::arg("n_rows"), py::arg("y_row_stride"), py::arg("dim"),
        py::arg("vocab"), py::arg("head_row_stride"), py::arg("n_ranges"),
        py::arg("ranges_row_stride"), py::arg("ranges_range_stride"), py::arg("dtype"),
        py::arg("mode"), py::arg("eps"), py::arg("logit_divisor"), py::arg("stream"),
        "kf_head_select on device addresses (ints; 0 for no ranges / no seeds): fills ids "
        "[n_rows] (out). Asynchronous on stream; raises RuntimeError('kf_head_select: <status> "
        "(...)') when the C API refuses or CUDA fails.");
}
