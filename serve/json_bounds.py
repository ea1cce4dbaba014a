"""JSON bodies checked on their raw bytes before they are parsed.

Python's parser fails on some valid-looking bodies with errors no client can act on: nesting a
few thousand deep is a RecursionError, and an integer over 4300 digits is Python's int-string
conversion limit (a ValueError that is no JSONDecodeError). Both are refused here first, as
InvalidRequest naming the field, and so are what pydantic would let through to code that
cannot handle it: NaN and Infinity (not JSON at all, but Python's parser accepts them) and
lone UTF-16 surrogates (`"\\ud800"`), which parse into a str no file system or tokenizer takes.
A body of very many tiny items (4 MB of `[],[],...` is over a million) is refused too, as
TooLarge: checking, parsing and validating each item costs far more than its bytes suggest.

One pass over the body finds the brackets, commas, strings and number literals: a regular
expression finds the next token, and a string's closing quote is found with bytes.find, so a
large base64 value costs a memchr, and only the tokens are looked at in Python. A body nested
too deep stops the pass at the first bracket past the limit.
"""

from __future__ import annotations

import json
import re

from deployments.errors import InvalidRequest, TooLarge

MAX_JSON_DEPTH = 32  # the deepest valid body (loras.0.block_weights.<group>.0) is 5 deep
MAX_INTEGER_DIGITS = 32  # the largest valid integer (a seed, 2**63 - 1) has 19 digits
# Array elements and object members, counted as commas and containers: the largest valid body
# (a JSON dataset of 10,000 images, three fields each) has about 40,000.
MAX_JSON_ITEMS = 50_000
MAX_KEY_CHARS_SHOWN = 64

_TOKENS = re.compile(
    rb'[\[\]{},"]'  # a quote opens a string, whose end _string_end finds
    rb"|-?[0-9]+(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?"
    rb"|NaN|-?Infinity"
)
_HIGH_SURROGATE = re.compile(r"[\ud800-\udbff](?![\udc00-\udfff])")
_LOW_SURROGATE = re.compile(r"(?<![\ud800-\udbff])[\udc00-\udfff]")


def check_json_bounds(
    body: bytes,
    max_depth: int = MAX_JSON_DEPTH,
    max_digits: int = MAX_INTEGER_DIGITS,
    max_items: int = MAX_JSON_ITEMS,
) -> None:
    """InvalidRequest naming the field for a body nested over `max_depth`, an integer of over
    `max_digits` digits, NaN or Infinity, or a string holding a lone surrogate; TooLarge for
    one of over `max_items` items. A body that is not JSON at all passes: the parser reports
    it."""
    path: list[str | int] = []  # the key or index of the current item of each open container
    in_object: list[bool] = []
    expect_key = False
    position = 0
    items = 0
    while match := _TOKENS.search(body, position):
        start, end = match.span()
        first = body[start : start + 1]
        if first == b'"':
            end = _string_end(body, start)
        position = end
        if first in (b"{", b"[", b","):
            items += 1
            if items > max_items:
                top = _field(path[:1]) if path and in_object[0] else "body"
                raise TooLarge(f"{top}: more than {max_items} JSON items (elements and members)")
        if first in (b"{", b"["):
            if len(path) >= max_depth:
                top = _field(path[:1]) if in_object[0] else "body"
                raise InvalidRequest(f"{top}: nested deeper than {max_depth} levels")
            path.append("" if first == b"{" else 0)
            in_object.append(first == b"{")
            expect_key = first == b"{"
        elif first in (b"}", b"]"):
            if not path:
                return  # unbalanced: not JSON, which the parser says
            path.pop()
            in_object.pop()
            expect_key = False
        elif first == b",":
            if path and in_object[-1]:
                expect_key = True
            elif path:
                path[-1] = int(path[-1]) + 1
        elif first == b'"':
            # Only keys and strings with \u escapes are decoded: a value such as a base64
            # image is passed over at the speed of bytes.find.
            escaped = body.find(b"\\u", start, end) != -1
            text = _string(body[start:end]) if expect_key or escaped else ""
            if expect_key:
                path[-1] = _shown(text)
                expect_key = False
            if escaped and _has_lone_surrogate(text):
                raise InvalidRequest(
                    f"{_field(path)}: a lone UTF-16 surrogate (\\uD800-\\uDFFF) is not text"
                )
        elif first in (b"N", b"I") or body[start : start + 2] == b"-I":
            raise InvalidRequest(f"{_field(path)}: {match.group().decode()} is not a JSON number")
        else:
            _check_number(match.group(), path, max_digits)


def _check_number(token: bytes, path: list[str | int], max_digits: int) -> None:
    is_integer = not any(mark in token for mark in (b".", b"e", b"E"))
    digits = len(token.lstrip(b"-"))
    if is_integer and digits > max_digits:
        raise InvalidRequest(
            f"{_field(path)}: an integer of {digits} digits is out of range "
            f"(at most {max_digits} digits)"
        )


def _string_end(body: bytes, start: int) -> int:
    """Just past the quote that closes the string opened at `start` (the body's end if none):
    the first quote after an even number of backslashes."""
    position = start + 1
    while (quote := body.find(b'"', position)) != -1:
        backslashes = quote - len(body[position:quote].rstrip(b"\\")) - position
        if backslashes % 2 == 0:
            return quote + 1
        position = quote + 1
    return len(body)


def _string(token: bytes) -> str:
    """The text of a string token; its escapes decoded where they are valid JSON."""
    try:
        return json.loads(token)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return token[1:-1].decode("utf-8", "replace")  # the parser reports it


def _has_lone_surrogate(text: str) -> bool:
    return bool(_HIGH_SURROGATE.search(text) or _LOW_SURROGATE.search(text))


def _shown(key: str) -> str:
    """A key as an error message may show it: cut, and encodable whatever it holds."""
    return key[:MAX_KEY_CHARS_SHOWN].encode("utf-8", "replace").decode("utf-8")


def _field(path: list[str | int]) -> str:
    return ".".join(str(part) for part in path) or "body"
