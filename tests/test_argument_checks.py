"""Arguments: every public entry point refuses a bad argument of each kind through one shared check
(kelix_fast/arguments.py), with TypeError/ValueError naming the argument, before any compute.

1. Seeds: negative, too large, floats, strings and bools refused; numpy integers accepted.
2. Pixel bounds and image sizes: integers >= 1 with min <= max.
3. Prompt ids that are not ints; flags that are not bools; callbacks that are not callable.
4. The ops' scalar arguments (eps, scale, ids, offsets) and empty codebooks or tables.
5. Concurrent pipeline calls each keep their own timings.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from kelix_fast import Engine, KelixAR, KelixPipeline, ops, presets
from kelix_fast.processor import (
    ImageProcessorConfig,
    KelixProcessor,
    image_to_patches,
    preprocess_image,
    smart_resize,
)
from kelix_fast.runtime.flow import check_sampling
from kelix_fast.runtime.requests import request_seeds

CPU = "cpu"
F32 = torch.float32
USER = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def pipe():
    return KelixPipeline.tiny(0, device=CPU, dtype=F32)


def _image():
    return np.zeros((56, 56, 3), np.uint8)


def _engine(pipe):
    return Engine(pipe.ar, max_batch=1, max_context=16)


# --------------------------------------------------------------------------- 1. seeds

# Each entry point that takes a seed: (name, call(pipe, seed), the range its message states).
SEEDED = {
    "KelixAR.generate": (lambda p, s: p.ar.generate([[1, 2]], max_new_blocks=1, seed=s), 31),
    "Engine.add_request": (
        lambda p, s: _engine(p).add_request([1, 2], max_new_blocks=1, seed=s),
        31,
    ),
    "KelixPipeline.chat": (lambda p, s: p.chat(USER, max_new_tokens=1, seed=s), 31),
    "KelixPipeline.__call__": (lambda p, s: p("a fox", height=64, seed=s), 63),
    "KelixPipeline.generate_image": (lambda p, s: p.generate_image("a fox", size=64, seed=s), 63),
    "KelixPipeline.reconstruct": (lambda p, s: p.reconstruct(_image(), size=64, seed=s), 63),
    "KelixAR.tiny": (lambda p, s: KelixAR.tiny(s, device=CPU, dtype=F32), 63),
    "KelixPipeline.tiny": (lambda p, s: KelixPipeline.tiny(s, device=CPU, dtype=F32), 63),
    "presets.tiny_dit": (lambda p, s: presets.tiny_dit(s, device=CPU, dtype=F32), 63),
    "presets.tiny_vae": (lambda p, s: presets.tiny_vae(s, device=CPU, dtype=F32), 63),
}


@pytest.mark.parametrize(
    "seed, error",
    [
        (-1, ValueError),
        (2**64 - 1, ValueError),
        (1.0, TypeError),
        ("1", TypeError),
        (True, TypeError),
    ],
)
@pytest.mark.parametrize("entry", SEEDED)
def test_bad_seeds_are_refused_naming_the_seed_and_its_range(
    pipe, forbid_models, entry, seed, error
):
    call, bits = SEEDED[entry]
    forbid_models(pipe)
    with pytest.raises(error, match=rf"seed must be an int in \[0, 2\^{bits}\), got .*{seed!r}"):
        call(pipe, seed)


def test_a_batch_seed_stands_for_one_seed_per_image(pipe):
    """Pipeline seed s gives image b the seed s + b: the last must still fit a generator."""
    kwargs = {"batch": 2, "steps": 1, "guidance_scale": 1.0, "image_size": 64, "op": "t2i"}
    check_sampling(pipe.dit, seed=2**63 - 2, **kwargs)
    with pytest.raises(ValueError, match=r"t2i: seed must be an int in \[0, 2\^63 - 2\]"):
        check_sampling(pipe.dit, seed=2**63 - 1, **kwargs)
    with pytest.raises(TypeError, match=r"t2i: seed\[1\] must be an int in \[0, 2\^63\), got str"):
        check_sampling(pipe.dit, seed=[1, "2"], **kwargs)


def test_numpy_integer_seeds_are_the_same_seeds(pipe):
    assert request_seeds(np.int64(7), 2) == [7, 7] and type(request_seeds(np.int32(7), 1)[0]) is int
    with pytest.raises(TypeError, match=r"seed\[1\] must be an int in \[0, 2\^31\), got bool"):
        request_seeds([1, np.bool_(True)], 2)
    config = presets.tiny_config()
    key = "model.model.norm.scale"
    assert torch.equal(
        presets.random_weights(config, np.int64(3))[key], presets.random_weights(config, 3)[key]
    )
    sampled = {"max_new_blocks": 2, "top_k": 0, "temperature": 1.0}
    a = pipe.ar.generate([[1, 2]], seed=np.int64(5), **sampled).groups
    assert torch.equal(a, pipe.ar.generate([[1, 2]], seed=5, **sampled).groups)


# --------------------------------------------------------------------------- 2. pixel bounds and sizes

AT_LEAST_1 = r"an int (>= 1|in \[1, \d+\])"  # the message's bounds are capped (see below)
PIXEL_ENTRIES = {
    "smart_resize": lambda lo, hi: smart_resize(56, 56, min_pixels=lo, max_pixels=hi),
    "ImageProcessorConfig": lambda lo, hi: ImageProcessorConfig(min_pixels=lo, max_pixels=hi),
    "ImageProcessorConfig.fetch": lambda lo, hi: ImageProcessorConfig(
        fetch_min_pixels=lo, fetch_max_pixels=hi
    ),
    "preprocess_image": lambda lo, hi: preprocess_image(
        _image(), fetch_min_pixels=lo, fetch_max_pixels=hi
    ),
    "KelixProcessor.prepare": lambda lo, hi: KelixProcessor.tiny().prepare(
        [
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": _image(), "min_pixels": lo, "max_pixels": hi}
                ],
            }
        ]
    ),
}


@pytest.mark.parametrize(
    "low, high, error, match",
    [
        (1, 0, ValueError, rf"max_pixels must be {AT_LEAST_1}, got 0"),  # was ZeroDivisionError
        (0, 100, ValueError, rf"min_pixels must be {AT_LEAST_1}, got 0"),
        (200, 100, ValueError, r"min_pixels must be <= (fetch_)?max_pixels, got 200 > 100"),
        (1, 100.5, TypeError, rf"max_pixels must be {AT_LEAST_1}, got float 100.5"),
        (True, 100, TypeError, rf"min_pixels must be {AT_LEAST_1}, got bool"),
    ],
)
@pytest.mark.parametrize("entry", PIXEL_ENTRIES)
def test_bad_pixel_bounds_are_refused_naming_the_bound(entry, low, high, error, match):
    with pytest.raises(error, match=match):
        PIXEL_ENTRIES[entry](low, high)


def test_a_message_cannot_ask_for_more_pixels_than_the_processor_allows():
    """A message's image bounds come from the caller (a client, through the server): 2^31 pixels would
    be a 6 GB resize (the long fuzz profile found a 25 s call); the processor's fetch_max_pixels caps
    them."""
    ceiling = KelixProcessor.tiny().image_config.fetch_max_pixels
    with pytest.raises(
        ValueError, match=rf"max_pixels must be an int in \[1, {ceiling}\], got 2147483648"
    ):
        PIXEL_ENTRIES["KelixProcessor.prepare"](1, 2**31)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda p: p.reconstruct(_image(), size=64, max_pixels=0), ValueError, "max_pixels must"),
        (lambda p: p.reconstruct(_image(), size=64, max_pixels=1e5), TypeError, "max_pixels must"),
        (lambda p: p("a fox", height=0), ValueError, "height must be a positive multiple of 32"),
        (lambda p: p("a fox", width=64.0), ValueError, "width must be a positive multiple of 32"),
        (
            lambda p: p.generate_image("a", size=True),
            ValueError,
            "size must be a positive multiple",
        ),
        (lambda p: p("a", height=64, max_condition_length=2.0), TypeError, "max_condition_length"),
        (
            lambda p: image_to_patches(torch.zeros(28, 28, 3, dtype=torch.uint8), patch_size=0),
            ValueError,
            "patch_size must be an int >= 1, got 0",
        ),
        (
            lambda p: smart_resize(56.0, 56, min_pixels=1, max_pixels=10**6),
            TypeError,
            "height and width must be ints",
        ),
    ],
)
def test_bad_sizes_are_refused_naming_the_argument(pipe, forbid_models, call, error, match):
    forbid_models(pipe)
    with pytest.raises(error, match=match):
        call(pipe)


# --------------------------------------------------------------------------- 3. prompt ids, flags, callbacks

PROMPTED = {
    "KelixAR.generate": lambda p, ids: p.ar.generate([ids], max_new_blocks=1),
    "KelixAR.generate(input_ids=)": lambda p, ids: p.ar.generate(input_ids=[ids], max_new_tokens=1),
    "Engine.add_request": lambda p, ids: _engine(p).add_request(ids, max_new_blocks=1),
    "KelixPipeline.generate_image": lambda p, ids: p.generate_image(ids, size=64),
}


@pytest.mark.parametrize("bad", [2.5, "a", None, True, [2], np.float32(1)])
@pytest.mark.parametrize("entry", PROMPTED)
def test_prompt_ids_that_are_not_ints_are_refused(pipe, forbid_models, entry, bad):
    forbid_models(pipe)
    name = "input_ids" if "input_ids" in entry else "prompt"
    with pytest.raises(TypeError, match=rf"{name}\w*(\[0\])? must .*(int|token ids)"):
        PROMPTED[entry](pipe, [1, bad, 3])


def test_prompt_id_messages_say_where(pipe):
    message = r"prompt_ids\[1\] must hold int token ids, got float 2.5 at position 1"
    with pytest.raises(TypeError, match=message):
        pipe.ar.generate([[1], [1, 2.5]], max_new_blocks=1)
    # An id past int64 is out of the vocabulary, not an overflow inside torch.
    message = rf"prompt_ids\[0\] must hold text ids in \[0, 151936\), got {2**70} at position 1"
    with pytest.raises(ValueError, match=message):
        pipe.ar.generate([[1, 2**70]], max_new_blocks=1)
    with pytest.raises(TypeError, match=r"prompt_ids\[0\] must be a sequence of int token ids"):
        pipe.ar.generate([1, 2], max_new_blocks=1)


# Each flag or callback: (entry, call(pipe, value), the name its message gives).
FLAGGED = {
    "generate: return_hidden_states": lambda p, v: p.ar.generate(
        [[1]], max_new_blocks=1, return_hidden_states=v
    ),
    "add_request: return_hidden_states": lambda p, v: _engine(p).add_request(
        [1], max_new_blocks=1, return_hidden_states=v
    ),
    "chat: stream": lambda p, v: p.chat(USER, stream=v),
    "chat: progress": lambda p, v: p.chat(USER, progress=v),
    "KelixPipeline: progress": lambda p, v: p("a fox", height=64, progress=v),
    "generate_image: progress": lambda p, v: p.generate_image("a fox", size=64, progress=v),
    "reconstruct: progress": lambda p, v: p.reconstruct(_image(), size=64, progress=v),
    "apply_chat_template: tokenize": lambda p, v: p.processor.apply_chat_template(USER, tokenize=v),
    "apply_chat_template: return_dict": lambda p, v: p.processor.apply_chat_template(
        USER, tokenize=True, return_dict=v
    ),
    "prepare: add_generation_prompt": lambda p, v: p.processor.prepare(
        USER, add_generation_prompt=v
    ),
    "prepare: allow_special_tokens": lambda p, v: p.processor(USER, allow_special_tokens=v),
    "KelixProcessor: allow_special_tokens": lambda p, v: KelixProcessor(
        p.processor.tokenizer, allow_special_tokens=v
    ),
    # The lower-level text tokenizer (KelixTextTokenizer) takes the same flags.
    "encode: allow_special_tokens": lambda p, v: p.processor.tokenizer.encode(
        "a", allow_special_tokens=v
    ),
    "decode: skip_special_tokens": lambda p, v: p.processor.tokenizer.decode(
        [1], skip_special_tokens=v
    ),
    "apply_chat_template: add_generation_prompt": lambda p, v: (
        p.processor.tokenizer.apply_chat_template(USER, add_generation_prompt=v)
    ),
}


@pytest.mark.parametrize("value", [1, "yes", None])
@pytest.mark.parametrize("entry", FLAGGED)
def test_flags_must_be_bools(pipe, forbid_models, entry, value):
    forbid_models(pipe)
    if value is None and "allow_special_tokens" in entry and "prepare" in entry:
        pytest.skip("None is prepare's allow_special_tokens default: the processor's setting")
    name = entry.split(": ")[1]
    with pytest.raises(TypeError, match=rf"{name} must be a bool \(True or False\), got"):
        FLAGGED[entry](pipe, value)


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda p, f: p.ar.generate([[1]], max_new_blocks=1, step_callback=f), "step_callback"),
        (lambda p, f: p("a fox", height=64, callback_on_step_end=f), "callback_on_step_end"),
    ],
)
def test_callbacks_must_be_callable(pipe, forbid_models, call, name):
    forbid_models(pipe)
    with pytest.raises(TypeError, match=rf"{name} must be callable or None, got int 3"):
        call(pipe, 3)


# --------------------------------------------------------------------------- 4. ops scalars


def _codebook(**kwargs):
    groups, codes, dim = kwargs.pop("shape", (2, 4, 3))
    args = {
        "z": torch.zeros(5, groups * dim),
        "ln_weight": torch.ones(groups, dim),
        "ln_bias": torch.zeros(groups, dim),
        "codebooks": torch.zeros(groups, codes, dim),
        "vocab_offset": 10,
        "mode": "exact",
        **kwargs,
    }
    return ops.codebook_argmin(**args)


def _embed(**kwargs):
    return ops.block_embed(
        torch.zeros(1, 2, 3, dtype=torch.int64),
        **{"table": torch.zeros(8, 4), "q_eos": 7, "text_vocab": 5, **kwargs},
    )


def _head(**kwargs):
    y, weight, head = torch.zeros(2, 4), torch.ones(4), torch.zeros(6, 4)
    return ops.head_select(y, weight, head, **{"eps": 1e-6, **kwargs})


def _qkv(tokens=3):
    return (torch.zeros(1, tokens, 2, 4) for _ in range(3))


def _cross(**kwargs):
    q, k, v = _qkv()
    return ops.cross_attention(q, k, v, torch.ones(1, 3, dtype=torch.bool), **kwargs)


def _cached(**kwargs):
    q, k, v = _qkv()
    lengths = {
        "q_start": torch.zeros(1, dtype=torch.int64),
        "kv_lens": torch.ones(1, dtype=torch.int64),
    }
    return ops.cached_attention(q, k, v, **lengths, **kwargs)


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize(
    "call, kwargs, error, match",
    [
        (_codebook, {"vocab_offset": -1}, ValueError, "codebook_argmin: vocab_offset must be an int in \\[0, \\d+\\], got -1"),
        (_codebook, {"vocab_offset": 10.0}, TypeError, "codebook_argmin: vocab_offset must be an int in \\[0, \\d+\\], got float"),
        (_codebook, {"vocab_offset": True}, TypeError, "vocab_offset must be an int in \\[0, \\d+\\], got bool"),
        (_codebook, {"eps": NAN}, ValueError, "codebook_argmin: eps must be a finite number > 0, got nan"),
        (_codebook, {"eps": "1e-5"}, TypeError, "codebook_argmin: eps must be a finite number > 0, got str"),
        (_codebook, {"shape": (2, 0, 3)}, ValueError, r"codebook_argmin: codebooks must have no empty dim \(G, K, d\), got shape \[2, 0, 3\]"),
        (_codebook, {"shape": (0, 4, 3)}, ValueError, "codebooks must have no empty dim"),
        (_embed, {"q_eos": -1}, ValueError, "block_embed: q_eos must be an int in \\[0, 2\\^63 - 1\\], got -1"),
        (_embed, {"q_eos": 2**64}, ValueError, "q_eos must be an int in \\[0, 2\\^63 - 1\\], got 18446744073709551616"),
        (_codebook, {"vocab_offset": 2**63 - 1}, ValueError, "vocab_offset must be an int in \\[0, \\d+\\], got 9223372036854775807"),
        (_embed, {"text_vocab": 5.0}, TypeError, "block_embed: text_vocab must be an int in \\[0, 2\\^63 - 1\\], got float"),
        (_embed, {"table": torch.zeros(0, 4)}, ValueError, r"block_embed: table must have no empty dim \(V, D\)"),
        (_head, {"eps": INF}, ValueError, "head_select: eps must be a finite number > 0, got inf"),
        (_head, {"temperature": NAN}, ValueError, "head_select: temperature must be a finite number"),
        (_head, {"top_k": np.bool_(True)}, TypeError, "head_select: top_k must be an int in \\[0, 2\\^63 - 1\\]"),
        (lambda **kw: ops.rms_norm(torch.zeros(2, 4), torch.ones(4), **kw), {"eps": INF}, ValueError,
         "rms_norm: eps must be a finite number > 0, got inf"),
        (lambda **kw: ops.linear_attention(*_qkv(), **kw), {"eps": NAN}, ValueError,
         "linear_attention: eps must be a finite number > 0, got nan"),
        (_cross, {"scale": NAN}, ValueError, "cross_attention: scale must be a finite number, got nan"),
        (_cross, {"scale": "0.5"}, TypeError, "cross_attention: scale must be a finite number, got str"),
        (_cached, {"scale": INF}, ValueError, "cached_attention: scale must be a finite number, got inf"),
        (_cached, {"causal": 1}, TypeError, r"cached_attention: causal must be a bool \(True or False\)"),
    ],
)  # fmt: skip
def test_op_scalars_are_checked_before_any_kernel(monkeypatch, backend, call, kwargs, error, match):
    # Any backend chosen would be a kernel launch: the checks must come first.
    def picked(*args, **kw):
        raise AssertionError("a backend was picked before the arguments were checked")

    monkeypatch.setattr(ops._dispatch, "pick", picked)
    with pytest.raises(error, match=match):
        call(**kwargs, backend=backend)


# --------------------------------------------------------------------------- 5. timings per call


def test_concurrent_calls_keep_their_own_timings(pipe):
    """A call's laps go to its own record even when another call starts and ends in the middle."""
    other_done = threading.Event()
    mine: dict[str, object] = {}

    def other_call() -> None:
        timings: dict[str, float] = {}
        pipe.tokenize_image(_image(), timings=timings)
        mine["other"] = timings
        other_done.set()

    def wait_for_other(pipe_, step, timestep, kwargs):
        if step == 0:
            thread = threading.Thread(target=other_call)
            thread.start()
            assert other_done.wait(60)
            thread.join()

    out = pipe("a fox", height=64, num_inference_steps=2, max_condition_length=4, seed=0,
               callback_on_step_end=wait_for_other)  # fmt: skip
    assert list(out.timings) == ["preprocess", "prefill", "decode", "dit", "vae"]
    assert list(mine["other"]) == ["preprocess", "vit_vq"]
    assert pipe.timings is mine["other"]  # the attribute: the record of the latest call started
    with pytest.raises(TypeError, match="timings must be a dict or None, got list"):
        pipe.tokenize_image(_image(), timings=[])
