"""``kelix_fast.Engine``: continuous batching. Every request's groups (and hidden states) equal what
``KelixAR.generate`` gives for it alone, whatever joins or leaves around it and whenever: requests joining
at different steps, aborts, a full engine with a waiting queue, mixed sampling parameters and scoring
modes, images and text. CPU, float32, the tiny model."""

from __future__ import annotations

import pytest
import torch

from kelix_fast import Engine, KelixAR, presets
from kelix_fast.processor import image_to_patches

IM_START, IM_END, USER, ASSISTANT, NL = presets.IM_START, presets.IM_END, 872, 77091, 198
TEXT = [
    [IM_START, USER, NL, 1000, 2000, 3000, IM_END, NL, IM_START, ASSISTANT, NL],
    [IM_START, USER, NL, 42, IM_END, NL, IM_START, ASSISTANT, NL],
    [IM_START, ASSISTANT, NL, presets.VISION_START],
    [IM_START, USER, NL, 5, 6, IM_END, NL, IM_START, ASSISTANT, NL, 17],
]
SAMPLED = {"top_k": 0, "top_p": 0.9, "temperature": 0.8}


@pytest.fixture(scope="module")
def tiny():
    return KelixAR.tiny(seed=3, device="cpu")


@pytest.fixture(scope="module")
def image():
    pixels, grid = image_to_patches(
        torch.arange(56 * 84 * 3).reshape(56, 84, 3).remainder(251).to(torch.uint8)
    )
    n_tok = int(grid[0, 1] * grid[0, 2]) // 4
    prompt = [IM_START, USER, NL, presets.VISION_START, *[presets.IMAGE_PAD] * n_tok]
    prompt += [presets.VISION_END, IM_START, ASSISTANT, NL]
    return prompt, pixels, grid


def alone(ar, prompt, blocks, **kwargs):
    """(groups [n, 9] of the new blocks, hidden [L + n - 1, D]) of the request run by itself."""
    out = ar.generate([prompt], max_new_blocks=blocks, return_hidden_states=True, **kwargs)
    n = int(out.lengths[0])
    return out.groups[0, len(prompt) : n], out.hidden_states[0, : n - 1]


def run(engine, schedule, steps=40):
    """Drive ``engine``: ``schedule`` maps a step index to calls made before that step (add or abort).
    Returns every request's outputs in order, and the steps at which each finished."""
    outputs, finished = {}, {}
    for i in range(steps):
        for action in schedule.get(i, []):
            action(engine)
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
            if out.finished:
                finished[out.request_id] = (i, out.finish_reason)
        if not engine.has_unfinished() and i >= max(schedule, default=0):
            break
    return outputs, finished


def joined(outputs):
    groups = torch.cat([o.new_groups for o in outputs])
    hidden = [o.hidden_states for o in outputs if o.hidden_states is not None]
    return groups, torch.cat(hidden) if hidden else None


def add(prompt, blocks, request_id, **kwargs):
    return lambda engine: engine.add_request(
        prompt, max_new_blocks=blocks, request_id=request_id, return_hidden_states=True, **kwargs
    )


def test_requests_joining_at_different_steps_equal_their_single_runs(tiny, image):
    image_prompt, pixels, grid = image
    kwargs = {
        "a": {"top_k": 1},
        "b": {**SAMPLED, "seed": 4},
        "c": {"top_k": 1, "scoring": "structured"},
        "d": {"top_k": 5, "temperature": 1.2, "seed": 9},
        "img": {"top_k": 1, "pixel_values": pixels, "image_grid_thw": grid},
    }
    schedule = {
        0: [add(TEXT[0], 6, "a", **kwargs["a"]), add(TEXT[1], 9, "b", **kwargs["b"])],
        2: [add(TEXT[2], 5, "c", **kwargs["c"])],
        3: [add(image_prompt, 4, "img", **kwargs["img"])],
        5: [add(TEXT[3], 7, "d", **kwargs["d"])],
    }
    engine = Engine(tiny, max_batch=4, max_context=64)
    outputs, finished = run(engine, schedule)
    prompts = {"a": TEXT[0], "b": TEXT[1], "c": TEXT[2], "img": image_prompt, "d": TEXT[3]}
    blocks = {"a": 6, "b": 9, "c": 5, "img": 4, "d": 7}
    for rid, prompt in prompts.items():
        groups, hidden = joined(outputs[rid])
        want_groups, want_hidden = alone(tiny, prompt, blocks[rid], **kwargs[rid])
        assert torch.equal(groups, want_groups), rid
        torch.testing.assert_close(hidden, want_hidden, rtol=0, atol=1e-5)
        reason = finished[rid][1]
        assert reason == ("eos" if int(groups[-1, 0]) == IM_END else "length"), rid
    assert not engine.has_unfinished() and engine.stats().running == 0


def test_a_full_engine_queues_in_arrival_order_and_refills_freed_slots(tiny):
    engine = Engine(tiny, max_batch=2, max_context=32)
    ids = [
        engine.add_request(p, max_new_blocks=3 + i, **SAMPLED, seed=i) for i, p in enumerate(TEXT)
    ]
    assert engine.stats().waiting == 4 and engine.stats().running == 0
    first = engine.step()
    assert [o.request_id for o in first] == ids[:2]  # admitted in order, two slots
    assert engine.stats().running == 2 and engine.stats().waiting == 2
    outputs, finished = run(engine, {})
    for i, rid in enumerate(ids):
        got = torch.cat(
            [o.new_groups for o in ([*first, *outputs.get(rid, [])]) if o.request_id == rid]
        )
        want, _ = alone(tiny, TEXT[i], 3 + i, **SAMPLED, seed=i)
        assert torch.equal(got, want), rid
    # The third request was admitted only once a slot was freed.
    assert finished[ids[2]][0] >= min(finished[ids[0]][0], finished[ids[1]][0])


def test_abort_frees_the_slot_at_once_and_others_are_unaffected(tiny):
    engine = Engine(tiny, max_batch=2, max_context=32)
    engine.add_request(TEXT[0], max_new_blocks=8, request_id="keep", **SAMPLED, seed=1)
    engine.add_request(TEXT[1], max_new_blocks=8, request_id="drop", **SAMPLED, seed=2)
    engine.add_request(TEXT[3], max_new_blocks=4, request_id="next", top_k=1)
    collected = {"keep": [], "next": []}
    for out in engine.step() + engine.step():
        if out.request_id in collected:
            collected[out.request_id].append(out)
    assert engine.stats().waiting == 1
    engine.abort("drop")
    assert engine.stats().running == 1  # the slot is free before the next step
    step = engine.step()
    aborted = [o for o in step if o.request_id == "drop"]
    assert len(aborted) == 1 and aborted[0].finished and aborted[0].finish_reason == "aborted"
    assert aborted[0].new_groups.shape == (0, 9)
    assert any(o.request_id == "next" for o in step)  # admitted into the freed slot
    for out in step:
        if out.request_id in collected:
            collected[out.request_id].append(out)
    while engine.has_unfinished():
        for out in engine.step():
            collected[out.request_id].append(out)
    assert torch.equal(joined(collected["keep"])[0], alone(tiny, TEXT[0], 8, **SAMPLED, seed=1)[0])
    assert torch.equal(joined(collected["next"])[0], alone(tiny, TEXT[3], 4, top_k=1)[0])


def test_an_aborted_waiting_request_never_runs(tiny):
    engine = Engine(tiny, max_batch=1, max_context=32)
    engine.add_request(TEXT[0], max_new_blocks=3, request_id="a")
    engine.add_request(TEXT[1], max_new_blocks=3, request_id="b")
    engine.abort("b")
    outputs, _ = run(engine, {})
    assert [o.finish_reason for o in outputs["b"]] == ["aborted"]


def test_stop_at_im_end_finishes_with_eos():
    ar = KelixAR.tiny(seed=3, device="cpu")
    ar.model.llm.output.weight[IM_END] = ar.model.llm.norm.scale.sign() * 50.0
    engine = Engine(ar, max_batch=2, max_context=32)
    engine.add_request(TEXT[1], max_new_blocks=5, request_id="x")
    (out,) = engine.step()
    assert out.finished and out.finish_reason == "eos" and int(out.new_groups[-1, 0]) == IM_END
    assert engine.step() == [] and not engine.has_unfinished()


def test_step_with_nothing_queued_returns_nothing(tiny):
    engine = Engine(tiny, max_batch=2, max_context=16)
    assert engine.step() == [] and not engine.has_unfinished()
    stats = engine.stats()
    assert (stats.running, stats.waiting, stats.kv_positions_total) == (0, 0, 32)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"max_new_blocks": 0}, ValueError, "max_new_blocks must be an int >= 1"),
        ({"max_new_blocks": 30}, ValueError, "more than max_context = 32"),
        ({"max_new_blocks": 2, "top_p": 0.0}, ValueError, r"top_p must lie in \(0, 1\]"),
        ({"max_new_blocks": 2, "scoring": "fast"}, ValueError, "scoring must be one of"),
        ({"max_new_blocks": 2, "seed": -1}, ValueError, r"seed must be an int in \[0, 2\^31\)"),
        ({"max_new_blocks": 2, "request_id": 7}, TypeError, "request_id must be a str"),
        ({"max_new_blocks": 2, "return_hidden_states": 1}, TypeError, "return_hidden_states"),
        (
            {"max_new_blocks": 2, "pixel_values": torch.zeros(4, 3, 14, 14)},
            ValueError,
            "pixel_values and image_grid_thw must be given together",
        ),
    ],
)
def test_add_request_refuses_bad_input_before_queueing(tiny, kwargs, error, match):
    engine = Engine(tiny, max_batch=2, max_context=32)
    with pytest.raises(error, match=match):
        engine.add_request(TEXT[0], **kwargs)
    assert not engine.has_unfinished()


def test_request_ids_are_unique_and_abort_names_unknown_ones(tiny):
    engine = Engine(tiny, max_batch=2, max_context=32)
    engine.add_request(TEXT[0], max_new_blocks=2, request_id="x")
    with pytest.raises(ValueError, match="'x' is already in use"):
        engine.add_request(TEXT[1], max_new_blocks=2, request_id="x")
    with pytest.raises(KeyError, match="'nope'"):
        engine.abort("nope")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_batch": 0}, "max_batch must be an int >= 1"),
        ({"max_context": 10**9}, "max_context must be <= the model's max_seq_len"),
        ({"cuda_graphs": True}, "cuda_graphs=True needs the model on CUDA"),
    ],
)
def test_engine_refuses_bad_options(tiny, kwargs, match):
    with pytest.raises(ValueError, match=match):
        Engine(tiny, **kwargs)


@pytest.mark.gpu
def test_continuous_batching_with_cuda_graphs_equals_single_runs():
    ar = KelixAR.tiny(seed=3, device="cuda")
    engine = Engine(ar, max_batch=4, max_context=64, cuda_graphs=True)
    schedule = {
        0: [add(TEXT[0], 6, "a", top_k=1), add(TEXT[1], 9, "b", **SAMPLED, seed=4)],
        3: [add(TEXT[3], 5, "d", top_k=1)],
    }
    outputs, _ = run(engine, schedule)
    for rid, prompt, blocks, kwargs in (
        ("a", TEXT[0], 6, {"top_k": 1}),
        ("b", TEXT[1], 9, {**SAMPLED, "seed": 4}),
        ("d", TEXT[3], 5, {"top_k": 1}),
    ):
        want, _ = alone(ar, prompt, blocks, cuda_graphs=False, **kwargs)
        assert torch.equal(joined(outputs[rid])[0], want), rid


def test_a_failed_step_drops_its_requests_and_the_engine_goes_on(tiny, monkeypatch):
    """Out of memory (injected) inside a decode step: exactly the requests of that step fail, their
    slots are free, a waiting request is untouched, and later requests are served exactly."""
    from kelix_fast.runtime.engine_core import StepFailed

    engine = Engine(tiny, max_batch=2, max_context=32)
    engine.add_request(TEXT[0], max_new_blocks=6, request_id="a")
    engine.add_request(TEXT[1], max_new_blocks=6, request_id="b")
    engine.add_request(TEXT[2], max_new_blocks=3, request_id="waits")
    engine.step()  # a and b admitted
    slots = engine._core.slots

    def out_of_memory(*_args, **_kwargs):
        raise torch.OutOfMemoryError("injected")

    monkeypatch.setattr(slots, "advance", out_of_memory)
    with pytest.raises(StepFailed) as failed:
        engine.step()
    assert sorted(failed.value.request_ids) == ["a", "b"]
    assert isinstance(failed.value.__cause__, torch.OutOfMemoryError)
    monkeypatch.undo()
    assert engine.stats().running == 0 and engine.stats().waiting == 1
    engine.add_request(TEXT[3], max_new_blocks=4, request_id="later", top_k=1)
    outputs, finished = run(engine, {})
    assert set(finished) == {"waits", "later"}
    assert torch.equal(joined(outputs["later"])[0], alone(tiny, TEXT[3], 4, top_k=1)[0])
    assert torch.equal(joined(outputs["waits"])[0], alone(tiny, TEXT[2], 3)[0])


@pytest.mark.gpu
def test_a_host_bound_request_runs_its_steps_eagerly_under_automatic_graphs():
    """top_k > 64 with top_p < 1 needs the host (head_select's torch path): with cuda_graphs left to
    the engine its steps run eagerly, and it still equals its single run; cuda_graphs=True refuses it."""
    ar = KelixAR.tiny(seed=3, device="cuda")
    engine = Engine(ar, max_batch=2, max_context=64)
    schedule = {0: [add(TEXT[0], 5, "host", top_k=100, top_p=0.5, seed=2), add(TEXT[1], 5, "dev")]}
    outputs, _ = run(engine, schedule)
    want, _ = alone(ar, TEXT[0], 5, top_k=100, top_p=0.5, seed=2, cuda_graphs=False)
    assert torch.equal(joined(outputs["host"])[0], want)
    strict = Engine(ar, max_batch=2, max_context=64, cuda_graphs=True)
    with pytest.raises(ValueError, match="captures CUDA graphs"):
        strict.add_request(TEXT[0], max_new_blocks=2, top_k=100, top_p=0.5)
