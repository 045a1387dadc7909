"""Every Triton kernel compiles for Hopper (sm_90a) in its realistic configurations, without a GPU.

``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`` runs the whole GPU pipeline down to
PTX and cubin (TOOLCHAIN.md) and catches what the interpreter never sees (``tl.dot`` with K < 16, layout
and shared-memory errors). ``ASTSource`` takes compiled ``@triton.jit`` functions only, and a
``TRITON_INTERPRET=1`` in the caller's environment would have made them interpreted at import, so the
kernels are compiled in one subprocess whose environment has the variable removed.
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
import json, os, re, subprocess, sys, tempfile, time
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kelix_fast.triton_kernels import block_embed, codebook_argmin, head_select
from kelix_fast.triton_kernels import cross_attention, linear_attention
from kelix_fast.triton_kernels import flash_attention
from kelix_fast.triton_kernels import decode_attention
from kelix_fast.triton_kernels import rms_norm
from kelix_fast.triton_kernels import silu_mul

def codebook_config(dtype, exact):
    # Kelix-Tok: G 8, K 8192, d 128, contiguous tensors, whose unit strides a launch specializes.
    block_n, block_k, num_warps, num_stages, split = codebook_argmin._BLOCKS[
        exact, getattr(codebook_argmin.torch, dtype)]
    pointers = {"z_ptr": dtype, "ln_w_ptr": dtype, "ln_b_ptr": dtype, "cb_ptr": dtype,
                "sqnorms_ptr": "float32", "ids_ptr": "int64"}
    constexprs = {"stride_ln_w_dim": 1, "stride_ln_b_dim": 1, "stride_cb_dim": 1, "stride_sqnorms_code": 1,
                  "stride_ids_group": 1, "DIM": 128, "BLOCK_N": block_n, "BLOCK_K": block_k, "BLOCK_D": 128,
                  "NUM_STAGES": num_stages, "EXACT": exact, "SPLIT": split, "UPCAST_DOT": False,
                  "BF16_BY_BITS": False}
    ints = {"num_codes": 8192, "stride_z_row": 1024, "stride_ln_w_group": 128, "stride_ln_b_group": 128,
            "stride_cb_group": 8192 * 128, "stride_cb_code": 128, "stride_sqnorms_group": 8192,
            "stride_ids_row": 8}
    name = f"codebook_argmin-{dtype}-{'exact' if exact else 'reference'}"
    return (name, codebook_argmin._codebook_argmin_kernel, pointers, {"eps": "fp32"}, constexprs, num_warps,
            ints)

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

def linear_attention_config(dtype, phase):
    # Full scale: d = 32 (70 heads); the head-dim strides are 1, which a launch specializes.
    if phase == "state":
        kernel = linear_attention._linear_attention_state_kernel
        pointers = {"k_ptr": dtype, "v_ptr": dtype, "kv_ptr": "float32", "z_ptr": "float32"}
        constexprs = {"stride_k_d": 1, "stride_v_d": 1, "UPCAST_DOT": False}
    else:
        kernel = linear_attention._linear_attention_out_kernel
        pointers = {"q_ptr": dtype, "kv_ptr": "float32", "z_ptr": "float32", "out_ptr": dtype}
        constexprs = {"stride_q_d": 1, "stride_out_d": 1, "BF16_BY_BITS": False}
    constexprs |= {"BLOCK_N": linear_attention._BLOCK_N, "BLOCK_D": 32}
    return (f"linear_attention-{phase}-{dtype}", kernel, pointers, {"eps": "fp32"}, constexprs,
            linear_attention._NUM_WARPS)

def cross_attention_config(dtype):
    # Full scale: d = 112 padded to BLOCK_D 128 (20 heads), Lk <= 720 (one scan step).
    block_m, block_n, num_warps = cross_attention.blocks(getattr(cross_attention.torch, dtype), False)
    pointers = {"q_ptr": dtype, "k_ptr": dtype, "v_ptr": dtype, "mask_ptr": "uint8", "out_ptr": dtype}
    constexprs = {"stride_q_d": 1, "stride_k_d": 1, "stride_v_d": 1, "stride_mask_l": 1,
                  "stride_out_d": 1, "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_D": 128,
                  "SCAN_BLOCK": 1024, "UPCAST_DOT": False, "BF16_BY_BITS": False}
    scalars = {"scale": "fp32", "mask_bias": "fp32"}
    return (f"cross_attention-{dtype}", cross_attention._cross_attention_kernel, pointers, scalars,
            constexprs, num_warps)

FLASH_MASKS = {"bidirectional": flash_attention.BIDIRECTIONAL, "causal": flash_attention.CAUSAL,
               "block_causal": flash_attention.BLOCK_CAUSAL,  # blocks of block_size rows
               "block_ids": flash_attention.KEY_END,  # runs of block ids: per-row key ends
               "packed": flash_attention.KEY_RANGE}  # many short sequences as one pack

def flash_attention_config(dtype, head_dim, mask, key_mask=0, max_seqlen=4096):
    # LLM prefill: hd 128 (H 32 / Hkv 8); ViT: hd 72 as 64 + 16 columns; packed Block Decoder
    # sequences: max_seqlen 9 (16 x 16 tiles). key_mask 2 is the biased key mask (natural-unit scores).
    # The strides are those of q/k/v/out views [T, H, d] of [T, H * d] projections, divided by
    # STRIDE_ALIGN as the launcher passes them: hd 72 gives head strides that are not multiples of 16.
    if mask == "packed":
        block_m, block_n, num_warps = flash_attention._PACKED[dtype == "float32"]
    else:
        block_m, block_n, num_warps = flash_attention.blocks(dtype == "float32", head_dim, max_seqlen, False)
    width, second = flash_attention.head_dim_blocks(head_dim)
    pointers = {"q_ptr": dtype, "k_ptr": dtype, "v_ptr": dtype, "cu_seqlens_ptr": "int32",
                "key_end_ptr": "int32", "key_start_ptr": "int32", "key_mask_ptr": "bool", "out_ptr": dtype}
    align = 8 if dtype == "bfloat16" else 4
    heads = 16
    ints = {}
    for t in "qkvo":
        ints |= {f"stride_{t}_t": heads * head_dim // align, f"stride_{t}_h": head_dim // align}
    constexprs = {"stride_q_d": 1, "stride_k_d": 1, "stride_v_d": 1, "stride_o_d": 1,
                  "MASK": FLASH_MASKS[mask], "KEY_MASK": key_mask,
                  "HEAD_DIM": head_dim, "BLOCK_M": block_m, "BLOCK_N": block_n,
                  "BLOCK_D": width, "BLOCK_D2": max(second, 16), "SPLIT": second > 0, "STRIDE_ALIGN": align,
                  "UPCAST_DOT": False, "BF16_BY_BITS": False}
    name = (f"flash_attention-{mask.replace('_', '-')}{'-keybias' if key_mask else ''}-{dtype}-hd{head_dim}"
            f"{'-short' if max_seqlen < block_m else ''}")
    scalars = {"qk_scale": "fp32", "masked_bias": "fp32"}
    return name, flash_attention._flash_attention_kernel, pointers, scalars, constexprs, num_warps, ints

DECODE_SHAPES = {"decode": (1, 1, 32, 8, 128, 4096), "prefill": (1, 2048, 32, 8, 128, 4096),
                 "block_decoder": (64, 1, 4, 4, 128, 9)}  # (B, Lq, H, Hkv, d, S)

def decode_attention_config(dtype, shape):
    # Qwen3 decode (G=4, 64 splits), prefill (one split, 64-row tiles), Block Decoder step (G=1, S=9).
    batch, q_len, heads, kv_heads, dim, cache_len = DECODE_SHAPES[shape]
    plan = decode_attention.plan(batch, q_len, heads, kv_heads, cache_len, dim,
                                 getattr(decode_attention.torch, dtype))
    split = plan["num_splits"] > 1
    part = "float32" if split else dtype  # with one split the partial pointers are the output
    pointers = {"q_ptr": dtype, "k_ptr": dtype, "v_ptr": dtype, "q_start_ptr": "int64",
                "kv_lens_ptr": "int64", "out_ptr": dtype, "part_o_ptr": part, "part_lse_ptr": part}
    constexprs = {"GROUP": heads // kv_heads, "CAUSAL": True, "SPLIT": split, "BLOCK_M": plan["block_m"],
                  "BLOCK_N": plan["block_n"], "BLOCK_D": plan["block_d"], "UPCAST_DOT": False,
                  "BF16_BY_BITS": False}
    return (f"decode_attention-{shape}-{dtype}", decode_attention._decode_attention_kernel, pointers,
            {"qk_scale": "fp32"}, constexprs, plan["num_warps"])

def decode_attention_merge_config(dtype):
    plan = decode_attention.plan(*DECODE_SHAPES["decode"], getattr(decode_attention.torch, dtype))
    pointers = {"part_o_ptr": "float32", "part_lse_ptr": "float32", "out_ptr": dtype}
    constexprs = {"BLOCK_ROWS": 1, "BLOCK_SPLITS": triton.next_power_of_2(plan["num_splits"]),
                  "BLOCK_D": plan["block_d"], "BF16_BY_BITS": False}
    return (f"decode_attention-merge-{dtype}", decode_attention._decode_attention_merge_kernel, pointers,
            {}, constexprs, decode_attention._MERGE_WARPS)

def rms_norm_config(dtype, dim, mode):
    # The LLM's residual-stream norm (D 4096), with its residual add fused in, and its fused QK-norm
    # + RoPE (head dim 128).
    pointers = {"x_ptr": dtype, "w_ptr": dtype, "out_ptr": dtype, "residual_ptr": dtype, "sum_ptr": dtype,
                "cos_ptr": "float32", "sin_ptr": "float32"}
    rope = mode == "rope"
    block_d = dim // 2 if rope else dim
    constexprs = {"BLOCK_ROWS": rms_norm._BLOCK_ROWS, "BLOCK_D": block_d, "ROPE": rope,
                  "RESIDUAL": mode == "add", "BF16_BY_BITS": False}
    return (f"rms_norm-{mode + '-' if mode else ''}{dtype}", rms_norm._rms_norm_kernel, pointers,
            {"eps": "fp32"}, constexprs, 4 if block_d <= 1024 else 8)

def silu_mul_config(dtype):
    # Qwen3-8B's MLP: I 12288 of a [n, 2I] gate/up projection, rows 2I apart (multiples of 16, which a
    # launch specializes: the up half and every row start are 16-byte aligned).
    pointers = {"x_ptr": dtype, "out_ptr": dtype}
    constexprs = {"BLOCK_ROWS": silu_mul._BLOCK_ROWS, "BLOCK_COLS": silu_mul._BLOCK_COLS, "BF16_BY_BITS": False}
    ints = {"n_cols": 12288, "stride_x_row": 2 * 12288}
    return (f"silu_mul-{dtype}", silu_mul._silu_mul_kernel, pointers, {}, constexprs, silu_mul._NUM_WARPS,
            ints)

CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
PTXAS = os.path.join(os.path.dirname(CUOBJDUMP), "ptxas")
workdir = tempfile.mkdtemp()
TRITON_TYPES = {"bfloat16": "*bf16", "float32": "*fp32", "int64": "*i64", "uint8": "*u8", "int32": "*i32",
                "bool": "*i1", "float16": "*fp16"}
configs = [codebook_config(dtype, exact) for dtype in ("bfloat16", "float32") for exact in (False, True)]
configs += [codebook_config("float16", True)]
configs += [block_embed_config(dtype) for dtype in ("bfloat16", "float32")]
configs += [head_select_norm_config(dtype) for dtype in ("bfloat16", "float32")]
configs += [head_select_scores_config(dtype, mode) for dtype in ("bfloat16", "float32")
            for mode in ("greedy", "gumbel", "candidates")]
configs += [linear_attention_config(dtype, phase) for dtype in ("bfloat16", "float32")
            for phase in ("state", "out")]
configs += [cross_attention_config(dtype) for dtype in ("bfloat16", "float32")]
configs += [flash_attention_config(dtype, head_dim, mask) for dtype in ("bfloat16", "float32")
            for head_dim in (72, 128) for mask in ("causal", "block_causal")]
configs += [flash_attention_config("bfloat16", 72, "bidirectional"),
            flash_attention_config("bfloat16", 128, "causal", key_mask=2),
            flash_attention_config("bfloat16", 128, "causal", max_seqlen=9),
            flash_attention_config("bfloat16", 128, "block_ids"),
            flash_attention_config("bfloat16", 128, "packed"),
            flash_attention_config("float32", 128, "packed")]
configs += [decode_attention_config(dtype, shape) for dtype in ("bfloat16", "float32")
            for shape in DECODE_SHAPES]
configs += [decode_attention_merge_config(dtype) for dtype in ("bfloat16", "float32")]
configs += [rms_norm_config(dtype, dim, mode) for dtype in ("bfloat16", "float32")
            for dim, mode in ((4096, ""), (4096, "add"), (128, "rope"))]
configs += [silu_mul_config(dtype) for dtype in ("bfloat16", "float32")]
for name, kernel, pointers, scalars, constexprs, num_warps, *known in configs:
    # A launch specializes what Triton sees in the values: pointers are 16-byte aligned (torch
    # allocations are), and integers that are multiples of 16 (the known stride values) say so.
    ints = known[0] if known else {}
    signature, attrs = {}, {}
    for index, arg in enumerate(kernel.arg_names):
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg in pointers:
            signature[arg] = TRITON_TYPES[pointers[arg]]
            attrs[(index,)] = [["tt.divisibility", 16]]
        else:
            signature[arg] = scalars.get(arg, "i32")
            if ints.get(arg, 1) % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
    start = time.perf_counter()
    compiled = triton.compile(
        ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs),
        target=GPUTarget("cuda", 90, 32),
        options={"num_warps": num_warps},
    )
    ptx = compiled.asm["ptx"]
    # Registers and spills of the cubin, from the cuobjdump that triton ships.
    cubin = os.path.join(workdir, name + ".cubin")
    with open(cubin, "wb") as f:
        f.write(compiled.asm["cubin"])
    usage = subprocess.run([CUOBJDUMP, "-res-usage", cubin], check=True, capture_output=True, text=True)
    registers, stack = map(int, re.search(r"REG:(\d+) STACK:(\d+)", usage.stdout).groups())
    # ptxas says (C7515) when it makes every wgmma wait for the previous one; triton drops its log.
    serialized = False
    if "wgmma" in ptx:
        ptx_file = os.path.join(workdir, name + ".ptx")
        with open(ptx_file, "w") as f:
            f.write(ptx)
        log = subprocess.run([PTXAS, "-v", "--gpu-name=sm_90a", ptx_file, "-o", ptx_file + ".cubin"],
                             check=True, capture_output=True, text=True)
        serialized = "C7515" in log.stderr
    print(json.dumps({
        "name": name, "seconds": round(time.perf_counter() - start, 2),
        "target": ".target sm_90a" in ptx, "cubin_bytes": len(compiled.asm.get("cubin", b"")),
        "wgmma": "wgmma" in ptx, "mma": "mma" in ptx, "tf32": ".tf32" in ptx,
        "shared_bytes": compiled.metadata.shared,
        # one 16-bit element per load instruction: what unaligned tiles of a 16-bit tensor compile to
        "scalar_16bit_loads": len(re.findall(r"ld\.global(?:\.\w+)*\.[bu]16\b", ptx)),
        "async_copies": ptx.count("cp.async"),
        "registers": registers, "stack_bytes": stack, "wgmma_serialized": serialized,
    }), flush=True)
"""

CONFIGS = [
    "rms_norm-bfloat16",
    "rms_norm-float32",
    "rms_norm-add-bfloat16",
    "rms_norm-add-float32",
    "rms_norm-rope-bfloat16",
    "rms_norm-rope-float32",
    "silu_mul-bfloat16",
    "silu_mul-float32",
    "codebook_argmin-bfloat16-reference",
    "codebook_argmin-bfloat16-exact",
    "codebook_argmin-float32-reference",
    "codebook_argmin-float32-exact",
    "codebook_argmin-float16-exact",
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
    "linear_attention-state-bfloat16",
    "linear_attention-out-bfloat16",
    "linear_attention-state-float32",
    "linear_attention-out-float32",
    "cross_attention-bfloat16",
    "cross_attention-float32",
    "flash_attention-causal-bfloat16-hd72",
    "flash_attention-block-causal-bfloat16-hd72",
    "flash_attention-causal-bfloat16-hd128",
    "flash_attention-block-causal-bfloat16-hd128",
    "flash_attention-causal-float32-hd72",
    "flash_attention-block-causal-float32-hd72",
    "flash_attention-causal-float32-hd128",
    "flash_attention-block-causal-float32-hd128",
    "flash_attention-bidirectional-bfloat16-hd72",
    "flash_attention-causal-keybias-bfloat16-hd128",
    "flash_attention-causal-bfloat16-hd128-short",
    "flash_attention-block-ids-bfloat16-hd128",
    "flash_attention-packed-bfloat16-hd128",
    "flash_attention-packed-float32-hd128",
    "decode_attention-decode-bfloat16",
    "decode_attention-prefill-bfloat16",
    "decode_attention-block_decoder-bfloat16",
    "decode_attention-decode-float32",
    "decode_attention-prefill-float32",
    "decode_attention-block_decoder-float32",
    "decode_attention-merge-bfloat16",
    "decode_attention-merge-float32",
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


def test_codebook_argmin_on_tensor_cores_without_spills(compiled: dict[str, dict]) -> None:
    # Exact mode once ran a float32 tl.dot for every dtype: FMA units, and both operand slices for the
    # whole d held per thread, 32 registers and ~4 KB of stack per thread at bf16 (54.6 ms on the H200
    # at n = 4096 against 0.83 ms for reference mode). 16-bit codebooks now split u into bf16/fp16
    # parts whose products are exact in the float32 accumulator: wgmma, and no stack. Reference mode's
    # 128-row tiles stay on wgmma; the float32 configurations stay IEEE FMA products, and no
    # configuration spills (float32 reference did, 656 bytes, with the launch's default pipelining).
    for name in (
        "codebook_argmin-bfloat16-exact",
        "codebook_argmin-float16-exact",
        "codebook_argmin-bfloat16-reference",
    ):
        assert compiled[name]["wgmma"], f"{name}: no wgmma"
        assert not compiled[name]["wgmma_serialized"], f"{name}: ptxas serialized the wgmmas"
    for name in CONFIGS:
        if name.startswith("codebook_argmin"):
            stack = compiled[name]["stack_bytes"]
            assert stack == 0, f"{name}: {stack} bytes of stack (spills)"


def test_head_select_16bit_configurations_do_not_spill(compiled: dict[str, dict]) -> None:
    # The candidates mode (top-k sampling, the generate defaults) keeps [rows, 64] int64 keys in
    # registers beside the score tile: with 128-id tiles it spilled 528 bytes per thread in bf16.
    for name in CONFIGS:
        if name.startswith("head_select") and name.endswith("bfloat16"):
            stack = compiled[name]["stack_bytes"]
            assert stack == 0, f"{name}: {stack} bytes of stack (spills)"


def test_head_select_numerics_on_hopper(compiled: dict[str, dict]) -> None:
    # bf16 head tiles run on tensor cores; float32 stays IEEE so that greedy is the float32 argmax.
    for mode in ("greedy", "gumbel", "candidates"):
        fact = compiled[f"head_select-{mode}-bfloat16"]
        assert fact["wgmma"] or fact["mma"], f"head_select-{mode}-bfloat16: no tensor-core MMA"
        assert not compiled[f"head_select-{mode}-float32"]["tf32"]


def test_dit_attention_numerics_on_hopper(compiled: dict[str, dict]) -> None:
    # bf16 tiles run on tensor cores; float32 inputs and the float32 state stay IEEE (no TF32), as the
    # references' float32 einsums do.
    for name in ("linear_attention-state-bfloat16", "cross_attention-bfloat16"):
        assert compiled[name]["wgmma"] or compiled[name]["mma"], f"{name}: no tensor-core MMA"
    for name in CONFIGS:
        if name.startswith(("linear_attention", "cross_attention")):
            assert not compiled[name]["tf32"], f"{name}: TF32 in the PTX"


def test_flash_attention_on_hopper(compiled: dict[str, dict]) -> None:
    # bf16 tiles run on tensor cores, float32 stays IEEE (the tests' tight float32 tolerance), and every
    # tile configuration fits Hopper's 227 KB of shared memory per block (a launch would fail otherwise).
    for name in CONFIGS:
        if name.startswith("flash_attention"):
            fact = compiled[name]
            if name.endswith("-short"):  # 16-row tiles: below wgmma's 64, Ampere-style mma
                assert fact["mma"], f"{name}: no tensor-core MMA"
            elif "bfloat16" in name:
                assert fact["wgmma"], f"{name}: no wgmma"
            else:
                assert not fact["tf32"], f"{name}: TF32 in the PTX"
            assert fact["shared_bytes"] <= 232448, (
                f"{name}: {fact['shared_bytes']} bytes of shared memory"
            )


def test_flash_attention_wgmma_chains_are_not_serialized(compiled: dict[str, dict]) -> None:
    # With an unmasked and a masked key loop, ptxas serialized every wgmma of the kernel (C7515: each
    # HGMMA waited for the previous one) in every 16-bit configuration but the packed one; one loop
    # with a uniform mask branch lets the Q K^T and P V chains issue back to back.
    for name in CONFIGS:
        if name.startswith("flash_attention") and compiled[name]["wgmma"]:
            assert not compiled[name]["wgmma_serialized"], f"{name}: ptxas serialized the wgmmas"


def test_flash_attention_tiles_load_as_vectors_without_spills(compiled: dict[str, dict]) -> None:
    # The ViT's head dim 72 gives head strides that are not multiples of 16: without STRIDE_ALIGN every
    # bf16 element of a Q/K/V tile was its own 2-byte load and nothing was copied asynchronously (the
    # likely cause of Kelix-Tok's 318 ms at 980 px on the H200). And loop-carried tensors of 64-bit K/V
    # pointers made hd 128 (the LLM prefill) spill 192 bytes per thread at 255 registers; scalar tile
    # pointers plus int32 offsets take 177 and no stack. Every 16-bit configuration loads its tiles as
    # 16-byte vectors through cp.async. No configuration spills: float32 ones did (656-776 bytes at 255
    # registers) while the kernel had a second copy of the tile loop.
    for name in CONFIGS:
        if name.startswith("flash_attention"):
            fact = compiled[name]
            if "bfloat16" in name:
                assert fact["scalar_16bit_loads"] == 0, (
                    f"{name}: {fact['scalar_16bit_loads']} 2-byte loads"
                )
                assert fact["async_copies"], f"{name}: no cp.async"
            assert fact["stack_bytes"] == 0, (
                f"{name}: {fact['stack_bytes']} bytes of stack (spills)"
            )


def test_decode_attention_on_hopper(compiled: dict[str, dict]) -> None:
    # bf16 tiles run on tensor cores (mma at the 16-row decode tiles, wgmma at 64-row prefill tiles),
    # float32 stays IEEE (no TF32), and every tile fits Hopper's 227 KB of shared memory per block.
    for shape in ("decode", "prefill", "block_decoder"):
        fact = compiled[f"decode_attention-{shape}-bfloat16"]
        assert fact["wgmma"] or fact["mma"], f"{shape}-bfloat16: no tensor-core MMA"
        assert not compiled[f"decode_attention-{shape}-float32"]["tf32"]
    for name in CONFIGS:
        if name.startswith("decode_attention"):
            assert compiled[name]["shared_bytes"] <= 232448, f"{name}: too much shared memory"


def test_silu_mul_loads_vectors_without_spills(compiled: dict[str, dict]) -> None:
    # A bandwidth-bound elementwise kernel: at I 12288 (a multiple of 16) the gate half, the up half
    # and the output are 16-byte aligned, so every thread moves its 8 columns as 16-byte vectors (no
    # 2-byte loads), and nothing spills (32 registers for bf16 when written).
    assert compiled["silu_mul-bfloat16"]["scalar_16bit_loads"] == 0
    for name in ("silu_mul-bfloat16", "silu_mul-float32"):
        fact = compiled[name]
        assert fact["stack_bytes"] == 0, f"{name}: {fact['stack_bytes']} bytes of stack"
        assert fact["shared_bytes"] == 0, f"{name}: shared memory in an elementwise kernel"
