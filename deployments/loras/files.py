"""Reading adapter files: safetensors bytes -> tensors and metadata, with clear errors."""

from __future__ import annotations

import json
import struct

import torch
from safetensors.torch import load as load_safetensors

from deployments.errors import LoraIncompatible

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
    """(tensors, metadata) of a `.safetensors` adapter; LoraIncompatible if it is not one."""
    header = read_header(data, name)
    metadata = header.get("__metadata__") or {}
    try:
        tensors = load_safetensors(data)
    except Exception as e:  # safetensors raises its own SafetensorError for any corruption
        raise LoraIncompatible(
            f"Failed to load LoRA: {name}: corrupt safetensors file ({e})"
        ) from e
    if not tensors:
        raise LoraIncompatible(f"Failed to load LoRA: {name}: the file holds no tensors")
    return tensors, {str(k): str(v) for k, v in metadata.items()}
