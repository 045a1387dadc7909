"""Kelix-DiT against ``dit_forward`` (every recorded tensor) and the per-step DiT outputs of ``dit_sampling_*``.

Nothing here knows the sizes of a fixture set: lengths, block counts and grids come from the fixtures,
meta.json and the model config.
"""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

import pytest
import torch

from kelix_fast import KelixDiT, dit_position_args, ops
from kelix_fast.models.dit import DiTCondition
from tests.engine.tolerances import assert_close

SAMPLING = ("dit_sampling_cfg1p0", "dit_sampling_cfg4p5")


@pytest.fixture(scope="module")
def golden_dit(golden_dir: Path) -> KelixDiT:
    return KelixDiT.from_pretrained(golden_dir / "kelix_dit", device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def preset(golden_dir: Path) -> dict:
    with open(golden_dir / "meta.json", encoding="utf-8") as f:
        return json.load(f)["config"]["preset"]


def _positions(fx, latent_hw, cond_length, valid_length, image_size):
    latent, cond = dit_position_args(
        latent_hw, cond_length=cond_length, valid_length=valid_length, image_size=image_size
    )
    assert torch.equal(latent.rows, fx["x_input_pos_height"])
    assert torch.equal(latent.cols, fx["x_input_pos_width"])
    assert torch.equal(cond.rows, fx["cond_input_pos_height"])
    assert torch.equal(cond.cols, fx["cond_input_pos_width"])
    assert [*latent.grid, *cond.grid] == fx["pos_scalars"].tolist()
    return latent, cond


def _forward_positions(fx, preset):
    return _positions(
        fx,
        tuple(fx["x"].shape[2:]),
        fx["y"].shape[1],
        preset["dit_forward"]["token_embed_lengths"][0],
        preset["t2i"]["image_size"],
    )


def test_position_args_match_dit_forward(load_fixture, preset):
    _forward_positions(load_fixture("dit_forward"), preset)


@pytest.mark.parametrize("name", SAMPLING)
def test_position_args_match_sampling_runs(load_fixture, preset, name):
    fx = load_fixture(name)
    _positions(
        fx,
        tuple(fx["initial_latents"].shape[2:]),
        fx["cond_embeds"].shape[1],
        int(fx["token_embed_lengths"][0]),
        preset["t2i"]["image_size"],
    )


def test_connector_and_null_condition_match_golden(golden_dit, load_fixture):
    fx = load_fixture("dit_forward")
    assert_close(golden_dit.connect(fx["cond_hidden"]), fx["connector_out"], "connector_out")
    uncond, uncond_mask = golden_dit.null_condition(fx["y"].shape[1])
    assert_close(uncond, fx["uncond_embeds"], "uncond_embeds")
    assert torch.equal(uncond_mask.float(), fx["mask"][0].reshape(1, -1))


# "triton": the linear- and cross-attention kernels (under Triton's interpreter on CPU) inside the
# whole forward, on the fixture's right-padded CFG condition.
@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_forward_matches_every_recorded_tensor(golden_dit, load_fixture, preset, backend):
    fx = load_fixture("dit_forward")
    latent_pos, cond_pos = _forward_positions(fx, preset)
    scope = (
        ops.use_backends(linear_attention="triton", cross_attention="triton")
        if backend == "triton"
        else contextlib.nullcontext()
    )
    with scope:
        velocity, inter = golden_dit(
            fx["x"],
            fx["timestep"],
            fx["y"],
            fx["mask"].reshape(fx["mask"].shape[0], -1),
            cond_positions=cond_pos,
            latent_positions=latent_pos,
            return_intermediates=True,
        )
    assert_close(inter.t_emb, fx["t_emb"], "t_emb")
    assert_close(inter.t_block, fx["t_block"], "t_block")
    assert_close(inter.y_embedder_out, fx["y_embedder_out"], "y_embedder_out")
    assert_close(inter.y_normed, fx["y_normed"], "y_normed")
    recorded = sorted(int(m[1]) for k in fx if (m := re.fullmatch(r"block(\d+)_out", k)))
    assert recorded == list(range(golden_dit.config.depth))
    assert len(inter.blocks) == golden_dit.config.depth
    for i in recorded:
        assert_close(inter.blocks[i], fx[f"block{i}_out"], f"block{i}_out")
    assert_close(velocity, fx["noise_pred"], "noise_pred")


@pytest.mark.parametrize("name", SAMPLING)
def test_condition_prepared_once_serves_every_sampling_step(golden_dit, load_fixture, preset, name):
    """The recorded per-step DiT outputs from one prepared [null, cond] condition (golden "Sampling")."""
    fx = load_fixture(name)
    length = fx["cond_embeds"].shape[1]
    latent_pos, cond_pos = _positions(
        fx,
        tuple(fx["initial_latents"].shape[2:]),
        length,
        int(fx["token_embed_lengths"][0]),
        preset["t2i"]["image_size"],
    )
    positions = {"cond_positions": cond_pos, "latent_positions": latent_pos}
    null = golden_dit.prepare_condition(*golden_dit.null_condition(length), **positions)
    cond = golden_dit.prepare_condition(
        golden_dit.connect(fx["cond_embeds"]), fx["cond_mask"].reshape(1, -1), **positions
    )
    both = DiTCondition.concat([null, cond])
    for step, latents in enumerate(fx["latents_per_step"][:-1]):
        velocity = golden_dit.predict_velocity(
            latents[None].expand(2, -1, -1, -1), fx["timestep_inputs"][step], both
        )
        assert_close(velocity[0], fx["noise_pred_uncond"][step], f"step {step} uncond")
        assert_close(velocity[1], fx["noise_pred_cond"][step], f"step {step} cond")


def test_position_args_with_a_real_image_grid():
    """The AEDIT call: a 36 x 36 patch grid and 324 condition rows give an 18 x 18 raster."""
    from kelix_fast import dit_position_args

    latent, cond = dit_position_args(
        (16, 16), cond_length=324, valid_length=324, image_size=512, image_grid=(36, 36)
    )
    assert cond.grid == (18, 18) and latent.grid == (512 // 28, 512 // 28)
    assert cond.rows.tolist() == [k // 18 for k in range(324)]
    assert cond.cols.tolist() == [k % 18 for k in range(324)]
