"""Fuzz of the public API on the tiny models (CPU, float32): ``KelixAR.generate`` and its Kelix-Tok and
prompt entry points, ``Engine`` (add_request / step / abort), ``KelixPipeline.chat``, text to image
(``generate_image`` and ``__call__``) and ``tokenize_image``. The oracle is oracle.py's: a valid result
or a documented refusal naming something, never another exception, a NaN or a hang."""

from __future__ import annotations

import itertools

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from kelix_fast import Engine, KelixAR, KelixPipeline
from kelix_fast.presets import tiny_config
from tests.fuzz.oracle import (
    HOSTILE,
    HOSTILE_FLOATS,
    HOSTILE_INTS,
    NAN,
    arguments,
    call,
    check_tensor,
    refused,
    tensors,
)
from tests.fuzz.profiles import budget

LLM = tiny_config().llm
G = LLM.n_q_tokens  # sub-codebooks: a group is G ids and an end-of-block slot
SPECIAL_IDS = [
    LLM.image_token_id,
    LLM.vision_start_token_id,
    LLM.vision_end_token_id,
    LLM.vocab_size - 1,
]

# --------------------------------------------------------------------------- strategies

valid_ids = st.one_of(st.integers(0, 300), st.sampled_from(SPECIAL_IDS))
bad_ids = st.sampled_from([-1, LLM.vocab_size, LLM.total_vocab, 2**63 - 1, True, 1.0, "a", None])
prompt_lists = st.lists(valid_ids, min_size=1, max_size=6)
bad_prompt_lists = st.one_of(
    st.lists(valid_ids, max_size=0),
    st.tuples(st.lists(valid_ids, max_size=3), bad_ids, st.lists(valid_ids, max_size=2)).map(
        lambda p: [*p[0], p[1], *p[2]]
    ),
)


@st.composite
def prompt_tensors(draw: st.DrawFn, *, valid: bool) -> torch.Tensor:
    if valid:
        shape, dtype, (low, high) = draw(st.sampled_from([(1, 3), (2, 4)])), torch.int64, (0, 300)
    else:
        shape = draw(st.sampled_from([(1, 3), (1, 0), (0, 3), (3,), (1, 2, 2), ()]))
        dtype = draw(st.sampled_from([torch.int64, torch.int32, torch.float32, torch.bool]))
        low, high = draw(st.sampled_from([(0, 300), (-5, 0), (LLM.total_vocab, 2**40)]))
    return torch.randint(low, high, shape).to(dtype)


prompts = st.one_of(
    prompt_lists.map(lambda ids: [ids]),
    st.lists(prompt_lists, min_size=2, max_size=3),
    prompt_tensors(valid=True),
)
bad_prompts = st.one_of(
    bad_prompt_lists.map(lambda ids: [ids]),
    st.tuples(prompt_lists, bad_prompt_lists).map(list),
    st.lists(prompt_lists, max_size=0),
    prompt_tensors(valid=False),
    HOSTILE,
)
# One 28x28 image: a [1, 2, 2] grid of 14-pixel patches, merged 2x2 into one visual token; a prompt
# with one image placeholder goes with it.
IMAGE_GRID = torch.tensor([[1, 2, 2]])
IMAGE_PROMPT = [[1, 2, LLM.image_token_id, 3]]
valid_pixels = tensors((4, 3, 14, 14), fills=("randn", "zeros", "large"))
bad_pixels = st.one_of(
    tensors((4, 3, 14, 14), fills=("nan", "inf"), dtypes=(torch.float64,)),
    tensors((4, 3, 14, 14), torch.int64),
    tensors((3, 3, 14, 14)),
    tensors((4, 3, 7, 14)),
    HOSTILE,
)
bad_grids = st.one_of(
    st.sampled_from(
        [
            torch.tensor([[1, 2, 3]]),
            torch.tensor([[2, 2, 2]]),
            torch.tensor([[1, -2, -2]]),
            torch.tensor([[1, 2, 2]], dtype=torch.float32),
            torch.zeros(0, 3, dtype=torch.int64),
            torch.tensor([1, 2, 2]),
            torch.tensor([[1, 2, 2], [1, 2, 2]]),
            torch.tensor([[1, 2**40, 2]]),
        ]
    ),
    HOSTILE,
)
blocks = st.integers(1, 3)
bad_blocks = st.one_of(HOSTILE_INTS, st.sampled_from([LLM.max_seq_len, 10**9]))
top_ks = st.integers(0, 3)
bad_top_ks = st.one_of(HOSTILE_INTS, st.lists(st.integers(-1, 2), max_size=3))
top_ps = st.floats(0.05, 1.0)
bad_top_ps = st.one_of(HOSTILE_FLOATS, st.lists(st.floats(0.0, 1.5), max_size=3))
temperatures = st.floats(0.0, 2.0)
bad_temperatures = st.one_of(HOSTILE_FLOATS, st.lists(st.floats(-1, 2), max_size=3))
seeds = st.one_of(st.none(), st.integers(0, 2**31 - 1))
bad_seeds = st.one_of(HOSTILE_INTS, st.lists(st.integers(-1, 2**31), max_size=3))
samplers = st.sampled_from([None, "sequential", "reference"])
bad_samplers = st.sampled_from(["bogus", "", 1, b"reference"])
scorings = st.sampled_from([None, "full", "structured"])
bad_scorings = st.sampled_from(["FULL", "", 0, ["full"]])
bad_flags = st.sampled_from([None, 0, 1, "yes", NAN])
callbacks = st.sampled_from([None, lambda n: None])
bad_callbacks = st.sampled_from([1, "print", object()])
timings = st.sampled_from([None, {}, {"decode": 1.0}])
bad_timings = st.sampled_from([[], 1, "t", {"decode": "x"}, {1: 2.0}])


def check_generation(ar: KelixAR, out, return_hidden_states: object) -> None:
    """A GenerationOutput of consistent shapes with every id in the vocabulary."""
    groups = check_tensor(
        "groups",
        out.groups,
        shape=(None, None, G + 1),
        dtype=torch.int64,
        low=0,
        high=LLM.total_vocab,
    )
    batch, total = groups.shape[:2]
    lengths = check_tensor("lengths", out.lengths, shape=(batch,), dtype=torch.int64, low=1)
    prompt_lengths = check_tensor(
        "prompt_lengths", out.prompt_lengths, shape=(batch,), dtype=torch.int64, low=1
    )
    assert int(lengths.max()) <= total and bool((prompt_lengths < lengths).all())
    check_tensor(
        "block_decoder_ids",
        out.block_decoder_ids,
        shape=(batch, None, G + 1),
        dtype=torch.int64,
        low=-1,
        high=LLM.total_vocab,
    )
    if return_hidden_states:
        check_tensor("hidden_states", out.hidden_states, shape=(batch, total - 1, None))
    else:
        assert out.hidden_states is None


# --------------------------------------------------------------------------- KelixAR

SAMPLING = {"top_k": top_ks, "top_p": top_ps, "temperature": temperatures, "seed": seeds}
BAD_SAMPLING = {
    "top_k": bad_top_ks,
    "top_p": bad_top_ps,
    "temperature": bad_temperatures,
    "seed": bad_seeds,
}
GENERATE = {
    "prompt_ids": prompts,
    "max_new_blocks": blocks,
    **SAMPLING,
    "sampler": samplers,
    "scoring": scorings,
    "return_hidden_states": st.booleans(),
    "step_callback": callbacks,
    "timings": timings,
}
BAD_GENERATE = {
    "prompt_ids": bad_prompts,
    "max_new_blocks": bad_blocks,
    **BAD_SAMPLING,
    "sampler": bad_samplers,
    "scoring": bad_scorings,
    "return_hidden_states": bad_flags,
    "step_callback": bad_callbacks,
    "timings": bad_timings,
    "pixel_values": st.one_of(valid_pixels, bad_pixels),
    "image_grid_thw": st.one_of(st.just(IMAGE_GRID), bad_grids),
    "cuda_graphs": st.sampled_from([True, "no", 1]),
}


@settings(max_examples=budget(60))
@given(kwargs=arguments(GENERATE, BAD_GENERATE))
def test_generate(ar, kwargs):
    out = call(ar.generate, **kwargs)
    if not refused(out):
        check_generation(ar, out, kwargs["return_hidden_states"])


@settings(max_examples=budget(25))
@given(
    kwargs=arguments(
        {"pixel_values": valid_pixels, "max_new_blocks": blocks, **SAMPLING},
        {
            "pixel_values": bad_pixels,
            "image_grid_thw": bad_grids,
            "prompt_ids": st.sampled_from([[[1, 2, 3]], [[LLM.image_token_id] * 2]]),
            **BAD_SAMPLING,
        },
    )
)
def test_generate_with_an_image(ar, kwargs):
    kwargs = {"prompt_ids": IMAGE_PROMPT, "image_grid_thw": IMAGE_GRID, **kwargs}
    out = call(ar.generate, **kwargs)
    if not refused(out):
        check_generation(ar, out, False)


@settings(max_examples=budget(15))
@given(
    kwargs=arguments(
        {
            "input_ids": st.just(torch.tensor([[0, 5, 6, 7], [8, 9, 10, 11]])),
            "attention_mask": st.sampled_from(
                [
                    None,
                    torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]]),
                    torch.ones(2, 4, dtype=torch.bool),
                ]
            ),
            "max_new_tokens": blocks,
        },
        {
            "input_ids": bad_prompts,
            "attention_mask": st.one_of(
                st.sampled_from(
                    [
                        torch.zeros(2, 4),
                        torch.tensor([[1, 0, 1, 1], [1, 1, 1, 1]]),
                        torch.ones(2, 3),
                    ]
                ),
                tensors((2, 4), torch.int64),
                tensors((2, 4)),
                HOSTILE,
            ),
            "max_new_tokens": bad_blocks,
            "prompt_ids": st.just([[1, 2]]),
            "max_new_blocks": st.just(1),
        },
    )
)
def test_generate_transformers_names(ar, kwargs):
    out = call(ar.generate, **kwargs)
    if not refused(out):
        check_generation(ar, out, False)


@settings(max_examples=budget(20))
@given(
    images=arguments(
        {"pixel_values": valid_pixels, "image_grid_thw": st.just(IMAGE_GRID)},
        {"pixel_values": bad_pixels, "image_grid_thw": bad_grids},
    ),
    prompt=st.one_of(st.just(torch.tensor(IMAGE_PROMPT)), prompt_tensors(valid=True), bad_prompts),
)
def test_tokenize_and_expand(ar, images, prompt):
    ids = call(ar.tokenize_images, images["pixel_values"], images["image_grid_thw"])
    if not refused(ids):
        check_tensor(
            "ids",
            ids,
            shape=(None, G),
            dtype=torch.int64,
            low=LLM.vocab_size,
            high=LLM.total_vocab,
        )
    groups = call(ar.expand_prompt, prompt, None if refused(ids) else ids)
    if not refused(groups):
        check_tensor(
            "groups",
            groups,
            shape=(None, None, G + 1),
            dtype=torch.int64,
            low=0,
            high=LLM.total_vocab,
        )


# --------------------------------------------------------------------------- Engine

ADD = {
    "prompt_ids": st.one_of(prompt_lists, prompt_tensors(valid=True).map(lambda t: t[0])),
    "max_new_blocks": blocks,
    **SAMPLING,
    "scoring": scorings,
    "return_hidden_states": st.booleans(),
    "request_id": st.sampled_from([None, "a", "b"]),
}
BAD_ADD = {
    "prompt_ids": st.one_of(bad_prompt_lists, prompt_tensors(valid=False), HOSTILE),
    "max_new_blocks": bad_blocks,
    **BAD_SAMPLING,
    "scoring": bad_scorings,
    "return_hidden_states": bad_flags,
    "request_id": st.sampled_from(["", 1, b"a", ["a"]]),
    "pixel_values": st.one_of(valid_pixels, bad_pixels),
    "image_grid_thw": st.one_of(st.just(IMAGE_GRID), bad_grids),
}
actions = st.lists(
    st.one_of(
        st.tuples(st.just("add"), arguments(ADD, BAD_ADD)),
        st.tuples(st.just("step")),
        st.tuples(st.just("abort"), st.sampled_from(["a", "b", "req-0", "nope", 1, None])),
    ),
    min_size=1,
    max_size=6,
)


@settings(max_examples=budget(20))
@given(
    engine_args=arguments(
        {"max_batch": st.integers(1, 2), "max_context": st.sampled_from([None, 8, 64])},
        {
            "max_batch": st.sampled_from([0, -1, 1.5, True, "2", None]),
            "max_context": st.one_of(HOSTILE_INTS, st.just(LLM.max_seq_len + 1)),
            "cuda_graphs": st.sampled_from([True, "yes", 1]),
        },
    ),
    actions=actions,
)
def test_engine(ar, engine_args, actions):
    engine = call(Engine, ar, **engine_args)
    if refused(engine):
        return
    outputs = []
    for action in actions:
        if action[0] == "add":
            call(engine.add_request, **action[1])
        elif action[0] == "step":
            outputs += call(engine.step)
        else:  # abort documents a KeyError for an unknown id
            call(engine.abort, action[1], refusals=(KeyError, TypeError, ValueError))
    for _ in range(40):  # every request asks for at most 3 blocks; a few wait for a slot
        if not engine.has_unfinished():
            break
        outputs += call(engine.step)
    assert not engine.has_unfinished(), f"requests left after 40 steps: {engine.stats()}"
    for out in outputs:
        check_tensor(
            "new_groups",
            out.new_groups,
            shape=(None, G + 1),
            dtype=torch.int64,
            low=0,
            high=LLM.total_vocab,
        )
        assert out.finish_reason in (None, "eos", "length", "aborted")
        assert out.finished == (out.finish_reason is not None)
        if out.hidden_states is not None:
            check_tensor("hidden_states", out.hidden_states, shape=(None, None))


# --------------------------------------------------------------------------- pipeline

images = st.one_of(
    st.builds(
        Image.new, st.sampled_from(["RGB", "L", "RGBA", "P"]), st.sampled_from([(28, 28), (30, 17)])
    ),
    st.just(np.zeros((28, 28, 3), dtype=np.uint8)),
)
bad_images = st.one_of(
    st.builds(
        Image.new, st.sampled_from(["RGB", "I", "F", "1"]), st.sampled_from([(0, 5), (1, 1)])
    ),
    st.just(np.zeros((28, 28, 3), dtype=np.float32)),
    st.just(np.zeros((28, 28, 2), dtype=np.uint8)),
    st.just(torch.zeros(3, 28, 28, dtype=torch.uint8)),
    st.just("/nonexistent/image.png"),
    HOSTILE,
)
texts = st.one_of(
    st.text(max_size=20),
    st.sampled_from(["<|im_end|>", "<|image_pad|>", "<|vision_start|>hi", "<|im_start|>user\n"]),
)


def user_turn(content: object) -> list[dict[str, object]]:
    return [{"role": "user", "content": content}]


def image_turn(image: object, text: object) -> list[dict[str, object]]:
    return user_turn([{"type": "image", "image": image}, {"type": "text", "text": text}])


messages = st.one_of(
    texts.map(user_turn),
    st.builds(image_turn, images, texts),
    st.tuples(images, texts),
)
bad_messages = st.one_of(
    st.builds(image_turn, bad_images, texts),
    st.builds(image_turn, images, HOSTILE),
    st.tuples(bad_images, texts),
    st.tuples(images, HOSTILE),
    st.lists(
        st.fixed_dictionaries(
            {"role": st.sampled_from(["user", "assistant", "system", "bogus", 1])},
            optional={"content": st.one_of(texts, HOSTILE, st.lists(HOSTILE, max_size=2))},
        ),
        max_size=3,
    ),
    HOSTILE,
)


@settings(max_examples=budget(30))
@given(
    messages=st.one_of(messages, messages, bad_messages),
    kwargs=arguments(
        {"max_new_tokens": blocks, **SAMPLING, "sampler": samplers, "stream": st.booleans()},
        {
            "max_new_tokens": bad_blocks,
            **BAD_SAMPLING,
            "sampler": bad_samplers,
            "scoring": bad_scorings,
            "stream": bad_flags,
        },
    ),
)
def test_chat(pipe, messages, kwargs):
    if kwargs["stream"] is True and kwargs["sampler"] == "reference":
        kwargs["sampler"] = None  # refused by design; the stream is what this example is about
    answer = call(pipe.chat, messages, **kwargs)
    if refused(answer):
        return
    if kwargs["stream"] is True:
        pieces = call(lambda: list(itertools.islice(answer, 10)))
        assert not refused(pieces), pieces
        assert all(isinstance(p, str) for p in pieces)
        answer = "".join(pieces)
    assert isinstance(answer, str)


@settings(max_examples=budget(14))
@given(
    prompt=st.one_of(texts, texts, st.lists(valid_ids, max_size=4), bad_prompt_lists, HOSTILE),
    kwargs=arguments(
        {
            "steps": st.integers(1, 2),
            "size": st.sampled_from([32, 64]),
            "guidance_scale": st.sampled_from([1.0, 2.0]),
            "seed": seeds,
            "max_condition_length": st.integers(1, 3),
            "scoring": scorings,
        },
        {
            "steps": HOSTILE_INTS,
            "size": st.sampled_from([0, -32, 33, 16, 1.5, True, 2**40, "64"]),
            "guidance_scale": HOSTILE_FLOATS,
            "seed": bad_seeds,
            "generator": st.sampled_from([1, "g", torch.Generator()]),
            "max_condition_length": st.one_of(HOSTILE_INTS, st.just(10**6)),
            "noise": st.one_of(tensors((1, 8, 1, 1)), tensors((1, 8, 2, 2)), HOSTILE),
            "scoring": bad_scorings,
            "output_path": st.sampled_from(["/nonexistent-dir/x.png", 3, "/", ""]),
            "progress": bad_flags,
        },
    ),
)
def test_generate_image(pipe, prompt, kwargs):
    image = call(pipe.generate_image, prompt, **kwargs)
    if not refused(image):
        assert isinstance(image, Image.Image) and image.mode == "RGB"
        assert image.size == (kwargs["size"], kwargs["size"])


@settings(max_examples=budget(8))
@given(
    prompt=st.one_of(texts, st.lists(texts, min_size=2, max_size=2)),
    kwargs=arguments(
        {"height": st.sampled_from([None, 32]), "seed": seeds},
        {
            "prompt": st.one_of(
                st.lists(texts, max_size=0), st.lists(HOSTILE, max_size=2), HOSTILE
            ),
            "height": st.sampled_from([0, 33, -32, 1.5]),
            "width": st.sampled_from([64, 0, "32"]),
            "seed": st.one_of(bad_seeds, st.lists(st.integers(-1, 3), min_size=1, max_size=3)),
            "latents": st.one_of(tensors((1, 8, 1, 1)), HOSTILE),
            "callback_on_step_end": st.sampled_from(
                [lambda *a: None, lambda *a: {"latents": 1}, lambda *a: {"latents": None}, "cb"]
            ),
        },
    ),
)
def test_text_to_image_call(pipe, prompt, kwargs):
    prompt = kwargs.pop("prompt", prompt)
    out = call(pipe, prompt, num_inference_steps=1, max_condition_length=1, **kwargs)
    if not refused(out):
        n = 1 if isinstance(prompt, str) else len(prompt)
        assert len(out.images) == n and all(isinstance(i, Image.Image) for i in out.images)


@settings(max_examples=budget(10))
@given(image=st.one_of(images, bad_images))
def test_tokenize_image(pipe, image):
    ids = call(pipe.tokenize_image, image)
    if not refused(ids):
        check_tensor(
            "ids",
            ids,
            shape=(None, G),
            dtype=torch.int64,
            low=LLM.vocab_size,
            high=LLM.total_vocab,
        )


def test_models_are_the_tiny_ones(ar: KelixAR, pipe: KelixPipeline):
    """The strategies above hard-code the tiny preset's sizes (G = 8, 14-pixel patches)."""
    assert ar.config.llm.vocab_size == LLM.vocab_size and G == 8
    assert pipe.processor.image_config.patch_size == 14
