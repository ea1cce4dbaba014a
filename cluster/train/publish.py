"""The trained adapter as files: diffusers layout with metadata, written atomically into the
LoRA root through the store, and an optional kohya-layout copy for ComfyUI and A1111 users."""

from __future__ import annotations

import json

import torch
from safetensors.torch import save

from cluster.train.config import TrainJob
from deployments.errors import Conflict
from deployments.family import Family, get_family
from deployments.loras.files import parse_lora_file
from deployments.loras.formats import LORA_ADAPTER_METADATA_KEY
from deployments.loras.store import LoraStore
from deployments.schemas import LoraRef

KOHYA_SUFFIX = ".kohya.safetensors"
# kohya's prefixes for a pipeline's CLIP text encoders (CLIP-L in Flux and SDXL, SDXL's
# CLIP-G), before their module paths (`text_model.encoder.layers.0.self_attn.q_proj`).
KOHYA_TEXT_ENCODER_PREFIX = {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}


def adapter_metadata(
    job: TrainJob, steps: int, dataset_hash: str, components: list[str]
) -> dict[str, str]:
    """What a served file says about itself: `GET /loras` shows these, and diffusers'
    `lora_adapter_metadata` carries rank and alpha the way `save_lora_weights` writes them."""
    config = job.config
    peft_configs = {}
    for component in components:
        peft_configs[f"{component}.r"] = config.rank
        peft_configs[f"{component}.lora_alpha"] = config.alpha
    return {
        "format": "pt",
        LORA_ADAPTER_METADATA_KEY: json.dumps(peft_configs, sort_keys=True),
        "loraplex.base_model": job.base_model,
        "loraplex.model_uri": job.model_uri,
        "loraplex.rank": str(config.rank),
        "loraplex.alpha": str(config.alpha),
        "loraplex.steps": str(steps),
        "loraplex.dataset_hash": dataset_hash,
        "trigger_words": job.trigger_word,
    }


def adapter_file(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """The adapter as safetensors bytes: diffusers keys (`transformer.<module>.lora_A.weight`),
    lora_B unscaled; alpha is in the metadata, as diffusers' own `save_lora_weights` keeps it."""
    return save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, metadata)


def to_kohya(
    tensors: dict[str, torch.Tensor], family: Family, alpha: float
) -> dict[str, torch.Tensor]:
    """diffusers keys -> kohya's (`<prefix><module_with_underscores>.lora_down.weight`,
    `.lora_up.weight`, `.alpha`). diffusers converts kohya files on load but has no writer for
    them, so this one is ours; `family.training.kohya_prefix` names the denoiser's prefix."""
    spec = family.training
    if spec is None:
        raise ValueError(f"training is not supported for {family.name}")
    out: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        component, _, rest = key.partition(".")
        if component == family.denoiser_component:
            prefix = spec.kohya_prefix
        else:
            prefix = KOHYA_TEXT_ENCODER_PREFIX.get(component)
            if prefix is None:
                raise ValueError(f"no kohya name for component {component!r}")
        for ours, theirs in (
            (".lora_A.weight", ".lora_down.weight"),
            (".lora_B.weight", ".lora_up.weight"),
        ):
            if rest.endswith(ours):
                module = prefix + _original_name(rest.removesuffix(ours), spec).replace(".", "_")
                out[module + theirs] = tensor.contiguous()
                out[module + ".alpha"] = torch.tensor(float(alpha))
    return out


def _original_name(module: str, spec) -> str:
    for diffusers_name, original_name in spec.kohya_module_names:
        if module.endswith("." + diffusers_name):
            return module.removesuffix(diffusers_name) + original_name
    return module


def kohya_name(output_file: str) -> str:
    return output_file.removesuffix(".safetensors") + KOHYA_SUFFIX


def output_files(job: TrainJob) -> list[str]:
    """The names a job publishes under, relative to the LoRA root."""
    names = [job.output_file]
    if job.config.export_kohya:
        names.append(kohya_name(job.output_file))
    return names


def check_output_free(job: TrainJob, store: LoraStore | None = None) -> None:
    """Conflict naming the output's field when one of the job's names is taken in the LoRA
    root and the job may not replace it (`config.overwrite`)."""
    if job.config.overwrite:
        return
    store = store or LoraStore(job.lora_root)
    taken = [name for name in output_files(job) if store.exists(name)]
    if taken:
        field = "character_id" if job.character_id is not None else "output_name"
        raise Conflict(
            f"{field}: {taken[0]} already exists in the LoRA root; set config.overwrite: true "
            "to replace it, or choose another name"
        )


def publish(job: TrainJob, adapter_bytes: bytes) -> list[LoraRef]:
    """Write the adapter (and its kohya copy when asked) into the LoRA root, each in one step:
    a server sees the old file or the new one, never part of one. Without `config.overwrite`
    a name taken since the job was submitted is Conflict and nothing is written (checked just
    before the write: two jobs publishing one name in the same instant can still both write)."""
    store = LoraStore(job.lora_root)
    check_output_free(job, store)
    refs = [store.write(job.output_file, adapter_bytes)]
    if job.config.export_kohya:
        tensors, metadata = parse_lora_file(adapter_bytes, job.output_file)
        kohya = to_kohya(tensors, get_family(job.base_model), job.config.alpha)
        kohya_metadata = {k: v for k, v in metadata.items() if k != LORA_ADAPTER_METADATA_KEY} | {
            "ss_network_dim": str(job.config.rank),
            "ss_network_alpha": str(job.config.alpha),
        }
        refs.append(store.write(kohya_name(job.output_file), save(kohya, kohya_metadata)))
    return refs
