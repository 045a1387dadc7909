"""DC-AE through diffusers against ``dcae_decode`` and the decoded images of the t2i runs."""

from __future__ import annotations

import pytest
import torch

from kelix_fast.models.vae import decode_latents, load_vae
from tests.engine.tolerances import assert_close


@pytest.fixture(scope="module")
def vae(golden_dir):
    return load_vae(golden_dir / "dcae", device="cpu", dtype=torch.float32)


def test_decode_matches_golden(vae, load_fixture):
    fx = load_fixture("dcae_decode")
    with torch.inference_mode():
        assert_close(vae.decode(fx["latents"]).sample, fx["decoded"], "DC-AE decode")


def test_uint8_images_of_the_t2i_runs(vae, golden_dir, load_fixture):
    runs = sorted(p.stem for p in golden_dir.glob("dit_sampling_*.safetensors"))
    for name in runs:
        fx = load_fixture(name)
        image = decode_latents(vae, fx["final_latents"])
        assert image.dtype == torch.uint8 and image.shape == (1, *fx["image_u8"].shape)
        # golden README: uint8 images within 1 level (float32 rounding at the .5 boundaries)
        assert (image[0].int() - fx["image_u8"].int()).abs().max() <= 1, name


def test_bad_latents_and_directories(vae, tmp_path, golden_dir):
    with pytest.raises(ValueError, match=r"latents must have shape \[B, 8, h, w\]"):
        decode_latents(vae, torch.zeros(1, 4, 5, 5))
    with pytest.raises(ValueError, match="latents must be a float tensor"):
        decode_latents(vae, torch.zeros(1, 8, 5, 5, dtype=torch.int64))
    with pytest.raises(ValueError, match="must be on the VAE's device"):
        decode_latents(vae, torch.zeros(1, 8, 5, 5, device="meta"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_vae(tmp_path, device="cpu")
    with pytest.raises(ValueError, match="must hold a diffusers AutoencoderDC, .*'SanaConfig'"):
        (tmp_path / "config.json").write_text('{"_class_name": "SanaConfig"}')
        load_vae(tmp_path, device="cpu")
