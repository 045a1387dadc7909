"""Fuzz of the processor (kelix_fast/processor.py): images of odd modes, sizes and dtypes (PIL images,
numpy arrays, torch tensors), chat messages with hostile structure, and text with control tokens.
A result must be consistent model inputs: prompt ids in the vocabulary, finite float32 pixels, and a
grid whose patches add up to the pixel rows."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from kelix_fast import KelixProcessor
from kelix_fast.presets import tiny_config
from tests.fuzz.oracle import HOSTILE, HOSTILE_INTS, arguments, call, check_tensor, refused
from tests.fuzz.profiles import budget

VOCAB = tiny_config().llm.vocab_size
PROCESSOR = KelixProcessor.tiny()  # stateless: shared by every example
CONTROL = [
    "<|im_start|>",
    "<|im_end|>",
    "<|image_pad|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|endoftext|>",
    "<think>",
]
texts = st.lists(st.one_of(st.text(max_size=8), st.sampled_from(CONTROL)), max_size=4).map("".join)
sizes = st.tuples(st.integers(0, 48), st.integers(0, 48)) | st.sampled_from([(1, 300), (300, 2)])
MODES = ["RGB", "RGBA", "L", "LA", "P", "1", "I", "I;16", "F", "CMYK", "YCbCr", "HSV"]


@st.composite
def pil_images(draw: st.DrawFn) -> Image.Image:
    mode, (w, h) = draw(st.sampled_from(MODES)), draw(sizes)
    image = Image.new(mode, (w, h))
    if mode in ("I", "F") and w and h:  # values beyond 16 bits, or non-finite floats
        values = [0, 65535, 70000, -1] if mode == "I" else [0.5, 2.0, -1.0, float("nan")]
        image.putpixel((0, 0), draw(st.sampled_from(values)))
    return image


ARRAY_DTYPES = [np.uint8, np.uint16, np.float32, np.float64, np.int32, np.bool_, np.int8]


@st.composite
def arrays(draw: st.DrawFn) -> np.ndarray | torch.Tensor:
    h, w = draw(sizes)
    shape = draw(st.sampled_from([(h, w), (h, w, 1), (h, w, 3), (h, w, 4), (h, w, 2), (3, h, w)]))
    dtype = draw(st.sampled_from(ARRAY_DTYPES))
    array = (np.random.default_rng(draw(st.integers(0, 99))).random(shape) * 300).astype(dtype)
    return torch.from_numpy(array) if draw(st.booleans()) else array


images = st.one_of(pil_images(), arrays(), st.just("/nonexistent/x.png"), HOSTILE)


def image_part(image: object, min_pixels: object, max_pixels: object) -> dict[str, object]:
    part = {"type": "image", "image": image}
    return (
        part
        | ({} if min_pixels is None else {"min_pixels": min_pixels})
        | ({} if max_pixels is None else {"max_pixels": max_pixels})
    )


pixel_bounds = st.one_of(st.none(), st.none(), st.sampled_from([1, 784, 10**6]), HOSTILE_INTS)
parts = st.one_of(
    st.builds(lambda t: {"type": "text", "text": t}, texts),
    st.builds(image_part, images, pixel_bounds, pixel_bounds),
    st.fixed_dictionaries({"type": st.sampled_from(["video", "audio", 1, None])}),
    HOSTILE,
)
messages = st.lists(
    st.fixed_dictionaries(
        {
            "role": st.sampled_from(["user", "user", "assistant", "system", "tool", 1]),
            "content": st.one_of(texts, st.lists(parts, max_size=3), HOSTILE),
        }
    ),
    max_size=3,
)


def check_inputs(out: dict, batch: int | None = None) -> None:
    ids = check_tensor(
        "prompt ids",
        out["input_ids" if "input_ids" in out else "prompt_ids"],
        dtype=torch.int64,
        low=0,
        high=VOCAB,
    )
    assert ids.dim() == 2 and (batch is None or ids.shape[0] == batch)
    if "pixel_values" not in out:  # a processor call without images returns no image entries
        assert "image_grid_thw" not in out
        return
    pixels, grid = out["pixel_values"], out["image_grid_thw"]
    check_tensor("pixel_values", pixels, shape=(None, 3, 14, 14), dtype=torch.float32)
    check_tensor("image_grid_thw", grid, shape=(None, 3), dtype=torch.int64, low=1)
    assert int(grid.prod(-1).sum()) == pixels.shape[0], "patches != sum of t*h*w"


@settings(max_examples=budget(80))
@given(messages=st.one_of(messages, HOSTILE), allow_special=st.sampled_from([None, True, False, 1]))
def test_prepare_messages(messages, allow_special):
    out = call(PROCESSOR.prepare, messages, allow_special_tokens=allow_special)
    if not refused(out):
        check_inputs(out, 1)


@settings(max_examples=budget(80))
@given(image=images)
def test_preprocess_one_image(image):
    out = call(PROCESSOR.prepare, text="<|image_pad|>hi", images=[image])
    if not refused(out):
        check_inputs(out, 1)
        assert out["image_grid_thw"].shape[0] == 1


@settings(max_examples=budget(60))
@given(
    kwargs=arguments(
        {
            "text": st.one_of(texts, st.lists(texts, min_size=1, max_size=3)),
            "padding_side": st.sampled_from(["left", "right"]),
        },
        {
            "text": st.one_of(st.lists(texts, max_size=0), st.lists(HOSTILE, max_size=2), HOSTILE),
            "images": st.one_of(images, st.lists(images, max_size=2)),
            "padding": st.sampled_from([False, "max_length", "longest", 2]),
            "padding_side": st.sampled_from(["middle", None, 1]),
            "truncation": st.sampled_from([True, "yes"]),
            "return_tensors": st.sampled_from(["np", "tf", None, 1]),
            "videos": st.sampled_from([[1], "v"]),
            "allow_special_tokens": st.sampled_from([False, 1, "no"]),
        },
    )
)
def test_processor_call(kwargs):
    out = call(PROCESSOR, **kwargs)
    if not refused(out):
        text = kwargs["text"]
        check_inputs(out, 1 if isinstance(text, str) else len(text))
        mask = check_tensor("attention_mask", out["attention_mask"], low=0, high=2)
        assert mask.shape == out["input_ids"].shape


@settings(max_examples=budget(40))
@given(
    ids=st.one_of(
        st.lists(st.integers(0, VOCAB - 1), max_size=6),
        st.lists(st.one_of(st.integers(-5, 2 * VOCAB), HOSTILE), max_size=3),
        st.just(torch.tensor([[1, 2], [3, 4]])),
        HOSTILE,
    ),
    skip=st.sampled_from([True, False, None, "yes"]),
)
def test_decode(ids, skip):
    text = call(PROCESSOR.decode, ids, skip_special_tokens=skip)
    if not refused(text):
        assert isinstance(text, str)
