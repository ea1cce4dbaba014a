"""Media in and out: PNG / JPEG / animated WebP encoding, and decoding input images."""

from __future__ import annotations

import base64
import binascii
import io

from PIL import Image, UnidentifiedImageError

from deployments.errors import InvalidRequest, TooLarge

JPEG_QUALITY = 95
WEBP_QUALITY = 90
MAX_INPUT_SIDE_PX = 4096


def encode_image(image: Image.Image, media_type: str) -> bytes:
    """PNG or JPEG bytes of one image; the same image always gives the same bytes."""
    buffer = io.BytesIO()
    if media_type == "image/png":
        image.save(buffer, format="PNG")
    elif media_type == "image/jpeg":
        image.convert("RGB").save(buffer, format="JPEG", quality=JPEG_QUALITY)
    else:
        raise ValueError(f"unsupported image media type {media_type!r}")
    return buffer.getvalue()


def encode_video(frames: list[Image.Image], media_type: str, fps: int) -> bytes:
    """An animated WebP that plays `frames` at `fps`, looping."""
    if media_type != "image/webp":
        raise ValueError(f"unsupported video media type {media_type!r}")
    buffer = io.BytesIO()
    frames[0].save(
        buffer,
        format="WEBP",
        save_all=True,
        append_images=frames[1:],
        duration=round(1000 / fps),
        loop=0,
        quality=WEBP_QUALITY,
    )
    return buffer.getvalue()


def decode_input_image(value: str, field: str = "image") -> bytes:
    """The bytes of a base64 or data-URI image, checked to decode; errors name the field."""
    if value.startswith("data:"):
        header, _, value = value.partition(",")
        if ";base64" not in header:
            raise InvalidRequest(f"{field}: a data URI must be base64 (data:image/png;base64,...)")
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as e:
        raise InvalidRequest(f"{field}: not valid base64 ({e})") from e
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
            width, height = image.size
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise InvalidRequest(f"{field}: not a decodable image ({e})") from e
    if max(width, height) > MAX_INPUT_SIDE_PX:
        raise TooLarge(f"{field}: {width}x{height} is over {MAX_INPUT_SIDE_PX} pixels a side")
    return data


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) of an encoded image, from its header alone."""
    with Image.open(io.BytesIO(data)) as image:
        return image.size


def open_image(data: bytes) -> Image.Image:
    """An RGB image from bytes already checked by `decode_input_image`."""
    return Image.open(io.BytesIO(data)).convert("RGB")
