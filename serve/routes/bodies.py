"""Request bodies read within their limit: raw, JSON, or multipart parts.

The ingress's middleware refuses a body whose declared length is over the limit; a chunked body
declares none, so every body is read as a stream, counted as it arrives and refused at the
first chunk past the limit: the ingress never holds more than the limit of it.
"""

from __future__ import annotations

import asyncio
import json

from fastapi import Request
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from deployments.errors import InvalidRequest, TooLarge
from serve.json_bounds import check_json_bounds


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The raw body, refused as soon as it passes `max_bytes`."""
    body = bytearray()
    async for chunk in request.stream():
        if len(body) + len(chunk) > max_bytes:
            raise TooLarge(f"body: over the limit of {max_bytes} bytes")
        body += chunk
    return bytes(body)


async def read_json(request: Request, max_bytes: int) -> object:
    body = await read_body(request, max_bytes)
    # Off the event loop: a body of tens of megabytes (an edit image) takes a good part of a
    # second to check and parse, which every other request would wait for.
    return await asyncio.to_thread(parse_json, body)


def parse_json(body: bytes) -> object:
    """A UTF-8 JSON body within serve/json_bounds.py's bounds (depth, integer digits, no NaN or
    lone surrogates), so the parser never meets what it fails on with a RecursionError or a
    bare ValueError, nor returns what no field can use."""
    try:
        # UTF-8 only, as RFC 8259 asks: json.loads would also take UTF-16 and UTF-32 bytes,
        # whose digits and brackets the byte-level bounds check does not see.
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidRequest(f"body: not UTF-8 ({e})") from e
    check_json_bounds(body)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise InvalidRequest(f"body: not valid JSON ({e})") from e


async def form_parts(
    request: Request, body: bytes, max_parts: int
) -> list[tuple[str, str | None, bytes]]:
    """A multipart body (already read within the limit) as (field, file name or None, bytes);
    at most `max_parts` files and as many plain fields."""

    async def stream():
        yield body

    parser = MultiPartParser(request.headers, stream(), max_files=max_parts, max_fields=max_parts)
    try:
        form = await parser.parse()
    except MultiPartException as e:
        raise InvalidRequest(f"body: not valid multipart ({e.message})") from e
    parts = []
    for field, value in form.multi_items():
        if isinstance(value, UploadFile):
            parts.append((field, value.filename or field, await value.read()))
        else:
            parts.append((field, None, value.encode()))
    await form.close()
    return parts
