"""CUDA graph capture shared by the runtime's captured steps (the decode step, the DiT Euler step)."""

from __future__ import annotations

from collections.abc import Callable

import torch


def capture_graph(step: Callable[[], object]) -> torch.cuda.CUDAGraph:
    """``step`` as a CUDA graph: run once for real on a side stream (kernels compile, workspaces are
    allocated, nothing lazy is left for the capture), then captured. Capture records without executing,
    so ``step``'s effects happen once, by the warm-up; each replay applies them again."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph
