"""The trainer-layout table of docs/loras.md: every layout of tests/trainer_layouts.py checked
against its real-size model on the meta device, as the service checks a file.

    HF_HUB_OFFLINE=1 .venv/bin/python -m tests.layout_table > /tmp/layouts.md
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from deployments.adapters import PipelineAdapters  # noqa: E402
from deployments.errors import LoraIncompatible  # noqa: E402
from deployments.family import get_family  # noqa: E402
from deployments.lora_anatomy import FileAnatomy  # noqa: E402
from deployments.loras.formats import apply_metadata_alpha  # noqa: E402
from tests.real_models import meta_pipeline  # noqa: E402
from tests.trainer_layouts import LAYOUTS  # noqa: E402


def rows() -> list[str]:
    lines = [
        "| family | layout | trainer | kind | outcome | matched | the file |",
        "|---|---|---|---|---|---|---|",
    ]
    for layout in LAYOUTS:
        pipe = meta_pipeline(layout.family)
        tensors, metadata = layout.build(pipe)
        label = f"{layout.family}-{layout.name}.safetensors"
        anatomy = FileAnatomy.of(tensors, metadata)
        adapters = PipelineAdapters(pipe, get_family(layout.family))
        try:
            matched = adapters.check(apply_metadata_alpha(tensors, metadata, label), label)
            outcome = "loads"
        except LoraIncompatible as e:
            matched = 0
            outcome = "refused: " + e.message.removeprefix(f"Failed to load LoRA: {label}: ")
        lines.append(
            f"| {layout.family} | {layout.name} | {layout.trainer} | {anatomy.kind} | "
            f"{outcome.replace('|', '/')} | {matched} | {anatomy.describe()} |"
        )
    return lines


if __name__ == "__main__":
    print("\n".join(rows()))
