"""``TextStream``: a chat answer's text, block by block, for streaming.

The text of an answer is what ``KelixPipeline.chat`` returns: the slot-0 ids of its text blocks (below
the text vocabulary, not ``q_eos``), up to ``<|im_end|>``, decoded without special tokens; image blocks
carry no text.
"""

from __future__ import annotations

import torch

from kelix_fast.config import LLMConfig
from kelix_fast.text_tokenizer import KelixTextTokenizer


class TextStream:
    """Incremental detokenization: :meth:`push` new groups, get the text they add.

    Decoding ids one at a time is wrong for byte-level tokenizers (a character can span tokens) and
    decoding the whole answer each time is quadratic, so, as vLLM does, each push decodes a window:
    from ``prefix`` (the ids before the last emitted delta's ids, giving the tokenizer its context) to
    the end, and emits what it adds to the window's already emitted part. A delta ending in U+FFFD
    (a character not complete yet) is held back until more ids arrive or :meth:`finish`. The deltas
    join to the decode of the whole answer.
    """

    def __init__(self, tokenizer: KelixTextTokenizer, llm: LLMConfig) -> None:
        self.tokenizer, self.llm = tokenizer, llm
        self.ids: list[int] = []
        self.ended = False  # <|im_end|> seen: later ids are not part of the answer
        self._prefix = 0  # window start
        self._read = 0  # ids before this are emitted

    def push(self, groups: torch.Tensor) -> str:
        """groups [n, G+1] int64, the request's new groups -> the text they add ("" for none yet)."""
        for token in groups[:, 0].tolist():
            if self.ended:
                break
            if token == self.llm.eos_token_id:
                self.ended = True
            elif token < self.llm.vocab_size and token != self.llm.q_eos_token:
                self.ids.append(token)
        return self._delta(final=False)

    def finish(self) -> str:
        """The text held back at the end of the answer (an incomplete character decodes as U+FFFD)."""
        return self._delta(final=True)

    def _delta(self, *, final: bool) -> str:
        if self._read == len(self.ids):
            return ""
        decode = self.tokenizer.decode
        emitted = decode(self.ids[self._prefix : self._read], skip_special_tokens=True)
        window = decode(self.ids[self._prefix :], skip_special_tokens=True)
        if not final and (len(window) <= len(emitted) or window.endswith("\ufffd")):
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        return window[len(emitted) :]
