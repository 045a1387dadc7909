"""Config parsing: the official file round-trips; unsupported, unknown and inconsistent values are errors."""

from __future__ import annotations

import copy
import json

import pytest

from kelix_fast.config import ConfigError, KelixARConfig
from kelix_fast.presets import tiny_config


@pytest.fixture(scope="module")
def official(golden_dir):
    with open(golden_dir / "kelix_ar" / "config.json", encoding="utf-8") as f:
        return json.load(f)


def test_official_config_parses_and_round_trips(official):
    config = KelixARConfig.from_dict(official)
    assert config.to_dict() == official
    llm = config.llm
    assert llm.total_vocab == config.block_decoder.vocab_size
    assert (
        config.tokenizer.codes_per_group * config.tokenizer.n_q_tokens
        == config.tokenizer.codebook_size
    )
    # quirk 14: the model reads rope_base and norm_eps, never rope_theta / rms_norm_eps
    assert llm.rope_base == official["qwen_config"]["rope_base"]
    assert llm.norm_eps == official["qwen_config"]["norm_eps"]


def test_tiny_preset_config_round_trips():
    config = tiny_config()
    assert KelixARConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_from_json_accepts_a_directory_or_a_file(golden_dir):
    a = KelixARConfig.from_json(golden_dir / "kelix_ar")
    assert a == KelixARConfig.from_json(golden_dir / "kelix_ar" / "config.json")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        KelixARConfig.from_json(golden_dir / "does-not-exist")


@pytest.mark.parametrize(
    "section, field, value, match",
    [
        (
            "qwen_config",
            "use_multimodal_rope",
            True,
            r"qwen_config.use_multimodal_rope = True is not supported",
        ),
        (
            "tokenizer_config",
            "split_dim",
            True,
            r"tokenizer_config.split_dim = True is not supported",
        ),
        (
            "tokenizer_config",
            "vq_sampling_mode",
            "softmax",
            r"vq_sampling_mode = 'softmax' is not supported",
        ),
        (
            "qwen_config",
            "tie_word_embeddings",
            True,
            r"tie_word_embeddings = True is not supported",
        ),
        ("qwen_config", "rope_scaling", {"type": "yarn"}, r"qwen_config.rope_scaling"),
        ("token_decoder_config", "reduce", False, r"token_decoder_config.reduce = False"),
        (
            "qwen_config",
            "brand_new_field",
            1,
            r"unknown field\(s\) in qwen_config: \['brand_new_field'\]",
        ),
        ("qwen_config", "num_heads", "4", r"qwen_config.num_heads must be a number"),
        ("tokenizer_config", "split_voc", 4, r"split_voc \(4\) must equal n_q_tokens \(8\)"),
        (
            "token_decoder_config",
            "eos_token",
            998,
            r"eos_token \(998\) must equal qwen_config.q_eos_token",
        ),
        ("token_decoder_config", "vocab_size", 1000, r"vocab_size \(1000\) must equal"),
    ],
)
def test_unsupported_or_inconsistent_values_name_the_field(official, section, field, value, match):
    raw = copy.deepcopy(official)
    raw[section][field] = value
    with pytest.raises(ConfigError, match=match):
        KelixARConfig.from_dict(raw)


def test_vision_options_are_checked(official):
    raw = copy.deepcopy(official)
    raw["tokenizer_config"]["vision_config"]["use_qk_norm"] = True
    with pytest.raises(ConfigError, match=r"tokenizer_config.vision_config.use_qk_norm = True"):
        KelixARConfig.from_dict(raw)


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda raw: raw.update({"__class__": "SanaConfig"}), r"__class__ must be 'KeyeARConfig'"),
        (lambda raw: raw.pop("__class__"), r"__class__ must be 'KeyeARConfig'"),
        (lambda raw: raw.pop("token_decoder_config"), r"missing section 'token_decoder_config'"),
        (
            lambda raw: raw["qwen_config"].pop("rope_base"),
            r"missing field\(s\) in qwen_config: \['rope_base'\]",
        ),
        (lambda raw: raw.update({"extra": 1}), r"unknown top-level field\(s\): \['extra'\]"),
    ],
)
def test_other_model_classes_and_incomplete_files_are_rejected(official, mutate, match):
    raw = copy.deepcopy(official)
    mutate(raw)
    with pytest.raises(ConfigError, match=match):
        KelixARConfig.from_dict(raw)
