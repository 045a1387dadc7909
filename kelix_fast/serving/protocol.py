"""The OpenAI-compatible wire format: request and response models, and the server's documented limits.

Requests are validated strictly (``extra="forbid"``, no type coercion), so an unknown field or a wrong
type is a 400 naming the field, never silently ignored. Kelix extensions are marked as such.
"""

from __future__ import annotations

import re
import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# Limits (README "Serving"). A body is refused before it is parsed; images are counted per request.
MAX_BODY_BYTES = 20 * 2**20
MAX_IMAGES_PER_REQUEST = 8
MAX_IMAGE_PIXELS = (
    4096 * 4096
)  # of one decoded input image, checked from its header before decoding
MAX_IMAGES_N = 4  # images per /v1/images/generations request
MAX_INFERENCE_STEPS = 100
DEFAULT_MAX_TOKENS = 256  # blocks, when the request names none (cut to what the context leaves)
SEED_LIMIT = 2**31  # the engine's seed range [0, 2^31)

_SIZE = re.compile(r"^([1-9][0-9]*)x([1-9][0-9]*)$")


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


# ------------------------------------------------------------------ chat completions


class ImageURL(_Request):
    url: str  # a data: URI (base64 PNG or JPEG); remote URLs are refused
    detail: Literal["auto", "low", "high"] | None = None  # accepted for compatibility, not used


class ContentPart(_Request):
    """One part of a message: ``{"type": "text", "text": ...}`` or ``{"type": "image_url", ...}``.

    One model with a type check rather than a tagged union, so that a validation error's location is
    the request's own path (``messages[0].content[1].text``), not pydantic's union member names.
    """

    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURL | None = None

    @model_validator(mode="after")
    def _one_payload(self) -> ContentPart:
        if (self.text is not None, self.image_url is not None) != (
            self.type == "text",
            self.type == "image_url",
        ):
            raise ValueError(f"a {self.type!r} part must carry the field {self.type!r} only")
        return self


class ChatMessage(_Request):
    role: Literal["system", "user", "assistant"]
    content: str | list[ContentPart]


class StreamOptions(_Request):
    include_usage: bool = False


class ChatCompletionRequest(_Request):
    """``max_tokens`` (or ``max_completion_tokens``) counts new *blocks*: a text block is one token,
    an image block is 8 visual codes. ``temperature`` 0 is greedy; ``top_k`` is an extension (0: off)."""

    messages: list[ChatMessage] = Field(min_length=1)
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: int = Field(0, ge=0)
    seed: int | None = Field(None, ge=0, lt=SEED_LIMIT)
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError(f"only n = 1 is supported, got {n}")
        return n

    @property
    def max_blocks(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatMessageOut
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class Usage(BaseModel):
    prompt_tokens: int  # prompt positions (an image counts one per merged patch)
    completion_tokens: int  # new blocks
    total_tokens: int


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage


def _absent_if_none(value: object) -> bool:
    return value is None


class ChunkDelta(BaseModel):
    role: Literal["assistant"] | None = Field(None, exclude_if=_absent_if_none)
    content: str | None = Field(None, exclude_if=_absent_if_none)


class ChunkChoice(BaseModel):
    index: int = 0
    delta: ChunkDelta
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = Field(None, exclude_if=_absent_if_none)  # the last chunk's, if asked


# ------------------------------------------------------------------ images


class ImageGenerationRequest(_Request):
    """``size`` is ``"<side>x<side>"``, checked against the loaded DiT's sizes by the route;
    ``guidance_scale`` and ``num_inference_steps`` are extensions (the official demo: 1.0, 50).
    Image i of a request is drawn from noise seed ``seed + i``."""

    prompt: str = Field(min_length=1)
    model: str | None = None
    n: int = Field(1, ge=1, le=MAX_IMAGES_N)
    size: str | None = None
    response_format: str = "b64_json"
    seed: int | None = Field(None, ge=0, lt=SEED_LIMIT)
    guidance_scale: float = Field(1.0, ge=0.0, allow_inf_nan=False)
    num_inference_steps: int = Field(50, ge=1, le=MAX_INFERENCE_STEPS)

    @field_validator("response_format")
    @classmethod
    def _inline_only(cls, value: str) -> str:
        if value != "b64_json":
            raise ValueError(
                f"only response_format 'b64_json' is supported (the server stores no images to "
                f"link to), got {value!r}"
            )
        return value

    def side(self, allowed: list[int]) -> int:
        """The requested square side in pixels, one of ``allowed`` (default: the largest).

        Raises ValueError naming the allowed sizes.
        """
        if self.size is None:
            return allowed[-1]
        match = _SIZE.match(self.size)
        if match is None or match[1] != match[2] or int(match[1]) not in allowed:
            sizes = ", ".join(f"{s}x{s}" for s in allowed)
            raise ValueError(f"size must be one of {sizes}, got {self.size!r}")
        return int(match[1])


class ImageData(BaseModel):
    b64_json: str  # a PNG


class ImagesResponse(BaseModel):
    created: int = Field(default_factory=lambda: int(time.time()))
    data: list[ImageData]


# ------------------------------------------------------------------ models


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "kelix_fast"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
