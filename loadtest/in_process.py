"""The in-process half of the benchmark: adapter costs measured on the replica's own code.

Shared by loadtest/bench.py (a CPU, beside its HTTP measurements) and loadtest/gpu_adapters.py
(a GPU, at FLUX.1's size). No Ray and no HTTP here, so it runs where neither is installed."""

from __future__ import annotations

import gc
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Rounds:
    repeats: int
    """Rounds for each median."""
    swaps: int
    """Evict-and-load cycles before memory is measured again."""
    slots: int
    """Hot adapters (the LRU) during the swaps."""
    fuse: bool
    """Measure "one adapter" with `fuse_single_adapter` on."""


def log(message: str) -> None:
    print(f"[in_process {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def measure_adapters(
    pipe,
    family,
    lora_root: Path,
    names: list[str],
    rounds: Rounds,
    generate: Callable[[], object],
    memory_mb: Callable[[], float],
    sync: Callable[[], None] = lambda: None,
) -> tuple[dict[str, float], dict]:
    """Ratios (figures) and the times behind them (details). `generate` makes one image with
    whatever adapters are active; `memory_mb` reads the memory the swaps must not grow; `sync`
    waits for queued device work, so a timer sees it. Leaves the pipeline without adapters."""
    from deployments.adapters import ActiveAdapter, PipelineAdapters
    from deployments.loras.store import LoraStore

    adapters = PipelineAdapters(pipe, family, fuse_single=rounds.fuse, max_adapters=rounds.slots)
    store = LoraStore(str(lora_root))

    def timed_ms(action) -> float:
        sync()
        started = time.perf_counter()
        action()
        sync()
        return (time.perf_counter() - started) * 1000

    def read(name: str) -> bytes:
        return store.read_bytes(store.resolve(name))

    def prepared(name: str):
        """As a replica reads a file it does not hold: read, then parse and check (a file
        layout seen before: neither, its bytes are ready to copy)."""
        return adapters.prepare(read(name), name)

    def cold_load(name: str, adapter_name: str) -> None:
        """A fresh load: the file parsed, new layers (load_lora_weights)."""
        adapters.load(adapter_name, adapters.file_tensors(prepared(name)), name)

    def evict_and_load(evicted: str, name: str) -> str:
        """As a replica with a full LRU loads a file it does not hold: the eviction keeps the
        evicted adapter's layers as a free slot, and the file is copied into it when its
        layout fits (a fresh load otherwise)."""
        adapters.release(evicted)
        return adapters.load_prepared(prepared(name))[0]

    log("base, one adapter, switches, cold loads")
    generate()  # warm-up: first calls allocate and pick kernels
    pristine = [timed_ms(generate) for _ in range(rounds.repeats)]

    # Cold loads, each against reading the same file's bytes just before (so both meet the
    # allocator and caches alike): fresh (new layers), then through an eviction into the
    # evicted adapter's free slot, as a replica loads a file of a layout it has seen (the
    # first fresh load learnt it), and the same without the byte layout (parse, conversion, a
    # copy per matrix: the path of a file whose conversion does more than rename keys).
    read_ms, fresh_ms, cold_ms, general_ms = [], [], [], []
    for i in range(rounds.repeats):
        name = names[-1 - i]
        fresh_ms.append(timed_ms(lambda name=name: cold_load(name, "cold")))
        adapters.delete("cold")
    loaded = [adapters.load_prepared(prepared(names[-1]))[0]]
    for i in range(rounds.repeats):
        name = names[-2 - i]
        read_ms.append(timed_ms(lambda name=name: read(name)))
        cold_ms.append(
            timed_ms(lambda name=name: loaded.append(evict_and_load(loaded.pop(), name)))
        )

    def evict_and_load_general(evicted: str, name: str) -> str:
        adapters.release(evicted)
        return adapters.load_reusing(adapters.file_tensors(prepared(name)), name)[0]

    for i in range(rounds.repeats):
        name = names[(-2 - rounds.repeats - i) % len(names)]
        general_ms.append(
            timed_ms(lambda name=name: loaded.append(evict_and_load_general(loaded.pop(), name)))
        )
    adapters.delete(loaded.pop())

    # Two hot adapters; rounds of base, first, repeat, switch, interleaved against drift.
    cold_load(names[0], "a")
    cold_load(names[1], "b")
    one_a, one_b = [ActiveAdapter("a", 1.0, 1.0)], [ActiveAdapter("b", 1.0, 1.0)]

    def request(active):
        adapters.activate(active)
        generate()

    def fusing(fuse: bool) -> None:
        adapters.fuse_single = fuse
        adapters.activate([])  # the next activation applies `fuse`

    base, unfused, repeat, switch, activation = [], [], [], [], []
    for _ in range(rounds.repeats):
        fusing(False)
        base.append(timed_ms(lambda: request([])))
        request(one_a)
        unfused.append(timed_ms(lambda: request(one_a)))
        fusing(rounds.fuse)
        request(one_a)
        repeat.append(timed_ms(lambda: request(one_a)))
        switch.append(timed_ms(lambda: request(one_b)))
        activation.append(timed_ms(lambda: adapters.activate(one_a)))

    # Memory: an LRU of `slots` adapters, warmed, then `swaps` evict-and-load cycles.
    adapters.delete("a")
    adapters.delete("b")
    hot = [adapters.load_prepared(prepared(names[i]))[0] for i in range(rounds.slots)]

    def settle() -> float:
        adapters.activate([ActiveAdapter(hot[-1], 1.0, 1.0)])
        generate()
        gc.collect()
        sync()
        return memory_mb()

    def swapped_in(i: int) -> str:
        return names[(rounds.slots + i) % len(names)]

    # Warm-up: each slot refilled once, which lays it out as the files' data (one buffer in
    # place of a tensor per matrix; the allocator keeps the pages the old tensors held).
    for i in range(rounds.slots):
        hot.append(evict_and_load(hot.pop(0), swapped_in(i)))
    log(f"{rounds.swaps} swaps")
    settle()
    memory_warm = settle()
    swap_ms = []
    for i in range(rounds.slots, rounds.slots + rounds.swaps):
        name = swapped_in(i)
        swap_ms.append(timed_ms(lambda n=name: hot.append(evict_and_load(hot.pop(0), n))))
        if len(swap_ms) % 100 == 0:
            log(f"{len(swap_ms)} swaps, median {statistics.median(swap_ms):.0f} ms")
    memory_swapped = settle()
    layers = adapters.layer_count(hot[-1])
    adapters.activate([])  # puts fused base weights back
    pipe.unload_lora_weights()  # back to the bare model

    median = statistics.median
    figures = {
        "adapter_over_base": median(repeat) / median(base),
        "unfused_adapter_over_base": median(unfused) / median(base),
        "switch_over_repeat": median(switch) / median(repeat),
        "switch_activation_over_generation": median(activation) / median(repeat),
        "cold_load_over_read": median(cold_ms) / median(read_ms),
        "cold_load_fresh_over_read": median(fresh_ms) / median(read_ms),
        "memory_after_swaps_over_warmup": memory_swapped / memory_warm,
    }
    details = {
        "in_process_ms": {
            "base_no_lora_layers": round(median(pristine), 1),
            "base_adapters_loaded_inactive": round(median(base), 1),
            "one_adapter_repeat": round(median(repeat), 1),
            "one_adapter_repeat_unfused": round(median(unfused), 1),
            "one_adapter_switch": round(median(switch), 1),
            "switch_activation": round(median(activation), 2),
            "read_file": round(median(read_ms), 2),
            "cold_load": round(median(cold_ms), 2),
            "cold_load_fresh": round(median(fresh_ms), 1),
            "cold_load_general_path": round(median(general_ms), 1),
            "swap_median": round(median(swap_ms), 1) if swap_ms else None,
        },
        "memory_mb": {
            "after_warmup": round(memory_warm, 1),
            "after_swaps": round(memory_swapped, 1),
        },
        "lora_layers": layers,
    }
    return figures, details


def measure_zipf_workload(
    pipe,
    family,
    lora_root: Path,
    names: list[str],
    sequence: list[int],
    warmup: int,
    slots: int,
    generate: Callable[[], object],
    sync: Callable[[], None] = lambda: None,
) -> tuple[dict[str, float], dict]:
    """One request at a time for the adapters `names[i]`, i in `sequence` (the first `warmup`
    untimed), served two ways on the bare pipeline: the naive path of the reference worker (read
    the file, `load_lora_weights`, generate, `unload_lora_weights`), then a replica's, with its
    code but without Ray or HTTP (an LRU of `slots` hot adapters in `PipelineAdapters`, fused
    when alone; a cold adapter evicts the least recently used one into a free slot). The
    throughput ratio (figures) and the times behind it (details). Leaves the pipeline bare."""
    from collections import OrderedDict

    from safetensors.torch import load_file

    from deployments.adapters import ActiveAdapter, PipelineAdapters
    from deployments.loras.store import LoraStore

    store = LoraStore(str(lora_root))  # the replica reads its files through the store

    def seconds(serve_one, requests: list[int]) -> float:
        sync()
        started = time.perf_counter()
        for index in requests:
            serve_one(names[index])
        sync()
        return time.perf_counter() - started

    def naive(name: str) -> None:
        pipe.load_lora_weights(load_file(str(lora_root / name)), adapter_name="naive")
        generate()
        pipe.unload_lora_weights()

    adapters = PipelineAdapters(pipe, family, fuse_single=True, max_adapters=slots)
    hot: OrderedDict[str, str] = OrderedDict()  # file -> adapter name, least recently used first
    hits = 0

    def replica(name: str) -> None:
        nonlocal hits
        if name in hot:
            hot.move_to_end(name)
            hits += 1
        else:
            if len(hot) >= slots:
                adapters.release(hot.popitem(last=False)[1])
            prepared = adapters.prepare(store.read_bytes(store.resolve(name)), name)
            hot[name] = adapters.load_prepared(prepared)[0]
        adapters.activate([ActiveAdapter(hot[name], 1.0, 1.0)])
        generate()

    untimed, timed = sequence[:warmup], sequence[warmup:]
    log(f"Zipf workload, naive path: {len(untimed)} + {len(timed)} requests")
    seconds(naive, untimed)
    naive_s = seconds(naive, timed)
    log(f"Zipf workload, replica path: {len(untimed)} + {len(timed)} requests")
    seconds(replica, untimed)
    hits = 0
    replica_s = seconds(replica, timed)
    adapters.activate([])
    pipe.unload_lora_weights()
    figures = {"replica_over_naive_throughput": naive_s / replica_s}
    details = {
        "zipf": {
            "requests": len(timed),
            "distinct_adapters": len(set(timed)),
            "slots": slots,
            "hit_rate": round(hits / len(timed), 3),
            "naive_ms_per_request": round(naive_s / len(timed) * 1000, 1),
            "replica_ms_per_request": round(replica_s / len(timed) * 1000, 1),
        }
    }
    return figures, details
