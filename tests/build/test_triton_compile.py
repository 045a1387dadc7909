"""Every Triton kernel compiles for Hopper (sm_90a) in its realistic configurations, without a GPU.

``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`` runs the whole GPU pipeline down to
PTX and cubin (TOOLCHAIN.md) and catches what the interpreter never sees (``tl.dot`` with K < 16, layout
and shared-memory errors). tests/conftest.py sets TRITON_INTERPRET=1 without CUDA, which turns every
``@triton.jit`` kernel into an interpreted function that ``ASTSource`` cannot take, so the kernels are
compiled in one subprocess whose environment has the variable removed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# Runs in the subprocess: compiles each configuration with the launcher's own block table and prints
# one JSON object per configuration. Configurations: (name, module, kernel, pointer dtypes, constexprs).
_COMPILE_SCRIPT = r"""
import json, sys, time
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kelix_fast.triton_kernels import block_embed, codebook_argmin, head_select

def codebook_config(dtype, exact):
    block_n, block_k, num_warps = codebook_argmin._BLOCKS[
        codebook_argmin.torch.float32 if exact else getattr(codebook_argmin.torch, dtype)]
    pointers = {"z_ptr": dtype, "ln_w_ptr": dtype, "ln_b_ptr": dtype, "cb_ptr": dtype,
                "sqnorms_ptr": "float32", "ids_ptr": "int64"}
    constexprs = {"DIM": 128, "BLOCK_N": block_n, "BLOCK_K": block_k, "BLOCK_D": 128,
                  "EXACT": exact, "UPCAST_DOT": False, "BF16_BY_BITS": False}
    name = f"codebook_argmin-{dtype}-{'exact' if exact else 'reference'}"
    return name, codebook_argmin._codebook_argmin_kernel, pointers, {"eps": "fp32"}, constexprs, num_warps

def block_embed_config(dtype):
    block_rows, block_d, num_warps = block_embed._BLOCKS["gpu"]
    pointers = {"ids_ptr": "int64", "table_ptr": dtype, "out_ptr": dtype}
    constexprs = {"NUM_SLOTS": 9, "BLOCK_ROWS": block_rows, "BLOCK_D": block_d, "BF16_BY_BITS": False}
    return f"block_embed-{dtype}", block_embed._block_embed_kernel, pointers, {}, constexprs, num_warps

def head_select_norm_config(dtype):
    pointers = {"y_ptr": dtype, "w_ptr": dtype, "normed_ptr": dtype}
    constexprs = {"BLOCK_ROWS": 1, "BLOCK_D": head_select._NORM_BLOCK_D, "BF16_BY_BITS": False}
    return f"head_select-norm-{dtype}", head_select._head_select_norm_kernel, pointers, {"eps": "fp32"}, constexprs, 4

def head_select_scores_config(dtype, mode):
    # greedy: running max; gumbel: full-row sampling; candidates: top_k=50 with ranges (structured).
    keep = 50 if mode == "candidates" else 1
    block_m, block_v, block_d, num_warps = head_select._BLOCKS["candidates" if keep > 1 else "max"]
    pointers = {"normed_ptr": dtype, "head_ptr": dtype, "ranges_ptr": "int64", "row_keys_ptr": "int64",
                "keys_ptr": "int64"}
    constexprs = {"NUM_RANGES": 2 if mode == "candidates" else 0, "KEEP": keep, "KEEP_POW2": 64 if keep > 1 else 1,
                  "GUMBEL": mode == "gumbel", "SCALE": mode != "greedy", "BLOCK_M": block_m,
                  "BLOCK_V": block_v, "BLOCK_D": block_d, "UPCAST_DOT": False}
    scalars = {"temperature_div": "fp32"}
    return (f"head_select-{mode}-{dtype}", head_select._head_select_scores_kernel, pointers, scalars,
            constexprs, num_warps)

TRITON_TYPES = {"bfloat16": "*bf16", "float32": "*fp32", "int64": "*i64"}
configs = [codebook_config(dtype, exact) for dtype in ("bfloat16", "float32") for exact in (False, True)]
configs += [block_embed_config(dtype) for dtype in ("bfloat16", "float32")]
configs += [head_select_norm_config(dtype) for dtype in ("bfloat16", "float32")]
configs += [head_select_scores_config(dtype, mode) for dtype in ("bfloat16", "float32")
            for mode in ("greedy", "gumbel", "candidates")]
for name, kernel, pointers, scalars, constexprs, num_warps in configs:
    signature = {}
    for arg in kernel.arg_names:
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg in pointers:
            signature[arg] = TRITON_TYPES[pointers[arg]]
        else:
            signature[arg] = scalars.get(arg, "i32")
    start = time.perf_counter()
    compiled = triton.compile(
        ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
        target=GPUTarget("cuda", 90, 32),
        options={"num_warps": num_warps},
    )
    ptx = compiled.asm["ptx"]
    print(json.dumps({
        "name": name, "seconds": round(time.perf_counter() - start, 2),
        "target": ".target sm_90a" in ptx, "cubin_bytes": len(compiled.asm.get("cubin", b"")),
        "wgmma": "wgmma" in ptx, "mma": "mma" in ptx, "tf32": ".tf32" in ptx,
    }), flush=True)
"""

CONFIGS = [
    "codebook_argmin-bfloat16-reference",
    "codebook_argmin-bfloat16-exact",
    "codebook_argmin-float32-reference",
    "codebook_argmin-float32-exact",
    "block_embed-bfloat16",
    "block_embed-float32",
    "head_select-norm-bfloat16",
    "head_select-norm-float32",
    "head_select-greedy-bfloat16",
    "head_select-gumbel-bfloat16",
    "head_select-candidates-bfloat16",
    "head_select-greedy-float32",
    "head_select-gumbel-float32",
    "head_select-candidates-float32",
]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """name -> facts about the sm_90a build of that configuration (one subprocess for all)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton_cache"))  # compile, never reuse
    result = subprocess.run(
        [sys.executable, "-c", _COMPILE_SCRIPT],
        check=False,  # the assertion below shows the compiler output
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, f"Triton compile for sm_90a failed:\n{result.stderr[-6000:]}"
    facts = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    return {fact["name"]: fact for fact in facts}


def test_every_kernel_has_a_configuration(compiled: dict[str, dict]) -> None:
    # Guards the parametrization: a new kernel file must add its configurations here.
    kernels = {p.stem for p in (REPO / "triton_kernels").glob("[!_]*.py")}
    assert kernels == {name.split("-")[0] for name in CONFIGS}
    assert sorted(compiled) == sorted(CONFIGS)


@pytest.mark.parametrize("name", CONFIGS)
def test_kernel_compiles_for_sm90a(compiled: dict[str, dict], name: str) -> None:
    fact = compiled[name]
    assert fact["target"], f"{name}: PTX is not for sm_90a"
    assert fact["cubin_bytes"] > 0, f"{name}: no cubin"


def test_codebook_argmin_numerics_on_hopper(compiled: dict[str, dict]) -> None:
    # bf16 reference mode is a tensor-core GEMM; float32 tiles must stay IEEE (no TF32, which would
    # change the exact-mode ids and the float32 reference arithmetic).
    assert compiled["codebook_argmin-bfloat16-reference"]["wgmma"]
    for name in CONFIGS:
        if name.startswith("codebook_argmin") and not name.endswith("bfloat16-reference"):
            assert not compiled[name]["tf32"], f"{name}: TF32 in the PTX"


def test_head_select_numerics_on_hopper(compiled: dict[str, dict]) -> None:
    # bf16 head tiles run on tensor cores; float32 stays IEEE so that greedy is the float32 argmax.
    for mode in ("greedy", "gumbel", "candidates"):
        fact = compiled[f"head_select-{mode}-bfloat16"]
        assert fact["wgmma"] or fact["mma"], f"head_select-{mode}-bfloat16: no tensor-core MMA"
        assert not compiled[f"head_select-{mode}-float32"]["tf32"]
