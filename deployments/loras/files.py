"""Reading adapter files: safetensors bytes -> tensors and metadata, with clear errors.

Every reader (the upload check, the listing, a replica's cold load) reads through
`parse_lora_file`, so a file is refused for the same reasons wherever it is read: its metadata
(`metadata.py`) and its tensors (`tensors.py`) are checked here.
"""

from __future__ import annotations

import json
import struct

import torch
from safetensors.torch import load as load_safetensors

from deployments.errors import LoraIncompatible
from deployments.loras.metadata import lora_metadata
from deployments.loras.tensors import check_tensors

# A safetensors header is JSON describing the tensors; real LoRA headers are tens of KiB.
MAX_HEADER_BYTES = 16 * 1024 * 1024


def read_header(data: bytes, name: str) -> dict:
    """The parsed safetensors header, checked before any tensor is touched."""
    if len(data) < 8:
        raise LoraIncompatible(f"Failed to load LoRA: {name}: not a safetensors file (too short)")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > MAX_HEADER_BYTES or 8 + header_len > len(data):
        raise LoraIncompatible(f"Failed to load LoRA: {name}: not a safetensors file (bad header)")
    try:
        header = json.loads(data[8 : 8 + header_len])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LoraIncompatible(f"Failed to load LoRA: {name}: corrupt safetensors header") from e
    if not isinstance(header, dict):
        raise LoraIncompatible(f"Failed to load LoRA: {name}: corrupt safetensors header")
    return header


def parse_lora_file(data: bytes, name: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a `.safetensors` adapter; LoraIncompatible if it is not one, or
    if a metadata value loraplex reads or a tensor is unusable."""
    header = read_header(data, name)
    metadata = header_metadata(header)
    lora_metadata(metadata, name)
    try:
        tensors = load_safetensors(data)
    except Exception as e:  # safetensors raises its own SafetensorError for any corruption
        raise LoraIncompatible(
            f"Failed to load LoRA: {name}: corrupt safetensors file ({e})"
        ) from e
    if not tensors:
        raise LoraIncompatible(f"Failed to load LoRA: {name}: the file holds no tensors")
    check_tensors(tensors, name)
    return tensors, metadata


def header_metadata(header: dict) -> dict[str, str]:
    """The header's `__metadata__` as text, as safetensors defines it."""
    metadata = header.get("__metadata__")
    return {str(k): str(v) for k, v in metadata.items()} if isinstance(metadata, dict) else {}
