"""LoRA tags in a prompt (`<lora:NAME:WEIGHT>`, AUTOMATIC1111's convention) and trigger words.

A tag adds that LoRA to the request's stack and is removed from the prompt text. As in
AUTOMATIC1111, `<lora:NAME:W>` sets both strengths, `<lora:NAME:TE:UNET>` sets the text-encoder
strength then the model strength, and the named forms `te=` and `unet=` work in any order.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from deployments.errors import InvalidRequest
from deployments.loras.store import LORA_SUFFIX

MIN_STRENGTH = 0.0
MAX_STRENGTH = 2.0
_TAG = re.compile(r"<lora:([^<>]*)>", re.IGNORECASE)
# What removing a tag leaves behind: a separator with nothing before it ("a, , b", ", b").
_EMPTY_SEPARATOR = re.compile(r"(^|,)\s*(?:,\s*)+")


@dataclass(frozen=True)
class LoraTag:
    text: str
    """The tag as written, for error messages."""
    name: str
    strength: float
    clip_strength: float

    def file_names(self) -> list[str]:
        """The store names the tag may mean, in order: NAME.safetensors (sub-folders allowed),
        then the character LoRA character-NAME.safetensors."""
        if self.name.endswith(LORA_SUFFIX):
            return [self.name]
        names = [self.name + LORA_SUFFIX]
        if "/" not in self.name:
            names.append(f"character-{self.name}{LORA_SUFFIX}")
        return names


def extract_lora_tags(prompt: str) -> tuple[str, list[LoraTag]]:
    """(the prompt without its LoRA tags, the tags in order); InvalidRequest naming `prompt` for
    a malformed tag or a prompt that is empty once its tags are gone. A prompt with tags has
    the separators and spaces they leave behind tidied (runs of spaces become one)."""
    tags = [_parse_tag(match.group(0), match.group(1)) for match in _TAG.finditer(prompt)]
    if not tags:
        return prompt, []
    text = _TAG.sub(" ", prompt)
    text = _EMPTY_SEPARATOR.sub(lambda m: m.group(1) + " " if m.group(1) else "", text)
    text = re.sub(r"\s+,", ",", text)
    text = re.sub(r"[ \t]*\n[ \t]*", "\n", text)
    text = re.sub(r"[ \t]{2,}", " ", text).strip(" \t\n,")
    if not text:
        raise InvalidRequest("prompt: nothing is left once its <lora:...> tags are removed")
    return text, tags


def _parse_tag(text: str, body: str) -> LoraTag:
    name, *params = (part.strip() for part in body.split(":"))
    if not name:
        raise InvalidRequest(f"prompt: {text}: the tag names no LoRA")
    named = {}
    positional = []
    for param in params:
        key, sep, value = param.partition("=")
        if sep:
            if key.strip().lower() not in ("te", "unet"):
                raise InvalidRequest(f"prompt: {text}: unknown parameter {key!r} (te= or unet=)")
            named[key.strip().lower()] = _strength(text, value)
        else:
            positional.append(_strength(text, param))
    if len(positional) > 2:
        raise InvalidRequest(f"prompt: {text}: at most two weights (<lora:NAME:TE:UNET>)")
    clip = named.get("te", positional[0] if positional else 1.0)
    model = named.get("unet", positional[1] if len(positional) > 1 else clip)
    return LoraTag(text=text, name=name, strength=model, clip_strength=clip)


def _strength(text: str, value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise InvalidRequest(f"prompt: {text}: weight {value.strip()!r} is not a number") from None
    if not MIN_STRENGTH <= number <= MAX_STRENGTH:
        raise InvalidRequest(
            f"prompt: {text}: weight {number} is outside {MIN_STRENGTH}-{MAX_STRENGTH}"
        )
    return number


def prompt_with_triggers(prompt: str, words: list[str | None]) -> str:
    """The prompt with trigger words prepended in order: blanks, repeats and words the prompt
    already holds are left out."""
    stripped = [w.strip() for w in words if w and w.strip()]
    new = [w for w in dict.fromkeys(stripped) if w not in prompt]
    return ", ".join([*new, prompt])
