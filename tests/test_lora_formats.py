"""LoRA files from the whole ecosystem: every format of every family loads to the same image as
the same weights in diffusers keys; alpha scales by alpha / rank whatever carries it; the format,
family, rank, alpha and targets are reported; a file that does not fit is refused, never a no-op.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline

from deployments.adapters import ActiveAdapter, PipelineAdapters
from deployments.errors import LoraIncompatible
from deployments.family import get_family
from deployments.loras.files import parse_lora_file
from deployments.loras.formats import apply_metadata_alpha, inspect_lora
from deployments.loras.synthetic import write_lora
from tests.family_helpers import render
from tests.http_helpers import pixels
from tests.lora_formats import ALPHA, FORMATS, RANK, lora_in_format

# A format's file and its diffusers twin differ only in where alpha / rank is multiplied in (and
# in the order diffusers' converters multiply); measured max abs pixel difference (floats in
# [0, 1]) over the matrix below: 7.7e-5 (Qwen-Image), 1e-5 or less elsewhere. Ignoring alpha
# (0.75 here) changes pixels by several hundredths.
FORMAT_TOLERANCE = 1e-3
VISIBLE = 0.005  # mean abs pixel change that shows a LoRA did something
MATRIX = [(family, fmt) for family, formats in FORMATS.items() for fmt in formats]


_BASES: dict[str, np.ndarray] = {}


@pytest.fixture
def family_adapters(tiny_pipelines):
    """family -> PipelineAdapters on the shared tiny pipeline; every adapter a test loads is
    deleted after it, so the session's pipelines stay as other tests expect them."""
    made = []

    def get(family: str) -> PipelineAdapters:
        adapters = PipelineAdapters(tiny_pipelines(family), get_family(family))
        made.append(adapters)
        return adapters

    yield get
    for adapters in made:
        loaded = adapters.pipe.get_list_adapters()
        for name in {name for names in loaded.values() for name in names}:
            adapters.delete(name)


def base_image(adapters: PipelineAdapters) -> np.ndarray:
    family = adapters.family.name
    if family not in _BASES:
        adapters.activate([])
        _BASES[family] = render(adapters.pipe, family)
    return _BASES[family]


def with_adapter(adapters: PipelineAdapters, name: str, strength: float = 1.0) -> np.ndarray:
    adapters.activate([ActiveAdapter(name, strength, strength)])
    return render(adapters.pipe, adapters.family.name)


def through_file(tmp_path, tensors, metadata=None) -> dict[str, torch.Tensor]:
    """The tensors as the service reads them: written to .safetensors and parsed back."""
    path = write_lora(tmp_path / "lora.safetensors", tensors, metadata)
    read, metadata = parse_lora_file(path.read_bytes(), path.name)
    return apply_metadata_alpha(read, metadata)


@pytest.mark.parametrize(("family", "fmt"), MATRIX)
def test_every_format_gives_the_image_of_its_diffusers_twin(family_adapters, tmp_path, family, fmt):
    adapters = family_adapters(family)
    base = base_image(adapters)
    theirs, diffusers = lora_in_format(adapters.pipe, family, fmt, seed=5)
    theirs = through_file(tmp_path, theirs)
    assert adapters.check(theirs, fmt) == len(diffusers)
    assert adapters.load("theirs", theirs, fmt) == len(diffusers) // 2
    adapters.load("twin", diffusers, "twin")
    from_theirs = with_adapter(adapters, "theirs")
    assert np.abs(from_theirs - base).mean() > VISIBLE, "the LoRA changed nothing"
    assert np.abs(from_theirs - with_adapter(adapters, "twin")).max() < FORMAT_TOLERANCE


def test_kohya_alpha_below_rank_scales_like_lora_b_times_alpha_over_rank(family_adapters):
    """rank 4, alpha 2: the kohya file is the diffusers file with lora_B halved, not unscaled."""
    adapters = family_adapters("flux")
    kohya, _ = lora_in_format(adapters.pipe, "flux", "kohya", seed=6)
    kohya = {k: torch.tensor(2.0) if k.endswith(".alpha") else v for k, v in kohya.items()}
    halved, unscaled = _diffusers_of_kohya(kohya, 0.5), _diffusers_of_kohya(kohya, 1.0)
    adapters.load("kohya", kohya, "kohya")
    adapters.load("halved", halved, "halved")
    adapters.load("unscaled", unscaled, "unscaled")
    from_kohya = with_adapter(adapters, "kohya")
    assert np.abs(from_kohya - with_adapter(adapters, "halved")).max() < FORMAT_TOLERANCE
    assert np.abs(from_kohya - with_adapter(adapters, "unscaled")).mean() > VISIBLE


def _diffusers_of_kohya(kohya: dict, up_scale: float) -> dict:
    """The flux kohya file in diffusers keys, by diffusers' own converter at alpha = rank, with
    lora_B times `up_scale`."""
    at_rank = {
        k: torch.tensor(float(RANK)) if k.endswith(".alpha") else v for k, v in kohya.items()
    }

    converted = FluxPipeline.lora_state_dict(at_rank)
    return {k: v * up_scale if ".lora_B." in k else v for k, v in converted.items()}


def save_with_metadata_alpha(lora: dict, folder, name: str, alpha: float):
    """The Flux LoRA as diffusers' `save_lora_weights` writes it: rank and lora_alpha in the
    file's `lora_adapter_metadata`."""
    layers = {k.removeprefix("transformer."): v for k, v in lora.items()}
    FluxPipeline.save_lora_weights(
        folder,
        transformer_lora_layers=layers,
        transformer_lora_adapter_metadata={
            "r": RANK,
            "lora_alpha": alpha,
            "target_modules": sorted({k.rpartition(".lora_")[0] for k in layers}),
        },
        weight_name=name,
    )
    return folder / name


def test_lora_alpha_in_diffusers_adapter_metadata_scales_like_diffusers_own_loading(
    family_adapters, tmp_path
):
    """A file written by diffusers' `save_lora_weights` with lora_alpha 2 at rank 4: read as the
    service reads it, it gives the image diffusers gives when it opens the file itself, and
    that of the same weights with lora_B halved."""
    adapters = family_adapters("flux")
    _, lora = lora_in_format(adapters.pipe, "flux", "diffusers", seed=7)
    path = save_with_metadata_alpha(lora, tmp_path, "saved.safetensors", alpha=2)
    tensors, metadata = parse_lora_file(path.read_bytes(), path.name)
    assert inspect_lora(tensors, metadata).alpha == 2.0
    adapters.load("service", apply_metadata_alpha(tensors, metadata), "service")
    halved = {k: v * 0.5 if ".lora_B." in k else v for k, v in lora.items()}
    adapters.load("halved", halved, "halved")
    adapters.pipe.load_lora_weights(str(path), adapter_name="diffusers_itself")
    from_service = with_adapter(adapters, "service")
    assert np.abs(from_service - with_adapter(adapters, "halved")).max() < FORMAT_TOLERANCE
    assert np.abs(from_service - with_adapter(adapters, "diffusers_itself")).max() < 1e-5
    assert np.abs(from_service - base_image(adapters)).mean() > VISIBLE


def test_metadata_alpha_honours_peft_patterns_and_refuses_junk():
    lora = {
        "transformer.a.to_q.lora_A.weight": torch.ones(4, 8),
        "transformer.a.to_q.lora_B.weight": torch.ones(8, 4),
        "transformer.a.to_k.lora_B.weight": torch.ones(8, 4),
    }
    config = {"transformer.r": 4, "transformer.lora_alpha": 2, "transformer.alpha_pattern": {}}
    config["transformer.alpha_pattern"] = {"to_k": 8}
    folded = apply_metadata_alpha(lora, {"lora_adapter_metadata": json.dumps(config)})
    assert torch.equal(folded["transformer.a.to_q.lora_A.weight"], torch.ones(4, 8))
    assert torch.equal(folded["transformer.a.to_q.lora_B.weight"], torch.full((8, 4), 0.5))
    assert torch.equal(folded["transformer.a.to_k.lora_B.weight"], torch.full((8, 4), 2.0))
    assert apply_metadata_alpha(lora, {}) is lora
    junk = {"lora_adapter_metadata": json.dumps({"transformer.lora_alpha": "lots"})}
    with pytest.raises(LoraIncompatible, match="lora_adapter_metadata: transformer.lora_alpha"):
        apply_metadata_alpha(lora, junk, "x.safetensors")


# family -> format -> (expected format name, expected targets)
EXPECTED_FORMAT = {
    "diffusers": "diffusers",
    "kohya": "kohya",
    "kohya-diffusers-names": "kohya",
    "musubi": "musubi",
    "comfyui": "comfyui",
    "comfyui-peft": "ai-toolkit",  # lora_A/lora_B under `diffusion_model.`: AI Toolkit's layout
    "ai-toolkit": "ai-toolkit",
    "onetrainer": "onetrainer",
}
AI_TOOLKIT_METADATA = {"software": json.dumps({"name": "ai-toolkit", "version": "0.1.0"})}


@pytest.mark.parametrize(("family", "fmt"), [(f, "diffusers") for f in FORMATS] + MATRIX, ids=str)
def test_inspect_reports_format_family_rank_alpha_and_targets(tiny_pipelines, family, fmt):
    pipe = tiny_pipelines(family)
    tensors, _ = lora_in_format(pipe, family, fmt, seed=1)
    # AI Toolkit's Flux files use diffusers' names; its metadata names the software.
    metadata = AI_TOOLKIT_METADATA if (family, fmt) == ("flux", "ai-toolkit") else {}
    facts = inspect_lora(tensors, metadata)
    assert facts.format == EXPECTED_FORMAT[fmt]
    # Qwen-Image-Edit LoRAs are Qwen-Image LoRAs: the same transformer, the same key names.
    assert facts.family == ("qwen_image" if family == "qwen_image_edit" else family)
    assert facts.rank == RANK
    has_alpha = any(k.endswith(".alpha") for k in tensors)
    assert facts.alpha == (ALPHA if has_alpha else None)
    denoiser = get_family(family).denoiser_component
    expected = [denoiser]
    if family == "sdxl" and fmt != "diffusers":
        expected = ["text_encoder", "text_encoder_2", "unet"]
    assert facts.targets == expected
    assert facts.tensor_count == len(tensors)


def test_inspect_reads_alpha_and_trigger_words_from_kohya_and_modelspec_metadata():
    tensors = {
        "lora_unet_double_blocks_0_img_attn_proj.lora_down.weight": torch.zeros(8, 32),
        "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight": torch.zeros(32, 8),
    }
    metadata = {
        "ss_network_alpha": "4",
        "ss_trigger_words": '["ohwx", "red fox"]',
        "modelspec.trigger_phrase": "ohwx, snowy",
    }
    facts = inspect_lora(tensors, metadata)
    assert (facts.format, facts.family, facts.rank, facts.alpha) == ("kohya", "flux", 8, 4.0)
    assert facts.trigger_words == ["ohwx", "red fox", "snowy"]


# --- refusals: in-process ------------------------------------------------------------------------


def test_a_text_encoder_part_the_model_does_not_load_is_refused_by_name(family_adapters):
    """diffusers' Flux converter keeps only `lora_unet_` / `lora_te1_` keys and drops the rest
    without a word, e.g. kohya's T5 modules (`lora_te3_`): the file is refused naming its T5
    part instead of loading a fraction of itself."""
    adapters = family_adapters("flux")
    kohya, _ = lora_in_format(adapters.pipe, "flux", "kohya", seed=2)
    for i in range(40):
        stem = f"lora_te3_encoder_block_{i}_layer_0_SelfAttention_q"
        kohya[f"{stem}.lora_down.weight"] = torch.zeros(RANK, 32)
        kohya[f"{stem}.lora_up.weight"] = torch.zeros(32, RANK)
        kohya[f"{stem}.alpha"] = torch.tensor(float(RANK))
    with pytest.raises(LoraIncompatible) as refused:
        adapters.check(kohya, "t5")
    assert refused.value.message == (
        "Failed to load LoRA: t5: a kohya flux LoRA: it has a text-encoder part for "
        "T5EncoderModel (text_encoder_2): 120 tensors under lora_te3_; flux LoRAs load into "
        "transformer, text_encoder only"
    )


def test_a_converter_that_drops_keys_is_not_a_silent_partial_load(family_adapters):
    """Keys a converter does not know are dropped with at most a log line: dropped modules
    count as unmatched, and any unmatched matrix refuses the file."""
    adapters = family_adapters("flux")
    kohya, twin = lora_in_format(adapters.pipe, "flux", "kohya", seed=2)
    stem = "lora_te4_encoder_block_0"  # no encoder of that number: Flux's converter drops it
    kohya[f"{stem}.lora_down.weight"] = torch.zeros(RANK, 32)
    kohya[f"{stem}.lora_up.weight"] = torch.zeros(32, RANK)
    kohya[f"{stem}.alpha"] = torch.tensor(float(RANK))
    with pytest.raises(LoraIncompatible) as refused:
        adapters.check(kohya, "dropping")
    message = refused.value.message
    assert message.startswith(f"Failed to load LoRA: dropping: a kohya flux LoRA: {len(twin)} of ")
    assert "LoRA matrices match the flux model (2 dropped by the format conversion)" in message
    assert message.endswith("unmatched e.g. lora_te4_encoder_block_0.lora_down.weight")


# --- refusals over HTTP ---------------------------------------------------------------------------


def post_flux(service, lora_id: str):
    body = {"prompt": "a red fox", "seed": 3, "steps": 2, "width": 64, "height": 64}
    return service.post("/flux-lora", json={**body, "lora_id": lora_id})


def refused(response) -> str:
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "lora_incompatible"
    assert error["message"].startswith("Failed to load LoRA: ")
    return error["message"]


def test_http_a_file_matching_nothing_is_422_with_zero_of_n(service, lora_root):
    before = post_flux(service, "a").content
    write_lora(
        lora_root / "character-formats-nothing.safetensors",
        {
            f"transformer.no_such_block_{i}.to_q.lora_{ab}.weight": torch.ones(4, 4)
            for i in range(3)
            for ab in "AB"
        },
    )
    message = refused(post_flux(service, "formats-nothing"))
    assert "0 of 6 LoRA matrices match the flux model" in message
    assert "; unmatched e.g. transformer.no_such_block_" in message
    assert post_flux(service, "a").content == before


def test_http_a_file_matching_only_partly_is_422_with_counts_and_unmatched_examples(
    service, lora_root, tiny_pipelines
):
    before = post_flux(service, "a").content
    _, good = lora_in_format(tiny_pipelines("flux"), "flux", "diffusers", seed=3)
    partly = dict(good)
    for i in range(4):  # 8 strangers among 38 good matrices: far above the 5% tolerated
        partly[f"transformer.no_such_block_{i}.to_q.lora_A.weight"] = torch.ones(4, 32)
        partly[f"transformer.no_such_block_{i}.to_q.lora_B.weight"] = torch.ones(32, 4)
    write_lora(lora_root / "character-formats-partly.safetensors", partly)
    message = refused(post_flux(service, "formats-partly"))
    assert f"{len(good)} of {len(partly)} LoRA matrices match the flux model" in message
    assert "unmatched e.g. transformer.no_such_block_" in message
    assert post_flux(service, "a").content == before


def test_http_a_comfyui_flux_file_serves_like_its_diffusers_twin(
    service, lora_root, tiny_pipelines
):
    """The service path end to end (store, check, load): ComfyUI's Flux naming, which diffusers
    alone drops entirely, gives the image of the same weights in diffusers keys."""
    comfy, twin = lora_in_format(tiny_pipelines("flux"), "flux", "comfyui", seed=4)
    write_lora(lora_root / "character-formats-comfy.safetensors", comfy)
    write_lora(lora_root / "character-formats-twin.safetensors", twin)
    from_comfy = pixels(post_flux(service, "formats-comfy"))
    from_twin = pixels(post_flux(service, "formats-twin"))
    assert np.abs(from_comfy - from_twin).max() <= 1  # 8-bit rounding of float-equal images
    assert np.abs(from_comfy - pixels(post_flux(service, "a"))).mean() > 1


def test_http_lora_alpha_in_adapter_metadata_is_applied(service, lora_root, tiny_pipelines):
    """The service reads the file's metadata: lora_alpha 2 at rank 4 serves like lora_B halved."""
    _, lora = lora_in_format(tiny_pipelines("flux"), "flux", "diffusers", seed=8)
    save_with_metadata_alpha(lora, lora_root, "character-formats-meta.safetensors", alpha=2)
    halved = {k: v * 0.5 if ".lora_B." in k else v for k, v in lora.items()}
    write_lora(lora_root / "character-formats-halved.safetensors", halved)
    write_lora(lora_root / "character-formats-full.safetensors", lora)
    from_meta = pixels(post_flux(service, "formats-meta"))
    assert np.abs(from_meta - pixels(post_flux(service, "formats-halved"))).max() <= 1
    assert np.abs(from_meta - pixels(post_flux(service, "formats-full"))).mean() > 1
