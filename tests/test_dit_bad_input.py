"""Kelix-DiT: bad configs, config/checkpoint disagreements, bad weights and bad inputs raise clear errors.

Checkpoints are variations of the golden one, built in memory by dropping, adding or reshaping tensors.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file

from kelix_fast import ConfigError, KelixDiT, WeightsMismatchError, dit_position_args
from kelix_fast.config import KelixDiTConfig
from kelix_fast.models.dit import DiTCondition, GridPositions


@pytest.fixture(scope="module")
def raw_config(golden_dir):
    with open(golden_dir / "kelix_dit" / "config.json", encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def tensors(golden_dir):
    return load_file(golden_dir / "kelix_dit" / "model.safetensors")


@pytest.fixture(scope="module")
def dit(raw_config, tensors):
    """The golden model with the cross-attention RoPE on (it owns no weights), so positions are checked."""
    return _load({**raw_config, "use_cross_attn_rope": True}, tensors)


def _load(raw, tensors, **kwargs):
    config = KelixDiTConfig.from_dict(raw)
    return KelixDiT.from_weights(config, tensors, device="cpu", dtype=torch.float32, **kwargs)


def _without(tensors, needle):
    return {k: v for k, v in tensors.items() if needle not in k}


def _inputs(dit, batch=2, length=None, hw=(3, 4)):
    c = dit.config
    length = c.model_max_length if length is None else length
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(batch, c.in_channels, *hw, generator=gen)
    cond = torch.randn(batch, length, c.caption_channels, generator=gen)
    mask = torch.ones(batch, length, dtype=torch.bool)
    latent_pos, cond_pos = dit_position_args(
        hw, cond_length=length, valid_length=length, image_size=32 * hw[0]
    )
    positions = {"cond_positions": cond_pos, "latent_positions": latent_pos}
    return latents, torch.full((batch,), 500.0), cond, mask, positions


# --------------------------------------------------------------------------- config


def test_config_round_trips_and_defaults_absent_fields(raw_config):
    assert KelixDiTConfig.from_dict(raw_config).to_dict() == raw_config
    trimmed = {k: v for k, v in raw_config.items() if k not in ("qk_norm", "use_pe")}
    config = KelixDiTConfig.from_dict(trimmed)
    assert (config.qk_norm, config.use_pe) == (False, False)  # SanaConfig code defaults (§2)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"__class__": "KeyeARConfig"}, r"__class__ must be 'SanaConfig'.*got 'KeyeARConfig'"),
        ({"brand_new_field": 1}, r"unknown field\(s\) in SanaConfig: \['brand_new_field'\]"),
        ({"attn_type": "flash"}, r"SanaConfig.attn_type = 'flash' is not supported"),
        ({"patch_size": 2}, r"SanaConfig.patch_size = 2 is not supported"),
        ({"pred_sigma": True}, r"SanaConfig.pred_sigma = True is not supported"),
        ({"qk_norm": "yes"}, r"qk_norm must be true or false, got 'yes'"),
        (
            {"hidden_size": 64, "num_heads": 7},
            r"hidden_size \(64\) must be a multiple of num_heads \(7\)",
        ),
        ({"depth": 0}, r"depth must be >= 1, got 0"),
        ({"connector_channels": None}, r"connector_channels must be an int >= 1"),
    ],
)
def test_bad_config_is_rejected(raw_config, change, match):
    with pytest.raises(ConfigError, match=match):
        KelixDiTConfig.from_dict({**raw_config, **change})


def test_ar_config_file_is_rejected(golden_dir):
    with pytest.raises(ConfigError, match="__class__ must be 'SanaConfig'"):
        KelixDiTConfig.from_json(golden_dir / "kelix_ar")


# --------------------------------------------------------------------------- config vs checkpoint


def _variants(raw, tensors, flag):
    """(checkpoint with the feature's weights, checkpoint without them, the key the error names)."""
    hidden, caption = raw["hidden_size"], raw["caption_channels"]
    if flag in ("qk_norm", "cross_norm"):
        module = "attn" if flag == "qk_norm" else "cross_attn"
        pattern = rf"\.{module}\.[qk]_norm\."
        without = {k: v for k, v in tensors.items() if not re.search(pattern, k)}
        extra = {}
        for key in without:
            if key.endswith(f".{module}.proj.weight"):
                prefix = key.removesuffix("proj.weight")
                extra |= {prefix + "q_norm.weight": torch.ones(hidden)}
                extra |= {prefix + "k_norm.weight": torch.ones(hidden)}
        return {**without, **extra}, without, f"blocks.0.{module}.q_norm.weight"
    if flag == "y_norm":
        without = _without(tensors, "attention_y_norm.")
        return (
            {**without, "attention_y_norm.weight": torch.ones(hidden)},
            without,
            ("attention_y_norm.weight"),
        )
    channels = raw["connector_channels"] or 2 * caption
    connector = {
        "diffusion_connector.0.weight": torch.randn(caption, channels),
        "diffusion_connector.0.bias": torch.randn(caption),
        "diffusion_connector.2.weight": torch.randn(caption, caption),
        "diffusion_connector.2.bias": torch.randn(caption),
        "diffusion_connector.3.weight": torch.ones(caption),
    }
    without = _without(tensors, "diffusion_connector.")
    return {**without, **connector}, without, "diffusion_connector.0.weight"


@pytest.mark.parametrize("flag", ["qk_norm", "cross_norm", "y_norm", "use_connector"])
def test_feature_flags_must_agree_with_the_checkpoint(raw_config, tensors, flag):
    with_weights, without, key = _variants(raw_config, tensors, flag)
    on = {**raw_config, flag: True}
    off = {**raw_config, flag: False}
    if flag == "use_connector":
        on["connector_channels"] = with_weights["diffusion_connector.0.weight"].shape[1]
        off["connector_channels"] = None
    with pytest.raises(ConfigError, match=rf"config {flag}=true but the checkpoint lacks {key}"):
        _load(on, without)
    with pytest.raises(ConfigError, match=rf"config {flag}=false but the checkpoint has {key}"):
        _load(off, with_weights)
    _load(on, with_weights)  # consistent: both load
    _load(off, without)


def test_connector_width_must_agree_with_the_checkpoint(raw_config, tensors):
    with_weights = _variants(raw_config, tensors, "use_connector")[0]
    channels = with_weights["diffusion_connector.0.weight"].shape[1]
    config = {**raw_config, "use_connector": True, "connector_channels": channels + 1}
    with pytest.raises(
        ConfigError,
        match=rf"config connector_channels={channels + 1} but the checkpoint's "
        rf"diffusion_connector.0.weight has {channels} input columns",
    ):
        _load(config, with_weights)


def test_without_connector_connect_is_the_identity(raw_config, tensors):
    model = _load(
        {**raw_config, "use_connector": False, "connector_channels": None},
        _without(tensors, "diffusion_connector"),
    )
    cond = torch.randn(1, 3, raw_config["caption_channels"])
    assert model.connect(cond) is cond
    with pytest.raises(ValueError, match=rf"hidden must have shape \[\*, \*, {cond.shape[-1]}\]"):
        model.connect(torch.randn(1, 3, cond.shape[-1] + 1))


def test_model_max_length_override(raw_config, tensors):
    rows = raw_config["model_max_length"] + 4
    longer = dict(tensors)
    longer["y_embedder.y_embedding"] = torch.randn(rows, raw_config["caption_channels"])
    with pytest.raises(
        ConfigError,
        match=rf"model_max_length={rows - 4} \(config.json\) .* has {rows} rows; "
        rf"pass model_max_length={rows}",
    ):
        _load(raw_config, longer)
    model = _load(raw_config, longer, model_max_length=rows)
    assert model.config.model_max_length == rows
    cond, mask = model.null_condition(rows + 2)
    assert torch.equal(cond[0, :rows], longer["y_embedder.y_embedding"])
    assert not cond[0, rows:].any() and mask.sum() == rows and not mask[0, rows:].any()
    with pytest.raises(ConfigError, match=rf"model_max_length={rows + 1} \(override\) but"):
        _load(raw_config, tensors, model_max_length=rows + 1)
    with pytest.raises(TypeError, match="model_max_length must be an int, got str"):
        _load(raw_config, tensors, model_max_length="720")


# --------------------------------------------------------------------------- weights


def test_missing_unknown_and_misshapen_weights(raw_config, tensors):
    broken = dict(tensors)
    del broken["blocks.0.attn.to_q.weight"]
    broken["blocks.0.attn.extra.weight"] = torch.zeros(3)
    broken["final_layer.linear.bias"] = torch.zeros(5)
    with pytest.raises(WeightsMismatchError) as info:
        _load(raw_config, broken)
    err = info.value
    assert err.missing == ["blocks.0.attn.to_q.weight"]
    assert err.unknown == ["blocks.0.attn.extra.weight"]
    assert [w[0] for w in err.wrong_shape] == ["final_layer.linear.bias"]


def test_an_extra_block_is_unknown(raw_config, tensors):
    depth = raw_config["depth"]
    extra = {
        k.replace("blocks.0.", f"blocks.{depth}.", 1): v
        for k, v in tensors.items()
        if k.startswith("blocks.0.")
    }
    with pytest.raises(WeightsMismatchError, match=f"blocks.{depth}.attn.to_q.weight"):
        _load(raw_config, {**tensors, **extra})


def test_dead_pos_embed_may_be_absent(raw_config, tensors):
    _load(raw_config, _without(tensors, "pos_embed"))


def test_bad_dtype_is_rejected(raw_config, tensors):
    with pytest.raises(ValueError, match="dtype must be float32, bfloat16 or float16"):
        KelixDiT.from_weights(
            KelixDiTConfig.from_dict(raw_config), tensors, device="cpu", dtype=torch.int8
        )


# --------------------------------------------------------------------------- inputs


def test_forward_accepts_good_inputs(dit):
    latents, timestep, cond, mask, positions = _inputs(dit)
    out = dit(latents, timestep, cond, mask, **positions)
    assert out.shape == latents.shape and out.dtype == latents.dtype


@pytest.mark.parametrize(
    "edit, error, match",
    [
        (lambda a: {**a, "latents": a["latents"][0]}, ValueError, r"latents must have shape"),
        (
            lambda a: {**a, "latents": a["latents"][:, :-1]},
            ValueError,
            r"latents must have shape \[2, \d+, \*, \*\]",
        ),
        (lambda a: {**a, "latents": a["latents"][:1]}, ValueError, r"latents must have shape \[2,"),
        (
            lambda a: {**a, "latents": a["latents"].double()},
            ValueError,
            "latents must have the model dtype",
        ),
        (
            lambda a: {**a, "latents": a["latents"].to("meta")},
            ValueError,
            r"latents must be on cpu, got meta",
        ),
        (
            lambda a: {**a, "latents": a["latents"][..., :2]},
            ValueError,
            r"latents must have h\*w = 12 tokens",
        ),
        (
            lambda a: {**a, "cond": a["cond"][..., :-1]},
            ValueError,
            r"cond must have shape \[\*, \*, \d+\]",
        ),
        (lambda a: {**a, "cond": a["cond"].half()}, ValueError, "cond must have the model dtype"),
        (lambda a: {**a, "cond": a["cond"].to("meta")}, ValueError, "cond must be on cpu"),
        (lambda a: {**a, "cond": a["cond"].tolist()}, TypeError, "cond must be a torch.Tensor"),
        (
            lambda a: {**a, "mask": a["mask"][:, 1:]},
            ValueError,
            r"cond_mask must have shape \[2, \d+\]",
        ),
        (lambda a: {**a, "mask": a["mask"] * 2}, ValueError, "cond_mask must hold only 0/1"),
        (
            lambda a: {**a, "timestep": a["timestep"][:1]},
            ValueError,
            r"timestep must be a real tensor of shape \[2\]",
        ),
        (lambda a: {**a, "timestep": 500.0}, TypeError, "timestep must be a torch.Tensor"),
        (
            lambda a: {**a, "positions": {}},
            ValueError,
            "cond_positions and latent_positions must be given",
        ),
        (
            lambda a: {
                **a,
                "positions": {
                    **a["positions"],
                    "cond_positions": GridPositions(
                        torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64), (1, 1)
                    ),
                },
            },
            ValueError,
            r"cond_positions.rows and .cols must be int64 tensors of shape \[\d+\]",
        ),
    ],
)
def test_bad_forward_inputs_are_rejected(dit, edit, error, match):
    latents, timestep, cond, mask, positions = _inputs(dit)
    args = edit(
        {
            "latents": latents,
            "timestep": timestep,
            "cond": cond,
            "mask": mask,
            "positions": positions,
        }
    )
    with pytest.raises(error, match=match):
        dit(args["latents"], args["timestep"], args["cond"], args["mask"], **args["positions"])


def test_condition_longer_than_model_max_length_is_accepted(dit):
    """The official cross-attention takes any condition length; model_max_length only sizes the null
    condition (y_embedding rows), which is padded with masked rows beyond it."""
    limit = dit.config.model_max_length
    latents, timestep, cond, mask, positions = _inputs(dit, length=limit + 3)
    condition = dit.prepare_condition(cond, mask, **positions)
    assert condition.key_mask.sum(dim=1).tolist() == [limit + 3] * 2
    assert dit.predict_velocity(latents, timestep, condition).shape == latents.shape
    null, null_mask = dit.null_condition(limit + 3)
    assert null_mask.sum().item() == limit
    torch.testing.assert_close(null[0, :limit], dit.y_embedder.y_embedding)
    assert not null[0, limit:].any()


def test_connect_and_null_condition_reject_bad_input(dit):
    width = (
        dit.config.connector_channels if dit.config.use_connector else dit.config.caption_channels
    )
    with pytest.raises(ValueError, match=rf"hidden must have shape \[\*, \*, {width}\]"):
        dit.connect(torch.zeros(1, 3, width + 1))
    with pytest.raises(ValueError, match="hidden must have the model dtype"):
        dit.connect(torch.zeros(1, 3, width, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="length must be an int >= 1, got 0"):
        dit.null_condition(0)


def test_condition_batch_and_concat_checks(dit):
    latents, timestep, cond, mask, positions = _inputs(dit)
    one = dit.prepare_condition(cond[:1], mask[:1], **positions)
    with pytest.raises(ValueError, match=r"latents must have shape \[1, \d+"):
        dit.predict_velocity(latents, timestep, one)
    with pytest.raises(TypeError, match="condition must be a DiTCondition"):
        dit.predict_velocity(latents, timestep, cond)
    short = dit.prepare_condition(cond[:1, :4], mask[:1, :4], **_inputs(dit, length=4)[4])
    with pytest.raises(ValueError, match=r"conditions\[1\] must have length \d+ like"):
        DiTCondition.concat([one, short])
    both = DiTCondition.concat([one, dit.prepare_condition(cond[1:], mask[1:], **positions)])
    torch.testing.assert_close(
        dit.predict_velocity(latents, timestep, both),
        dit(latents, timestep, cond, mask, **positions),
        rtol=0,
        atol=1e-6,
    )


# --------------------------------------------------------------------------- features without a fixture


def test_use_pe_table_is_the_sana_sincos_formula(raw_config, tensors):
    """use_pe adds diffusers' (= SANA's) 2-D sin-cos table for the actual grid; the checkpoint's is dead."""
    embeddings = pytest.importorskip("diffusers.models.embeddings")
    on = _load({**raw_config, "use_pe": True}, tensors)
    off = _load(raw_config, tensors)
    hw = (3, 4)
    want = embeddings.get_2d_sincos_pos_embed(
        raw_config["hidden_size"], hw, base_size=raw_config["input_size"], output_type="pt"
    )
    latents = torch.randn(1, raw_config["in_channels"], *hw)
    torch.testing.assert_close(
        on.x_embedder(latents) + on._latent_pos_embed(*hw), off.x_embedder(latents) + want.float()
    )


def test_cross_attn_x_norm_changes_only_the_cross_attention_queries(raw_config, tensors, dit):
    normed = _load({**raw_config, "use_cross_attn_rope": True, "cross_attn_x_norm": True}, tensors)
    latents, timestep, cond, mask, positions = _inputs(dit)
    plain_out, normed_out = (m(latents, timestep, cond, mask, **positions) for m in (dit, normed))
    assert not torch.allclose(plain_out, normed_out)
    mask[:] = False  # keys all masked and equal values: cross-attention no longer depends on q
    cond[:] = 0.0
    plain_out, normed_out = (m(latents, timestep, cond, mask, **positions) for m in (dit, normed))
    torch.testing.assert_close(plain_out, normed_out)
