"""Encoding generated media into response bytes."""

from __future__ import annotations

import io

from PIL import Image

JPEG_QUALITY = 95


def encode_image(image: Image.Image, media_type: str) -> bytes:
    """PNG or JPEG bytes of one image; the same image always gives the same bytes."""
    buffer = io.BytesIO()
    if media_type == "image/png":
        image.save(buffer, format="PNG")
    elif media_type == "image/jpeg":
        image.convert("RGB").save(buffer, format="JPEG", quality=JPEG_QUALITY)
    else:
        raise ValueError(f"unsupported media type {media_type!r}")
    return buffer.getvalue()
