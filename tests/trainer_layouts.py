"""LoRA files as public trainers name their keys, at the real models' shapes.

Each `Layout` builds one file (tensors and safetensors metadata) for a family's pipeline, its
keys written from the trainer's own naming code (cited beside each generator), its shapes read
from the pipeline it is given: on `tests.real_models.meta_pipeline(family)` that is the real
model's, at no memory cost. Rank 4, small seeded values, the dtype the trainer saves in.

`expect` is the product's contract for that file: "loads" (a positive count of matrices that
fit) or "refused" (LoraIncompatible, its message containing `reason`).

The corpus is split by family: trainer_layouts_flux.py, trainer_layouts_sdxl.py and
trainer_layouts_dit.py (Qwen-Image, Qwen-Image-Edit, Z-Image, Wan); trainer_layouts_base.py
holds the record and the tensor writers.
"""

from __future__ import annotations

from tests import trainer_layouts_dit, trainer_layouts_flux, trainer_layouts_sdxl
from tests.trainer_layouts_base import Layout

LAYOUTS: list[Layout] = [
    *trainer_layouts_flux.LAYOUTS,
    *trainer_layouts_sdxl.LAYOUTS,
    *trainer_layouts_dit.LAYOUTS,
]

__all__ = ["LAYOUTS", "Layout"]
