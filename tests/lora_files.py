"""LoRA files for tests: the product's synthetic writer (real key layout and shapes)."""

from deployments.loras.synthetic import ATTENTION_TARGETS, lora_tensors, write_lora

__all__ = ["ATTENTION_TARGETS", "lora_tensors", "write_lora"]
