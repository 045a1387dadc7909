"""``TextStream``: block-by-block text deltas that join to the answer ``KelixPipeline.chat`` decodes, with
characters split across blocks held back until complete (the tiny tokenizer has one token per byte)."""

from __future__ import annotations

import pytest

# The serve extra (pip install -e ".[serve]"); a machine without it (the bare GPU image) skips these.
for _module in ("fastapi", "uvicorn", "prometheus_client", "httpx", "openai"):
    pytest.importorskip(_module, reason=f"the serve extra is not installed ({_module})")

import torch

from kelix_fast import presets
from kelix_fast.processor import KelixTextTokenizer
from kelix_fast.serving.detokenizer import TextStream

LLM = presets.tiny_config().llm
TEXT = "héllo, 狐狸 🦊!"


def groups(*slot0: int) -> torch.Tensor:
    """Text groups [n, G+1]: the id, then q_eos."""
    out = torch.full((len(slot0), LLM.n_q_tokens + 1), LLM.q_eos_token)
    out[:, 0] = torch.tensor(slot0)
    return out


def test_deltas_join_to_the_answer_and_never_split_a_character():
    tokenizer = KelixTextTokenizer.tiny()
    ids = tokenizer.encode(TEXT)
    assert len(ids) == len(TEXT.encode())  # one block per byte: characters span blocks
    stream = TextStream(tokenizer, LLM)
    deltas = [stream.push(groups(token)) for token in ids]
    deltas.append(stream.finish())
    assert "".join(deltas) == TEXT
    assert all("\ufffd" not in delta for delta in deltas)
    assert deltas.count("") == len(ids) - len(TEXT) + 1  # one per held-back byte, and finish()


def test_image_blocks_and_empty_groups_carry_no_text_and_eos_ends_the_answer():
    tokenizer = KelixTextTokenizer.tiny()
    stream = TextStream(tokenizer, LLM)
    visual = torch.arange(LLM.vocab_size, LLM.vocab_size + LLM.n_q_tokens + 1)[
        None
    ]  # an image block
    assert stream.push(visual) == ""
    assert stream.push(groups(LLM.q_eos_token)) == ""  # an empty group
    assert stream.push(groups(*tokenizer.encode("ok"))) == "ok"
    assert stream.push(groups(LLM.eos_token_id, *tokenizer.encode("late"))) == ""
    assert stream.finish() == ""


def test_a_character_cut_by_the_end_of_the_answer_is_flushed():
    tokenizer = KelixTextTokenizer.tiny()
    stream = TextStream(tokenizer, LLM)
    fox = tokenizer.encode("🦊")
    assert stream.push(groups(*fox[:2])) == ""
    assert stream.finish() == tokenizer.decode(fox[:2])  # as the whole answer decodes
