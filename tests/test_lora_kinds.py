"""Adapters beyond plain LoRA, as trainers write them: LyCORIS LoKr and LoHa applied by their
formulas, DoRA and lora_B biases through peft, peft's own saved layout; Control LoRAs and
kohya-layout DoRA refused by name; and a load that changes the base model undone.

Each formula is computed here from the file's tensors, independently of the product's code:
LoKr dW = kron(w1, w2) with w2 = w2_a @ w2_b; LoHa dW = (w1_a @ w1_b) * (w2_a @ w2_b); both
times alpha / rank. DoRA: m / ||W + s B A||_row * (W + s B A) x; a lora_B bias: s (B A x + c).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deployments.adapters import ActiveAdapter, PipelineAdapters
from deployments.errors import LoraIncompatible
from deployments.family import detect_lora_family, get_family
from deployments.loras.formats import inspect_lora
from deployments.loras.synthetic import write_lora
from tests.family_helpers import render
from tests.lora_formats import RANK, _linear, flux_bfl_modules, kohya_name, lora_in_format

LYCORIS_RANK = 4
LYCORIS_ALPHA = 2.0


@pytest.fixture
def flux(tiny_pipelines):
    adapters = PipelineAdapters(tiny_pipelines("flux"), get_family("flux"))
    yield adapters
    _delete_all(adapters)


@pytest.fixture
def sdxl(tiny_pipelines):
    adapters = PipelineAdapters(tiny_pipelines("sdxl"), get_family("sdxl"))
    yield adapters
    _delete_all(adapters)


def _delete_all(adapters: PipelineAdapters) -> None:
    adapters.activate([])
    names = {n for names in adapters.pipe.get_list_adapters().values() for n in names}
    for name in names | set(adapters._lycoris):
        adapters.delete(name)


def lycoris_file(kohya: dict[str, torch.Tensor], kind: str, seed: int) -> dict:
    """A LoKr or LoHa file over the modules of a kohya LoRA file (same stems, same shapes), with
    LyCORIS's key names: LoKr w1 whole (2x2), w2 factored; LoHa both products factored."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for key, down in kohya.items():
        if not key.endswith(".lora_down.weight"):
            continue
        stem = key.removesuffix(".lora_down.weight")
        rows, columns = kohya[f"{stem}.lora_up.weight"].shape[0], down.shape[1]
        r = LYCORIS_RANK
        if kind == "LoKr":
            out[f"{stem}.lokr_w1"] = torch.randn(2, 2, generator=generator)
            out[f"{stem}.lokr_w2_a"] = torch.randn(rows // 2, r, generator=generator) * 0.2
            out[f"{stem}.lokr_w2_b"] = torch.randn(r, columns // 2, generator=generator) * 0.2
        else:
            for i in (1, 2):
                out[f"{stem}.hada_w{i}_a"] = torch.randn(rows, r, generator=generator) * 0.3
                out[f"{stem}.hada_w{i}_b"] = torch.randn(r, columns, generator=generator) * 0.3
        out[f"{stem}.alpha"] = torch.tensor(LYCORIS_ALPHA)
    return out


def expected_delta(file: dict, stem: str) -> torch.Tensor:
    """The LyCORIS formula, written out: the module's whole delta at strength 1."""
    scale = LYCORIS_ALPHA / LYCORIS_RANK
    if f"{stem}.lokr_w1" in file:
        w2 = file[f"{stem}.lokr_w2_a"] @ file[f"{stem}.lokr_w2_b"]
        return torch.kron(file[f"{stem}.lokr_w1"], w2) * scale
    w1 = file[f"{stem}.hada_w1_a"] @ file[f"{stem}.hada_w1_b"]
    w2 = file[f"{stem}.hada_w2_a"] @ file[f"{stem}.hada_w2_b"]
    return w1 * w2 * scale


def weights(modules: list[torch.nn.Module]) -> list[torch.Tensor]:
    return [m.weight.detach().clone() for m in modules]


@pytest.mark.parametrize("kind", ["LoKr", "LoHa"])
def test_lycoris_flux_kohya_deltas_follow_the_formula_per_split_module(flux, kind):
    """BFL's fused qkv in kohya naming: its delta's rows go to to_q, to_k and to_v in order, at
    strength x alpha / rank, and the base weights come back bit for bit."""
    pipe = flux.pipe
    kohya, _ = lora_in_format(pipe, "flux", "kohya", seed=1)
    file = lycoris_file(kohya, kind, seed=2)
    assert inspect_lora(file, {}).kind == kind
    modules = flux_bfl_modules(pipe)
    assert flux.check(file, kind) == sum(len(parts) for _, parts in modules)
    flux.load("ly", file, kind)
    layers = [_linear(pipe, p) for _, parts in modules for p in parts]
    before = weights(layers)
    flux.activate([ActiveAdapter("ly", 0.5, 1.0)])
    after = iter(zip(before, weights(layers), strict=True))
    for bfl, parts in modules:
        delta = expected_delta(file, kohya_name(bfl))
        rows = [_linear(pipe, p).out_features for p in parts]
        for part in delta.split(rows):
            base, now = next(after)
            torch.testing.assert_close(now - base, 0.5 * part, rtol=1e-4, atol=1e-6)
    flux.activate([])
    assert all(torch.equal(a, b) for a, b in zip(before, weights(layers), strict=True))


def test_lycoris_strength_zero_and_deactivation_give_the_base_image_and_stack_with_a_lora(flux):
    pipe = flux.pipe
    base = render(pipe, "flux")
    kohya, lora = lora_in_format(pipe, "flux", "kohya", seed=3)
    flux.load("ly", lycoris_file(kohya, "LoKr", seed=4), "lokr")
    flux.load("lora", lora, "lora")
    flux.activate([ActiveAdapter("ly", 0.0, 0.0)])
    assert np.array_equal(render(pipe, "flux"), base)
    flux.activate([ActiveAdapter("ly", 1.0, 1.0)])
    alone = render(pipe, "flux")
    assert np.abs(alone - base).mean() > 0.001
    flux.activate([ActiveAdapter("lora", 1.0, 1.0)])
    lora_only = render(pipe, "flux")
    flux.activate([ActiveAdapter("lora", 1.0, 1.0), ActiveAdapter("ly", 1.0, 1.0)])
    stacked = render(pipe, "flux")
    assert np.abs(stacked - alone).mean() > 0.001 and np.abs(stacked - lora_only).mean() > 0.001
    flux.activate([])
    assert np.array_equal(render(pipe, "flux"), base)
    flux.delete("ly")
    assert flux.layer_count("ly") == 0


def test_lycoris_sdxl_loha_reaches_unet_and_both_text_encoders_at_their_strengths(sdxl):
    """kohya's SGM UNet names and `lora_te1_` / `lora_te2_`: text encoders get clip_strength."""
    pipe = sdxl.pipe
    kohya, _ = lora_in_format(pipe, "sdxl", "kohya", seed=5)
    file = lycoris_file(kohya, "LoHa", seed=6)
    sdxl.load("ly", file, "loha")
    unet_q = pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q
    clip_q = pipe.text_encoder.get_submodule("encoder.layers.0.self_attn.q_proj")
    unet_q = getattr(unet_q, "base_layer", unet_q)
    clip_q = getattr(clip_q, "base_layer", clip_q)
    before = weights([unet_q, clip_q])
    sdxl.activate([ActiveAdapter("ly", 1.0, 0.25)])
    after = weights([unet_q, clip_q])
    block = 1 + (pipe.unet.config.layers_per_block + 1)  # SGM numbering, as kohya names it
    unet_stem = f"lora_unet_input_blocks_{block}_1_transformer_blocks_0_attn1_to_q"
    clip_stem = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
    close = {"atol": 1e-6, "rtol": 1e-4}
    torch.testing.assert_close(after[0] - before[0], expected_delta(file, unet_stem), **close)
    clip_delta = 0.25 * expected_delta(file, clip_stem)
    torch.testing.assert_close(after[1] - before[1], clip_delta, **close)
    sdxl.activate([])


def test_peft_dora_follows_the_dora_formula_with_the_files_magnitudes(flux):
    pipe = flux.pipe
    _, lora = lora_in_format(pipe, "flux", "diffusers", seed=7)
    stem = "transformer.transformer_blocks.0.attn.to_q"
    magnitudes = {}
    for key, up in list(lora.items()):
        if key.endswith(".lora_B.weight"):
            magnitudes[key.replace("lora_B.weight", "lora_magnitude_vector")] = (
                torch.rand(up.shape[0], generator=torch.Generator().manual_seed(8)) + 0.5
            )
    dora = {**lora, **magnitudes}
    assert inspect_lora(dora, {}).kind == "DoRA"
    assert flux.check(dora, "dora") == len(lora)
    flux.load("dora", dora, "dora")
    flux.activate([ActiveAdapter("dora", 1.0, 1.0)])
    layer = pipe.transformer.get_submodule(stem.removeprefix("transformer."))
    base = layer.get_base_layer()
    a, b = lora[f"{stem}.lora_A.weight"], lora[f"{stem}.lora_B.weight"]
    adapted = base.weight.detach() + b @ a  # alpha = rank: scale 1
    m = magnitudes[f"{stem}.lora_magnitude_vector"]
    x = torch.randn(3, base.in_features, generator=torch.Generator().manual_seed(9))
    expected = (m / adapted.norm(dim=1))[None, :] * (x @ adapted.T) + base.bias.detach()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, rtol=1e-4, atol=1e-5)


def test_lora_b_biases_load_through_peft_and_add_to_the_output(flux):
    pipe = flux.pipe
    _, lora = lora_in_format(pipe, "flux", "diffusers", seed=10)
    biases = {
        key.replace(".weight", ".bias"): torch.randn(up.shape[0]) * 0.1
        for key, up in lora.items()
        if key.endswith(".lora_B.weight")
    }
    assert flux.check({**lora, **biases}, "bias") == len(lora)
    flux.load("bias", {**lora, **biases}, "bias")
    flux.activate([ActiveAdapter("bias", 0.5, 0.5)])
    stem = "transformer.transformer_blocks.0.attn.to_k"
    layer = pipe.transformer.get_submodule(stem.removeprefix("transformer."))
    base = layer.get_base_layer()
    a, b, c = (
        lora[f"{stem}.lora_A.weight"],
        lora[f"{stem}.lora_B.weight"],
        biases[f"{stem}.lora_B.bias"],
    )
    x = torch.randn(3, base.in_features)
    with torch.no_grad():
        expected = base(x) + 0.5 * (x @ a.T @ b.T + c)
        torch.testing.assert_close(layer(x), expected, rtol=1e-4, atol=1e-5)


def test_peft_saved_layout_loads_like_diffusers_keys(flux):
    pipe = flux.pipe
    _, lora = lora_in_format(pipe, "flux", "diffusers", seed=11)
    saved = {"base_model.model." + k.removeprefix("transformer."): v for k, v in lora.items()}
    assert inspect_lora(saved, {}).format == "peft"
    assert flux.check(saved, "peft") == len(lora)
    flux.load("peft", saved, "peft")
    flux.load("twin", lora, "twin")
    flux.activate([ActiveAdapter("peft", 1.0, 1.0)])
    from_peft = render(pipe, "flux")
    flux.activate([ActiveAdapter("twin", 1.0, 1.0)])
    assert np.array_equal(from_peft, render(pipe, "flux"))


def test_kohya_dora_scales_are_refused_not_dropped(flux):
    kohya, _ = lora_in_format(flux.pipe, "flux", "kohya", seed=12)
    ups = [(key, up) for key, up in kohya.items() if key.endswith(".lora_up.weight")]
    for key, up in ups:
        kohya[key.replace("lora_up.weight", "dora_scale")] = torch.ones(up.shape[0], 1)
    with pytest.raises(LoraIncompatible, match="DoRA adapters are not supported") as refused:
        flux.check(kohya, "dora.safetensors")
    assert refused.value.message.startswith(
        "Failed to load LoRA: dora.safetensors: a kohya flux DoRA: DoRA adapters are not "
        f"supported in the kohya layout ({len(ups)} dora_scale tensors)"
    )


def test_a_control_lora_is_refused_and_a_load_that_reshapes_the_model_is_undone(flux):
    """The check names it; loaded anyway (past the check), diffusers widens x_embedder and
    changes the config: the replica's guard puts the layer and config back, refuses the file,
    and the next base request gives the bytes it gave before."""
    pipe = flux.pipe
    base = render(pipe, "flux")
    embedder, in_channels = pipe.transformer.x_embedder, pipe.transformer.config.in_channels
    _, lora = lora_in_format(pipe, "flux", "diffusers", seed=13)
    control = {
        **lora,
        "transformer.x_embedder.lora_A.weight": torch.randn(RANK, 2 * embedder.in_features),
        "transformer.x_embedder.lora_B.weight": torch.randn(embedder.out_features, RANK),
    }
    with pytest.raises(LoraIncompatible) as refused:
        flux.check(control, "control.safetensors")
    assert refused.value.message == (
        "Failed to load LoRA: control.safetensors: a diffusers flux LoRA: transformer.x_embedder "
        f"takes {2 * embedder.in_features} inputs, this model {embedder.in_features}: it is a "
        "Control LoRA, and control LoRAs need a control pipeline"
    )
    with pytest.raises(LoraIncompatible, match="loading it changed the base model"):
        flux.load("control", control, "control.safetensors")
    assert pipe.transformer.x_embedder is embedder
    assert pipe.transformer.config.in_channels == in_channels
    assert flux.broken is None and flux.guard.changes() == []
    assert np.array_equal(render(pipe, "flux"), base)


def test_a_load_that_overwrites_base_weights_in_place_marks_the_pipeline_broken(monkeypatch):
    """Values overwritten in place cannot be put back from what the guard keeps: the file is
    refused and the pipeline reported broken, which the replica's health check turns into a
    replacement by Serve. A fresh pipeline: this one is broken on purpose."""
    family = get_family("flux")
    adapters = PipelineAdapters(family.build_tiny(), family)
    norm = adapters.pipe.transformer.norm_out.linear.weight

    def overwrite(*args, **kwargs):
        with torch.no_grad():
            norm.mul_(2)

    monkeypatch.setattr(adapters.pipe, "load_lora_weights", overwrite)
    _, lora = lora_in_format(adapters.pipe, "flux", "diffusers", seed=19)
    with pytest.raises(LoraIncompatible, match="base weights were overwritten in place"):
        adapters.load("bad", lora, "bad.safetensors")
    assert adapters.broken == (
        "a load of bad.safetensors changed the base model: base weights were overwritten in place"
    )


def test_real_size_control_lora_is_named_from_its_keys():
    tensors = {
        "transformer.x_embedder.lora_A.weight": torch.zeros(RANK, 128),
        "transformer.x_embedder.lora_B.weight": torch.zeros(3072, RANK),
    }
    assert inspect_lora(tensors, {}).kind == "Control"


def test_flux_file_with_t5_keys_is_a_flux_file():
    keys = [f"lora_transformer_single_transformer_blocks_{i}_attn_to_q" for i in range(38)]
    keys += [f"lora_te2_encoder_block_{i}_layer_0_SelfAttention_q" for i in range(24)]
    keys += [f"lora_te2_encoder_block_{i}_layer_1_DenseReluDense_wi_0" for i in range(24)]
    assert detect_lora_family([f"{k}.lora_down.weight" for k in keys]) == "flux"


def test_a_refusal_is_at_most_500_characters_whatever_the_file(flux):
    strangers = {
        f"lora_unet_no_such_module_with_a_long_name_{i}.lora_down.weight": torch.zeros(RANK, 8)
        for i in range(500)
    }
    with pytest.raises(LoraIncompatible) as refused:
        flux.check(strangers, "x" * 200 + ".safetensors")
    assert len(refused.value.message) <= 500


# --- over HTTP: the replica's LRU, the catalog, and the bytes after a refusal -------------------


def post_flux(service, **lora):
    body = {"prompt": "a red fox", "seed": 3, "steps": 2, "width": 64, "height": 64}
    return service.post("/flux", json={**body, **lora})


def test_http_a_lokr_file_serves_from_the_replicas_cache_and_lists_its_kind(
    service, lora_root, tiny_pipelines
):
    kohya, _ = lora_in_format(tiny_pipelines("flux"), "flux", "kohya", seed=14)
    write_lora(lora_root / "character-kinds-lokr.safetensors", lycoris_file(kohya, "LoKr", 15))
    base = post_flux(service)
    first = post_flux(service, lora_id="kinds-lokr")
    again = post_flux(service, lora_id="kinds-lokr")
    assert first.status_code == again.status_code == 200, first.text
    assert (first.headers["X-LoRA-Cache"], again.headers["X-LoRA-Cache"]) == ("miss", "hit")
    assert first.content == again.content != base.content
    assert post_flux(service, lora_id="kinds-lokr", lora_strength=0).content == base.content
    listed = {e["name"]: e for e in service.get("/loras").json()["loras"]}
    entry = listed["character-kinds-lokr.safetensors"]
    assert (entry["kind"], entry["format"], entry["family"]) == ("LoKr", "kohya", "flux")
    assert (entry["rank"], entry["alpha"]) == (LYCORIS_RANK, LYCORIS_ALPHA)


def test_http_a_control_lora_is_422_and_the_next_request_gives_the_same_bytes(
    service, lora_root, tiny_pipelines
):
    pipe = tiny_pipelines("flux")
    _, lora = lora_in_format(pipe, "flux", "diffusers", seed=16)
    width = pipe.transformer.x_embedder.in_features
    lora["transformer.x_embedder.lora_A.weight"] = torch.randn(RANK, 2 * width)
    lora["transformer.x_embedder.lora_B.weight"] = torch.zeros(
        pipe.transformer.x_embedder.out_features, RANK
    )
    write_lora(lora_root / "character-kinds-control.safetensors", lora)
    before = post_flux(service)
    refused = post_flux(service, lora_id="kinds-control")
    assert refused.status_code == 422, refused.text
    error = refused.json()["error"]
    assert error["code"] == "lora_incompatible"
    assert "it is a Control LoRA, and control LoRAs need a control pipeline" in error["message"]
    assert post_flux(service).content == before.content


def test_http_a_lokr_file_is_not_merged_into_a_lora(service, lora_root, tiny_pipelines):
    kohya, _ = lora_in_format(tiny_pipelines("flux"), "flux", "kohya", seed=17)
    write_lora(lora_root / "character-kinds-merge.safetensors", lycoris_file(kohya, "LoKr", 18))
    merge = {
        "inputs": [{"name": "character-kinds-merge.safetensors"}],
        "output": "kinds-merged.safetensors",
    }
    response = service.post("/loras/merge", json=merge)
    assert response.status_code == 422, response.text
    assert "a LoKr adapter cannot be merged into a LoRA file" in response.json()["error"]["message"]
    assert not (lora_root / "kinds-merged.safetensors").exists()
