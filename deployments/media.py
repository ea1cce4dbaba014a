"""Media in and out: PNG / JPEG / animated WebP encoding, and decoding input images."""

from __future__ import annotations

import base64
import binascii
import io
import struct

from PIL import Image, PngImagePlugin, UnidentifiedImageError

from deployments.errors import InvalidRequest, TooLarge
from deployments.schemas import MAX_SIDE_PX, MIN_SIDE_PX

JPEG_QUALITY = 95
WEBP_QUALITY = 90
MAX_INPUT_SIDE_PX = 4096
# An edit input's longer side over its shorter: at most what the output box can keep, so its
# output has the input's aspect ratio (deployments/job_sizes.py fits it into the box).
MAX_INPUT_ASPECT_RATIO = MAX_SIDE_PX // MIN_SIDE_PX
MAX_IMAGE_PIXELS = 4096 * 4096
"""The most pixels of an edit input: 64 MiB as RGBA. A compressed image can declare far more
than its bytes hold (a 30000x30000 PNG of one colour is a few hundred kilobytes), so its
header's size is checked before decoding."""
MAX_DATASET_IMAGE_PIXELS = 8192 * 8192
"""The most pixels of a dataset or training image: a 48 MP phone photo fits, 256 MiB as RGBA."""
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
"""The formats decoded: PIL's other plugins (EPS runs Ghostscript, and the rarer ones are
where its decoder bugs were) are never tried on a client's bytes."""

# PIL's own limits, set rather than left to its defaults, back the check above up for every
# decode in the process (a pipeline's, a training worker's): PIL warns past its limit and
# refuses twice as many at open. PNG text chunks are decompressed too, so they get a budget of
# their own; loraplex reads none of them.
Image.MAX_IMAGE_PIXELS = MAX_DATASET_IMAGE_PIXELS
PngImagePlugin.MAX_TEXT_CHUNK = 1024 * 1024
PngImagePlugin.MAX_TEXT_MEMORY = 4 * 1024 * 1024
# What PIL's plugins raise for bytes that are not a whole image of their format: a header
# they refuse, a chunk that fails its CRC, a truncated or corrupt compressed stream.
_UNREADABLE = (
    UnidentifiedImageError,
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    IndexError,
    struct.error,
)


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


def load_image(data: bytes, field: str, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """`data` decoded in full (every pixel read, so a corrupt stream fails here, not in a
    replica or a training worker). InvalidRequest naming `field` for bytes that are not an
    image of IMAGE_FORMATS, TooLarge for one of over `max_pixels` (refused from its header)."""
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as image:
            image.verify()  # chunk CRCs; verify leaves the image unusable, so it is reopened
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        # PIL's refusal names its own limit (twice this one): this one is the user's.
        raise TooLarge(f"{field}: the image is over the limit of {max_pixels} pixels") from e
    except UnidentifiedImageError as e:  # its message shows a BytesIO's repr, no reason
        raise InvalidRequest(
            f"{field}: unreadable image (not a {', '.join(IMAGE_FORMATS)} file)"
        ) from e
    except _UNREADABLE as e:
        raise InvalidRequest(f"{field}: unreadable image ({e})") from e
    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise TooLarge(
            f"{field}: {width}x{height} is {width * height} pixels, over the limit of {max_pixels}"
        )
    try:
        image.load()
    except _UNREADABLE as e:
        image.close()
        raise InvalidRequest(f"{field}: unreadable image ({e})") from e
    return image


def decode_input_image(value: str, field: str = "image") -> bytes:
    """The bytes of a base64 or data-URI input image, decoded in full here (in the ingress) so
    a replica only ever gets an image it can open; errors name the field."""
    if value.startswith("data:"):
        header, _, value = value.partition(",")
        if ";base64" not in header:
            raise InvalidRequest(f"{field}: a data URI must be base64 (data:image/png;base64,...)")
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as e:
        raise InvalidRequest(f"{field}: not valid base64 ({e})") from e
    with load_image(data, field) as image:
        width, height = image.size
    if max(width, height) > MAX_INPUT_SIDE_PX:
        raise TooLarge(f"{field}: {width}x{height} is over {MAX_INPUT_SIDE_PX} pixels a side")
    if max(width, height) > MAX_INPUT_ASPECT_RATIO * min(width, height):
        raise InvalidRequest(
            f"{field}: {width}x{height} is longer than {MAX_INPUT_ASPECT_RATIO}:1; crop it "
            f"(the output keeps the input's aspect ratio within {MIN_SIDE_PX}-{MAX_SIDE_PX} "
            "pixels a side)"
        )
    return data


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) of an encoded image, from its header alone."""
    with Image.open(io.BytesIO(data)) as image:
        return image.size


def open_image(data: bytes) -> Image.Image:
    """An RGB image from bytes already checked by `decode_input_image`."""
    return Image.open(io.BytesIO(data)).convert("RGB")
