"""The LLM's and the Block Decoder's fused projections (models/layers.py ``fuse_linears``): q/k/v and
gate/up run as one GEMM each, while the checkpoint names, ``state_dict`` and in-place loads still reach
the same values, and nothing is stored twice."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from kelix_fast import KelixAR, presets
from kelix_fast.models.kelix_ar import KelixARModel
from kelix_fast.models.layers import SwiGLU, fused_linear

_GEMMS = {"linear", "mm", "addmm", "bmm"}  # CPU inference mode sees aten.linear


class _CountGemms(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.gemms = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in _GEMMS:
            self.gemms += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def model():
    config = presets.tiny_config()
    return KelixAR.from_weights(config, presets.random_weights(config), device="cpu").model


def _fused_tensors(model):
    attn, mlp = model.llm.layers[0].attn, model.llm.layers[0].mlp
    decoder = model.block_decoder.transformer.layers[0].attn
    return [
        (attn.qkv, None, (attn.q_proj, attn.k_proj, attn.v_proj)),
        (mlp.gate_up, None, (mlp.w1, mlp.w3)),
        (decoder.qkv, decoder.qkv_bias, (decoder.q_proj, decoder.k_proj, decoder.v_proj)),
    ]


def test_parameters_are_rows_of_the_fused_tensors(model):
    """Each linear's weight (and bias) is a view of its rows of the fused tensor, in order: one copy."""
    for weight, bias, linears in _fused_tensors(model):
        start = 0
        for linear in linears:
            rows = linear.out_features
            assert linear.weight.untyped_storage().data_ptr() == weight.untyped_storage().data_ptr()
            assert torch.equal(linear.weight, weight[start : start + rows])
            if bias is not None:
                assert linear.bias.untyped_storage().data_ptr() == bias.untyped_storage().data_ptr()
                assert torch.equal(linear.bias, bias[start : start + rows])
            start += rows
        assert start == weight.shape[0]


def test_checkpoint_names_and_state_dict_are_unchanged(model):
    """The fused tensors are not persistent: state_dict holds the keys of the model as declared."""
    with torch.device("meta"):
        declared = KelixARModel(presets.tiny_config())
    for part in ("llm", "block_decoder"):
        got = getattr(model, part).state_dict()
        assert list(got) == list(getattr(declared, part).state_dict())
        assert any(k.endswith("attn.k_proj.weight") for k in got)


def test_in_place_loads_reach_the_fused_tensors():
    """load_state_dict copies into the parameters, i.e. into the fused rows the GEMM reads."""
    mlp = SwiGLU(8, 12)
    for p in mlp.parameters():
        torch.nn.init.normal_(p)
    mlp.fuse_projections()
    x = torch.randn(3, 8)
    new = {k: torch.randn_like(v) for k, v in mlp.state_dict().items()}
    mlp.load_state_dict(new)
    want = new["w2.weight"] @ (
        torch.nn.functional.silu(new["w1.weight"] @ x.T) * (new["w3.weight"] @ x.T)
    )
    torch.testing.assert_close(mlp(x), want.T)


def test_moving_or_casting_keeps_one_copy():
    """.to() converts each fused tensor once and re-points the linears at it: after a cast the
    parameters are still rows of the fused tensors (nn.Module alone would convert every view on its
    own, storing the weights twice), and the fused GEMM computes what the linears say."""
    config = presets.tiny_config()
    model = KelixAR.from_weights(config, presets.random_weights(config), device="cpu").model
    model.to(torch.float64)
    test_parameters_are_rows_of_the_fused_tensors(model)
    mlp = model.llm.layers[0].mlp
    assert mlp.gate_up.dtype == torch.float64
    x = torch.randn(2, mlp.w1.in_features, dtype=torch.float64)
    torch.testing.assert_close(
        fused_linear(x, mlp.gate_up, None), torch.cat([mlp.w1(x), mlp.w3(x)], -1)
    )


def test_unfused_module_refuses_to_run():
    with pytest.raises(RuntimeError, match=r"not fused: call its process_weights_after_loading"):
        SwiGLU(8, 12)(torch.randn(2, 8))


def test_a_layer_runs_four_gemms(model):
    """q/k/v, output, gate/up and down: 4 GEMMs per LLM layer and per Block Decoder layer (7 before)."""
    llm, decoder = model.llm, model.block_decoder
    x = torch.randn(2, 1, llm.config.embed_dim)
    cache = llm.new_cache(2, 4)
    pos = torch.zeros(2, dtype=torch.int64)
    cos, sin = llm.rope_cos[pos][:, None], llm.rope_sin[pos][:, None]
    with torch.inference_mode(), _CountGemms() as count:
        llm.layers[0](x, x, cos, sin, cache, 0, pos, pos + 1, None)
    assert count.gemms == 4
    y = torch.randn(2, 1, decoder.config.d_model)
    block_cache = decoder.new_cache(2)
    with torch.inference_mode(), _CountGemms() as count:
        decoder.transformer.layers[0](y, block_cache, 0, pos)
    assert count.gemms == 4
