"""The safetensors metadata loraplex acts on, as typed fields.

Metadata is text anyone can write: a client's upload `metadata`, or the header of a file dropped
into the root. Each value loraplex reads (the file's own family, its trigger words, its alpha,
and the peft LoraConfig that diffusers' `save_lora_weights` writes as `lora_adapter_metadata`)
is checked here, where it is read, so a bad value is a refusal naming its key, never an
exception while listing or loading. Keys loraplex does not read stay free text.

peft takes the keys of `alpha_pattern` / `rank_pattern` as regular expressions
(`re.match(rf"(.*\\.)?({key})$", module)`), but what diffusers and peft write there are module
names (`transformer_blocks.0.attn.to_q`, from `get_peft_kwargs`). loraplex accepts only those
and matches them as names, the module or a dotted suffix of it (a leading `^`: the module
only), with `.` taken literally: a regular expression from a file never runs.
"""

from __future__ import annotations

import json
import re
from typing import Annotated

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
)

from deployments.errors import LoraIncompatible
from deployments.family import FamilyName

LORA_ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # as diffusers' lora_base names it
TRIGGER_METADATA_KEYS = (
    "trigger_word",
    "trigger_words",
    "ss_trigger_words",
    "modelspec.trigger_phrase",
)
MAX_RANK = 8192  # past any real LoRA (a full-rank Flux layer is 3072)
MAX_ALPHA = 65504.0  # the largest float16; a larger scale overflows a half-precision layer
MAX_PATTERNS = 10_000  # diffusers writes one per module whose rank or alpha is not the usual one
MAX_PATTERN_CHARS = 256
MAX_TRIGGER_WORDS = 100
MAX_TRIGGER_WORD_CHARS = 1000
_NAME_PART = re.compile(r"[A-Za-z0-9_]+")


def _module_pattern(pattern: str) -> str:
    """A peft pattern that is a module name; ValueError for anything else."""
    if len(pattern) > MAX_PATTERN_CHARS:
        raise ValueError(f"a pattern of {len(pattern)} characters (at most {MAX_PATTERN_CHARS})")
    name = pattern.removeprefix("^").removesuffix("$").replace("\\.", ".")
    if not all(_NAME_PART.fullmatch(part) for part in name.split(".")):
        raise ValueError(
            f"{pattern[:60]!r} is not a module name (letters, digits, '_' and '.' only, as "
            "diffusers and peft write them); loraplex runs no regular expression from a file"
        )
    return pattern


def _trigger_list(value: object) -> object:
    """kohya and modelspec write one comma-separated string, loraplex a JSON list."""
    if not isinstance(value, str):
        return value
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = value
    if isinstance(parsed, list):
        return [str(word).strip() for word in parsed if str(word).strip()]
    text = parsed if isinstance(parsed, str) else value
    return [word for word in re.split(r"\s*,\s*", text.strip()) if word]


def _optional(value: object) -> object:
    return None if value in ("", "None", "null") else value


def _kohya_alpha(value: object) -> object:
    """kohya's `ss_network_alpha` is informational and may be any text (`None`, `Dynamic`):
    only a number is read, and then it must be a sane one."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _adapter_configs(value: object) -> object:
    """diffusers' flat `{"transformer.r": 4, "transformer.lora_alpha": 8, ...}` by component."""
    if not isinstance(value, str):
        return value
    try:
        flat = json.loads(value)
    except json.JSONDecodeError as e:
        raise ValueError(f"not JSON ({e.msg})") from e
    if not isinstance(flat, dict):
        raise ValueError("not a JSON object")
    configs: dict[str, dict] = {}
    for key, item in flat.items():
        component, _, field = key.partition(".")
        if field:
            configs.setdefault(component, {})[field] = item
    return configs


Rank = Annotated[int, Field(ge=1, le=MAX_RANK)]
Alpha = Annotated[float, Field(ge=0, le=MAX_ALPHA, allow_inf_nan=False)]
PatternKey = Annotated[str, AfterValidator(_module_pattern)]
TriggerWords = Annotated[
    list[Annotated[str, Field(max_length=MAX_TRIGGER_WORD_CHARS)]],
    BeforeValidator(_trigger_list),
    Field(max_length=MAX_TRIGGER_WORDS),
]


class _NameTable:
    """peft's pattern lookup as dictionary lookups: the first pattern (in file order) that is
    the module's name or a dotted suffix of it, in time linear in the name."""

    def __init__(self, patterns: dict[str, object]):
        self._suffixes: dict[str, tuple[int, object]] = {}
        self._whole: dict[str, tuple[int, object]] = {}
        for index, (pattern, value) in enumerate(patterns.items()):
            name = pattern.removeprefix("^").removesuffix("$").replace("\\.", ".")
            table = self._whole if pattern.startswith("^") else self._suffixes
            table.setdefault(name, (index, value))

    def get(self, module: str, default):
        parts = module.split(".")
        found = [self._suffixes.get(".".join(parts[i:])) for i in range(len(parts))]
        found = [hit for hit in found + [self._whole.get(module)] if hit is not None]
        return min(found, key=lambda hit: hit[0])[1] if found else default


class AdapterConfig(BaseModel):
    """The fields of one component's peft LoraConfig that scale its layers."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    r: Rank | None = None
    lora_alpha: Alpha | None = None
    alpha_pattern: Annotated[dict[PatternKey, Alpha], Field(max_length=MAX_PATTERNS)] = {}
    rank_pattern: Annotated[dict[PatternKey, Rank], Field(max_length=MAX_PATTERNS)] = {}
    use_rslora: bool = False
    _alphas: _NameTable = PrivateAttr()
    _ranks: _NameTable = PrivateAttr()

    def model_post_init(self, context) -> None:
        self._alphas = _NameTable(self.alpha_pattern)
        self._ranks = _NameTable(self.rank_pattern)

    def alpha_for(self, module: str) -> float | None:
        return self._alphas.get(module, self.lora_alpha)

    def rank_pattern_for(self, module: str) -> int | None:
        return self._ranks.get(module, None)


class LoraMetadata(BaseModel):
    """What loraplex reads from a file's metadata, each field under its metadata key."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    family: Annotated[FamilyName | None, BeforeValidator(_optional)] = Field(
        None, alias="loraplex.family"
    )
    trigger_word: TriggerWords = Field([], alias="trigger_word")
    trigger_words_list: TriggerWords = Field([], alias="trigger_words")
    ss_trigger_words: TriggerWords = Field([], alias="ss_trigger_words")
    trigger_phrase: TriggerWords = Field([], alias="modelspec.trigger_phrase")
    lora_alpha: Annotated[Alpha | None, BeforeValidator(_optional)] = Field(
        None, alias="lora_alpha"
    )
    ss_network_alpha: Annotated[Alpha | None, BeforeValidator(_kohya_alpha)] = Field(
        None, alias="ss_network_alpha"
    )
    adapters: Annotated[dict[str, AdapterConfig], BeforeValidator(_adapter_configs)] = Field(
        {}, alias=LORA_ADAPTER_METADATA_KEY
    )

    @property
    def trigger_words(self) -> list[str]:
        words = self.trigger_word + self.trigger_words_list + self.ss_trigger_words
        return list(dict.fromkeys(words + self.trigger_phrase))

    @property
    def alpha(self) -> float | None:
        """The file's alpha as its metadata states it; None means alpha = rank."""
        configured = [c.lora_alpha for c in self.adapters.values() if c.lora_alpha is not None]
        for alpha in (self.ss_network_alpha, self.lora_alpha, *configured):
            if alpha is not None:
                return alpha
        return None


def metadata_problem(metadata: dict[str, str], keys: tuple[str, ...] | None = None) -> str | None:
    """`<key>: <what is wrong>` for the first bad value loraplex reads (only `keys`, if given),
    or None when every one is sound."""
    try:
        _validate(metadata, keys)
    except ValidationError as e:
        return _describe(e)
    return None


def lora_metadata(metadata: dict[str, str], name: str, keys=None) -> LoraMetadata:
    """The typed metadata of file `name`; LoraIncompatible naming the key of a bad value."""
    try:
        return _validate(metadata, keys)
    except ValidationError as e:
        raise LoraIncompatible(f"Failed to load LoRA: {name}: metadata {_describe(e)}") from e


def _validate(metadata: dict[str, str], keys) -> LoraMetadata:
    read = metadata if keys is None else {k: v for k, v in metadata.items() if k in keys}
    return LoraMetadata.model_validate(read)


def _describe(error: ValidationError) -> str:
    """`lora_adapter_metadata: transformer.alpha_pattern: '(a+)+$' is not a module name ...`"""
    item = error.errors()[0]
    loc = [str(part) for part in item["loc"]]
    if "[key]" in loc:  # a bad dict key: name the dict, the message shows the key
        loc = loc[: loc.index("[key]") - 1]
    message = item["msg"].removeprefix("Value error, ")
    if item["type"] not in ("value_error", "missing") and not isinstance(item["input"], dict):
        message += f" (got {str(item['input'])[:40]!r})"
    where = loc[0] + (": " + ".".join(loc[1:]) if len(loc) > 1 else "")
    return f"{where}: {message}"
