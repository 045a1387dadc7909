"""The ``"cuda"`` backend of the ops: adapters from the ops' reference signatures to ``kelix_fast._C``.

``kelix_fast._C`` binds the torch-free C API (``csrc/include/kelix_fast/kernels.h``) with device addresses,
sizes, strides and the stream as integers; these adapters turn tensors into those arguments. The module is
loaded lazily, on the first probe, so importing the ops never fails for want of a native build.

The adapters take exactly the arguments of the ops' ``_reference`` functions and fill the output tensor
in place; the ops have already validated shapes, dtypes, devices and id ranges. They launch on the current
stream of the inputs' device and never synchronize.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MAX_CODE_DIM = 256  # kf_codebook_argmin: d % 16 == 0 and d <= 256
# kf_head_select: head rows of D * element size bytes, a multiple of 16 (vector loads) and at most
# 112 KiB (one row must fit the kernel's shared-memory budget).
_HEAD_SELECT_MAX_ROW_BYTES = 112 * 1024
# Rows for which kelix_fast offers kf_head_select, by measured speed (H200, commit 265be71, greedy,
# V = 217,472, D = 4096, bf16; benchmarks/results/h200-2026-12-04-265be71-manual/kernels.json): at M = 1
# it takes 0.437 ms against Triton's 0.457, but it scores on CUDA cores, so its time grows with M
# (0.925 ms at M = 8, 3.16 at 32, 11.1 at 128) while Triton's tensor-core tl.dot stays near the head's
# bandwidth (0.460, 0.491, 0.671 ms). The C library still serves any M (correct, not fast).
_HEAD_SELECT_MAX_ROWS = 1

_extension: ModuleType | None = None
_extension_reason: str | None = None
_probed = False


def _load() -> None:
    global _extension, _extension_reason, _probed
    if _probed:
        return
    _probed = True
    try:
        _extension = importlib.import_module("kelix_fast._C")
    except ModuleNotFoundError as error:
        if error.name == "kelix_fast._C":
            _extension_reason = "kelix_fast._C not built (nvcc was absent at install)"
        else:
            _extension_reason = f"kelix_fast._C failed to import ({error})"
    except ImportError as error:  # e.g. libcudart or libkelix_fast_kernels.so not found
        _extension_reason = f"kelix_fast._C failed to import ({error})"


def extension_unavailable_reason() -> str | None:
    """None when ``kelix_fast._C`` imports, else why it does not (probed once per process)."""
    _load()
    return _extension_reason


def _C() -> ModuleType:
    _load()
    if _extension is None:
        raise RuntimeError(f"backend 'cuda' unavailable: {_extension_reason}")
    return _extension


def can_run_cuda(*tensors: torch.Tensor) -> str | None:
    """None when the CUDA kernels can take these tensors; else the reason.

    Reasons: the extension is missing, a tensor is not on a CUDA device, or a floating-point tensor has a
    dtype the kernels do not implement (they take float32, bfloat16 and float16).
    """
    reason = extension_unavailable_reason()
    if reason is not None:
        return reason
    for t in tensors:
        if t.device.type != "cuda":
            return f"tensors must be on a CUDA device, got {t.device}"
        if t.is_floating_point() and t.dtype not in _KERNEL_DTYPES:
            return f"the CUDA kernels take float32, bfloat16 or float16, got {t.dtype}"
    return None


def can_run_codebook_argmin(z: torch.Tensor, codebooks: torch.Tensor) -> str | None:
    """:func:`can_run_cuda` plus the code dim the kernel supports (``d % 16 == 0``, ``d <= 256``)."""
    reason = can_run_cuda(z, codebooks)
    if reason is not None:
        return reason
    dim = codebooks.shape[-1]
    if dim % 16 != 0 or dim > _MAX_CODE_DIM:
        return f"the CUDA kernel needs a code dim d % 16 == 0 and d <= {_MAX_CODE_DIM}, got d={dim}"
    return None


def can_run_block_embed(ids: torch.Tensor, table: torch.Tensor) -> str | None:
    """:func:`can_run_cuda` (the kernel has no shape limits beyond int32 group counts)."""
    return can_run_cuda(ids, table)


def can_run_head_select(y: torch.Tensor, head: torch.Tensor) -> str | None:
    """:func:`can_run_cuda` for one row (``_HEAD_SELECT_MAX_ROWS``) plus what ``kf_head_select``'s
    16-byte head loads need.

    The head's rows must start on 16-byte boundaries (``D * element size`` and the row stride in
    bytes multiples of 16, an aligned base) and a row may take at most 112 KiB. The request itself
    (greedy or full-row sampling) is checked by ``ops.head_select``.
    """
    rows = y.shape[0]
    if rows > _HEAD_SELECT_MAX_ROWS:
        return (
            f"the CUDA kernel is offered for M <= {_HEAD_SELECT_MAX_ROWS} row (it scores on CUDA "
            f"cores: 3.16 ms at M = 32 where triton's tensor cores took 0.49 on an H200), got "
            f"M={rows}; use backend='triton'"
        )
    reason = can_run_cuda(y, head)
    if reason is not None:
        return reason
    if not hasattr(_C(), "head_select"):
        return "kelix_fast._C was built before kf_head_select existed (rebuild the extension)"
    vocab, dim = head.shape
    size = head.element_size()
    if dim * size % 16 != 0 or dim * size > _HEAD_SELECT_MAX_ROW_BYTES:
        return (
            f"the CUDA kernel needs D * element size a multiple of 16 bytes and at most "
            f"{_HEAD_SELECT_MAX_ROW_BYTES}, got D={dim} in {head.dtype}"
        )
    if head.data_ptr() % 16 != 0 or (vocab > 1 and head.stride(0) * size % 16 != 0):
        return (
            f"the CUDA kernel needs 16-byte aligned head rows, got address % 16 = "
            f"{head.data_ptr() % 16} and a row stride of {head.stride(0) * size} bytes"
        )
    return None


def _dtype_code(dtype: torch.dtype) -> int:
    C = _C()
    codes = {
        torch.float32: C.DTYPE_FLOAT32,
        torch.bfloat16: C.DTYPE_BFLOAT16,
        torch.float16: C.DTYPE_FLOAT16,
    }
    return codes[dtype]


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def codebook_argmin(
    z, ln_weight, ln_bias, codebooks, codebook_sqnorms, ids, vocab_offset, mode, eps
) -> None:
    """``kf_codebook_argmin`` on the tensors of :func:`kelix_fast.ops.codebook_argmin`; fills ``ids``.

    Copies made here (none in the usual case):
    - ``ln_weight``/``ln_bias`` are cast to contiguous float32 when they are not (G*d values; exact,
      since bf16/fp16 widen losslessly).
    - z and codebooks in different dtypes (only possible in ``"exact"`` mode) are both widened to float32,
      which is exact; the kernel takes one dtype for both. A non-contiguous ``codebooks`` is made contiguous.
    - ``ids`` not contiguous: the kernel writes a temporary that is copied into it.
    ``codebook_sqnorms=None`` allocates nothing: the kernel then computes ``|c|^2`` in float32 per tile.
    The reference mode always computes its own bf16/fp16-rounded ``|c|^2`` and ignores ``codebook_sqnorms``.
    """
    C = _C()
    num_groups, num_codes, dim = codebooks.shape
    if z.dtype != codebooks.dtype:
        z, codebooks = z.float(), codebooks.float()
    codebooks = codebooks.contiguous()
    ln_weight = ln_weight.to(torch.float32).contiguous()
    ln_bias = ln_bias.to(torch.float32).contiguous()
    if codebook_sqnorms is not None:
        codebook_sqnorms = codebook_sqnorms.to(torch.float32).contiguous()
    out = (
        ids if ids.is_contiguous() else torch.empty_like(ids, memory_format=torch.contiguous_format)
    )
    modes = {"reference": C.ARGMIN_REFERENCE, "exact": C.ARGMIN_EXACT}
    # The kernel launches on the current device; make it the inputs' device.
    with torch.cuda.device(z.device):
        C.codebook_argmin(
            z.data_ptr(),
            ln_weight.data_ptr(),
            ln_bias.data_ptr(),
            codebooks.data_ptr(),
            0 if codebook_sqnorms is None else codebook_sqnorms.data_ptr(),
            out.data_ptr(),
            z.shape[0],
            z.stride(0),
            num_groups,
            num_codes,
            dim,
            vocab_offset,
            _dtype_code(z.dtype),
            modes[mode],
            eps,
            _stream(z.device),
        )
    if out is not ids:
        ids.copy_(out)


def block_embed(ids, table, out, q_eos, text_vocab) -> None:
    """``kf_block_embed`` on the tensors of :func:`kelix_fast.ops.block_embed`; fills ``out``.

    Copies made here: ``ids`` when not contiguous (B*L*(G+1) int64); ``table`` only when its last dim is
    not contiguous (a full copy of the table: avoid); ``out`` when not contiguous (a temporary copied back).
    """
    C = _C()
    ids = ids.contiguous()
    if table.dim() == 2 and table.shape[1] > 1 and table.stride(1) != 1:
        table = table.contiguous()
    target = (
        out if out.is_contiguous() else torch.empty_like(out, memory_format=torch.contiguous_format)
    )
    batch, length, slots = ids.shape
    with torch.cuda.device(table.device):
        C.block_embed(
            ids.data_ptr(),
            table.data_ptr(),
            target.data_ptr(),
            batch * length,
            slots,
            table.shape[0],
            table.shape[1],
            table.stride(0)
            if table.shape[0] > 1
            else table.shape[1],  # any stride is legal for 1 row
            q_eos,
            text_vocab,
            _dtype_code(table.dtype),
            _stream(table.device),
        )
    if target is not out:
        out.copy_(target)


def head_select(y, norm_weight, head, allowed, seeds, ids, eps, temperature, top_k, top_p) -> None:
    """``kf_head_select`` on the tensors of :func:`kelix_fast.ops.head_select`; fills ``ids``.

    ``top_k == 1`` is greedy; any other request reaching here is full-row Gumbel-max sampling (no
    top-k filter, ``top_p == 1``: ``ops.head_select`` refuses the rest for this backend), so
    ``top_p`` is not read. Logits are divided by ``temperature + 1e-5`` (rounded to float32, as the
    reference and the Triton kernel do) when ``temperature > 0``.

    Allocates the workspace (``_C.head_select_workspace_size``: M x D x element size + about 8 KB
    per row, from the caching allocator, so CUDA graph capture works). Copies (none usually):
    ``norm_weight`` when not contiguous (D values); ``allowed`` when its [low, high) pairs are not
    contiguous; ``seeds`` when not contiguous; ``ids`` not contiguous: a temporary copied back.
    """
    C = _C()
    n_rows, dim = y.shape
    if n_rows == 0:
        return
    vocab = head.shape[0]
    dtype = _dtype_code(y.dtype)
    norm_weight = norm_weight.contiguous()
    gumbel = top_k != 1
    seeds = seeds.contiguous() if gumbel else None
    ranges = allowed
    if ranges is not None and ranges.stride(-1) != 1:
        ranges = ranges.contiguous()
    out = (
        ids if ids.is_contiguous() else torch.empty_like(ids, memory_format=torch.contiguous_format)
    )
    workspace_size = C.head_select_workspace_size(n_rows, dim, vocab, dtype)
    workspace = torch.empty(workspace_size, dtype=torch.uint8, device=y.device)
    with torch.cuda.device(y.device):
        C.head_select(
            y.data_ptr(),
            norm_weight.data_ptr(),
            head.data_ptr(),
            0 if ranges is None else ranges.data_ptr(),
            0 if seeds is None else seeds.data_ptr(),
            out.data_ptr(),
            workspace.data_ptr(),
            workspace_size,
            n_rows,
            y.stride(0),
            dim,
            vocab,
            head.stride(0) if vocab > 1 else dim,  # any stride is legal for one row
            0 if ranges is None else ranges.shape[1],
            0 if ranges is None else ranges.stride(0),
            0 if ranges is None else ranges.stride(1),
            dtype,
            C.HEAD_SELECT_GUMBEL if gumbel else C.HEAD_SELECT_GREEDY,
            eps,
            temperature + 1e-5 if gumbel and temperature > 0 else 1.0,
            _stream(y.device),
        )
    if out is not ids:
        ids.copy_(out)
