"""Prefill (runtime/prefill.py): the prompts of a batch attend to their own new keys through the flash
kernel (``ops.attention``, causal over the padded rows) instead of through the KV cache, and the result
equals the cache path's on every real row, for prompts of different lengths, with the Triton kernel
under the interpreter as with the PyTorch references."""

from __future__ import annotations

import pytest
import torch

from kelix_fast import KelixAR, ops
from kelix_fast.runtime import requests
from kelix_fast.runtime.prefill import prefill

LENGTHS = (11, 1, 6)  # a single-row prompt and padding of 10 and 5 rows


@pytest.fixture(scope="module")
def tiny():
    return KelixAR.tiny(seed=9, device="cpu")


def _prompts(ar, lengths):
    """Random text prompts of these lengths as [L, G+1] groups."""
    gen = torch.Generator().manual_seed(4)
    ids = [
        torch.randint(0, ar.config.llm.vocab_size, (n,), generator=gen).tolist() for n in lengths
    ]
    checked = requests.check_prompts(ar.config, ids, arg="prompt_ids", device=torch.device("cpu"))
    return requests.expand_prompts(ar.config, checked, None, torch.device("cpu"))


def _cache_path(ar, prompts, capacity):
    """The same forward with fresh=False: every layer attends through the cache (the decode kernel)."""
    llm = ar.model.llm
    lengths = torch.tensor([p.shape[0] for p in prompts])
    batch = torch.full(
        (len(prompts), int(lengths.max()), prompts[0].shape[1]), llm.config.q_eos_token
    )
    for b, p in enumerate(prompts):
        batch[b, : p.shape[0]] = p
    cache = llm.new_cache(len(prompts), capacity)
    h, states = llm(
        llm.embed(batch), cache, torch.zeros_like(lengths), lengths, output_hidden_states=True
    )
    return h, states, cache


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_prefill_runs_the_flash_kernel_and_equals_the_cache_path(tiny, backend, monkeypatch):
    prompts = _prompts(tiny, LENGTHS)
    calls = {"attention": 0, "cached_attention": 0}
    for name in calls:
        original = getattr(ops, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(ops, name, counted)
    with ops.use_backends(attention=backend, cached_attention=backend):
        h, states, cache, lengths = prefill(tiny.model, prompts, 16, hidden_states=True)
    assert calls == {"attention": tiny.config.llm.num_layers, "cached_attention": 0}
    monkeypatch.undo()
    with ops.use_backends(cached_attention="torch"):
        want_h, want_states, want_cache = _cache_path(tiny, prompts, 16)
    for b, length in enumerate(LENGTHS):  # real rows only: padding rows are garbage by contract
        torch.testing.assert_close(h[b, :length], want_h[b, :length], atol=2e-5, rtol=2e-5)
        for got, want in zip(states, want_states):
            torch.testing.assert_close(got[b, :length], want[b, :length], atol=2e-5, rtol=2e-5)
        for layer in range(tiny.config.llm.num_layers):  # what the decode steps that follow read
            torch.testing.assert_close(cache.k[layer][b, :length], want_cache.k[layer][b, :length])
            torch.testing.assert_close(cache.v[layer][b, :length], want_cache.v[layer][b, :length])
    assert lengths.tolist() == list(LENGTHS)
