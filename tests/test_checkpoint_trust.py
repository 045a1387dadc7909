"""Hostile checkpoints: nothing outside the checkpoint directory is opened, an invalid index or a corrupt
file raises :class:`CheckpointError` naming the file, NaN/Inf and integer tensors are refused at load
(naming file and key), and degenerate numeric config fields raise :class:`ConfigError` before any model is
built."""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from kelix_fast import ConfigError, KelixAR, KelixDiT
from kelix_fast.config import KelixARConfig, KelixDiTConfig
from kelix_fast.presets import random_weights, tiny_config, tiny_dit, write_checkpoint
from kelix_fast.weights import INDEX_FILE, CheckpointError

PLACE = {"device": "cpu", "dtype": torch.float32}
SHARD0 = "model-00000-of-00002.safetensors"
SHARD1 = "model-00001-of-00002.safetensors"


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Path:
    """One valid two-shard tiny checkpoint, written once; tests work on hard-linked copies."""
    path = tmp_path_factory.mktemp("good") / "ckpt"
    config = tiny_config()
    write_checkpoint(path, config, random_weights(config, seed=3), num_shards=2)
    return path


@pytest.fixture
def ckpt(tmp_path, written) -> Path:
    """A fresh checkpoint directory whose files are hard links to :func:`written` (replace a file by
    unlinking it first, never write through the link)."""
    path = tmp_path / "ckpt"
    path.mkdir()
    for file in written.iterdir():
        os.link(file, path / file.name)
    return path


def _index(path: Path) -> dict:
    return json.loads((path / INDEX_FILE).read_text())


def _write_index(path: Path, index: object) -> None:
    (path / INDEX_FILE).unlink()
    (path / INDEX_FILE).write_text(index if isinstance(index, str) else json.dumps(index))


def _replace_tensor(path: Path, key: str, value: torch.Tensor) -> Path:
    """Rewrite the shard holding ``key`` with ``value`` in its place; returns that shard."""
    shard = path / _index(path)["weight_map"][key]
    tensors = load_file(shard)
    tensors[key] = value
    shard.unlink()
    save_file(tensors, shard)
    return shard


def _load(path: Path, **place) -> KelixAR:
    return KelixAR.from_pretrained(path, **{**PLACE, **place})


# ------------------------------------------------------------------- 1. paths outside the directory


@pytest.mark.parametrize("kind", ["parent", "absolute", "symlinked_dir", "nested_parent"])
def test_index_paths_outside_the_checkpoint_are_refused(tmp_path, ckpt, kind):
    outside = tmp_path / "outside"
    outside.mkdir()
    os.link(ckpt / SHARD1, outside / "x.safetensors")  # a valid file: only the path is at fault
    if kind == "parent":
        entry = "../outside/x.safetensors"
    elif kind == "absolute":
        entry = str(outside / "x.safetensors")
    elif kind == "nested_parent":
        (ckpt / "sub").mkdir()
        entry = "sub/../../outside/x.safetensors"
    else:
        (ckpt / "sub").symlink_to(outside, target_is_directory=True)
        entry = "sub/x.safetensors"
    index = _index(ckpt)
    key = next(k for k, v in index["weight_map"].items() if v == SHARD1)
    index["weight_map"] = {k: (entry if v == SHARD1 else v) for k, v in index["weight_map"].items()}
    _write_index(ckpt, index)
    with pytest.raises(CheckpointError) as info:
        _load(ckpt)
    message = str(info.value)
    assert str(ckpt / INDEX_FILE) in message and repr(entry) in message
    assert "absolute path" in message if kind == "absolute" else "outside the checkpoint" in message
    assert f"weight_map[{key!r}]" in message


def test_a_symlinked_file_inside_the_directory_still_loads(tmp_path, written):
    """As in a Hugging Face cache snapshot: every file a symlink to a blob elsewhere."""
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshot"
    blobs.mkdir(), snapshot.mkdir()
    for file in written.iterdir():
        os.link(file, blobs / file.name)
        (snapshot / file.name).symlink_to(blobs / file.name)
    assert _load(snapshot).config == tiny_config()


# ------------------------------------------------------------------- 2. invalid index, corrupt files


@pytest.mark.parametrize(
    "index, match",
    [
        ('{"weight_map": {', r"is not valid JSON"),
        ("[1, 2]", r"must hold a JSON object, got list"),
        ({"metadata": {}}, r"has no 'weight_map' object"),
        ({"weight_map": ["a.safetensors"]}, r"has no 'weight_map' object"),
        ({"weight_map": {"model.model.norm.scale": 3}},
         r"weight_map\['model.model.norm.scale'\] must be a file name \(a non-empty string\), got 3"),
        ({"weight_map": {"k": ""}}, r"weight_map\['k'\] must be a file name"),
    ],
)  # fmt: skip
def test_an_invalid_index_names_the_index_and_the_fault(ckpt, index, match):
    _write_index(ckpt, index)
    with pytest.raises(CheckpointError, match=match) as info:
        _load(ckpt)
    assert str(ckpt / INDEX_FILE) in str(info.value)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_a_corrupt_safetensors_file_is_named(ckpt, damage):
    shard = ckpt / SHARD0
    data = shard.read_bytes()
    shard.unlink()
    if damage == "truncated":
        shard.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        shard.write_bytes(b"\xff" * 64)
    else:
        shard.write_bytes(b"")
    with pytest.raises(CheckpointError, match=re.escape(str(shard))):
        _load(ckpt)


# ------------------------------------------------------------------- 3. tensor kind and finiteness


NORM = "model.model.layers.0.attention_norm.scale"


def _a_small_key() -> str:
    layout = {k: v.numel() for k, v in random_weights(tiny_config(), seed=0).items()}
    return NORM if NORM in layout else min(layout, key=layout.get)


@pytest.mark.parametrize(
    "bad, match",
    [
        (lambda t: t.index_fill(0, torch.tensor([1]), float("nan")), r"holds NaN or Inf"),
        (lambda t: t.index_fill(0, torch.tensor([0]), float("inf")), r"holds NaN or Inf"),
        (lambda t: t.to(torch.int64), r"has dtype torch.int64, the model expects floating point"),
        (lambda t: t > 0, r"has dtype torch.bool, the model expects floating point"),
    ],
)
def test_non_finite_or_non_float_tensors_name_file_and_key(ckpt, bad, match):
    key = _a_small_key()
    original = load_file(ckpt / _index(ckpt)["weight_map"][key])[key]
    shard = _replace_tensor(ckpt, key, bad(original))
    with pytest.raises(CheckpointError, match=match) as info:
        _load(ckpt)
    assert str(shard) in str(info.value) and repr(key) in str(info.value)


def test_overflow_in_the_engine_dtype_is_caught_after_the_cast(ckpt):
    key = _a_small_key()
    original = load_file(ckpt / _index(ckpt)["weight_map"][key])[key]
    _replace_tensor(ckpt, key, original.index_fill(0, torch.tensor([0]), 1e6))  # finite in fp32
    with pytest.raises(CheckpointError, match=r"NaN or Inf .*after the cast to torch.float16"):
        _load(ckpt, dtype=torch.float16)


def test_kelix_dit_refuses_nan_and_integer_tensors(tmp_path):
    dit = tiny_dit(0, **PLACE)
    tensors = {k: v.clone() for k, v in dit.state_dict().items()}
    key = "final_layer.linear.bias" if "final_layer.linear.bias" in tensors else min(tensors)
    nan = {**tensors, key: torch.full_like(tensors[key], float("nan"))}
    with pytest.raises(CheckpointError, match=rf"the weights mapping: tensor '{re.escape(key)}'"):
        KelixDiT.from_weights(dit.config, nan, **PLACE)
    folder = tmp_path / "dit"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(dit.config.to_dict()))
    save_file({**tensors, key: tensors[key].to(torch.int32)}, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor .* dtype torch.int32"):
        KelixDiT.from_pretrained(folder, **PLACE)


# ------------------------------------------------------------------- 4. numeric config fields


@pytest.fixture(scope="module")
def official() -> dict:
    return tiny_config().to_dict()


@pytest.mark.parametrize(
    "section, field, value, match",
    [
        ("qwen_config", "num_kv_heads", 0, r"qwen_config.num_kv_heads must be >= 1, got 0"),
        ("qwen_config", "num_heads", -4, r"qwen_config.num_heads must be >= 1, got -4"),
        ("qwen_config", "head_dim", 16.0, r"qwen_config.head_dim must be an integer >= 1, got 16.0"),
        ("qwen_config", "rope_base", 0, r"qwen_config.rope_base must be a finite number > 0, got 0"),
        ("qwen_config", "norm_eps", -1e-6, r"qwen_config.norm_eps must be a finite number > 0"),
        ("qwen_config", "rope_base", float("inf"), r"rope_base must be a finite number > 0, got inf"),
        ("qwen_config", "eos_token_id", -1, r"qwen_config.eos_token_id must be a token id"),
        ("qwen_config", "pad_token_id", 1.5, r"qwen_config.pad_token_id must be a token id"),
        ("qwen_config", "num_layers", True, r"qwen_config.num_layers must be a number"),
        ("tokenizer_config", "split_voc", 0, r"tokenizer_config.split_voc must be >= 1, got 0"),
        ("token_decoder_config", "nhead", 0, r"token_decoder_config.nhead must be >= 1, got 0"),
        ("token_decoder_config", "max_length", 9.0, r"max_length must be an integer >= 1, got 9.0"),
    ],
)  # fmt: skip
def test_degenerate_numbers_name_the_field_and_value(official, section, field, value, match):
    raw = copy.deepcopy(official)
    raw[section][field] = value
    with pytest.raises(ConfigError, match=match):
        KelixARConfig.from_dict(raw)


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("num_attention_heads", 0, r"vision_config.num_attention_heads must be >= 1, got 0"),
        ("patch_size", 0, r"vision_config.patch_size must be >= 1, got 0"),
        ("rope_theta", 0.0, r"vision_config.rope_theta must be a finite number > 0, got 0.0"),
    ],
)
def test_vision_numbers_are_checked(official, field, value, match):
    raw = copy.deepcopy(official)
    raw["tokenizer_config"]["vision_config"][field] = value
    with pytest.raises(ConfigError, match=match):
        KelixARConfig.from_dict(raw)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"num_heads": 0}, r"SanaConfig.num_heads must be >= 1, got 0"),
        ({"linear_head_dim": -32}, r"SanaConfig.linear_head_dim must be >= 1, got -32"),
        ({"mlp_ratio": 0}, r"SanaConfig.mlp_ratio must be a finite number > 0, got 0"),
        ({"hidden_size": 64.0}, r"SanaConfig.hidden_size must be an integer >= 1, got 64.0"),
        ({"connector_channels": 0}, r"SanaConfig.connector_channels must be >= 1, got 0"),
        ({"vae_downsample_rate": 0}, r"SanaConfig.vae_downsample_rate must be >= 1, got 0"),
    ],
)
def test_dit_numbers_are_checked(change, match):
    raw = {**tiny_dit(0, **PLACE).config.to_dict(), **change}
    with pytest.raises(ConfigError, match=match):
        KelixDiTConfig.from_dict(raw)


def test_a_bad_config_fails_before_any_weight_is_read(tmp_path, official):
    """Only config.json in the folder: the ConfigError comes before the (absent) weights are looked at."""
    raw = copy.deepcopy(official)
    raw["qwen_config"]["rope_base"] = 0
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=r"qwen_config.rope_base .* got 0"):
        _load(tmp_path)
