"""Throughput of an engine at several batch sizes (used by `hexfast bench`)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import numpy as np


def measure(engine, make_input: Callable[[int], object], batch_sizes: Iterable[int], seconds: float = 5.0,
            *, warmup: int = 1, min_runs: int = 3) -> list[dict]:
    """For each batch size: `warmup` untimed runs, then timed runs until `seconds` have passed (at
    least `min_runs`). `make_input(batch)` gives the feeds (a dict name → array, or one array for a
    one-input model); it is called once per batch size, outside the timing.

    Returns [{"batch", "runs", "tiles_per_s", "latency_ms" (median per run), "latency_p90_ms"}]
    in the order given. Batch sizes are measured in ascending order, so engines that grow their
    buffers or profiles (trt, ort-trt) do so in the warm-up of each new size, never in timed runs.
    """
    sizes = [int(b) for b in batch_sizes]
    if not sizes or any(b < 1 for b in sizes):
        raise ValueError(f"batch sizes must be positive integers, got {sizes}")
    results = {}
    for batch in sorted(set(sizes)):
        feeds = make_input(batch)
        if not isinstance(feeds, dict):
            feeds = {engine.input_names[0]: feeds}
        for _ in range(max(0, warmup)):
            engine.run(feeds)
        times = []
        start = time.perf_counter()
        while len(times) < min_runs or time.perf_counter() - start < seconds:
            t0 = time.perf_counter()
            engine.run(feeds)
            times.append(time.perf_counter() - t0)
        total = sum(times)
        results[batch] = {
            "batch": batch,
            "runs": len(times),
            "tiles_per_s": batch * len(times) / total if total > 0 else float("inf"),
            "latency_ms": float(np.median(times) * 1e3),
            "latency_p90_ms": float(np.percentile(times, 90) * 1e3),
        }
    return [results[b] for b in sizes]
