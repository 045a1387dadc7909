"""``codebook_argmin`` at Kelix-Tok shapes (kelix-ar.md §3.5, §7.3, §8 #1) and its official-style baseline.

The official tokenizer rebuilds the 8 SimVQ codebooks on every call, ``q_norm(E_g[slice] W_g^T + b_g)``
(8 GEMMs [K, init_dim] x [init_dim, d]), then makes 8 separate ``cdist(z_norm(z_g), C_g).pow(2).argmin``
calls in the model dtype. The baseline does exactly that; the op gets the codebooks precomputed once.

Queries sit near a code (``z_g = P_g[k] + noise`` with ``P_g`` the pre-``q_norm`` projections and the
query LayerNorm equal to ``q_norm``), so the nearest code wins by a wide margin: every backend, the
reference and the baseline must then agree id for id, in both modes and dtypes. Speed does not depend
on the values.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks.cases import Case, Point, Tensors, ids_equal
from kelix_fast import ops

TEXT_VOCAB = 151936  # vocab_offset: id of code 0 of sub-codebook 0 (kelix-ar.md §2.1)
EPS = 1e-5
_FULL = {"groups": 8, "codes": 8192, "dim": 128, "init_dim": 4096}
_QUICK = {"groups": 8, "codes": 67, "dim": 16, "init_dim": 24}
_FULL_N = (324, 1280, 4096, 16384)
_QUICK_N = (5, 33)
_DTYPES = ("bfloat16", "float32")
_MODES = ("exact", "reference")
_NOISE = 0.05  # query noise, relative to the projections' spread


def points(quick: bool) -> list[Point]:
    """dtype-major, so the raw tables are built once per dtype."""
    constants, sizes = (_QUICK, _QUICK_N) if quick else (_FULL, _FULL_N)
    return [
        {"n": n, **constants, "dtype": dtype, "mode": mode}
        for dtype in _DTYPES
        for n in sizes
        for mode in _MODES
    ]


def element_size(point: Point) -> int:
    return torch.empty((), dtype=getattr(torch, point["dtype"])).element_size()


def flops(point: Point) -> int:
    """The distance GEMM: ``2 n G K d`` (LayerNorm and argmin are lower order)."""
    return 2 * point["n"] * point["groups"] * point["codes"] * point["dim"]


def nbytes(point: Point) -> int:
    """Compulsory traffic: z, the codebooks, both LayerNorm vectors, int64 ids, and for ``exact`` the
    float32 code norms precomputed at load."""
    n, groups, codes, dim = point["n"], point["groups"], point["codes"], point["dim"]
    size = element_size(point)
    total = n * groups * dim * size + groups * codes * dim * size + 2 * groups * dim * size
    total += n * groups * 8
    if point["mode"] == "exact":
        total += groups * codes * 4
    return total


def _generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def project(raw: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``E_g W_g^T + b_g`` per sub-codebook through ``F.linear`` (``nn.Linear``, as the official code)."""
    return torch.stack([F.linear(raw[g], weight[g], bias[g]) for g in range(raw.shape[0])])


def build_codebooks(shared: Tensors) -> torch.Tensor:
    """``q_norm(E_g W_g^T + b_g)`` -> [G, K, d]: what the official code recomputes on every call."""
    proj = project(shared["raw"], shared["proj_weight"], shared["proj_bias"])
    dim = proj.shape[-1]
    return torch.stack(
        [
            F.layer_norm(proj[g], (dim,), shared["q_norm_weight"][g], shared["q_norm_bias"][g], EPS)
            for g in range(proj.shape[0])
        ]
    )


def make_shared(point: Point, device: torch.device) -> Tensors:
    """Raw tables [G, K, init_dim] (the used slice of each quantizer's table), projection, q_norm, and
    the codebooks, their float32 norms and the pre-norm projections derived from them (seed 0)."""
    groups, codes, dim, init_dim = point["groups"], point["codes"], point["dim"], point["init_dim"]
    dtype = getattr(torch, point["dtype"])
    gen = _generator(device, 0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=device, dtype=torch.float32)

    shared = {
        "raw": randn(groups, codes, init_dim).to(dtype),
        "proj_weight": (randn(groups, dim, init_dim) / init_dim**0.5).to(dtype),
        "proj_bias": (0.1 * randn(groups, dim)).to(dtype),
        "q_norm_weight": (1 + 0.1 * randn(groups, dim)).to(dtype),
        "q_norm_bias": (0.1 * randn(groups, dim)).to(dtype),
    }
    shared["projections"] = project(shared["raw"], shared["proj_weight"], shared["proj_bias"])
    shared["codebooks"] = build_codebooks(shared)
    shared["sqnorms"] = shared["codebooks"].float().square().sum(-1)
    return shared


def make_inputs(point: Point, shared: Tensors, seed: int) -> Tensors:
    """One input set in fresh memory: ``z [n, G*d]`` near random codes, the query LayerNorm (= q_norm),
    copies of the codebooks and their norms."""
    n, groups = point["n"], point["groups"]
    proj = shared["projections"]
    device = proj.device
    gen = _generator(device, seed)
    picks = torch.randint(0, point["codes"], (n, groups), generator=gen, device=device)
    near = proj.float()[torch.arange(groups, device=device)[None, :], picks]  # [n, G, d]
    noise = torch.randn(near.shape, generator=gen, device=device)
    z = (near + _NOISE * proj.float().std() * noise).reshape(n, -1).to(proj.dtype)
    return {
        "z": z,
        "ln_weight": shared["q_norm_weight"].clone(),
        "ln_bias": shared["q_norm_bias"].clone(),
        "codebooks": shared["codebooks"].clone(),
        "sqnorms": shared["sqnorms"].clone(),
    }


def run(point: Point, inputs: Tensors, backend: str) -> torch.Tensor:
    return ops.codebook_argmin(
        inputs["z"],
        inputs["ln_weight"],
        inputs["ln_bias"],
        inputs["codebooks"],
        inputs["sqnorms"],
        vocab_offset=TEXT_VOCAB,
        mode=point["mode"],
        eps=EPS,
        backend=backend,
    )


def baseline(point: Point, inputs: Tensors, shared: Tensors) -> torch.Tensor:
    """The official tokenizer's quantizer loop: rebuild each codebook, then one ``cdist`` per group."""
    groups, codes, dim = point["groups"], point["codes"], point["dim"]
    z = inputs["z"]
    ids = []
    for g in range(groups):
        proj = F.linear(shared["raw"][g], shared["proj_weight"][g], shared["proj_bias"][g])
        code_g = F.layer_norm(
            proj, (dim,), shared["q_norm_weight"][g], shared["q_norm_bias"][g], EPS
        )
        u = F.layer_norm(
            z[:, g * dim : (g + 1) * dim], (dim,), inputs["ln_weight"][g], inputs["ln_bias"][g], EPS
        )
        ids.append(torch.cdist(u, code_g).pow(2).argmin(-1) + (TEXT_VOCAB + g * codes))
    return torch.stack(ids, dim=1)


CASE = Case(
    name="codebook_argmin",
    roof="compute",
    points=points,
    flops=flops,
    bytes=nbytes,
    shared_key=("groups", "codes", "dim", "init_dim", "dtype"),
    baseline_key=("n", "groups", "codes", "dim", "init_dim", "dtype"),
    make_shared=make_shared,
    make_inputs=make_inputs,
    run=run,
    baseline=baseline,
    check=ids_equal,
    probe=lambda inputs: (inputs["z"], inputs["codebooks"]),
)
