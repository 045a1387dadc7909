"""Processor: smart_resize, patches, golden pixels, tokenizer, chat template, loading, bad input."""

from __future__ import annotations

import itertools
import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from kelix_fast import presets
from kelix_fast.processor import (
    ImageProcessorConfig,
    KelixProcessor,
    KelixTextTokenizer,
    expand_image_placeholders,
    image_to_patches,
    load_image,
    preprocess_image,
    smart_resize,
)

SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
PAD = "<|image_pad|>"
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
# A Qwen2-VL-style template without the default system turn, so the tests can tell it from ours.
JINJA_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}{{ eos_token }}"
)


def random_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def write_json(path, value) -> None:
    path.write_text(json.dumps(value), encoding="utf-8")


# --------------------------------------------------------------------------------------------------
# smart_resize
# --------------------------------------------------------------------------------------------------

BOUNDS = {"min_pixels": 3136, "max_pixels": 1_003_520}


@pytest.mark.parametrize(
    "size, bounds, want",
    [
        ((56, 84), BOUNDS, (56, 84)),  # already multiples of 28, area in bounds: unchanged
        ((84, 112), BOUNDS, (84, 112)),
        ((100, 200), BOUNDS, (112, 196)),  # 3.57 -> 4, 7.14 -> 7
        ((70, 98), BOUNDS, (56, 112)),  # halves round to even: 2.5 -> 2, 3.5 -> 4
        # 1008 x 1988 > max: beta = sqrt(2e6 / 1003520) = 1.4117; 708.4 / 28 = 25.3 -> 25,
        # 1416.7 / 28 = 50.6 -> 50
        ((1000, 2000), BOUNDS, (700, 1400)),
        # 28 x 28 < min: beta = sqrt(3136 / 1200) = 1.6166; 48.5 / 28 -> ceil 2, 64.7 / 28 -> ceil 3
        ((30, 40), BOUNDS, (56, 84)),
        ((10, 10), {"min_pixels": 1, "max_pixels": 10**6}, (28, 28)),  # round gives 0: 28 floor
        # 28 x 5012 > 3136: beta = 6.68; the short side floors to 0 and the final floor makes it 28
        ((28, 5000), {"min_pixels": 1, "max_pixels": 3136}, (28, 728)),
        ((1, 200), BOUNDS, (28, 196)),  # aspect ratio exactly 200 is allowed
    ],
)
def test_smart_resize_hand_worked(size, bounds, want):
    assert smart_resize(*size, **bounds) == want


@pytest.mark.parametrize(
    "size, match",
    [
        ((1, 201), "aspect ratio must be at most 200, got 1 x 201"),
        ((6000, 29), "aspect ratio must be at most 200"),
        ((0, 28), "height and width must be >= 1, got 0 x 28"),
    ],
)
def test_smart_resize_rejects(size, match):
    with pytest.raises(ValueError, match=match):
        smart_resize(*size, **BOUNDS)


# --------------------------------------------------------------------------------------------------
# Patches and the full image path
# --------------------------------------------------------------------------------------------------


def test_patches_come_in_raster_order():
    # Channel 0 = patch row, channel 1 = patch column, channel 2 = position inside the patch.
    ys, xs = np.meshgrid(np.arange(56), np.arange(84), indexing="ij")
    image = np.stack([ys // 14, xs // 14, (ys % 14) * 14 + xs % 14], axis=-1).astype(np.uint8)
    identity = ImageProcessorConfig(image_mean=(0.0, 0.0, 0.0), image_std=(1.0, 1.0, 1.0))
    pixels, grid = preprocess_image(image, identity)
    assert grid.tolist() == [[1, 4, 6]]
    codes = (pixels * 255).round().to(torch.int64)
    inside = torch.arange(196).reshape(14, 14)
    for k, (row, col) in enumerate(itertools.product(range(4), range(6))):
        assert (codes[k, 0] == row).all() and (codes[k, 1] == col).all()
        assert torch.equal(codes[k, 2], inside)


def test_patches_match_the_recorded_pixel_values(golden_dir):
    fx = load_file(golden_dir / "ar_visual.safetensors")
    for i in itertools.takewhile(lambda i: f"img{i}_rgb_u8" in fx, itertools.count()):
        pixels, grid = image_to_patches(fx[f"img{i}_rgb_u8"])
        assert torch.equal(grid, fx[f"img{i}_grid_thw"])
        assert torch.equal(pixels, fx[f"img{i}_pixel_values"])


def test_full_preprocessing_reproduces_the_recorded_pixel_values(golden_dir, tmp_path):
    fx = load_file(golden_dir / "ar_visual.safetensors")
    config = ImageProcessorConfig()
    for i in itertools.takewhile(lambda i: f"img{i}_rgb_u8" in fx, itertools.count()):
        rgb = fx[f"img{i}_rgb_u8"]
        height, width = rgb.shape[:2]
        # The fixture's premise: neither resize changes these sizes under the default settings.
        for low, high in ((3136, 16_056_320), (config.min_pixels, config.max_pixels)):
            assert smart_resize(height, width, min_pixels=low, max_pixels=high) == (height, width)
        Image.fromarray(rgb.numpy()).save(tmp_path / f"img{i}.png")
        inputs = (rgb, rgb.numpy(), Image.fromarray(rgb.numpy()), tmp_path / f"img{i}.png")
        for image in inputs:
            pixels, grid = preprocess_image(image, config)
            assert torch.equal(grid, fx[f"img{i}_grid_thw"])
            assert torch.equal(pixels, fx[f"img{i}_pixel_values"])


def test_resizes_to_the_smart_size():
    # 60 x 90 -> 56 x 84 (step 1 already lands on the final size; step 2 keeps it).
    pixels, grid = preprocess_image(random_image(60, 90))
    assert grid.tolist() == [[1, 4, 6]] and pixels.shape == (24, 3, 14, 14)
    assert pixels.dtype == torch.float32 and pixels.min() >= -1 and pixels.max() <= 1


def test_message_pixel_bounds_override_the_first_resize():
    processor = KelixProcessor.tiny()
    part = {"type": "image", "image": random_image(56, 84), "min_pixels": 25_088}
    out = processor([{"role": "user", "content": [part]}])
    assert out["image_grid_thw"].tolist() == [[1, 10, 14]]  # 140 x 196, see the smart_resize cases


def test_non_rgb_inputs_are_converted():
    rgb = random_image(56, 84)
    want, _ = preprocess_image(rgb)
    rgba = np.concatenate([rgb, np.full((56, 84, 1), 7, np.uint8)], axis=-1)
    assert torch.equal(preprocess_image(rgba)[0], want)  # alpha dropped
    grey = rgb[..., 0]
    from_grey, _ = preprocess_image(grey)
    assert torch.equal(from_grey, preprocess_image(np.repeat(grey[..., None], 3, axis=-1))[0])
    assert torch.equal(preprocess_image(grey[..., None])[0], from_grey)
    assert torch.equal(preprocess_image(Image.fromarray(grey))[0], from_grey)


@pytest.mark.parametrize(
    "image, error, match",
    [
        (np.zeros((56, 84, 3), np.float32), ValueError, "image array must be uint8, got float32"),
        (torch.zeros(56, 84, 3), ValueError, "image tensor must be uint8, got torch.float32"),
        (np.zeros((56, 84, 2), np.uint8), ValueError, r"channels last.*got shape \[56, 84, 2\]"),
        (np.zeros((3, 56, 84), np.uint8), ValueError, "channels last"),
        (np.zeros((0, 84, 3), np.uint8), ValueError, "image must be non-empty"),
        (Image.new("RGB", (0, 5)), ValueError, "image must be non-empty"),
        (np.zeros((1, 300, 3), np.uint8), ValueError, "aspect ratio must be at most 200"),
        ([[0, 0, 0]], TypeError, "image must be a PIL image, .* got list"),
    ],
)
def test_bad_images_are_rejected_by_preprocessing(image, error, match):
    with pytest.raises(error, match=match):
        preprocess_image(image)


def test_unreadable_files_name_the_path(tmp_path):
    missing = tmp_path / "missing.png"
    with pytest.raises(ValueError, match=f"image file '{missing}' could not be read"):
        load_image(missing)
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"not an image")
    with pytest.raises(ValueError, match=f"image file '{garbage}' could not be read"):
        load_image(str(garbage))


@pytest.mark.parametrize(
    "image, error, match",
    [
        (torch.zeros(56, 84, 3), ValueError, r"image must be uint8 of shape \[H, W, 3\]"),
        (
            torch.zeros(56, 84, dtype=torch.uint8),
            ValueError,
            r"image must be uint8 of shape \[H, W, 3\]",
        ),
        (torch.zeros(56, 70, 3, dtype=torch.uint8), ValueError, "multiples of 28, got 56 x 70"),
        (torch.zeros(0, 28, 3, dtype=torch.uint8), ValueError, "multiples of 28"),
        ([[0]], TypeError, "image must be a torch.Tensor"),
    ],
)
def test_bad_images_are_rejected(image, error, match):
    with pytest.raises(error, match=match):
        image_to_patches(image)


@pytest.mark.parametrize(
    "fields, match",
    [
        ({"merge_size": 3}, "merge_size must be 2"),
        ({"min_pixels": 0}, "min_pixels must be an int >= 1, got 0"),
        ({"min_pixels": 5000, "max_pixels": 4000}, "min_pixels must be <= max_pixels"),
        ({"image_std": (0.5, 0.0, 0.5)}, "std > 0"),
    ],
)
def test_bad_image_settings_are_rejected(fields, match):
    with pytest.raises(ValueError, match=match):
        ImageProcessorConfig(**fields)


# --------------------------------------------------------------------------------------------------
# Tokenizer, chat template, placeholder expansion
# --------------------------------------------------------------------------------------------------


def test_tiny_tokenizer_special_ids_and_round_trips():
    tok = KelixTextTokenizer.tiny()
    assert (tok.endoftext_id, tok.im_start_id, tok.im_end_id) == (
        presets.ENDOFTEXT,
        presets.IM_START,
        presets.IM_END,
    )
    assert (tok.vision_start_id, tok.vision_end_id, tok.image_pad_id) == (
        presets.VISION_START,
        presets.VISION_END,
        presets.IMAGE_PAD,
    )
    assert tok.token_id("<eob>") == presets.Q_EOS
    assert max(tok.backend.get_vocab(with_added_tokens=True).values()) < presets.TEXT_VOCAB
    for text in ("Hello, wörld!", "日本語 \n\t  spaces", "", "<|im_start|>user\nhi<|im_end|>"):
        assert tok.decode(tok.encode(text)) == text
    ids = tok.encode("<|im_start|>ab<|image_pad|><|im_end|>")
    assert ids[0] == presets.IM_START and ids[-2:] == [presets.IMAGE_PAD, presets.IM_END]
    assert ids[1:3] == [ord("a"), ord("b")]  # specials are atomic, one token per byte otherwise
    every_ascii = "".join(map(chr, range(128))) + "é世"
    assert tok.encode(every_ascii) == list(every_ascii.encode())
    assert tok.decode(torch.tensor(ids), skip_special_tokens=True) == "ab"


def test_default_chat_template():
    tok = KelixTextTokenizer.tiny()
    text_only = [{"role": "user", "content": "Hi"}]
    assert tok.apply_chat_template(text_only) == (
        SYSTEM + "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    with_image = [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [{"type": "image", "image": None}, {"type": "text", "text": "What?"}],
        },
        {"role": "assistant", "content": "A cat."},
    ]
    assert tok.apply_chat_template(with_image, add_generation_prompt=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        f"<|im_start|>user\n{IMAGE}What?<|im_end|>\n<|im_start|>assistant\nA cat.<|im_end|>\n"
    )


def test_placeholders_expand_per_image_grid():
    grids = torch.tensor([[1, 4, 6], [1, 2, 2]])
    assert expand_image_placeholders(f"a{PAD}b{PAD}", grids) == f"a{PAD * 6}b{PAD}"
    with pytest.raises(ValueError, match="one <|image_pad|> per image, got 2 placeholders for 1"):
        expand_image_placeholders(f"{PAD}{PAD}", grids[:1])
    with pytest.raises(ValueError, match=r"image_grid_thw must have shape \[n, 3\]"):
        expand_image_placeholders(PAD, grids[0])


def test_prepare_expands_each_image_in_order():
    processor = KelixProcessor.tiny()
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": random_image(56, 84)},
                {"type": "text", "text": "and"},
                {"type": "image", "image": random_image(84, 112, seed=1)},
            ],
        }
    ]
    out = processor.prepare(messages)
    assert out["image_grid_thw"].tolist() == [[1, 4, 6], [1, 6, 8]]
    assert out["pixel_values"].shape == (24 + 48, 3, 14, 14)
    assert out["prompt_ids"].dtype == torch.int64 and out["prompt_ids"].shape[0] == 1
    ids = out["prompt_ids"][0].tolist()
    runs = [len(list(run)) for key, run in itertools.groupby(ids) if key == presets.IMAGE_PAD]
    assert runs == [6, 12]
    templated = processor.apply_chat_template(messages)
    same = processor.prepare(
        text=templated, images=[part["image"] for part in messages[0]["content"][::2]]
    )
    assert all(torch.equal(same[key], out[key]) for key in out)


def test_prepare_text_only():
    out = KelixProcessor.tiny().prepare(text="hi")
    assert out["prompt_ids"].tolist() == [[ord("h"), ord("i")]]  # tiny ids are byte values
    assert out["pixel_values"].shape == (0, 3, 14, 14) and out["image_grid_thw"].shape == (0, 3)


@pytest.mark.parametrize(
    "messages, error, match",
    [
        ([], ValueError, r"messages must be non-empty, got \[\]"),
        ("hi", TypeError, "messages must be a list of dicts, got str"),
        ([{"content": "x"}], TypeError, r"messages\[0\] must be a dict with a str 'role'"),
        ([{"role": "user", "content": 5}], TypeError, r"messages\[0\]\['content'\] must be a str"),
        (
            [{"role": "user", "content": [{"type": "video", "video": "v.mp4"}]}],
            ValueError,
            r"messages\[0\]\['content'\]\[0\] must be \{'type': 'text'",
        ),
        ([{"role": "user", "content": [{"type": "text"}]}], ValueError, "must be {'type'"),
    ],
)
def test_bad_messages_are_rejected(messages, error, match):
    with pytest.raises(error, match=match):
        KelixProcessor.tiny().apply_chat_template(messages)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({}, ValueError, "exactly one of messages and text must be given, got neither"),
        (
            {"messages": [{"role": "user", "content": "x"}], "text": "x"},
            ValueError,
            "got both",
        ),
        (
            {"messages": [{"role": "user", "content": "x"}], "images": [random_image(28, 28)]},
            ValueError,
            "images must be empty when messages are given",
        ),
        (
            {"text": "no placeholder", "images": [random_image(56, 56)]},
            ValueError,
            "0 placeholders for 1",
        ),
        ({"text": b"bytes"}, TypeError, "text must be a str, got bytes"),
    ],
)
def test_bad_prepare_calls_are_rejected(kwargs, error, match):
    with pytest.raises(error, match=match):
        KelixProcessor.tiny().prepare(**kwargs)


def test_unknown_token_is_rejected():
    tok = KelixTextTokenizer.tiny()
    with pytest.raises(
        ValueError, match="token must be in the tokenizer's vocabulary, got '<|nope|>'"
    ):
        tok.token_id("<|nope|>")
    with pytest.raises(TypeError, match="text must be a str, got list"):
        tok.encode(["a"])


# --------------------------------------------------------------------------------------------------
# Loading a checkpoint directory
# --------------------------------------------------------------------------------------------------

REQUIRED_SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
]


def write_bpe_files(directory, specials=REQUIRED_SPECIALS) -> dict[str, int]:
    """A Qwen-style vocab.json + merges.txt (bytes and one merge "he") + added_tokens.json."""
    from tokenizers import pre_tokenizers

    vocab = {symbol: i for i, symbol in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["he"] = len(vocab)
    write_json(directory / "vocab.json", vocab)
    (directory / "merges.txt").write_text("#version: 0.2\nh e\n", encoding="utf-8")
    added = {token: len(vocab) + i for i, token in enumerate(specials)}
    write_json(directory / "added_tokens.json", added)
    return vocab | added


def test_loads_vocab_merges_and_added_tokens(tmp_path):
    ids = write_bpe_files(tmp_path)
    write_json(
        tmp_path / "tokenizer_config.json",
        {"additional_special_tokens": REQUIRED_SPECIALS[1:], "eos_token": "<|im_end|>"},
    )
    processor = KelixProcessor.from_pretrained(tmp_path)
    tok = processor.tokenizer
    assert tok.image_pad_id == ids["<|image_pad|>"] and tok.im_start_id == ids["<|im_start|>"]
    assert tok.encode("hello") == [ids["he"], ids["l"], ids["l"], ids["o"]]
    text = "<|im_start|>hello world<|im_end|>"
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode(text), skip_special_tokens=True) == "hello world"
    assert tok.chat_template is None  # the documented template applies
    assert processor.apply_chat_template([{"role": "user", "content": "x"}]).startswith(SYSTEM)
    assert processor.image_config == ImageProcessorConfig()  # no preprocessor_config.json


def test_loads_tokenizer_json_template_and_image_settings(tmp_path):
    KelixTextTokenizer.tiny().backend.save(str(tmp_path / "tokenizer.json"))
    decoder = {
        str(token_id): {"content": token, "special": True, "normalized": False}
        for token, token_id in (("<|im_start|>", 151644), ("<|im_end|>", 151645))
    }
    write_json(
        tmp_path / "tokenizer_config.json",
        {
            "added_tokens_decoder": decoder,
            "chat_template": JINJA_TEMPLATE,
            "eos_token": "<|im_end|>",
        },
    )
    write_json(
        tmp_path / "preprocessor_config.json",
        {
            "min_pixels": 25_088,
            "max_pixels": 1_003_520,
            "image_mean": CLIP_MEAN,
            "image_std": CLIP_STD,
            "patch_size": 14,
            "merge_size": 2,
            "temporal_patch_size": 1,
            "rescale_factor": 0.00392156862745098,
            "do_normalize": True,
        },
    )
    processor = KelixProcessor.from_pretrained(tmp_path)
    assert processor.image_config == ImageProcessorConfig(
        min_pixels=25_088, image_mean=tuple(CLIP_MEAN), image_std=tuple(CLIP_STD)
    )
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": random_image(56, 84)},
                {"type": "text", "text": "?"},
            ],
        }
    ]
    assert processor.apply_chat_template(messages) == (
        f"<|im_start|>user\n{IMAGE}?<|im_end|>\n<|im_start|>assistant\n<|im_end|>"
    )
    out = processor.prepare(messages)
    assert out["image_grid_thw"].tolist() == [[1, 10, 14]]  # 56 x 84 upscaled to 140 x 196
    assert out["prompt_ids"][0].tolist().count(presets.IMAGE_PAD) == 35
    # chat_template.jinja takes precedence over tokenizer_config.json.
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}!", encoding="utf-8")
    tok = KelixTextTokenizer.from_pretrained(tmp_path)
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "x!"


def test_jinja_template_without_jinja2_says_so(monkeypatch):
    tok = KelixTextTokenizer(KelixTextTokenizer.tiny().backend, chat_template="{{ 1 }}")
    monkeypatch.setitem(sys.modules, "jinja2.sandbox", None)
    with pytest.raises(ImportError, match="needs the jinja2 package"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])


def test_bad_checkpoint_directories_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="must hold tokenizer.json or vocab.json \\+ merges.txt"):
        KelixTextTokenizer.from_pretrained(tmp_path)
    # A missing path could be a Hub repo id; an absolute one cannot, and says so.
    with pytest.raises(FileNotFoundError, match="path must be a directory or a Hugging Face repo"):
        KelixProcessor.from_pretrained(tmp_path / "absent")
    write_bpe_files(tmp_path, specials=REQUIRED_SPECIALS[:-1])
    with pytest.raises(ValueError, match="got '<|image_pad|>'"):
        KelixTextTokenizer.from_pretrained(tmp_path)
    ids = write_bpe_files(tmp_path)
    write_json(tmp_path / "added_tokens.json", {"<|mm_pos_start|>": max(ids.values()) + 2})
    with pytest.raises(ValueError, match="must get its declared id .* without gaps"):
        KelixTextTokenizer.from_pretrained(tmp_path)
    write_json(tmp_path / "added_tokens.json", {"<|image_pad|>": 3})
    write_json(
        tmp_path / "tokenizer_config.json",
        {"added_tokens_decoder": {"4": {"content": "<|image_pad|>"}}},
    )
    with pytest.raises(ValueError, match="must have one id, got 3 in added_tokens.json and 4"):
        KelixTextTokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{", encoding="utf-8")
    with pytest.raises(ValueError, match="tokenizer_config.json must be valid JSON"):
        KelixTextTokenizer.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "settings, match",
    [
        ({"temporal_patch_size": 2}, "must have temporal_patch_size = 1, got 2"),
        ({"rescale_factor": 1.0}, "must have rescale_factor = 1/255, got 1.0"),
        ({"do_normalize": False}, "must have do_normalize = True, got False"),
        ({"min_pixels": 10, "max_pixels": 5}, "min_pixels must be <= max_pixels"),
    ],
)
def test_unsupported_image_settings_are_refused(tmp_path, settings, match):
    write_json(tmp_path / "preprocessor_config.json", settings)
    with pytest.raises(ValueError, match=match):
        ImageProcessorConfig.from_pretrained(tmp_path)
