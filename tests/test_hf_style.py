"""The transformers/diffusers surface: the processor call, ``generate(**processor_outputs)``, the
diffusers-style pipeline call (batches, generators, step callbacks), ``to``/CPU offload, streaming chat,
and argument checks that run before any model and name the caller's argument."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import kelix_fast
from kelix_fast import (
    Engine,
    KelixAR,
    KelixDiT,
    KelixPipeline,
    KelixProcessor,
    decode_latents,
    load_vae,
    presets,
    sample_latents,
)
from kelix_fast.processor import ProcessorOutput
from kelix_fast.runtime.flow import flow_schedule, initial_noise

IMAGE_PAD = "<|image_pad|>"


@pytest.fixture(scope="module")
def pipe():
    return KelixPipeline.tiny(seed=1, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def processor():
    return KelixProcessor.tiny()


def _image(height=56, width=84, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _question(image, text="What is this?"):
    return [
        {
            "role": "user",
            "content": [{"type": "image", "image": image}, {"type": "text", "text": text}],
        }
    ]


def _pixels(image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


def test_the_public_names_are_at_the_top_level():
    assert {
        "KelixPipeline",
        "KelixProcessor",
        "KelixAR",
        "KelixDiT",
        "Engine",
        "sample_latents",
        "decode_latents",
        "load_vae",
    } <= set(kelix_fast.__all__)
    for obj in (Engine, KelixAR, KelixDiT, decode_latents, load_vae, sample_latents):
        assert getattr(kelix_fast, obj.__name__) is obj


# --------------------------------------------------------------------------- processor


def test_processor_call_pads_a_batch_like_transformers(processor):
    messages = _question(_image())
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == processor.tokenizer.apply_chat_template(messages)
    short = processor.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    out = processor(text=[text, short], images=[_image()], return_tensors="pt")
    assert isinstance(out, ProcessorOutput)
    assert set(out) == {"input_ids", "attention_mask", "pixel_values", "image_grid_thw"}
    alone = processor.prepare(messages)
    lengths = [alone["prompt_ids"].shape[1], processor.prepare(text=short)["prompt_ids"].shape[1]]
    assert out["input_ids"].shape == (2, max(lengths))
    assert out["attention_mask"].sum(1).tolist() == lengths
    # Left padding with <|endoftext|>; the prompt itself unchanged.
    pad = lengths[0] - lengths[1]
    assert out["attention_mask"][1, :pad].eq(0).all() and out["attention_mask"][1, pad:].eq(1).all()
    assert out["input_ids"][1, :pad].eq(processor.tokenizer.endoftext_id).all()
    assert torch.equal(out["input_ids"][0], alone["prompt_ids"][0])
    assert torch.equal(out["pixel_values"], alone["pixel_values"])
    assert torch.equal(out["image_grid_thw"], alone["image_grid_thw"])
    right = processor(text=[text, short], images=[_image()], padding_side="right")
    assert right["attention_mask"][1, : lengths[1]].eq(1).all()
    moved = out.to("cpu")
    assert isinstance(moved, ProcessorOutput) and torch.equal(moved["input_ids"], out["input_ids"])
    # A conversation (or a list of them) directly, and the tokenize=True form of the template.
    assert torch.equal(processor(messages)["input_ids"], alone["prompt_ids"])
    assert torch.equal(processor.apply_chat_template(messages, tokenize=True), alone["prompt_ids"])
    as_dict = processor.apply_chat_template(messages, tokenize=True, return_dict=True)
    assert set(as_dict) == set(out)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (
            {"text": [IMAGE_PAD], "images": []},
            f"text holds 1 {IMAGE_PAD} placeholders .* images has 0",
        ),
        ({"text": "x", "return_tensors": "np"}, "return_tensors must be \"pt\", got 'np'"),
        ({"text": "x", "videos": ["v.mp4"]}, "videos must be None or empty"),
        ({"text": "x", "truncation": True}, "truncation must be False"),
        ({"text": ["x", "xy"], "padding": False}, r"padding=False needs prompts of one length"),
        ({"text": "x", "padding_side": "middle"}, 'padding_side must be "left" or "right"'),
        ({}, "exactly one of messages and text must be given, got neither"),
    ],
)
def test_processor_call_rejects(processor, kwargs, match):
    with pytest.raises(ValueError, match=match):
        processor(**kwargs)


def test_decode_drops_ids_without_text(processor):
    text_ids = processor.tokenizer.encode("hi")
    visual = 151936 + 5  # a Kelix-Tok id: no text
    assert processor.decode([*text_ids, visual]) == "hi"
    assert processor.decode(torch.tensor(text_ids)) == "hi"
    groups = torch.tensor([[[text_ids[0], 0], [visual, 0], [text_ids[1], 0]]])  # [B, T, G+1]
    assert processor.batch_decode(groups) == ["hi"]
    assert processor.batch_decode([text_ids, text_ids[:1]]) == ["hi", "h"]
    with pytest.raises(ValueError, match=r"sequences must be \[B, T\] or \[B, T, G\+1\]"):
        processor.batch_decode(torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"ids must be \[T\] or \[T, G\+1\]"):
        processor.decode(torch.zeros(1, 2, 3, dtype=torch.int64))
    # Token ids are the tokenizer's u32 (the fuzz test found -1 overflowing inside it).
    with pytest.raises(
        ValueError, match=r"decode: ids\[1\] must be an int in \[0, 2\^32 - 1\], got -1"
    ):
        processor.decode([text_ids[0], -1])
    with pytest.raises(TypeError, match=r"decode: ids\[0\] must be an int .*got float 1.5"):
        processor.decode([1.5])
    with pytest.raises(TypeError, match="decode: skip_special_tokens must be a bool"):
        processor.decode(text_ids, skip_special_tokens=None)


# --------------------------------------------------------------------------- generate(**outputs)


def test_generate_takes_processor_outputs(pipe, processor):
    ar = pipe.ar
    messages = [_question(_image()), [{"role": "user", "content": "hello there"}]]
    texts = [processor.apply_chat_template(m, tokenize=False) for m in messages]
    expected = [
        ar.generate(
            processor.prepare(m)["prompt_ids"],
            max_new_blocks=5,
            **{k: v for k, v in processor.prepare(m).items() if k != "prompt_ids" and v.numel()},
        )
        for m in messages
    ]
    for side in ("left", "right"):
        inputs = processor(text=texts, images=[_image()], padding_side=side, return_tensors="pt")
        out = ar.generate(**inputs, max_new_tokens=5, top_k=1, top_p=1.0, temperature=1.0)
        for b, alone in enumerate(expected):
            n = int(alone.lengths[0])
            assert int(out.lengths[b]) == n
            assert torch.equal(out.groups[b, :n], alone.groups[0, :n]), (side, b)
            assert torch.equal(out.new_groups()[b], alone.new_groups()[0])
        assert out.prompt_lengths.tolist() == inputs["attention_mask"].sum(1).tolist()


def test_text_only_prompts_give_no_image_tensors(pipe, processor):
    """As transformers' processors: demo/kelix_utils.build_input_ids passes text alone."""
    text = processor.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    inputs = processor(text=[text], return_tensors="pt")
    assert set(inputs) == {"input_ids", "attention_mask"}
    out = pipe.ar.generate(**inputs, top_k=1, max_new_tokens=3)
    alone = pipe.ar.generate(processor.prepare(text=text)["prompt_ids"], max_new_blocks=3)
    assert torch.equal(out.groups, alone.groups)


def test_the_official_demo_chat_flow_runs_as_written(pipe, processor):
    """demo/kelix_utils.chat, with kelix_fast's names."""
    messages = _question(_image())
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = processor(text=[text], images=[_image()], padding=False, return_tensors="pt").to("cpu")
    output = pipe.ar.generate(**inputs, top_k=1, max_new_tokens=4)
    new_ids = output.groups[0, inputs["input_ids"].shape[1] : int(output.lengths[0])]
    answer = processor.decode(new_ids[:, 0].long().tolist(), skip_special_tokens=False)
    assert isinstance(answer, str)
    assert processor.batch_decode(new_ids[None]) == [answer]
    (new_groups,) = output.new_groups()
    assert torch.equal(new_groups, new_ids) and processor.decode(new_groups) == answer


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (
            {"max_new_blocks": 2, "max_new_tokens": 2},
            ValueError,
            "give max_new_blocks or max_new_tokens",
        ),
        (
            {},
            ValueError,
            r"max_new_blocks \(or its transformers name max_new_tokens\) must be given",
        ),
        ({"max_new_tokens": 0}, ValueError, "max_new_tokens must be an int >= 1, got 0"),
        ({"max_new_tokens": 2.0}, TypeError, "max_new_tokens must be an int >= 1, got float"),
        (
            {"max_new_tokens": 10**6},
            ValueError,
            r"max_new_tokens = 1000000 with a 3-token prompt .* more than max_seq_len",
        ),
        (
            {"prompt_ids": [[1, 2, 3]], "max_new_tokens": 2},
            ValueError,
            "give prompt_ids or input_ids",
        ),
        (
            {"attention_mask": torch.tensor([[1, 0, 1]]), "max_new_tokens": 2},
            ValueError,
            r"attention_mask\[0\] must be one run of 1s",
        ),
        (
            {"attention_mask": torch.ones(1, 2), "max_new_tokens": 2},
            ValueError,
            r"attention_mask must have the shape of input_ids \[1, 3\]",
        ),
    ],
)
def test_generate_errors_name_the_arguments_given(pipe, kwargs, error, match):
    with pytest.raises(error, match=match):
        pipe.ar.generate(input_ids=torch.tensor([[104, 105, 106]]), **kwargs)


def test_generate_names_input_ids_in_prompt_errors(pipe):
    with pytest.raises(ValueError, match=r"input_ids\[0\] must hold text ids"):
        pipe.ar.generate(input_ids=torch.tensor([[-1]]), max_new_tokens=1)


# --------------------------------------------------------------------------- the diffusers-style call


def test_call_returns_images_and_a_batch_equals_its_prompts_alone(pipe):
    prompts = ["a fox", "a red cat in snow"]
    args = {"num_inference_steps": 2, "height": 64, "guidance_scale": 1.0}
    out = pipe(prompts, seed=7, **args)
    assert isinstance(out, kelix_fast.KelixPipelineOutput) and len(out.images) == 2
    assert list(pipe.timings) == ["preprocess", "prefill", "decode", "dit", "vae"]
    for b, prompt in enumerate(prompts):
        alone = pipe.generate_image(prompt, steps=2, size=64, seed=7 + b)
        assert alone.size == out.images[b].size == (64, 64)
        # one seed: prompt b gets seed + b; batched GEMMs may round differently, hence 1 level
        assert np.abs(_pixels(alone) - _pixels(out.images[b])).max() <= 1
    single = pipe("a fox", seed=7, **args).images
    assert (
        len(single) == 1
        and single[0].tobytes()
        == pipe("a fox", seed=7, width=64, num_inference_steps=2).images[0].tobytes()
    )


def test_generators_map_to_the_batch_as_documented(pipe):
    seeds = [3, 11]
    by_seed = pipe(["a", "b"], seed=seeds, num_inference_steps=1, height=64).images
    by_generator = pipe(
        ["a", "b"],
        generator=[torch.Generator().manual_seed(s) for s in seeds],
        num_inference_steps=1,
        height=64,
    ).images
    assert [i.tobytes() for i in by_seed] == [i.tobytes() for i in by_generator]
    shape = (2, 8, 2, 2)
    one = initial_noise(shape, generator=torch.Generator().manual_seed(3))
    assert torch.equal(one, torch.randn(shape, generator=torch.Generator().manual_seed(3)))
    per_seed = initial_noise(shape, seed=3)
    assert torch.equal(
        per_seed[1], torch.randn(shape[1:], generator=torch.Generator().manual_seed(4))
    )


def test_callback_on_step_end_sees_every_step_and_can_replace_the_latents(pipe):
    seen = []

    def record(p, step, timestep, kwargs):
        seen.append((p, step, float(timestep), tuple(kwargs["latents"].shape)))

    pipe("a fox", num_inference_steps=3, height=64, seed=0, callback_on_step_end=record)
    timesteps = flow_schedule(3)[1].tolist()
    assert seen == [(pipe, i, timesteps[i], (1, 8, 2, 2)) for i in range(3)]

    def zero(p, step, timestep, kwargs):
        return {"latents": torch.zeros_like(kwargs["latents"])}

    image = pipe("a fox", num_inference_steps=2, height=64, seed=0, callback_on_step_end=zero)
    expected = decode_latents(pipe.vae, torch.zeros(1, 8, 2, 2))[0].numpy()
    assert np.array_equal(np.asarray(image.images[0]), expected)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (
            {"num_inference_steps": 0},
            ValueError,
            "KelixPipeline: num_inference_steps must be an int >= 1",
        ),
        ({"height": 100}, ValueError, "KelixPipeline: height must be a positive multiple of 32"),
        ({"height": 64, "width": 96}, ValueError, "height and width must be equal"),
        (
            {"latents": torch.zeros(1, 8, 3, 3)},
            ValueError,
            r"KelixPipeline: latents must have shape \[1, 8, 2, 2\]",
        ),
        ({"seed": [1, 2]}, ValueError, "KelixPipeline: seed must be an int"),
        ({"seed": 1, "generator": torch.Generator()}, ValueError, "seed and generator: give one"),
        (
            {"generator": [torch.Generator()] * 2},
            ValueError,
            "generator must be a torch.Generator or a list of 1",
        ),
        ({"callback_on_step_end": 3}, TypeError, "callback_on_step_end must be callable"),
        ({"max_condition_length": 0}, ValueError, "max_condition_length must be an int >= 1"),
        ({"scoring": "fast"}, ValueError, "scoring must be one of"),
    ],
)
def test_call_checks_every_argument_before_any_model(pipe, forbid_models, kwargs, error, match):
    forbid_models(pipe)
    with pytest.raises(error, match=match):
        pipe("a fox", **{"height": 64, **kwargs})
    with pytest.raises(TypeError, match="prompt must be a str or a non-empty list of str"):
        pipe([])


@pytest.mark.parametrize(
    "method, kwargs, error, match",
    [
        ("generate_image", {"steps": 0}, ValueError, "generate_image: steps must be an int >= 1"),
        (
            "generate_image",
            {"guidance_scale": float("nan")},
            ValueError,
            "guidance_scale must be a finite",
        ),
        ("generate_image", {"seed": -1}, ValueError, "generate_image: seed must be an int"),
        (
            "generate_image",
            {"noise": torch.zeros(1, 8, 2, 2, dtype=torch.int64)},
            ValueError,
            "noise must have shape",
        ),
        (
            "generate_image",
            {"noise": torch.zeros(1, 8, 2, 2), "seed": 1},
            ValueError,
            "give it or seed/generator",
        ),
        (
            "generate_image",
            {"output_path": "/nonexistent-dir/x.png"},
            ValueError,
            "output_path's folder .* does not exist",
        ),
        (
            "generate_image",
            {"output_path": "x.notanimage"},
            ValueError,
            "output_path must end in an image extension",
        ),
        (
            "generate_image",
            {"max_condition_length": 3000},
            ValueError,
            r"the image blocks \(2 \* max_condition_length \+ 11\) = 6011 .* more than max_seq_len",
        ),
        ("reconstruct", {"steps": -2}, ValueError, "reconstruct: steps must be an int >= 1"),
        (
            "reconstruct",
            {"size": 65},
            ValueError,
            "reconstruct: size must be a positive multiple of 32",
        ),
        ("reconstruct", {"fusion": "max"}, ValueError, "fusion must be 'sum' or 'mean'"),
        ("reconstruct", {"schedule": "cosine"}, ValueError, "schedule must be one of"),
        ("reconstruct", {"max_pixels": 0}, ValueError, "max_pixels must be an int >= 1"),
        ("reconstruct", {"output_path": "/nonexistent-dir/x.png"}, ValueError, "does not exist"),
        ("chat", {"max_new_tokens": 0}, ValueError, "max_new_tokens must be an int >= 1"),
        ("chat", {"max_new_tokens": 10**6}, ValueError, r"max_new_tokens = 1000000 with a"),
        ("chat", {"top_p": 2.0}, ValueError, "top_p"),
        ("chat", {"seed": -1}, ValueError, r"seed must be an int in \[0, 2\^31\)"),
        ("chat", {"sampler": "greedy"}, ValueError, "sampler must be one of"),
        (
            "chat",
            {"stream": True, "sampler": "reference"},
            ValueError,
            'stream=True .* no sampler="reference"',
        ),
    ],
)
def test_methods_check_every_argument_before_any_model(
    pipe, forbid_models, method, kwargs, error, match
):
    forbid_models(pipe)
    first = {"generate_image": "a fox", "reconstruct": _image(), "chat": (_image(), "what?")}[
        method
    ]
    defaults = {"chat": {}, "generate_image": {"size": 64}, "reconstruct": {"size": 64}}[method]
    with pytest.raises(error, match=match):
        getattr(pipe, method)(first, **{**defaults, **kwargs})


def test_generate_image_and_reconstruct_write_output_path(pipe, tmp_path):
    image = pipe.generate_image("a fox", steps=1, size=64, seed=0, output_path=tmp_path / "fox.png")
    assert (tmp_path / "fox.png").read_bytes() and image.size == (64, 64)
    pipe.reconstruct(_image(), steps=1, size=64, seed=0, output_path=tmp_path / "r.jpg")
    assert (tmp_path / "r.jpg").stat().st_size > 0


# --------------------------------------------------------------------------- placement


def test_to_returns_the_pipeline_and_checks_the_device(pipe):
    assert pipe.to("cpu") is pipe and pipe.device == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(
            ValueError, match="KelixPipeline.to: device='cuda', but CUDA is not available"
        ):
            pipe.to("cuda")
        with pytest.raises(ValueError, match="enable_model_cpu_offload: device='cuda', but CUDA"):
            pipe.enable_model_cpu_offload()
    with pytest.raises(ValueError, match="must name a torch device"):
        pipe.to("tpu:x")


def test_cpu_offload_puts_one_model_at_a_time_on_the_device(pipe, monkeypatch):
    reference = pipe("a fox", num_inference_steps=1, height=64, seed=0).images[0]
    pipe.enable_model_cpu_offload("cpu")  # CPU as the "device": the moves happen, in order
    try:
        moves = []
        for name in ("ar", "dit", "vae", "aedit"):
            model = getattr(pipe, name)

            def to(device, _name=name, _to=model.to):
                moves.append((_name, str(device)))
                return _to(device)

            monkeypatch.setattr(model, "to", to)
        image = pipe("a fox", num_inference_steps=1, height=64, seed=0).images[0]
        assert moves == [
            ("ar", "cpu"), ("ar", "cpu"), ("dit", "cpu"), ("dit", "cpu"), ("vae", "cpu"), ("vae", "cpu"),
        ]  # fmt: skip
        assert image.tobytes() == reference.tobytes()
        moves.clear()
        pipe.reconstruct(_image(), steps=1, size=64, seed=0)
        assert [name for name, _ in moves] == ["ar", "ar", "aedit", "aedit", "vae", "vae"]
    finally:
        monkeypatch.undo()
        pipe.to("cpu")


@pytest.mark.gpu
def test_cpu_offload_on_cuda_keeps_the_models_on_the_cpu_between_stages():
    gpu_pipe = KelixPipeline.tiny(seed=1, device="cpu", dtype=torch.float32)
    reference = gpu_pipe("a fox", num_inference_steps=1, height=64, seed=0).images[0]
    gpu_pipe.enable_model_cpu_offload("cuda")
    image = gpu_pipe("a fox", num_inference_steps=1, height=64, seed=0).images[0]
    assert gpu_pipe.ar.device.type == gpu_pipe.dit.device.type == "cpu"
    assert np.abs(_pixels(image) - _pixels(reference)).max() <= 2


# --------------------------------------------------------------------------- streaming


@pytest.fixture(scope="module")
def talking_pipe():
    """A tiny model that answers in text its tiny byte tokenizer can spell: every output-head row but
    printable ASCII, the UTF-8 bytes of 'Ã'-led characters and the two stops is zeroed, so answers mix
    whole characters and byte sequences that end inside a character."""
    config = presets.tiny_config()
    weights = presets.random_weights(config, 2)
    head = weights["model.model.output.weight"]
    keep = torch.zeros(head.shape[0], dtype=torch.bool)
    keep[[*range(32, 128), 0xC3, *range(0x80, 0xC0), presets.Q_EOS, presets.IM_END]] = True
    head[~keep] = 0
    ar = KelixAR.from_weights(config, weights, device="cpu", dtype=torch.float32)
    return KelixPipeline(ar, KelixProcessor.tiny())


def test_streaming_chat_yields_the_answer_in_pieces(talking_pipe):
    for question in [(_image(), "What is this?"), [{"role": "user", "content": "hello"}]]:
        answer = talking_pipe.chat(question, max_new_tokens=24)
        pieces = talking_pipe.chat(question, max_new_tokens=24, stream=True)
        assert not isinstance(pieces, str)
        pieces = list(pieces)
        assert len(pieces) > 2 and all(pieces) and "".join(pieces) == answer
        # a piece never ends inside a character, except possibly the last
        assert not any(piece.endswith("\ufffd") for piece in pieces[:-1])
        assert list(talking_pipe.timings) == ["preprocess", "generate"]
