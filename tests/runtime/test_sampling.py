"""Block-token selection: greedy ties, the official top-k / stricter top-p filters, seeded draws."""

from __future__ import annotations

import math

import pytest
import torch

from kelix_fast.ops.selection import filter_logits
from kelix_fast.runtime.sampling import SamplingParams, select


def test_greedy_is_argmax_with_the_first_index_and_draws_nothing():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0], [-math.inf, 2.0, 5.0, 5.0]])
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state()
    assert select(logits, SamplingParams(top_k=1), [gen, gen]).tolist() == [1, 2]
    assert torch.equal(gen.get_state(), state)


def test_temperature_divides_by_temperature_plus_1e5():
    logits = torch.tensor([[1.0, 2.0]])
    out = filter_logits(logits, temperature=0.5, top_k=0, top_p=1.0)
    torch.testing.assert_close(out, logits / (0.5 + 1e-5))
    assert torch.equal(filter_logits(logits, temperature=0.0, top_k=0, top_p=1.0), logits)


def test_top_k_keeps_exactly_k_with_lower_ids_on_ties():
    logits = torch.tensor([[0.0, 2.0, 1.0, 2.0, 2.0]])
    out = filter_logits(logits, temperature=0.0, top_k=2, top_p=1.0)
    assert torch.isfinite(out[0]).tolist() == [False, True, False, True, False]
    everything = filter_logits(logits, temperature=0.0, top_k=10, top_p=1.0)
    assert torch.equal(everything, logits)


def test_top_p_is_the_stricter_official_rule():
    # probabilities 0.5, 0.25, 0.25: inclusive cumulative 0.5, 0.75, 1.0. With top_p = 0.6 the official rule
    # keeps only the first token (HF would also keep the one crossing the threshold).
    logits = torch.log(torch.tensor([[0.25, 0.5, 0.25]]))
    out = filter_logits(logits, temperature=0.0, top_k=0, top_p=0.6)
    assert torch.isfinite(out[0]).tolist() == [False, True, False]
    out = filter_logits(logits, temperature=0.0, top_k=0, top_p=0.8)
    assert torch.isfinite(out[0]).tolist() == [
        True,
        True,
        False,
    ]  # ties broken towards the lower id
    tiny = filter_logits(logits, temperature=0.0, top_k=0, top_p=1e-9)
    assert torch.isfinite(tiny[0]).tolist() == [False, True, False]


def test_draws_follow_the_filtered_distribution():
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.0])
    logits = torch.log(probs).expand(4000, -1)
    params = SamplingParams(temperature=0.0, top_k=0)
    gen = torch.Generator().manual_seed(1)
    ids = select(logits, params, [gen] * logits.shape[0])
    freq = torch.bincount(ids, minlength=5).double() / ids.numel()
    # 5 sigma of a binomial proportion at n = 4000 is at most 0.04
    assert (freq - probs.double()).abs().max() < 0.04
    assert freq[4] == 0


def test_seeded_draws_repeat():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(2))
    params = SamplingParams(temperature=0.8, top_k=10, top_p=0.9)
    a = select(logits, params, [torch.Generator().manual_seed(s) for s in (1, 2, 3)])
    b = select(logits, params, [torch.Generator().manual_seed(s) for s in (1, 2, 3)])
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"temperature": -1.0}, ValueError, "temperature must be a finite number >= 0"),
        ({"temperature": float("nan")}, ValueError, "temperature must be a finite number >= 0"),
        ({"top_k": -2}, ValueError, "top_k must be >= 0"),
        ({"top_k": True}, TypeError, "top_k must be an int"),
        ({"top_p": 0.0}, ValueError, r"top_p must lie in \(0, 1\]"),
        ({"top_p": "0.9"}, TypeError, "top_p must be a number"),
    ],
)
def test_invalid_parameters(kwargs, error, match):
    with pytest.raises(error, match=match):
        SamplingParams(**kwargs)
