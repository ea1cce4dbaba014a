"""Compiled generation (a model's `compile` config): the denoiser's repeated blocks compiled
once per replica, at start, and kept compiled while requests switch adapters.

What keeps one graph for every request is the always-fused state (`fused_stacks.py`) plus a
scaffold: before compiling, every Linear of the denoiser's repeated blocks (what kohya,
ai-toolkit and OneTrainer target: attention projections, MLPs, modulation) is wrapped in a
peft LoRA layer once, holding a rank-1 zero adapter that is never active and that no adapter
listing shows. A later fresh load then only adds keys to those layers and never changes the
blocks' structure, which a compiled graph guards.

At start, on the tensor thread, before Serve calls the replica ready: scaffold, compile, load
the node's compile cache (`compile_cache.py`), one warm-up render through the Renderer, and
save the cache. Compiles are counted from dynamo's counters (torch has no public
counter); those after warm-up are recompiles, which /models shows so an operator sees one.
"""

from __future__ import annotations

import logging
import threading
import time

import torch
from peft import LoraConfig, inject_adapter_in_model
from PIL import Image
from torch._dynamo.utils import counters

from deployments.compile_cache import CompileCache, cache_key
from deployments.config import ModelConfig
from deployments.media import encode_image
from deployments.rendering import Renderer
from deployments.schemas import GenerationJob

logger = logging.getLogger("ray.serve")

SCAFFOLD_ADAPTER = "lx_scaffold"
WARMUP_STEPS = 2  # the blocks' graphs do not depend on the step count


def scaffold_targets(denoiser: torch.nn.Module) -> list[str]:
    """The module names of every Linear inside the denoiser's repeated blocks."""
    repeated = set(denoiser._repeated_blocks)
    targets = []
    for name, block in denoiser.named_modules():
        if type(block).__name__ in repeated:
            targets += [
                f"{name}.{sub}"
                for sub, module in block.named_modules()
                if isinstance(module, torch.nn.Linear)
            ]
    return targets


def add_scaffold(denoiser: torch.nn.Module) -> int:
    """Wrap the targets in peft LoRA layers with a zero rank-1 adapter (lora_B starts at 0),
    inactive. It is taken out of the model's `peft_config`, which diffusers lists adapters
    from (`get_list_adapters`), so hot and free slot counts, the adapter bound and /models
    never see it. Returns the layers wrapped."""
    targets = scaffold_targets(denoiser)
    if not targets:
        raise ValueError(f"{type(denoiser).__name__}: no Linear layer in its repeated blocks")
    config = LoraConfig(r=1, lora_alpha=1, target_modules=targets, init_lora_weights=True)
    inject_adapter_in_model(config, denoiser, adapter_name=SCAFFOLD_ADAPTER)
    denoiser.peft_config.pop(SCAFFOLD_ADAPTER, None)
    for name in targets:
        denoiser.get_submodule(name).set_adapter([])
    return len(targets)


def compile_options(model: ModelConfig) -> dict:
    """torch.compile's arguments for this model: `mode` means something to inductor only."""
    config = model.compile
    options: dict = {"backend": config.backend}
    if config.backend == "inductor":
        options["mode"] = config.mode
    return options


def graphs_compiled() -> int:
    """Graphs dynamo compiled in this process (each compile and each recompile makes one)."""
    return counters["stats"]["unique_graphs"]


class CompiledGeneration:
    """One replica's compiled denoiser: how its start went and what it compiled since."""

    def __init__(self, model: ModelConfig, renderer: Renderer):
        self.model = model
        self.renderer = renderer
        self.warmup_ms: float | None = None
        self.compile_cache = "off"
        self._graphs_before = graphs_compiled()
        # Graphs compiled up to the end of the first render (the warm-up, when on).
        self._graphs_warm: int | None = None

    def start(self) -> None:
        """Scaffold, compile, cache, warm up; on the tensor thread."""
        renderer = self.renderer
        denoiser = getattr(renderer.pipe, renderer.family.denoiser_component)
        wrapped = add_scaffold(denoiser)
        renderer.adapters.activation.compiled = True
        renderer.compiled = self
        renderer.adapters.activation.reset()  # the next activation marks every layer merged
        denoiser.compile_repeated_blocks(**compile_options(self.model))
        config = self.model.compile
        cache = CompileCache(config.cache_dir, cache_key(self.model, str(denoiser.device)))
        hit = cache.load()  # before the first compile
        if config.cache_dir is not None:
            self.compile_cache = "hit" if hit else "miss"
        if config.warmup:
            started = time.perf_counter()
            renderer.render([self.warmup_job()], [], threading.Event(), count=False)
            self.warmup_ms = round((time.perf_counter() - started) * 1000.0, 1)
            # After a hit too: torch records what it loaded, and a warm-up that compiled more
            # (a graph the file lacked) keeps the file current; unchanged bytes are not written.
            cache.save()
        logger.info(
            "%s: denoiser blocks compiled (%s, %d layers scaffolded), warm-up %s ms, cache %s",
            self.model.name,
            config.backend,
            wrapped,
            self.warmup_ms,
            self.compile_cache,
        )

    def warmup_job(self) -> GenerationJob:
        """A base render at the model's default size, in a few steps."""
        defaults = self.model.generation_defaults()
        image = None
        if "image" in self.renderer.family.request_model.model_fields:  # edit models
            blank = Image.new("RGB", (defaults.width, defaults.height), (128, 128, 128))
            image = encode_image(blank, "image/png")
        return GenerationJob(
            prompt="warm-up",
            negative_prompt="",
            width=defaults.width,
            height=defaults.height,
            steps=WARMUP_STEPS,
            cfg=defaults.cfg,
            seed=0,
            adapters=[],
            length=defaults.length,
            fps=defaults.fps,
            image=image,
        )

    def rendered(self) -> None:
        """After each compiled render: the first one ends the warm-up's compiles."""
        if self._graphs_warm is None:
            self._graphs_warm = graphs_compiled()

    def describe(self) -> dict:
        """What /models shows per replica."""
        now = graphs_compiled()
        warm = self._graphs_warm
        return {
            "compiled": True,
            "compile_backend": self.model.compile.backend,
            "warmup_ms": self.warmup_ms,
            "compile_cache": self.compile_cache,
            "compiles": now - self._graphs_before,
            "recompiles": 0 if warm is None else now - warm,
            "eager_fallbacks": self.renderer.eager_fallbacks,
        }


def compile_report(compiled: CompiledGeneration | None, renderer: Renderer) -> dict:
    """The compile fields of /models for any replica: the same keys when not compiled."""
    if compiled is not None:
        return compiled.describe()
    return {
        "compiled": False,
        "compile_backend": None,
        "warmup_ms": None,
        "compile_cache": "off",
        "compiles": 0,
        "recompiles": 0,
        "eager_fallbacks": renderer.eager_fallbacks,
    }
