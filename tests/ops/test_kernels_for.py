"""``kelix_fast.triton_kernels.kernels_for``: compiled kernels for CUDA tensors, an interpreted copy of the
same module for CPU tensors, both in one process and whatever the environment said at import."""

from __future__ import annotations

import importlib
import os

import pytest
import torch
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

from kelix_fast import ops, triton_kernels

KERNEL_MODULES = [
    "block_embed",
    "codebook_argmin",
    "cross_attention",
    "decode_attention",
    "flash_attention",
    "head_select",
    "linear_attention",
    "rms_norm",
    "silu_mul",
]


@pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") == "1",
    reason="TRITON_INTERPRET=1 makes every module interpreted, the compiled ones included",
)
@pytest.mark.parametrize("name", KERNEL_MODULES)
def test_cpu_tensors_get_an_interpreted_copy_and_the_compiled_module_is_untouched(name):
    compiled = importlib.import_module(f"kelix_fast.triton_kernels.{name}")
    copy = triton_kernels.kernels_for(name, torch.zeros(1))
    assert copy is not compiled and copy is triton_kernels.interpreted(name)
    kernels = [v for v in vars(copy).values() if isinstance(v, InterpretedFunction)]
    assert kernels, f"no interpreted kernel in the copy of {name}"
    # The package and sys.modules still hold the compiled module, with compiled kernels.
    assert importlib.import_module(f"kelix_fast.triton_kernels.{name}") is compiled
    assert getattr(triton_kernels, name) is compiled
    assert not any(isinstance(v, InterpretedFunction) for v in vars(compiled).values())
    assert any(isinstance(v, JITFunction) for v in vars(compiled).values())


def test_an_interpreted_launch_leaves_triton_language_compiled():
    """tl.sum and friends run as interpreted twins during an interpreted launch, and only then: after
    it, calling a compiled @triton.jit function from Python raises as triton means it to."""
    x = torch.randn(5, 16)
    got = ops.rms_norm(x, torch.ones(16), eps=1e-6, backend="triton")
    torch.testing.assert_close(got, ops.rms_norm(x, torch.ones(16), eps=1e-6, backend="torch"))
    compiled = importlib.import_module("kelix_fast.triton_kernels.rms_norm")._rms_norm_kernel
    with pytest.raises(RuntimeError, match="outside of the scope of a kernel"):
        compiled(x)


@pytest.mark.gpu
@pytest.mark.parametrize("name", KERNEL_MODULES)
def test_cuda_tensors_get_the_compiled_module(name):
    compiled = importlib.import_module(f"kelix_fast.triton_kernels.{name}")
    assert triton_kernels.kernels_for(name, torch.zeros(1, device="cuda")) is compiled
