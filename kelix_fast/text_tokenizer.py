"""Kelix text tokenizer and chat template (kelix-ar.md §2.2, §3.1 "Chat template").

:class:`KelixTextTokenizer` computes token ids from text and text from ids with the Qwen byte-level
BPE tokenizer of a checkpoint (``tokenizer.json``, or ``vocab.json`` + ``merges.txt`` built as HF's
Qwen2 converter does) and renders chat messages to prompt text with the checkpoint's jinja template
or the documented Qwen template. It also escapes the control-token strings of user text so that
they encode as plain text.

Special tokens are looked up by their strings, never by hard-coded ids; the one exception is
``KelixTextTokenizer.tiny()``, the in-code tokenizer of the embedded tiny preset, which places them
at their release ids. jinja2 is imported when a checkpoint's jinja template is first rendered.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeAlias

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from kelix_fast.arguments import check_bool
from kelix_fast.checkpoint_files import checkpoint_dir, read_optional_json

__all__ = [
    "DEFAULT_SYSTEM_PROMPT",
    "ENDOFTEXT_TOKEN",
    "IMAGE_PAD_TOKEN",
    "IM_END_TOKEN",
    "IM_START_TOKEN",
    "VISION_END_TOKEN",
    "VISION_START_TOKEN",
    "KelixTextTokenizer",
    "Message",
]

Message: TypeAlias = Mapping[str, Any]

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# Special token strings of the release (kelix-ar.md §2.2); their ids come from the tokenizer files.
ENDOFTEXT_TOKEN = "<|endoftext|>"
IM_START_TOKEN = "<|im_start|>"
IM_END_TOKEN = "<|im_end|>"
VISION_START_TOKEN = "<|vision_start|>"
VISION_END_TOKEN = "<|vision_end|>"
IMAGE_PAD_TOKEN = "<|image_pad|>"

# The tiny preset's special tokens at their release ids (kelix-ar.md §2.2, presets.py). The release
# string of the end-of-block id 151681 is unknown; the paper's name "<eob>" stands in for it here.
_TINY_SPECIAL_TOKENS = {
    ENDOFTEXT_TOKEN: 151643,
    IM_START_TOKEN: 151644,
    IM_END_TOKEN: 151645,
    VISION_START_TOKEN: 151652,
    VISION_END_TOKEN: 151653,
    IMAGE_PAD_TOKEN: 151655,
    "<|video_pad|>": 151656,
    "<eob>": 151681,
}

# Pre-tokenizer split of Qwen2Tokenizer (what HF's Qwen2 slow -> fast conversion builds).
_QWEN_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_ADDED_TOKEN_FLAGS = ("single_word", "lstrip", "rstrip", "normalized", "special")
# Special-token entries of tokenizer_config.json that HF also passes to the chat template.
_TEMPLATE_TOKEN_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token")


class KelixTextTokenizer:
    """Qwen byte-level BPE tokenizer with the Kelix special tokens and the release chat template.

    Wraps a ``tokenizers.Tokenizer`` (``backend``). The special ids the engine needs are looked up
    by string at construction (``endoftext_id``, ``im_start_id``, ``im_end_id``,
    ``vision_start_id``, ``vision_end_id``, ``image_pad_id``), so a tokenizer lacking one fails
    here, not mid-prompt.

    Args:
        tokenizer: the backend tokenizer; added tokens must already be registered.
        chat_template: jinja source of the release template, or None for the documented Qwen
            template (kelix-ar.md §3.1, "Chat template").
        template_tokens: extra jinja variables, e.g. ``{"eos_token": "<|im_end|>"}``.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        chat_template: str | None = None,
        template_tokens: Mapping[str, str] | None = None,
    ) -> None:
        self.backend = tokenizer
        self.chat_template = chat_template
        self._template_tokens = dict(template_tokens or {})
        self.endoftext_id = self.token_id(ENDOFTEXT_TOKEN)
        self.im_start_id = self.token_id(IM_START_TOKEN)
        self.im_end_id = self.token_id(IM_END_TOKEN)
        self.vision_start_id = self.token_id(VISION_START_TOKEN)
        self.vision_end_id = self.token_id(VISION_END_TOKEN)
        self.image_pad_id = self.token_id(IMAGE_PAD_TOKEN)
        # Control strings user text must not produce: every special added token, plus the Kelix
        # markers even where a checkpoint registers them as non-special.
        control = {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special}
        control |= {
            ENDOFTEXT_TOKEN,
            IM_START_TOKEN,
            IM_END_TOKEN,
            VISION_START_TOKEN,
            VISION_END_TOKEN,
            IMAGE_PAD_TOKEN,
        }
        self.control_tokens = tuple(sorted(control, key=lambda c: (-len(c), c)))
        self._control_re = re.compile("|".join(map(re.escape, self.control_tokens)))
        self._plain: Tokenizer | None = None

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str]) -> KelixTextTokenizer:
        """Load from a checkpoint directory.

        Files: ``tokenizer.json``, or ``vocab.json`` + ``merges.txt`` (built as HF's Qwen2 converter
        does: NFC, Qwen split regex, byte-level); added tokens from ``added_tokens.json`` and
        ``tokenizer_config.json``'s ``added_tokens_decoder`` (their ids are checked); the chat
        template from ``chat_template.jinja``, else ``chat_template.json``, else
        ``tokenizer_config.json``.

        Raises: ValueError (not a directory, no tokenizer files, inconsistent added tokens, a
        missing Kelix special token).
        """
        op = "KelixTextTokenizer.from_pretrained"
        directory = checkpoint_dir(op, path)
        config = read_optional_json(directory / "tokenizer_config.json") or {}
        if (directory / "tokenizer.json").is_file():
            tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        elif (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file():
            tokenizer = _qwen_bpe(directory / "vocab.json", directory / "merges.txt")
        else:
            raise ValueError(
                f"{op}: {directory} must hold tokenizer.json or vocab.json + merges.txt, "
                "found neither"
            )
        for token_id, token in _declared_added_tokens(directory, config):
            tokenizer.add_tokens([token])
            if tokenizer.token_to_id(token.content) != token_id:
                raise ValueError(
                    f"{op}: added token {token.content!r} must get its declared id {token_id}, got "
                    f"{tokenizer.token_to_id(token.content)} (added ids must follow the vocabulary "
                    "without gaps)"
                )
        template_tokens = {
            key: _token_content(config[key]) for key in _TEMPLATE_TOKEN_KEYS if config.get(key)
        }
        return cls(
            tokenizer,
            chat_template=_read_chat_template(directory, config),
            template_tokens=template_tokens,
        )

    @classmethod
    def tiny(cls) -> KelixTextTokenizer:
        """In-code tokenizer of the embedded tiny preset: bytes plus the Kelix special tokens.

        Byte-level BPE without merges: id b (0..255) is the token of byte b, so every string
        round-trips (one token per UTF-8 byte). The special tokens sit at their release ids
        (151643 ... 151681); every id is below the text vocabulary size 151936.
        """
        # Specials live in the model vocabulary so that their ids are kept exactly, also through a
        # tokenizer.json round trip; registering them as special added tokens makes them atomic.
        vocab = {symbol: byte for byte, symbol in enumerate(_byte_symbols())} | _TINY_SPECIAL_TOKENS
        tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        tokenizer.add_special_tokens(list(_TINY_SPECIAL_TOKENS))
        return cls(tokenizer)

    def token_id(self, token: str) -> int:
        """Id of a single vocabulary or added token, e.g. ``token_id("<|im_end|>")``.

        Raises: ValueError when ``token`` is not one token of this tokenizer.
        """
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise ValueError(
                f"token_id: token must be in the tokenizer's vocabulary, got {token!r}"
            )
        return token_id

    def encode(self, text: str, *, allow_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``. Adds nothing.

        ``allow_special_tokens=True`` (this low-level method's default, for templated text): the
        special-token strings in ``text`` map to their ids. False: ``text`` is plain text, its
        control-token strings (:attr:`control_tokens`) are encoded byte by byte like any other text.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode: text must be a str, got {type(text).__name__}")
        check_bool("encode: allow_special_tokens", allow_special_tokens)
        if allow_special_tokens:
            return self.backend.encode(text, add_special_tokens=False).ids
        return self._plain_backend().encode(text, add_special_tokens=False).ids

    def _plain_backend(self) -> Tokenizer:
        """A copy of the backend that encodes control-token strings as plain text."""
        if self._plain is None:
            plain = Tokenizer.from_str(self.backend.to_str())
            plain.add_special_tokens(
                [AddedToken(c, special=True, normalized=False) for c in self.control_tokens]
            )
            plain.encode_special_tokens = True
            self._plain = plain
        return self._plain

    def escape_messages(self, messages: Sequence[Message]) -> tuple[list[Message], dict[str, str]]:
        """Messages whose text has each control-token string replaced by a one-off marker, and the
        marker -> string map: render them, then :meth:`encode_escaped` encodes the user's control
        strings as plain text while the template's own markers stay control tokens."""
        _check_messages(messages)
        nonce = secrets.token_hex(8)
        markers = {c: f"\ue000{nonce}.{i}\ue001" for i, c in enumerate(self.control_tokens)}

        def escape(text: str) -> str:
            return self._control_re.sub(lambda m: markers[m.group(0)], text)

        escaped = []
        for message in messages:
            content = message["content"]
            if isinstance(content, str):
                content = escape(content)
            else:
                content = [
                    {**item, "text": escape(item["text"])} if item["type"] == "text" else item
                    for item in content
                ]
            escaped.append({**message, "content": content})
        return escaped, {marker: c for c, marker in markers.items()}

    def encode_escaped(self, text: str, markers: Mapping[str, str]) -> list[int]:
        """Ids of ``text`` rendered from :meth:`escape_messages`: its control-token strings are
        control tokens, the stretches between them (markers restored) plain text."""
        present = [m for m in markers if m in text]
        if not present:  # no user control string: the ordinary encoding
            return self.encode(text)
        restore = re.compile("|".join(map(re.escape, present)))
        ids: list[int] = []
        start = 0
        for match in [*self._control_re.finditer(text), None]:
            end = len(text) if match is None else match.start()
            if end > start:
                plain = restore.sub(lambda m: markers[m.group(0)], text[start:end])
                ids += self.encode(plain, allow_special_tokens=False)
            if match is not None:
                ids.append(self.token_id(match.group(0)))
                start = match.end()
        return ids

    def decode(
        self, ids: Sequence[int] | torch.Tensor, *, skip_special_tokens: bool = False
    ) -> str:
        """Text of ``ids`` (a sequence of ints or a 1-D integer tensor)."""
        check_bool("decode: skip_special_tokens", skip_special_tokens)
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, messages: Sequence[Message], *, add_generation_prompt: bool = True
    ) -> str:
        """Chat messages -> prompt text, one ``<|image_pad|>`` per image.

        Args:
            messages: ``[{"role": str, "content": str | [{"type": "text", "text": str} |
                {"type": "image", "image": ImageInput, ...}]}]``.
            add_generation_prompt: append ``<|im_start|>assistant\\n``.
        Uses the checkpoint's jinja template when it has one (rendered as HF does: sandboxed,
        trim_blocks, lstrip_blocks), else the documented Qwen template: a default system turn
        unless the first message is one, ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per turn,
        each image written as ``<|vision_start|><|image_pad|><|vision_end|>``.

        Raises: TypeError/ValueError (malformed messages or flag), ImportError (jinja template, no
        jinja2).
        """
        _check_messages(messages)
        check_bool("apply_chat_template: add_generation_prompt", add_generation_prompt)
        if self.chat_template is not None:
            return self._render_jinja(messages, add_generation_prompt)
        image = VISION_START_TOKEN + IMAGE_PAD_TOKEN + VISION_END_TOKEN
        turns = [] if messages[0]["role"] == "system" else [("system", DEFAULT_SYSTEM_PROMPT)]
        for message in messages:
            content = message["content"]
            if not isinstance(content, str):
                content = "".join(
                    image if item["type"] == "image" else item["text"] for item in content
                )
            turns.append((message["role"], content))
        text = "".join(f"{IM_START_TOKEN}{role}\n{body}{IM_END_TOKEN}\n" for role, body in turns)
        return text + (f"{IM_START_TOKEN}assistant\n" if add_generation_prompt else "")

    def _render_jinja(self, messages: Sequence[Message], add_generation_prompt: bool) -> str:
        try:
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError as exc:
            raise ImportError(
                "apply_chat_template: this tokenizer's chat template is a jinja template and "
                "rendering it needs the jinja2 package (pip install jinja2)"
            ) from exc
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.globals["raise_exception"] = _raise_template_error
        # HF's tojson keeps non-ASCII text and does not HTML-escape, unlike jinja's builtin.
        env.filters["tojson"] = lambda value, indent=None: json.dumps(
            value, ensure_ascii=False, indent=indent
        )
        return env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **self._template_tokens
        )


def _byte_symbols() -> list[str]:
    """GPT-2's byte -> symbol table, which the ByteLevel pre-tokenizer applies: printable Latin-1
    bytes stand for themselves, the other 68 bytes for code points 256, 257, ... in byte order."""
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    others = iter(range(256, 512))
    return [chr(byte) if byte in printable else chr(next(others)) for byte in range(256)]


def _raise_template_error(message: str) -> None:
    raise ValueError(f"apply_chat_template: the chat template refused the messages: {message}")


def _check_messages(messages: Sequence[Message]) -> None:
    op = "apply_chat_template"
    if isinstance(messages, (str, Mapping)) or not isinstance(messages, Sequence):
        raise TypeError(f"{op}: messages must be a list of dicts, got {type(messages).__name__}")
    if not messages:
        raise ValueError(f"{op}: messages must be non-empty, got []")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise TypeError(
                f"{op}: messages[{i}] must be a dict with a str 'role', got {message!r}"
            )
        content = message.get("content")
        if isinstance(content, str):
            continue
        if not isinstance(content, Sequence):
            raise TypeError(
                f"{op}: messages[{i}]['content'] must be a str or a list of parts, "
                f"got {type(content).__name__}"
            )
        for j, item in enumerate(content):
            where = f"messages[{i}]['content'][{j}]"
            kind = item.get("type") if isinstance(item, Mapping) else None
            if kind == "text" and isinstance(item.get("text"), str):
                continue
            if kind == "image" and "image" in item:
                continue
            raise ValueError(
                f"{op}: {where} must be {{'type': 'text', 'text': str}} or "
                f"{{'type': 'image', 'image': ...}}, got {item!r}"
            )


def _qwen_bpe(vocab: Path, merges: Path) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN_PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _declared_added_tokens(
    directory: Path, config: Mapping[str, Any]
) -> list[tuple[int, AddedToken]]:
    """(id, token) pairs from added_tokens.json and tokenizer_config.json, sorted by id."""
    specials_map = read_optional_json(directory / "special_tokens_map.json") or {}
    special_strings = {
        _token_content(value)
        for source in (specials_map, config)
        for key, value in source.items()
        if key in _TEMPLATE_TOKEN_KEYS and value
    }
    special_strings |= {
        _token_content(value)
        for source in (specials_map, config)
        for value in source.get("additional_special_tokens") or ()
    }
    declared: dict[str, tuple[int, AddedToken]] = {}
    for content, token_id in (read_optional_json(directory / "added_tokens.json") or {}).items():
        special = content in special_strings
        declared[content] = (token_id, AddedToken(content, special=special, normalized=not special))
    for key, entry in (config.get("added_tokens_decoder") or {}).items():
        content = entry["content"]
        if content in declared and declared[content][0] != int(key):
            raise ValueError(
                f"KelixTextTokenizer.from_pretrained: added token {content!r} must have one id, "
                f"got {declared[content][0]} in added_tokens.json and {key} in "
                "tokenizer_config.json"
            )
        flags = {flag: bool(entry[flag]) for flag in _ADDED_TOKEN_FLAGS if flag in entry}
        declared[content] = (int(key), AddedToken(content, **flags))
    return sorted(declared.values(), key=lambda pair: pair[0])


def _token_content(value: str | Mapping[str, Any]) -> str:
    # tokenizer_config.json writes a special token as a string or as a serialised AddedToken.
    return value if isinstance(value, str) else value["content"]


def _read_chat_template(directory: Path, config: Mapping[str, Any]) -> str | None:
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    # Multimodal processors save their template to chat_template.json.
    processor = read_optional_json(directory / "chat_template.json") or {}
    template = processor.get("chat_template", config.get("chat_template"))
    if isinstance(template, list):  # HF's named form: [{"name": ..., "template": ...}]
        template = {entry["name"]: entry["template"] for entry in template}.get("default")
    return template
