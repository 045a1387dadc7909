"""Images on the wire: decoding a ``data:`` URI (base64 PNG or JPEG) into a PIL image with limits, and
encoding generated pixels as a base64 PNG."""

from __future__ import annotations

import base64
import binascii
import io
import re
import struct
import warnings
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from PIL import Image

_DATA_URI = re.compile(r"data:image/(?:png|jpeg|jpg);base64,", re.IGNORECASE)


class InvalidImage(ValueError):
    """An image the client sent cannot be used; the message says why."""


def decode_data_uri(url: str, *, max_pixels: int) -> Image.Image:
    """A ``data:image/png;base64,...`` (or ``image/jpeg``) URI -> an RGB PIL image.

    The size is read from the header and checked against ``max_pixels`` before the pixels are
    decoded, so a small file cannot expand into a huge image. The server fetches nothing: any other
    URL is refused.

    Raises:
        InvalidImage: not a data URI of a PNG/JPEG, bad base64, unreadable or truncated data, an
            image larger than ``max_pixels``.
    """
    from PIL import Image

    match = _DATA_URI.match(url)
    if match is None:
        if url.startswith(("http://", "https://")):
            raise InvalidImage(
                "remote image URLs are not supported (the server fetches nothing); send the image "
                "inline as a data URI: data:image/png;base64,... or data:image/jpeg;base64,..."
            )
        raise InvalidImage(
            "an image URL must be a data URI of a PNG or JPEG: data:image/png;base64,... or "
            f"data:image/jpeg;base64,..., got one starting {url[:32]!r}"
        )
    try:
        data = base64.b64decode(url[match.end() :], validate=True)
    except binascii.Error as error:
        raise InvalidImage(f"the image data is not valid base64: {error}") from None
    try:
        with warnings.catch_warnings():
            # PIL's own decompression-bomb guard warns far above our limit; ours applies first.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=("PNG", "JPEG"))
            if image.width * image.height > max_pixels:
                raise InvalidImage(
                    f"the image has {image.width} x {image.height} pixels, more than the limit "
                    f"of {max_pixels}"
                )
            image.load()
    except InvalidImage:
        raise
    # Untrusted bytes: PIL reports unknown formats and corrupt or truncated data through all of these.
    except (
        OSError,
        SyntaxError,
        EOFError,
        ValueError,
        struct.error,
        Image.DecompressionBombError,
    ) as error:
        raise InvalidImage(f"the image data is not a readable PNG or JPEG: {error}") from None
    return image if image.mode == "RGB" else image.convert("RGB")


def encode_png(pixels: torch.Tensor) -> str:
    """pixels [H, W, 3] uint8 (any device) -> the base64 text of a PNG."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels.cpu().numpy()).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")
