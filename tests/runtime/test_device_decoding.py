"""The engine's decode loop (runtime/device_decoding.py) against the reference loop (runtime/generation.py):
greedy equality, per-request sampling, the stop check, no host synchronisation inside a step, and CUDA
graphs on a GPU (structured scoring: tests/engine/test_structured_scoring.py)."""

from __future__ import annotations

import pytest
import torch

from kelix_fast import ops, presets
from kelix_fast.runtime import device_decoding, generation
from kelix_fast.runtime.block_selection import SelectionPlan, host_bound_reason, slot_seeds
from kelix_fast.runtime.sampling import SamplingParams

IM_START, IM_END, USER, ASSISTANT, NL = presets.IM_START, presets.IM_END, 872, 77091, 198
PROMPTS = [
    [IM_START, USER, NL, 1000, 2000, 3000, IM_END, NL, IM_START, ASSISTANT, NL],
    [IM_START, ASSISTANT, NL, presets.VISION_START],
    [IM_START, USER, NL, 42, IM_END, NL, IM_START, ASSISTANT, NL],
]


@pytest.fixture(scope="module")
def tiny():
    return presets.tiny(seed=5, device="cpu")


def _groups(engine, prompts):
    return engine._expand(engine._check_prompts(prompts, arg="prompt_ids"), None)


def _run(
    engine, prompts, params, *, seeds=None, scoring="full", check_every=8, blocks=7, reuse=None
):
    return device_decoding.generate(
        engine.model,
        _groups(engine, prompts),
        max_new_blocks=blocks,
        params=params,
        scoring=scoring,
        request_seeds=seeds or [7] * len(prompts),
        return_hidden_states=True,
        cuda_graphs=False,
        reuse=reuse,
        check_every=check_every,
    )


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
    h, _, _, lengths = generation.prefill(tiny.model, groups, 16, hidden_states=False)
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


@pytest.mark.gpu
@pytest.mark.parametrize(
    "params",
    [SamplingParams(top_k=1), SamplingParams(temperature=0.8, top_k=0)],
    ids=["greedy", "sampled"],
)
def test_cuda_graphs_equal_eager_on_gpu(params):
    engine = presets.tiny(seed=5, device="cuda")
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
    assert len(engine._decode_steps) == 1
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


def test_reused_decode_steps_equal_fresh_runs(tiny):
    """A DecodeStepsCache pads the batch to its bucket and keeps the steps (the graph, on CUDA) for
    later calls: every call must still equal a run without it, and the cache keeps at most two shapes."""
    reuse = device_decoding.DecodeStepsCache(max_entries=2)
    params = [SamplingParams(temperature=0.8, top_k=0)] * 3
    first = _run(tiny, PROMPTS, params, seeds=[1, 2, 3], reuse=reuse)
    _assert_same(first, _run(tiny, PROMPTS, params, seeds=[1, 2, 3]))
    # Same bucket (3 -> 4 rows, capacity 512): the same steps, refilled with other prompts and seeds.
    others = [PROMPTS[2], PROMPTS[0][:5], PROMPTS[1]]
    second = _run(tiny, others, params, seeds=[9, 8, 7], reuse=reuse)
    assert len(reuse) == 1
    _assert_same(second, _run(tiny, others, params, seeds=[9, 8, 7]))
    _run(tiny, PROMPTS[:1], params[:1], reuse=reuse)  # another bucket
    _run(tiny, PROMPTS, [SamplingParams(top_k=1)] * 3, reuse=reuse)  # another plan: evicts one
    assert len(reuse) == 2


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_decode_steps_cache_rejects_bad_sizes(bad):
    with pytest.raises(ValueError, match="max_entries must be an int >= 1"):
        device_decoding.DecodeStepsCache(max_entries=bad)


def test_buckets():
    assert device_decoding.DecodeStepsCache.bucket(1, 10, 4096) == (1, 512)
    assert device_decoding.DecodeStepsCache.bucket(3, 513, 4096) == (4, 1024)
    assert device_decoding.DecodeStepsCache.bucket(33, 4000, 4096) == (64, 4096)


@pytest.mark.gpu
def test_cuda_graphs_refuse_selection_on_the_host():
    engine = presets.tiny(seed=5, device="cuda")
    with pytest.raises(ValueError, match="cuda_graphs=True needs selection on the device"):
        engine.generate(PROMPTS, max_new_blocks=2, top_k=100, top_p=0.5, cuda_graphs=True)
