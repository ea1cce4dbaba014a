"""The checks every reader of a LoRA file runs (`deployments/loras/metadata.py`,
`deployments/loras/tensors.py`): hostile metadata and unusable tensors are refused with the key
at fault, the patterns peft and diffusers write still scale as peft scales them, and the
listing reports a bad file instead of failing. Served end to end in test_lora_hostile.py."""

from __future__ import annotations

import json
import re
import time

import pytest
import torch
from peft.utils.other import get_pattern_key
from safetensors.torch import save as save_safetensors

from deployments.adapters import PipelineAdapters
from deployments.errors import InvalidRequest, LoraIncompatible
from deployments.family import get_family
from deployments.loras.files import parse_lora_file
from deployments.loras.formats import apply_metadata_alpha, inspect_lora
from deployments.loras.metadata import (
    MAX_PATTERN_CHARS,
    MAX_PATTERNS,
    lora_metadata,
    metadata_problem,
)
from deployments.loras.synthetic import lora_tensors
from deployments.loras.tensors import check_tensors
from deployments.schemas import LoraRef
from serve.loras.catalog import inspect_file
from serve.loras.uploads import UploadStart

PAIR = {
    "transformer.a.to_q.lora_A.weight": torch.full((4, 8), 0.1),
    "transformer.a.to_q.lora_B.weight": torch.full((8, 4), 0.1),
}


def adapter_metadata(**fields) -> dict[str, str]:
    flat = {f"transformer.{key}": value for key, value in fields.items()}
    return {"lora_adapter_metadata": json.dumps(flat)}


def refusal(call, *args) -> str:
    with pytest.raises(LoraIncompatible) as caught:
        call(*args)
    return caught.value.message


# --- metadata -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("metadata", "named"),
    [
        ({"loraplex.family": "bogus"}, "metadata loraplex.family: unknown family 'bogus'"),
        ({"lora_alpha": "abc"}, "metadata lora_alpha: Input should be a valid number"),
        ({"lora_alpha": "1e30"}, "metadata lora_alpha: Input should be less than or equal"),
        ({"ss_network_alpha": "inf"}, "metadata ss_network_alpha: Input should be a finite"),
        (adapter_metadata(lora_alpha="abc"), "lora_adapter_metadata: transformer.lora_alpha:"),
        (adapter_metadata(lora_alpha=1e30), "lora_adapter_metadata: transformer.lora_alpha:"),
        (adapter_metadata(r=0), "lora_adapter_metadata: transformer.r: Input should be greater"),
        ({"lora_adapter_metadata": "{nope"}, "metadata lora_adapter_metadata: not JSON"),
        ({"trigger_words": json.dumps(["w"] * 101)}, "metadata trigger_words: Value should have"),
    ],
)
def test_metadata_values_loraplex_reads_are_typed_and_refusals_name_the_key(metadata, named):
    message = refusal(lora_metadata, metadata, "x.safetensors")
    assert message.startswith("Failed to load LoRA: x.safetensors: metadata "), message
    assert named in message


def test_metadata_loraplex_does_not_read_stays_free_text_and_kohya_alpha_may_be_words():
    stated = lora_metadata(
        {"ss_network_alpha": "None", "ss_tag_frequency": "{not json", "anything": "1e999"}, "x"
    )
    assert stated.alpha is None and stated.family is None


@pytest.mark.parametrize(
    "pattern",
    [
        "(a+)+$",  # catastrophic backtracking on `aaaa...b`
        "(x|x)*y",
        ".*to_q",
        "to_[qk]",
        "a" * (MAX_PATTERN_CHARS + 1),
    ],
)
def test_a_pattern_that_is_not_a_module_name_is_refused_naming_the_key(pattern):
    metadata = adapter_metadata(alpha_pattern={"to_k": 2, pattern: 8})
    message = refusal(lora_metadata, metadata, "x.safetensors")
    assert "metadata lora_adapter_metadata: transformer.alpha_pattern: " in message, message
    assert metadata_problem(metadata).startswith("lora_adapter_metadata: transformer.alpha_pattern")


def test_a_hostile_pattern_file_is_refused_at_once():
    """The attack: a 15 KB header whose pattern backtracks exponentially on the file's module
    names. Refused from its text, nothing matched against it."""
    evil = "(" * 20 + "a+" + ")+" * 20 + "$"
    names = {f"{'a' * 40}{i}": 2 for i in range(300)} | {evil: 3}
    data = save_safetensors(PAIR, metadata=adapter_metadata(alpha_pattern=names))
    assert len(data) > 15_000
    started = time.monotonic()
    message = refusal(parse_lora_file, data, "evil.safetensors")
    assert time.monotonic() - started < 0.5
    assert "transformer.alpha_pattern" in message and "not a module name" in message


def test_pattern_counts_are_bounded():
    many = {f"m{i}": 2 for i in range(MAX_PATTERNS + 1)}
    message = refusal(lora_metadata, adapter_metadata(rank_pattern=many), "x")
    assert "transformer.rank_pattern: Dictionary should have at most" in message


MODULES = [
    "transformer_blocks.0.attn.to_q",
    "transformer_blocks.0.attn.to_k",
    "transformer_blocks.10.attn.to_q",
    "single_transformer_blocks.0.attn.to_q",
    "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0",
    "text_model.encoder.layers.11.self_attn.q_proj",
]
PATTERNS = [
    # What diffusers' get_peft_kwargs writes (whole module names), and what peft users write
    # (short names, `^`-anchored names, escaped dots).
    {"transformer_blocks.0.attn.to_q": 8},
    {"to_q": 2, "transformer_blocks.0.attn.to_q": 8},
    {"transformer_blocks.0.attn.to_q": 8, "to_q": 2},
    {"^transformer_blocks.0.attn.to_q": 8, "to_k": 3},
    {"attn1.to_out.0": 5, "q_proj": 6},
    {r"attn\.to_q": 7, "layers.11.self_attn.q_proj": 9},
]


@pytest.mark.parametrize("patterns", PATTERNS, ids=str)
def test_module_name_patterns_match_as_peft_matches_them(patterns):
    config = lora_metadata(adapter_metadata(lora_alpha=1, alpha_pattern=patterns), "x")
    config = config.adapters["transformer"]
    for module in MODULES:
        key = get_pattern_key(list(patterns), module)
        assert config.alpha_for(module) == patterns.get(key, 1), module


def test_metadata_alpha_refuses_a_stated_rank_the_matrices_do_not_have():
    message = refusal(apply_metadata_alpha, PAIR, adapter_metadata(r=8, lora_alpha=8), "x")
    assert "transformer.r says rank 8 for a.to_q" in message
    patterned = adapter_metadata(r=4, lora_alpha=8, rank_pattern={"to_q": 2})
    assert "transformer.rank_pattern says rank 2" in refusal(apply_metadata_alpha, PAIR, patterned)


def test_metadata_alpha_that_overflows_a_half_precision_matrix_is_refused():
    half = {key: torch.full(t.shape, 60000.0, dtype=torch.float16) for key, t in PAIR.items()}
    message = refusal(apply_metadata_alpha, half, adapter_metadata(lora_alpha=16), "x")
    assert "transformer.a.to_q.lora_B.weight holds inf" in message


def test_upload_metadata_is_checked_before_any_byte_is_sent():
    start = UploadStart(
        filename="x.safetensors",
        total_size=64,
        sha256="0" * 64,
        metadata={"loraplex.family": "bogus"},
    )
    with pytest.raises(InvalidRequest, match=r"^metadata\.loraplex\.family: unknown family"):
        start.check_metadata()


# --- tensors --------------------------------------------------------------------------------


def with_(key: str, tensor: torch.Tensor, base: dict | None = None) -> dict:
    return {**(base or PAIR), key: tensor}


def one_bad(dtype: torch.dtype, value: float) -> torch.Tensor:
    """A (8, 4) up matrix of ones but for one element, as one poisoned weight would be."""
    tensor = torch.ones(8, 4, dtype=dtype)
    tensor[5, 2] = value
    return tensor


A, B = "transformer.a.to_q.lora_A.weight", "transformer.a.to_q.lora_B.weight"
KOHYA = {
    "lora_unet_a.lora_down.weight": torch.ones(4, 8),
    "lora_unet_a.lora_up.weight": torch.ones(8, 4),
    "lora_unet_a.alpha": torch.tensor(4),  # LyCORIS may store an integer alpha: accepted
}
LOKR = {
    "lycoris_a.lokr_w1": torch.ones(2, 2),
    "lycoris_a.lokr_w2_a": torch.ones(4, 2),
    "lycoris_a.lokr_w2_b": torch.ones(2, 4),
}
LOHA = {
    "lycoris_a.hada_w1_a": torch.ones(8, 2),
    "lycoris_a.hada_w1_b": torch.ones(2, 8),
    "lycoris_a.hada_w2_a": torch.ones(8, 2),
    "lycoris_a.hada_w2_b": torch.ones(2, 8),
}
BAD_TENSORS = {
    "int64": (with_(A, torch.ones(4, 8, dtype=torch.int64)), f"{A} is int64"),
    "rank 0": ({A: torch.ones(0, 8), B: torch.ones(8, 0)}, f"{A} has rank 0"),
    "ranks disagree": (with_(A, torch.ones(2, 8)), f"{A} has rank 2 and {B} rank 4"),
    "nan": (with_(B, torch.full((8, 4), float("nan"))), f"{B} holds NaN"),
    "inf": (with_(B, torch.full((8, 4), float("-inf"))), f"{B} holds inf"),
    "huge": (with_(B, torch.full((8, 4), 1e30)), f"{B} holds 1e+30"),
    "one nan in bf16": (with_(B, one_bad(torch.bfloat16, float("nan"))), f"{B} holds NaN"),
    "one inf in fp16": (with_(B, one_bad(torch.float16, float("inf"))), f"{B} holds inf"),
    "empty": (with_("transformer.a.to_q.lora_B.bias", torch.ones(0)), "lora_B.bias holds no"),
    "kohya ranks": (
        with_("lora_unet_a.lora_up.weight", torch.ones(8, 3), KOHYA),
        "lora_unet_a.lora_down.weight has rank 4 and lora_unet_a.lora_up.weight rank 3",
    ),
    "kohya alpha": (with_("lora_unet_a.alpha", torch.ones(2), KOHYA), "alpha is not one number"),
    "lokr ranks": (
        with_("lycoris_a.lokr_w2_b", torch.ones(3, 4), LOKR),
        "lycoris_a.lokr_w2_a has rank 2 and lycoris_a.lokr_w2_b rank 3",
    ),
    "loha shapes": (
        with_("lycoris_a.hada_w2_b", torch.ones(2, 6), LOHA),
        "its LoHa products are 8x8 (hada_w1) and 8x6 (hada_w2)",
    ),
    "1-d lora_A": (with_(A, torch.ones(4)), f"{A} is not a matrix"),
}


@pytest.mark.parametrize("kind", list(BAD_TENSORS))
def test_unusable_tensors_are_refused_naming_the_key(kind):
    tensors, named = BAD_TENSORS[kind]
    message = refusal(check_tensors, tensors, "x.safetensors")
    assert message.startswith("Failed to load LoRA: x.safetensors: ") and named in message, message
    # Every reader goes through parse_lora_file, and so through this check.
    data = save_safetensors({k: v.contiguous() for k, v in tensors.items()})
    assert named in refusal(parse_lora_file, data, "x.safetensors")


@pytest.mark.parametrize(
    "tensors", [PAIR, KOHYA, LOKR, LOHA], ids=["lora", "kohya", "lokr", "loha"]
)
def test_sound_files_pass(tensors):
    check_tensors(tensors, "x")


def test_a_known_layout_loaded_from_bytes_still_has_its_values_checked(tiny_flux):
    """A replica loads a file whose header it has seen straight from its bytes, without a
    parse: a copy of a good file with NaN in its data must be refused there too."""
    adapters = PipelineAdapters(tiny_flux, get_family("flux"), max_adapters=2)
    tensors = lora_tensors(tiny_flux.transformer, "transformer", seed=3)
    good = save_safetensors(tensors)
    adapters.prepare(good, "good")
    assert adapters.prepare(good, "again").layout is not None  # loads from its bytes now
    poisoned = good[:-2] + bytes([0xC0, 0x7F])  # the last float32 weight's top bytes: NaN
    message = refusal(adapters.prepare, poisoned, "poisoned.safetensors")
    assert "holds NaN" in message, message


# --- the listing ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tensors", "metadata", "named"),
    [
        (PAIR, {"loraplex.family": "bogus"}, "loraplex.family"),
        (PAIR, adapter_metadata(alpha_pattern={"(a+)+$": 2}), "alpha_pattern"),
        (with_(B, torch.full((8, 4), float("nan"))), None, "holds NaN"),
    ],
)
def test_the_listing_reports_a_bad_file_with_error_and_never_raises(tensors, metadata, named):
    data = save_safetensors(tensors, metadata=metadata)
    entry = inspect_file(data, LoraRef(name="bad.safetensors", version="1"))
    assert entry["family"] is None and named in entry["error"], entry


def test_inspect_lora_names_a_bad_family_instead_of_raising_key_errors():
    message = refusal(inspect_lora, PAIR, {"loraplex.family": "bogus"}, "x.safetensors")
    assert re.search(r"loraplex\.family: unknown family 'bogus'; expected one of", message)
