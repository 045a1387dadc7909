"""Checkpoint loading: official layout, sharding, strict key/shape checks, dead tensors, resident size."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from kelix_fast import KelixAR, WeightsMismatchError
from kelix_fast.models.kelix_ar import DEAD_TENSORS, KelixARModel
from kelix_fast.presets import random_weights, tiny_config, write_checkpoint
from kelix_fast.weights import engine_placement


def test_engine_layout_is_the_official_layout(golden_dir):
    """Every key of keys.json is either read by the engine (same shape) or a declared dead tensor."""
    with open(golden_dir / "kelix_ar" / "keys.json", encoding="utf-8") as f:
        official = {key: tuple(shape) for key, shape, _ in json.load(f)["keys"]}
    config = KelixAR.from_pretrained(golden_dir / "kelix_ar", device="cpu").config
    layout = KelixARModel.checkpoint_layout(config)
    assert layout == {k: v for k, v in official.items() if k not in DEAD_TENSORS}
    assert set(DEAD_TENSORS) <= official.keys()


@pytest.fixture(scope="module")
def tiny_checkpoint():
    config = tiny_config()
    return config, random_weights(config, seed=1)


def _same_outputs(a: KelixAR, b: KelixAR) -> None:
    prompt = [[1, 2, 3, 4]]
    assert torch.equal(
        a.generate(prompt, max_new_blocks=2).groups, b.generate(prompt, max_new_blocks=2).groups
    )


@pytest.mark.parametrize("num_shards", [1, 3])
def test_sharded_and_single_file_checkpoints_load_identically(
    tmp_path, tiny_checkpoint, num_shards
):
    config, weights = tiny_checkpoint
    write_checkpoint(tmp_path, config, weights, num_shards=num_shards)
    assert (tmp_path / "model.safetensors.index.json").exists() == (num_shards > 1)
    loaded = KelixAR.from_pretrained(tmp_path, device="cpu")
    _same_outputs(loaded, KelixAR.from_weights(config, weights, device="cpu"))


def test_shards_without_an_index_are_all_read(tmp_path, tiny_checkpoint):
    config, weights = tiny_checkpoint
    write_checkpoint(tmp_path, config, weights, num_shards=2)
    (tmp_path / "model.safetensors.index.json").unlink()
    _same_outputs(
        KelixAR.from_pretrained(tmp_path, device="cpu"),
        KelixAR.from_weights(config, weights, device="cpu"),
    )


def test_mismatches_are_listed_together(tiny_checkpoint):
    config, weights = tiny_checkpoint
    broken = dict(weights)
    del broken["model.model.norm.scale"]
    del broken["visual_tokenizer.encoder.bias"]
    broken["model.model.extra.weight"] = torch.zeros(2)
    broken["model.model.layers.0.attn.q_proj.weight"] = torch.zeros(3, 3)
    with pytest.raises(WeightsMismatchError) as info:
        KelixAR.from_weights(config, broken, device="cpu")
    err = info.value
    assert err.missing == ["model.model.norm.scale", "visual_tokenizer.encoder.bias"]
    assert err.unknown == ["model.model.extra.weight"]
    assert err.wrong_shape == [("model.model.layers.0.attn.q_proj.weight", (3, 3), (64, 64))]
    message = str(err)
    for text in (
        "missing keys (2)",
        "unexpected keys (1)",
        "checkpoint [3, 3], model expects [64, 64]",
    ):
        assert text in message


def test_dead_tensors_are_accepted_and_dropped(golden_dir):
    engine = KelixAR.from_pretrained(golden_dir / "kelix_ar", device="cpu")
    names = {name for name, _ in engine.model.named_parameters()}
    assert not any(
        "packing_position" in n or "final_norm" in n or n.startswith("lm_head") for n in names
    )


def test_codebooks_are_precomputed_and_raw_tables_freed(golden_dir):
    engine = KelixAR.from_pretrained(golden_dir / "kelix_ar", device="cpu")
    tok, cfg = engine.model.tokenizer, engine.config.tokenizer
    assert not hasattr(tok, "quantizer")
    assert tok.codebooks.shape == (cfg.n_q_tokens, cfg.codes_per_group, cfg.embedding_dim)
    raw = load_file(golden_dir / "kelix_ar" / "model.safetensors")
    g, k = 3, cfg.codes_per_group
    rows = raw[f"visual_tokenizer.quantizer.{g}.embedding.weight"][g * k : (g + 1) * k]
    proj = torch.nn.functional.linear(
        rows,
        raw[f"visual_tokenizer.quantizer.{g}.embedding_proj.weight"],
        raw[f"visual_tokenizer.quantizer.{g}.embedding_proj.bias"],
    )
    want = torch.nn.functional.layer_norm(
        proj,
        (cfg.embedding_dim,),
        raw[f"visual_tokenizer.quantizer.{g}.q_norm.weight"],
        raw[f"visual_tokenizer.quantizer.{g}.q_norm.bias"],
        1e-5,
    )
    torch.testing.assert_close(tok.codebooks[g], want, rtol=0, atol=1e-6)
    raw_bytes = sum(t.numel() * t.element_size() for t in raw.values())
    assert engine.resident_bytes() < raw_bytes


def test_weights_are_cast_once_to_the_engine_dtype(tiny_checkpoint):
    config, weights = tiny_checkpoint
    engine = KelixAR.from_weights(config, weights, device="cpu", dtype=torch.bfloat16)
    dtypes = {t.dtype for t in engine.model.parameters()}
    assert dtypes == {torch.bfloat16}
    assert engine.model.tokenizer.codebooks.dtype == torch.bfloat16
    assert engine.model.tokenizer.codebook_sqnorms.dtype == torch.float32


@pytest.mark.default_device
def test_default_placement_is_cuda_bfloat16_when_available_else_cpu_float32(tiny_checkpoint):
    """The documented default, checked on whichever machine runs it (the marker lifts the guard)."""
    config, weights = tiny_checkpoint
    engine = KelixAR.from_weights(config, weights)
    want = ("cuda", torch.bfloat16) if torch.cuda.is_available() else ("cpu", torch.float32)
    assert (engine.device.type, engine.dtype) == want


def test_default_dtype_follows_the_given_device():
    assert engine_placement("cuda", None, owner="t") == (torch.device("cuda"), torch.bfloat16)
    assert engine_placement("cpu", None, owner="t") == (torch.device("cpu"), torch.float32)


def test_unmarked_tests_cannot_use_the_default_device(tiny_checkpoint):
    """The guard of tests/conftest.py, which fails such a test on any machine."""
    config, weights = tiny_checkpoint
    with pytest.raises(AssertionError, match="relies on the implicit default device"):
        KelixAR.from_weights(config, weights)


def test_index_naming_absent_tensors_is_an_error(tmp_path, tiny_checkpoint):
    config, weights = tiny_checkpoint
    write_checkpoint(tmp_path, config, weights, num_shards=2)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.model.ghost.weight"] = "model-00000-of-00002.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="lists tensors absent from the files"):
        KelixAR.from_pretrained(tmp_path, device="cpu")


def test_empty_directory_is_an_error(tmp_path, tiny_checkpoint):
    config, _ = tiny_checkpoint
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors file"):
        KelixAR.from_pretrained(tmp_path, device="cpu")


def test_duplicate_tensor_across_files_is_an_error(tmp_path, tiny_checkpoint):
    config, weights = tiny_checkpoint
    write_checkpoint(tmp_path, config, weights)
    save_file(
        {"model.model.norm.scale": weights["model.model.norm.scale"]},
        tmp_path / "extra.safetensors",
    )
    with pytest.raises(ValueError, match="appears in more than one file"):
        KelixAR.from_pretrained(tmp_path, device="cpu")
