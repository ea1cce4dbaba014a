"""Compiled generation (a model's `compile` config): the denoiser's blocks compiled once, and no
adapter switch recompiling them.

In process (no Serve): a tiny Flux pipeline compiled with backend aot_eager (dynamo's guards,
which decide recompiles, are inductor's; the compile itself takes seconds) goes through 50
mixed switches under `fail_on_recompile`, and its images are compared with an eager
pipeline's. Through Serve (slow): an app of its own compiles with inductor, and its images
match the session's eager app within INDUCTOR_TOLERANCE.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from deployments import load_pipeline
from deployments.adapters import ActiveAdapter, PipelineAdapters
from deployments.compiled import SCAFFOLD_ADAPTER, CompiledGeneration
from deployments.config import ModelConfig
from deployments.family import get_family
from deployments.rendering import Renderer
from deployments.replica_health import ReplicaHealth
from deployments.replica_metrics import ReplicaMetrics
from deployments.schemas import GenerationJob
from tests.adapter_helpers import CLIP_TARGETS
from tests.http_helpers import pixels, reported
from tests.lora_files import ATTENTION_TARGETS, lora_tensors

FLUX = get_family("flux")
SIZE = 64
MAX_ADAPTERS = 4
# Compiled (aot_eager, every adapter fused into the weights) vs eager (peft's LoRA beside the
# weights): the same sums in another order. Measured: at most 1 of 255 in a pixel.
AOT_TOLERANCE = 1
# Compiled by inductor vs the session's eager app, in 1/255 steps of a pixel. Measured: at
# most 1, in under 0.01% of the values (64 px, 2 steps).
INDUCTOR_TOLERANCE = 2
COMPILED_APP = "loraplex-compiled"
HOT = ("a2", "b", "c", "outer")  # after a is evicted; dora falls back
MLP_TARGETS = ("ff.net.0.proj", "ff.net.2", "proj_mlp", "norm1.linear", "norm.linear")


def job(size: int = SIZE) -> GenerationJob:
    return GenerationJob(
        prompt="a red fox in the snow",
        negative_prompt="",
        width=size,
        height=size,
        steps=1,
        cfg=3.5,
        seed=0,
        adapters=[],
    )


class Replica:
    """A pipeline with its adapters and renderer, as a replica holds them; compiled or not."""

    def __init__(self, backend: str | None):
        self.pipe = load_pipeline("flux", "tiny://flux")
        self.adapters = PipelineAdapters(self.pipe, FLUX, max_adapters=MAX_ADAPTERS)
        health = ReplicaHealth(self.adapters, ThreadPoolExecutor(max_workers=1))
        self.renderer = Renderer(self.pipe, FLUX, self.adapters, health, ReplicaMetrics())
        self.names: dict[str, str] = {}  # label -> adapter name
        self.compiled = None
        if backend is not None:
            compile_config = {"enabled": True, "backend": backend, "cache_dir": None}
            model = ModelConfig(
                name="flux",
                family="flux",
                compile=compile_config,
                defaults={"width": SIZE, "height": SIZE},
            )
            self.compiled = CompiledGeneration(model, self.renderer)
            self.compiled.start()

    def load(self, label: str, tensors: dict) -> None:
        # Copies: a load may keep the given tensors as its layers' weights, and a refill of
        # its slot later writes into them (each replica's loads parse their own bytes).
        copies = {key: tensor.clone() for key, tensor in tensors.items()}
        self.names[label] = self.adapters.load_reusing(copies, label)[0]

    def release(self, label: str) -> None:
        self.adapters.release(self.names.pop(label))

    def render(self, *stack: tuple, size: int = SIZE) -> np.ndarray:
        """`stack`: (label, strength, block weights or None) per adapter."""
        active = [
            ActiveAdapter(
                self.names[label],
                strength,
                strength,
                self.adapters.block_scales(blocks or {}, "block_weights"),
            )
            for label, strength, blocks in stack
        ]
        [image], _ = self.renderer.render([job(size)], active, threading.Event())
        return np.asarray(image, dtype=np.int16)


@pytest.fixture(scope="module")
def files():
    """LoRAs as real trainers lay them out (attention and MLP linears of every block, CLIP),
    of ranks 4, 8 and 16; one reaching modules outside the blocks; one DoRA."""
    transformer = load_pipeline("flux", "tiny://flux").transformer
    text_encoder = load_pipeline("flux", "tiny://flux").text_encoder

    def made(seed: int, rank: int, targets=ATTENTION_TARGETS, clip: bool = False) -> dict:
        tensors = lora_tensors(transformer, "transformer", seed, rank, targets)
        if clip:
            tensors |= lora_tensors(text_encoder, "text_encoder", seed + 1, rank, CLIP_TARGETS)
        return tensors

    dora = made(7, 4)
    for key in [k for k in dora if k.endswith(".lora_B.weight")]:
        magnitude = key.replace("lora_B.weight", "lora_magnitude_vector")
        dora[magnitude] = torch.rand(dora[key].shape[0], generator=torch.Generator().manual_seed(8))
    return {
        "a": made(1, 4, clip=True),
        "a2": made(2, 4, clip=True),  # a's layout: refills a's free slot
        "b": made(3, 8, ATTENTION_TARGETS + MLP_TARGETS),
        "c": made(4, 16),
        "outer": made(5, 4, ("x_embedder", "context_embedder", "attn.to_q")),
        "dora": dora,
    }


@pytest.fixture(scope="module")
def replicas(files):
    torch.compiler.reset()  # no other test's compiled code in dynamo's caches
    compiled, eager = Replica("aot_eager"), Replica(None)
    yield compiled, eager
    torch.compiler.reset()


def test_scaffold_is_invisible(replicas):
    compiled, _ = replicas
    assert compiled.pipe.get_list_adapters() in ({}, {"transformer": []})
    assert compiled.adapters.free_slot_count() == 0
    describe = compiled.compiled.describe()
    assert describe["compile_cache"] == "off" and describe["warmup_ms"] > 0
    assert describe["compiles"] >= 1 and describe["recompiles"] == 0
    wrapped = [
        m for m in compiled.pipe.transformer.modules() if SCAFFOLD_ADAPTER in getattr(m, "r", {})
    ]
    assert len(wrapped) == 40  # every Linear of the 2 + 2 tiny blocks


def test_fifty_mixed_switches_never_recompile(replicas, files):
    compiled, eager = replicas
    a_blocks = {"transformer_blocks": [0.0, 1.5], "single_transformer_blocks": 0.5}
    # (before the render: loads "+label" / evictions "-label"; the stack: label, strength,
    # block weights)
    sequence = [
        ("+a", "+b", "+c"),  # fresh loads, ranks 4, 8, 16, after the compile
        [("a", 1.0, None)],  # one adapter: fused alone
        [("b", 1.0, None)],  # hot switch
        [("c", 0.7, None)],
        [("a", 0.3, None)],  # strength change
        [("a", 1.2, None)],
        [],  # no LoRA
        [("a", 1.0, a_blocks)],  # block weights
        [("a", 1.0, None), ("b", 0.5, None)],  # stacks of 2 and 3, mixed ranks
        [("a", 0.5, None), ("b", 0.5, None), ("c", 0.5, None)],
        [("c", 1.0, None), ("a", 0.8, a_blocks)],
        ("-a",),  # evicted: a free slot
        [("b", 1.0, None)],
        ("+a2",),  # a cold load into a's free slot
        [("a2", 1.0, None)],
        [("a2", 0.6, None), ("c", 0.6, None)],
        ("+outer",),  # a fresh load that wraps modules outside the blocks
        [("outer", 1.0, None)],
        [("outer", 1.0, None), ("a2", 1.0, a_blocks), ("b", 0.4, None)],
        ("+dora",),
        [("dora", 1.0, None)],  # eager fallback
        [("a2", 1.0, None)],
        [],
    ]
    # Then switches among the adapters still hot, at changing strengths, up to 50 renders.
    hot = [s for s in sequence if isinstance(s, list) and s and all(x[0] in HOT for x in s)]
    renders = sum(isinstance(s, list) for s in sequence)
    steps = sequence + [
        [
            (label, strength * (0.5 + 0.1 * (i % 10)), blocks)
            for label, strength, blocks in hot[i % len(hot)]
        ]
        for i in range(50 - renders)
    ]
    fresh_before = compiled.adapters.fresh_loads
    outputs = []
    with torch.compiler.set_stance("fail_on_recompile"):
        for step in steps:
            if isinstance(step, tuple):
                for event in step:
                    label = event[1:]
                    if event[0] == "+":
                        compiled.load(label, files[label])
                    else:
                        compiled.release(label)
                continue
            outputs.append((step, compiled.render(*step)))
    assert len(outputs) >= 50
    assert compiled.compiled.describe()["recompiles"] == 0
    # a2 refilled a's slot; the other five loads built layers.
    assert compiled.adapters.fresh_loads - fresh_before == 5
    assert compiled.renderer.eager_fallbacks == 1

    # The images are eager's, within the tolerance; the DoRA fallback's exactly.
    for label in ("a", "a2", "b", "c", "outer", "dora"):
        eager.load(label, files[label])
    assert np.abs(outputs[0][1] - outputs[5][1]).mean() > 1, "adapter a changes nothing"
    for stack, image in outputs[::4] + [o for o in outputs if o[0] and o[0][0][0] == "dora"]:
        difference = np.abs(image - eager.render(*stack)).max()
        if stack and stack[0][0] == "dora":
            assert difference == 0
        else:
            assert difference <= AOT_TOLERANCE, (stack, difference)


def test_a_new_size_compiles_once(replicas):
    compiled, _ = replicas
    before = compiled.compiled.describe()["recompiles"]
    compiled.render(size=96)
    once = compiled.compiled.describe()["recompiles"]
    compiled.render(size=128)
    assert compiled.compiled.describe()["recompiles"] == once > before


def test_reduce_overhead_is_refused():
    with pytest.raises(ValueError, match="compile.mode: reduce-overhead"):
        ModelConfig(name="flux", family="flux", compile={"mode": "reduce-overhead"})


def compiled_replica(client) -> dict:
    [model] = client.get("/models").json()["models"]
    [replica] = model["replicas"]
    return replica


@pytest.mark.slow  # an app of its own, compiled by inductor at start: about a minute
def test_a_compiled_app_matches_eager_and_reports_its_compile(
    service, ray_cluster, lora_root, tmp_path
):
    import httpx
    from ray import serve

    from serve.app import build_app

    model = {
        "name": "flux",
        "family": "flux",
        "model_uri": "tiny://flux",
        "defaults": {"width": SIZE, "height": SIZE, "steps": 2},
        "compile": {"enabled": True, "cache_dir": str(tmp_path / "compile-cache")},
    }
    args = {
        "models": [model],
        "lora_root": str(lora_root),
        "dataset_root": str(tmp_path / "datasets"),
        "train_storage_path": str(tmp_path / "train"),
    }
    serve.run(build_app(args), name=COMPILED_APP, route_prefix="/compiled")
    try:
        with httpx.Client(base_url=f"{ray_cluster}/compiled", timeout=300) as compiled:
            bodies = [
                {"lora_id": "a", "lora_strength": 0.8},
                {"loras": [{"id": "b", "strength": 0.7}, {"id": "c", "strength": 0.5}]},
                {
                    "loras": [
                        {"id": "a", "strength": 1.0, "block_weights": {"transformer_blocks": 0.5}}
                    ]
                },
                {},
            ]
            for extra in bodies:
                body = {"prompt": "a red fox", "width": SIZE, "height": SIZE, "steps": 2, "seed": 3}
                body |= extra
                got = pixels(compiled.post("/flux", json=body))
                expected = pixels(service.post("/flux", json=body))
                assert np.abs(got - expected).max() <= INDUCTOR_TOLERANCE, extra
            reported(lambda: compiled_replica(compiled)["adapter_loads"] >= 3, True, 30)
            replica = compiled_replica(compiled)
    finally:
        serve.delete(COMPILED_APP)
    assert replica["compiled"] and replica["compile_backend"] == "inductor"
    assert replica["compile_cache"] == "miss" and replica["warmup_ms"] > 0
    assert replica["compiles"] >= 2 and replica["recompiles"] == 0
    assert replica["eager_fallbacks"] == 0
