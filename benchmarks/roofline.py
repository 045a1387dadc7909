"""The device's measured roofline, taken in the same run as the kernels: copy bandwidth and matmul rate.

Copy: ``dst.copy_(src)`` over a large buffer (counted as read + write). Matmul: a square GEMM in bf16
and in float32 (TF32 as torch's current default leaves it). Never estimated from a data sheet.
"""

from __future__ import annotations

from typing import Any

import torch

from benchmarks import timing

_GPU_COPY_BYTES = 1 << 30  # 1 GiB each way, far beyond any L2
_GPU_MATMUL_SIZE = 8192
_CPU_COPY_BYTES = 1 << 26
_CPU_MATMUL_SIZE = 256


def _median_ms(raw_ms: list[float]) -> float:
    return timing.summarize(raw_ms)["median_ms"]


def measure(device: torch.device, budget: timing.Budget) -> dict[str, Any]:
    """``{"copy_gbps", "matmul_tflops": {dtype: rate}, "copy_bytes", "matmul_size", ...}``."""
    on_gpu = device.type == "cuda"
    timer = timing.time_cuda if on_gpu else timing.time_cpu
    copy_bytes = _GPU_COPY_BYTES if on_gpu else _CPU_COPY_BYTES
    size = _GPU_MATMUL_SIZE if on_gpu else _CPU_MATMUL_SIZE
    src = torch.empty(copy_bytes, dtype=torch.uint8, device=device).random_(0, 255)
    buffers = [(src, torch.empty_like(src))]
    copy_ms = _median_ms(timer(lambda pair: pair[1].copy_(pair[0]), buffers, budget))
    del src, buffers
    rates = {}
    for dtype in (torch.bfloat16, torch.float32):
        operands = [tuple(torch.randn(size, size, device=device).to(dtype) for _ in range(2))]
        ms = _median_ms(timer(lambda pair: pair[0] @ pair[1], operands, budget))
        rates[str(dtype).removeprefix("torch.")] = 2 * size**3 / (ms * 1e-3) / 1e12
    return {
        "copy_gbps": 2 * copy_bytes / (copy_ms * 1e-3) / 1e9,
        "copy_bytes": copy_bytes,
        "matmul_tflops": rates,
        "matmul_size": size,
        "allow_tf32": torch.backends.cuda.matmul.allow_tf32,
    }
