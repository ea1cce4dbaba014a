"""LoRA adapter files: the store (an fsspec root) and loading them into a pipeline."""

from serve.loras.store import LoraRef, LoraStore

__all__ = ["LoraRef", "LoraStore"]
