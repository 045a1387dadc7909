"""Loading by Hugging Face repo id, offline, from a Hub cache the tests fill themselves; dtype names.

The cache has the layout huggingface_hub reads (``models--org--name/refs/<ref>`` holding a commit,
``snapshots/<commit>/<files>``), filled with the tiny checkpoints: the AR model as the release writes it
(``presets.write_checkpoint``) with the tiny tokenizer as ``tokenizer.json``, the tiny DiT and AEDIT as
muse ``config.json`` + safetensors, and the tiny DC-AE in a ``vae/`` folder of a diffusers-style repo,
as SANA's is. ``HF_HUB_OFFLINE`` and ``HF_HUB_CACHE`` are set per test, so nothing reaches a network.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from kelix_fast import KelixAR, KelixDiT, KelixPipeline, KelixProcessor, load_vae, presets
from kelix_fast.hub import resolve_pretrained
from kelix_fast.processor import KelixTextTokenizer
from kelix_fast.weights import parse_dtype, resolve_dtype

SEED = 2
MAIN = "a" * 40  # commit of refs/main
TAGGED = "b" * 40  # commit of refs/v1


def _snapshot(cache: Path, repo_id: str, commit: str = MAIN, ref: str = "main") -> Path:
    """A snapshot folder of ``repo_id`` in the cache, named by ``ref``."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    folder = repo / "snapshots" / commit
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _write_dit(folder: Path, dit: KelixDiT) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(dit.config.to_dict()))
    tensors = {k: v.contiguous() for k, v in dit.state_dict().items()}
    save_file(tensors, folder / "model.safetensors")


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("hub")
    sft = _snapshot(cache, "kelix-test/Kelix-SFT")
    config = presets.tiny_config()
    presets.write_checkpoint(sft, config, presets.random_weights(config, SEED), num_shards=2)
    KelixTextTokenizer.tiny().backend.save(str(sft / "tokenizer.json"))
    (sft / "preprocessor_config.json").write_text(json.dumps({"min_pixels": 3136}))
    place = {"device": "cpu", "dtype": torch.float32}
    _write_dit(_snapshot(cache, "kelix-test/Kelix-DiT"), presets.tiny_dit(SEED, **place))
    _write_dit(_snapshot(cache, "kelix-test/Kelix-AEDIT"), presets.tiny_aedit(SEED, **place))
    # refs/v1 of the DiT repo: another snapshot, holding the AEDIT, so a test can tell them apart.
    _write_dit(
        _snapshot(cache, "kelix-test/Kelix-DiT", TAGGED, "v1"), presets.tiny_aedit(SEED, **place)
    )
    sana = _snapshot(cache, "kelix-test/SANA-diffusers")
    presets.tiny_vae(SEED, **place).save_pretrained(sana / "vae")
    (sana / "model_index.json").write_text("{}")
    return cache


@pytest.fixture
def offline(hub_cache, monkeypatch) -> Path:
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return hub_cache


# --------------------------------------------------------------------------- resolve_pretrained


def test_repo_ids_resolve_to_cached_snapshots(offline):
    snapshots = offline / "models--kelix-test--Kelix-DiT" / "snapshots"
    assert resolve_pretrained("kelix-test/Kelix-DiT") == snapshots / MAIN
    assert resolve_pretrained("kelix-test/Kelix-DiT", revision="v1") == snapshots / TAGGED
    assert resolve_pretrained("kelix-test/Kelix-DiT", revision=TAGGED) == snapshots / TAGGED
    vae = offline / "models--kelix-test--SANA-diffusers" / "snapshots" / MAIN / "vae"
    assert resolve_pretrained("kelix-test/SANA-diffusers", subfolder="vae") == vae
    assert resolve_pretrained("kelix-test/SANA-diffusers/vae") == vae  # the official demo's form


def test_explicit_arguments_need_no_environment(hub_cache, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    found = resolve_pretrained("kelix-test/Kelix-DiT", cache_dir=hub_cache, local_files_only=True)
    assert found == hub_cache / "models--kelix-test--Kelix-DiT" / "snapshots" / MAIN


def test_local_directories_are_used_as_they_are(tmp_path):
    (tmp_path / "vae").mkdir()
    assert resolve_pretrained(tmp_path) == tmp_path
    assert resolve_pretrained(str(tmp_path), subfolder="vae") == tmp_path / "vae"
    with pytest.raises(ValueError, match="revision='v1' applies to Hugging Face repo ids"):
        resolve_pretrained(tmp_path, revision="v1")
    with pytest.raises(FileNotFoundError, match="has no folder 'unet'"):
        resolve_pretrained(tmp_path, subfolder="unet")
    with pytest.raises(ValueError, match="subfolder must be a relative path inside it"):
        resolve_pretrained(tmp_path, subfolder="../etc")


def test_what_cannot_be_found_is_named(offline, tmp_path):
    with pytest.raises(
        FileNotFoundError, match=r"ar_path .* 'kelix-test/absent' .*cache only \(offline\)"
    ):
        resolve_pretrained("kelix-test/absent", arg="ar_path")
    with pytest.raises(
        FileNotFoundError, match="dit_path must be a directory or a Hugging Face repo id"
    ):
        resolve_pretrained(tmp_path / "missing", arg="dit_path")  # absolute: never a repo id
    with pytest.raises(FileNotFoundError, match="has no folder 'unet'"):
        resolve_pretrained("kelix-test/SANA-diffusers", subfolder="unet")
    with pytest.raises(FileNotFoundError, match="revision 'v2'"):
        resolve_pretrained("kelix-test/Kelix-DiT", revision="v2")
    with pytest.raises(TypeError, match="must be a directory or a Hugging Face repo id, got int"):
        resolve_pretrained(7)


# --------------------------------------------------------------------------- every loader, by id


def test_every_loader_takes_a_repo_id(offline):
    cpu = {"device": "cpu", "torch_dtype": "float32"}
    ar = KelixAR.from_pretrained("kelix-test/Kelix-SFT", **cpu)
    reference = KelixAR.tiny(SEED, device="cpu", dtype=torch.float32)
    prompt = [[151644, 872, 198, 1000, 151645, 198, 151644, 77091, 198]]
    assert torch.equal(
        ar.generate(prompt, max_new_blocks=3).groups,
        reference.generate(prompt, max_new_blocks=3).groups,
    )
    dit = KelixDiT.from_pretrained("kelix-test/Kelix-DiT", **cpu)
    assert dit.config.use_connector and dit.dtype == torch.float32
    tagged = KelixDiT.from_pretrained("kelix-test/Kelix-DiT", revision="v1", **cpu)
    assert not tagged.config.use_connector  # refs/v1 holds the AEDIT
    vae = load_vae("kelix-test/SANA-diffusers", subfolder="vae", **cpu)
    assert vae.config.latent_channels == presets.TINY_VAE_CONFIG["latent_channels"]
    processor = KelixProcessor.from_pretrained("kelix-test/Kelix-SFT")
    assert processor.image_config.min_pixels == 3136
    assert processor.tokenizer.encode("hi") == KelixTextTokenizer.tiny().encode("hi")


def test_the_pipeline_loads_the_official_demo_names(offline):
    """Repo ids as the demo's defaults name them (the VAE as 'repo/vae'), the same images as the
    embedded tiny pipeline of the same weights."""
    pipe = KelixPipeline.from_pretrained(
        "kelix-test/Kelix-SFT",
        "kelix-test/Kelix-DiT",
        "kelix-test/SANA-diffusers/vae",
        aedit_path="kelix-test/Kelix-AEDIT",
        device="cpu",
        torch_dtype="fp32",
    )
    tiny = KelixPipeline.tiny(SEED, device="cpu", dtype="float32")
    args = {"steps": 1, "size": 64, "seed": 5}
    assert np.array_equal(
        np.asarray(pipe.generate_image("a fox", **args)),
        np.asarray(tiny.generate_image("a fox", **args)),
    )
    image = np.full((56, 56, 3), 128, dtype=np.uint8)
    assert np.array_equal(
        np.asarray(pipe.reconstruct(image, **args)), np.asarray(tiny.reconstruct(image, **args))
    )
    with pytest.raises(ValueError, match=r"revisions keys must be in .*got \['unet'\]"):
        KelixPipeline.from_pretrained("kelix-test/Kelix-SFT", revisions={"unet": "main"})
    with pytest.raises(FileNotFoundError, match="KelixPipeline: dit_path .* 'kelix-test/nope'"):
        KelixPipeline.from_pretrained("kelix-test/Kelix-SFT", "kelix-test/nope", device="cpu")


# --------------------------------------------------------------------------- dtype names


@pytest.mark.parametrize(
    "name, dtype",
    [
        ("bfloat16", torch.bfloat16),
        ("bf16", torch.bfloat16),
        ("torch.bfloat16", torch.bfloat16),
        ("float32", torch.float32),
        ("fp32", torch.float32),
        ("float16", torch.float16),
        ("fp16", torch.float16),
        (torch.float16, torch.float16),
        (None, None),
    ],
)
def test_dtype_names(name, dtype):
    assert parse_dtype(name) == dtype


def test_dtype_arguments_are_checked():
    with pytest.raises(ValueError, match=r"dtype must be a torch.dtype or one of \['float32'"):
        parse_dtype("float8")
    with pytest.raises(TypeError, match="dtype must be a torch.dtype or a dtype name, got int"):
        parse_dtype(16)
    with pytest.raises(ValueError, match="give dtype or torch_dtype .*not both"):
        resolve_dtype("bf16", torch.float32, owner="KelixAR")
    with pytest.raises(ValueError, match="KelixAR: give dtype or torch_dtype"):
        KelixAR.tiny(device="cpu", dtype="bf16", torch_dtype="bf16")
    assert KelixAR.tiny(device="cpu", torch_dtype="bf16").dtype == torch.bfloat16
    with pytest.raises(ValueError, match="KelixDiT: dtype must be"):
        presets.tiny_dit(device="cpu", dtype="int8")
