"""The engine's decode loop (runtime/device_decoding.py's slots driven by runtime/engine_core.py) against
the reference loop (runtime/generation.py): greedy equality, per-request sampling, the stop check, no host
synchronisation inside a step, and CUDA graphs on a GPU (structured scoring:
tests/engine/test_structured_scoring.py; continuous batching: tests/runtime/test_engine_core.py)."""

from __future__ import annotations

import pytest
import torch

from kelix_fast import KelixAR, ops, presets
from kelix_fast.runtime import device_decoding, engine_core, generation, requests
from kelix_fast.runtime.block_selection import SelectionPlan, host_bound_reason, slot_seeds
from kelix_fast.runtime.prefill import prefill
from kelix_fast.runtime.sampling import SamplingParams

IM_START, IM_END, USER, ASSISTANT, NL = presets.IM_START, presets.IM_END, 872, 77091, 198
PROMPTS = [
    [IM_START, USER, NL, 1000, 2000, 3000, IM_END, NL, IM_START, ASSISTANT, NL],
    [IM_START, ASSISTANT, NL, presets.VISION_START],
    [IM_START, USER, NL, 42, IM_END, NL, IM_START, ASSISTANT, NL],
]


@pytest.fixture(scope="module")
def tiny():
    return KelixAR.tiny(seed=5, device="cpu")


def _groups(engine, prompts):
    device = engine.device
    checked = requests.check_prompts(engine.config, prompts, arg="prompt_ids", device=device)
    return requests.expand_prompts(engine.config, checked, None, device)


def _run(engine, prompts, params, *, seeds=None, check_every=8, blocks=7, core=None):
    groups, seeds = _groups(engine, prompts), seeds or [7] * len(prompts)
    if core is None:
        capacity = max(g.shape[0] for g in groups) + blocks - 1
        core = engine_core.EngineCore(
            engine.model, max_batch=len(prompts), capacity=capacity, cuda_graphs=False
        )
    batch = [
        engine_core.Request(core.new_request_id(), g, p, s, blocks, return_hidden_states=True)
        for g, p, s in zip(groups, params, seeds)
    ]
    return engine_core.generate(core, batch, check_every=check_every)


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x.new_groups, y.new_groups)
        assert torch.equal(x.chains, y.chains)
        torch.testing.assert_close(x.hidden, y.hidden, rtol=0, atol=1e-5)


def test_greedy_equals_the_reference_loop(tiny):
    greedy = SamplingParams(top_k=1)
    want = generation.generate_reference(
        tiny.model,
        _groups(tiny, PROMPTS),
        max_new_blocks=7,
        params=greedy,
        sampler="sequential",
        generators=[None] * len(PROMPTS),
        return_hidden_states=True,
    )
    _assert_same(_run(tiny, PROMPTS, [greedy] * len(PROMPTS)), want)


def test_stop_check_interval_changes_nothing(tiny):
    params = [SamplingParams(temperature=0.9, top_k=0)] * len(PROMPTS)
    every_block = _run(tiny, PROMPTS, params, check_every=1, blocks=12)
    _assert_same(_run(tiny, PROMPTS, params, check_every=5, blocks=12), every_block)
    # A request that stopped keeps its first <|im_end|> group as its last one.
    for out in every_block:
        eos = out.new_groups[:, 0] == presets.IM_END
        assert not bool(eos[:-1].any())


def test_per_request_sampling_parameters_equal_single_runs(tiny):
    params = [
        SamplingParams(top_k=1),
        SamplingParams(temperature=0.7, top_k=20, top_p=0.8),
        SamplingParams(temperature=1.3, top_k=0),
    ]
    seeds = [3, 4, 5]
    batch = _run(tiny, PROMPTS, params, seeds=seeds)
    for b in range(len(PROMPTS)):
        _assert_same([batch[b]], _run(tiny, [PROMPTS[b]], [params[b]], seeds=[seeds[b]]))


def test_seeds_of_different_draws_differ():
    seeds = torch.tensor([0, 1, 2**31 - 1])
    packed = torch.stack(
        [
            slot_seeds(seeds, torch.tensor([block]), slot)
            for block in (0, 1, 2**20)
            for slot in range(8)
        ]
    )
    assert packed.unique().numel() == packed.numel()


def test_a_decode_step_never_reads_device_values(tiny, monkeypatch):
    """Every host read of a tensor value (a device synchronisation on CUDA) goes through one of these;
    none may run inside a block (greedy, the torch backends the CPU runs)."""
    groups = _groups(tiny, PROMPTS)
    plan = SelectionPlan(
        tiny.config.llm, [SamplingParams(top_k=1)] * 3, scoring="full", device="cpu"
    )
    h, _, _, lengths = prefill(tiny.model, groups, 16, hidden_states=False)
    hidden = h[torch.arange(3), lengths - 1]
    cache = tiny.model.block_decoder.new_cache(3)

    def forbidden(*_args, **_kwargs):
        raise AssertionError("a tensor value was read on the host inside a block")

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    with torch.inference_mode(), ops.trusted_values():
        device_decoding.decode_block(
            tiny.model,
            hidden,
            cache,
            plan,
            torch.zeros(3, dtype=torch.int64),
            torch.zeros(1, dtype=torch.int64),
        )


def test_a_slot_step_never_reads_device_values(tiny, monkeypatch):
    """The whole decode step of the slots (LLM step + block, free rows included), as a CUDA graph
    captures it, reads nothing back to the host."""
    slots = device_decoding.DecodeSlots(tiny.model, 4, 64, cuda_graphs=False)
    greedy = SamplingParams(top_k=1)
    plan = SelectionPlan(tiny.config.llm, [greedy] * 2, scoring="full", device="cpu")
    with torch.inference_mode():
        slots.admit([0, 2], _groups(tiny, PROMPTS[:2]), [1, 2], plan)
    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, _forbidden)
    with torch.inference_mode():
        slots.advance(4, ("greedy",), lambda: SelectionPlan(
            tiny.config.llm, [greedy] * 4, scoring="full", device="cpu"
        ))  # fmt: skip
    monkeypatch.undo()
    assert slots.pos.tolist()[:4] == [len(PROMPTS[0]), 0, len(PROMPTS[1]), 0]  # free rows stay put


def _forbidden(*_args, **_kwargs):
    raise AssertionError("a tensor value was read on the host inside a decode step")


@pytest.mark.gpu
@pytest.mark.parametrize(
    "params",
    [SamplingParams(top_k=1), SamplingParams(temperature=0.8, top_k=0)],
    ids=["greedy", "sampled"],
)
def test_cuda_graphs_equal_eager_on_gpu(params):
    engine = KelixAR.tiny(seed=5, device="cuda")
    kwargs = {"top_k": params.top_k, "temperature": params.temperature, "seed": [1, 2, 3]}
    eager = engine.generate(PROMPTS, max_new_blocks=9, cuda_graphs=False, **kwargs)
    graphed = engine.generate(PROMPTS, max_new_blocks=9, cuda_graphs=True, **kwargs)
    assert torch.equal(eager.groups, graphed.groups)
    assert torch.equal(eager.lengths, graphed.lengths)
    assert torch.equal(eager.block_decoder_ids, graphed.block_decoder_ids)
    # A later call of the same bucket replays the kept graph with other prompts.
    others = [PROMPTS[2], PROMPTS[0][:5], PROMPTS[1]]
    eager = engine.generate(others, max_new_blocks=9, cuda_graphs=False, **kwargs)
    graphed = engine.generate(others, max_new_blocks=9, cuda_graphs=True, **kwargs)
    assert len(engine._cores) == 1
    assert torch.equal(eager.groups, graphed.groups)
    assert torch.equal(eager.block_decoder_ids, graphed.block_decoder_ids)


def test_selection_that_needs_the_host_is_named():
    vocab = 1000
    on_device = [
        SamplingParams(top_k=1),
        SamplingParams(top_k=0),
        SamplingParams(top_k=50, top_p=0.9),
    ]
    assert host_bound_reason(on_device, vocab) is None
    reason = host_bound_reason([SamplingParams(top_k=100, top_p=0.5)], vocab)
    assert "top_k=100, top_p=0.5" in reason


def test_a_reused_engine_core_equals_fresh_runs(tiny):
    """One core serves later static batches of its bucket (wider than the batch, its slots, KV caches
    and graphs kept): every call still equals a run on a fresh core of exactly its size."""
    params = [SamplingParams(temperature=0.8, top_k=0)] * 3
    core = engine_core.EngineCore(tiny.model, max_batch=4, capacity=512, cuda_graphs=False)
    first = _run(tiny, PROMPTS, params, seeds=[1, 2, 3], core=core)
    _assert_same(first, _run(tiny, PROMPTS, params, seeds=[1, 2, 3]))
    others = [PROMPTS[2], PROMPTS[0][:5], PROMPTS[1]]
    second = _run(tiny, others, params, seeds=[9, 8, 7], core=core)
    _assert_same(second, _run(tiny, others, params, seeds=[9, 8, 7]))
    assert not core.has_unfinished()


def test_generate_keeps_two_engine_cores_by_bucket(tiny):
    tiny.release_decode_graphs()
    tiny.generate(PROMPTS, max_new_blocks=3)
    tiny.generate(
        [PROMPTS[2], PROMPTS[0], PROMPTS[1][:2]], max_new_blocks=4
    )  # same bucket (4, 512)
    assert list(tiny._cores) == [(4, 512, False)]
    tiny.generate(PROMPTS[:1], max_new_blocks=3)
    tiny.generate(PROMPTS[:2], max_new_blocks=3)  # a third bucket evicts the oldest
    assert list(tiny._cores) == [(1, 512, False), (2, 512, False)]
    tiny.release_decode_graphs()
    assert not tiny._cores


@pytest.mark.gpu
def test_cuda_graphs_refuse_selection_on_the_host():
    engine = KelixAR.tiny(seed=5, device="cuda")
    with pytest.raises(ValueError, match="cuda_graphs=True needs selection on the device"):
        engine.generate(PROMPTS, max_new_blocks=2, top_k=100, top_p=0.5, cuda_graphs=True)
