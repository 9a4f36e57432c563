"""Engine-only and end-to-end HEX throughput (`hexfast bench engine` / `hexfast bench e2e`).

    hexfast bench engine [--model BUNDLE] [--backend auto|all|B,B] [--batch-sizes 1,8,32,64] [--tile 224]
    hexfast bench e2e SLIDE [--model BUNDLE] [--backend B] [--batch-size 64] [--threads 2]

engine: the HEX model alone on seeded random uint8 tiles (engines.measure: warm-up, then timed
runs for `seconds` per batch size), one process per backend so each has its own peak RSS. Rows:
  model, backend, describe, precision, tile, batch, runs, tiles_per_s, latency_ms (median per
  batch), latency_p90_ms, cpu_ms_per_tile (process CPU time, all threads: barely moved by other
  load), peak_rss_mib, gpu_mem_mib ("n/a" without a GPU).

e2e: one slide through Scorer (tissue, grid, TileStream → HEX engine, virtual CODEX, CODEX encoder
+ MICA, outputs to a scratch directory), with the HEX engine wrapped to record every batch
(start, end, tiles, CPU); in the same process, the engine alone at the same batch size just before
the slide (random tiles; this also warms the engine) and just after (the slide's first batch); then,
in a fresh process, the TileStream alone over the same tiles (bench.stream's stream case). Fields:
  tiles, seconds (the SlideResult's stages), e2e_seconds (around Scorer.score), e2e_tiles_per_s
  (SlideResult.hex_tiles_per_s: tiles over the stream+hex stage), engine_tiles_per_s, stream_tiles_per_s,
  pipeline_efficiency = e2e_tiles_per_s / engine_tiles_per_s (the goal is ≥ 0.95: the engine never
  waits for tiles), steady_tiles_per_s / pipeline_efficiency_steady (the same from the end of the
  first batch on), engine_busy (engine seconds / stream+hex seconds), cpu_efficiency (engine-alone
  CPU per tile / process CPU per tile during the slide's engine runs), pipeline_efficiency_load_robust
  = engine_busy × cpu_efficiency (an estimate that other load on a shared CPU barely moves; on a GPU
  read pipeline_efficiency), slide_tiles_per_s (tiles /
  e2e_seconds, every stage), cpu_ms_per_tile, peak_rss_mib, gpu_mem_mib, trace (per batch).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ..bundle import Bundle, load_bundle
from ..engines import available_backends
from ..errors import HexfastError
from ..score import Scorer, open_engine
from ..slide import open_slide
from .measure import measure
from .proc import cpu_seconds, peak_rss_mib, run_in_subprocess
from .stream import pick_tiles, stream_tiles

DEFAULT_BATCH_SIZES = (1, 8, 32, 64)


class TimedEngine:
    """An engine that records each batch: (submitted, collected) perf_counter seconds, tiles,
    process CPU seconds and seconds spent inside submit + collect (with two batches in flight the
    (submitted, collected) spans overlap; the time inside does not). Everything else is the
    wrapped engine's. Keeps a copy of the first batch when asked."""

    def __init__(self, engine, keep_first: bool = False):
        self.engine = engine
        self.records: list[tuple[float, float, int, float, float]] = []
        self.first: dict | None = None
        self._keep_first = keep_first

    def submit(self, feeds):
        c0, t0 = cpu_seconds(), time.perf_counter()
        handle = self.engine.submit(feeds)
        first = next(iter(feeds.values()))
        if self._keep_first and self.first is None:
            self.first = {k: np.array(v) for k, v in feeds.items()}
        return handle, t0, int(first.shape[0]) if first.ndim else 1, cpu_seconds() - c0, time.perf_counter() - t0

    def collect(self, timed_handle):
        handle, t0, tiles, cpu, inside = timed_handle
        c0, t1 = cpu_seconds(), time.perf_counter()
        out = self.engine.collect(handle)
        t2 = time.perf_counter()
        self.records.append((t0, t2, tiles, cpu + cpu_seconds() - c0, inside + t2 - t1))
        return out

    def run(self, feeds):
        return self.collect(self.submit(feeds))

    def __getattr__(self, name):
        return getattr(self.engine, name)


class SimulatedEngine:
    """A GPU that scores `tiles_per_s` tiles a second and does nothing else, for measuring the
    pipeline on a machine without one (`hexfast bench e2e --simulate-engine`; never reachable
    from `hexfast score`). submit() puts the batch on the device's timeline and returns, collect()
    sleeps (the GIL released) until it is done; outputs are zeros of HEX's shapes."""

    backend = "simulated"
    precision = "fp32"

    def __init__(self, tiles_per_s: float, markers: int = 40, embedding: int = 1024):
        self.tiles_per_s = float(tiles_per_s)
        self.widths = {"markers": markers, "embedding": embedding}
        self.busy_until = 0.0
        self.outputs = ()

    def submit(self, feeds):
        n = int(next(iter(feeds.values())).shape[0])
        self.busy_until = max(time.perf_counter(), self.busy_until) + n / self.tiles_per_s
        return self.busy_until, n

    def collect(self, handle):
        done, n = handle
        wait = done - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        return {name: np.zeros((n, width), np.float32) for name, width in self.widths.items()}

    def run(self, feeds):
        return self.collect(self.submit(feeds))

    def describe(self) -> str:
        return f"simulated engine: {self.tiles_per_s:g} tiles/s, no compute"

    def close(self) -> None:
        pass


def gpu_memory_mib(engine=None) -> float | str:
    """GPU memory this process holds: torch's peak allocation for the torch backend on CUDA, else
    nvidia-smi's figure for this PID (ORT / TensorRT allocate outside torch); "n/a" without a GPU."""
    torch_engine = getattr(engine, "engine", engine)
    device = getattr(torch_engine, "device", None)
    if getattr(device, "type", None) == "cuda":
        import torch

        return torch.cuda.max_memory_allocated(device) / 2**20
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=30)
            for line in out.stdout.splitlines():
                pid, _, used = line.partition(",")
                if pid.strip() == str(os.getpid()):
                    return float(used)
            if out.returncode == 0:
                return 0.0
        except (OSError, subprocess.SubprocessError, ValueError):
            pass
    return "n/a"


def encoder_label(bundle) -> str:
    """e.g. "MUSK dim 1024 × 24 layers, patch 16" from the manifest (MUSK-L/16 when it says nothing)."""
    enc = bundle.manifest.get("hex_encoder") or {"dim": 1024, "depth": 24, "patch_size": 16}
    return f"MUSK dim {enc['dim']} × {enc['depth']} layers, patch {enc['patch_size']}"


def random_tiles(batch: int, tile: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(batch, tile, tile, 3), dtype=np.uint8)


def engine_rows(bundle, backend: str = "auto", precision: str = "fp32", batch_sizes=DEFAULT_BATCH_SIZES,
                tile: int = 224, seconds: float = 5.0, threads: int | None = None, warmup: int = 1) -> list[dict]:
    """Engine-only rows for one backend, in this process (see the module docstring for the fields)."""
    bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
    rows = []
    with open_engine(bundle, "hex", backend, precision, threads) as engine:
        timed = TimedEngine(engine)
        for batch in sorted({int(b) for b in batch_sizes}):
            timed.records.clear()
            (m,) = measure(timed, lambda b: random_tiles(b, tile), [batch], seconds=seconds, warmup=warmup)
            timed_runs = timed.records[warmup:]
            cpu = sum(r[3] for r in timed_runs)
            rows.append({"model": str(bundle.path), "demo": bundle.demo, "encoder": encoder_label(bundle),
                         "backend": engine.backend,
                         "describe": engine.describe(), "precision": precision, "tile": tile, **m,
                         "cpu_ms_per_tile": 1e3 * cpu / (batch * len(timed_runs)),
                         "peak_rss_mib": peak_rss_mib(), "gpu_mem_mib": gpu_memory_mib(engine)})
    order = {int(b): i for i, b in enumerate(batch_sizes)}
    return sorted(rows, key=lambda r: order[r["batch"]])


def _in_subprocess(case: str, **kwargs) -> list[dict] | dict:
    """Runs `case` of this module in a fresh interpreter (its own peak RSS, no shared thread pools)."""
    return run_in_subprocess(__name__, case, json.dumps(kwargs))


def bench_engine(model=None, backends=("auto",), precision: str = "fp32", batch_sizes=DEFAULT_BATCH_SIZES,
                 tile: int = 224, seconds: float = 5.0, threads: int | None = None, isolate: bool = True,
                 on_row=None) -> list[dict]:
    """Engine-only rows for each backend ("all": every backend available here, skipping those that
    cannot load this model, with a row {"backend", "error"})."""
    bundle = load_bundle(model)
    every = list(backends) == ["all"]
    names = available_backends() if every else list(backends)
    rows = []
    for backend in names:
        kwargs = dict(model=str(bundle.path), backend=backend, precision=precision, batch_sizes=list(batch_sizes),
                      tile=tile, seconds=seconds, threads=threads)
        try:
            if isolate:
                got = _in_subprocess("engine", **kwargs)
            else:
                got = engine_rows(kwargs.pop("model"), **kwargs)
        except HexfastError as e:
            if not every:
                raise
            got = [{"backend": backend, "error": str(e)}]
        for row in got:
            rows.append(row)
            if on_row:
                on_row(row)
    return rows


def format_engine_table(rows: list[dict]) -> str:
    lines = ["| backend | precision | tile | batch | tiles/s | latency ms (median / p90) | CPU ms/tile | peak RSS MiB "
             "| GPU MiB |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['backend']} | - | - | - | skipped: {r['error']} | | | | |")
            continue
        gpu = r["gpu_mem_mib"] if isinstance(r["gpu_mem_mib"], str) else f"{r['gpu_mem_mib']:.0f}"
        lines.append(f"| {r['backend']} | {r['precision']} | {r['tile']} | {r['batch']} | {_rate(r['tiles_per_s'])} "
                     f"| {r['latency_ms']:.1f} / {r['latency_p90_ms']:.1f} | {r['cpu_ms_per_tile']:.2f} "
                     f"| {r['peak_rss_mib']:.0f} | {gpu} |")
    return "\n".join(lines)


def _rate(x: float) -> str:
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.3g}"


# ----------------------------------------------------------------------------- end to end

def _engine_alone(timed: TimedEngine, feeds: dict, seconds: float, warmup: int) -> dict:
    """engines.measure on `feeds` at their batch size, with the process CPU time per tile."""
    batch = int(next(iter(feeds.values())).shape[0])
    saved, timed.records = timed.records, []
    try:
        (m,) = measure(timed, lambda b: feeds, [batch], seconds=seconds, warmup=warmup)
        runs = timed.records[warmup:]
    finally:
        timed.records = saved
    return {**m, "cpu_ms_per_tile": 1e3 * sum(r[3] for r in runs) / (batch * len(runs))}


def e2e_case(slide: str, model=None, backend: str = "auto", precision: str = "fp32", batch_size: int = 64,
             threads: int = 2, engine_threads: int | None = None, engine_seconds: float = 5.0,
             out: str | None = None, simulate_engine: float | None = None) -> dict:
    """Scores `slide` once, tracing the HEX engine, with the engine measured alone (this process) just
    before (random tiles of the slide's tile size, batch_size) and just after (the slide's first batch):
    bracketing the slide in time makes the ratio less sensitive to other load on the machine.
    simulate_engine: HEX replaced by SimulatedEngine at that many tiles/s (its rate is then the
    engine-alone figure)."""
    bundle = model if isinstance(model, Bundle) else load_bundle(model)
    start = time.perf_counter()
    scorer = Scorer(bundle, backend, precision=precision, batch_size=batch_size, threads=threads,
                    engine_threads=engine_threads)
    load_s = time.perf_counter() - start
    scratch = None
    if out is None:
        scratch = tempfile.mkdtemp(prefix="hexfast-bench-")
        out = scratch
    try:
        with open_slide(slide) as s:
            tile_px = s.tile.size
        if simulate_engine:
            timed = TimedEngine(SimulatedEngine(simulate_engine), keep_first=True)
            before = {"batch": batch_size, "tiles_per_s": float(simulate_engine), "latency_ms": 1e3 * batch_size /
                      simulate_engine, "cpu_ms_per_tile": 0.0, "runs": 0}
        else:
            timed = TimedEngine(scorer.hex, keep_first=True)
            before = _engine_alone(timed, {"tiles": random_tiles(batch_size, tile_px)}, engine_seconds, warmup=1)
        scorer.hex = timed
        c0, t0 = cpu_seconds(), time.perf_counter()
        result = scorer.score(slide, out=out)
        e2e_s, cpu_s = time.perf_counter() - t0, cpu_seconds() - c0
        rss = peak_rss_mib()
        gpu = gpu_memory_mib(timed)
        n = len(result.coords)
        after = None
        if timed.first is not None and not simulate_engine:  # no warm-up: the engine has just run this batch
            after = _engine_alone(timed, timed.first, engine_seconds, warmup=0)
        alone = [m for m in (before, after) if m is not None and m["batch"] == (after or before)["batch"]]
        engine_rate = sum(m["tiles_per_s"] for m in alone) / len(alone)
        engine_cpu = sum(m["cpu_ms_per_tile"] for m in alone) / len(alone)
        stream_hex = result.seconds.get("stream+hex", 0.0)
        engine_within = sum(r[4] for r in timed.records)
        busy = engine_within / stream_hex if stream_hex else None
        during_cpu = 1e3 * sum(r[3] for r in timed.records) / n if n else None
        cpu_eff = engine_cpu / during_cpu if during_cpu and not simulate_engine else None
        e2e_rate = result.hex_tiles_per_s
        # From the end of the first batch on (without the stream filling its ring).
        steady = None
        if len(timed.records) > 1:
            span = timed.records[-1][1] - timed.records[0][1]
            steady = sum(r[2] for r in timed.records[1:]) / span if span > 0 else None
        return {
            "slide": str(slide), "tiles": n, "tile_px": int(result.tile_size), "model": str(scorer.bundle.path),
            "demo": scorer.bundle.demo, "backend": scorer.backend, "describe": scorer.hex.describe(),
            "precision": precision, "batch_size": batch_size, "threads": threads,
            "model_load_seconds": load_s, "seconds": dict(result.seconds), "wall_seconds": result.wall_seconds,
            "e2e_seconds": e2e_s, "e2e_tiles_per_s": e2e_rate, "slide_tiles_per_s": n / e2e_s if e2e_s else 0.0,
            "engine_batch": alone[0]["batch"], "engine_tiles_per_s": engine_rate,
            "engine_before": before, "engine_after": after,
            "engine_latency_ms": alone[-1]["latency_ms"], "engine_cpu_ms_per_tile": engine_cpu,
            "pipeline_efficiency": e2e_rate / engine_rate if engine_rate else None,
            "steady_tiles_per_s": steady,
            "pipeline_efficiency_steady": steady / engine_rate if steady and engine_rate else None,
            "engine_busy": busy,
            "during_cpu_ms_per_tile": during_cpu, "cpu_efficiency": cpu_eff,
            "pipeline_efficiency_load_robust": busy * cpu_eff if busy is not None and cpu_eff is not None else None,
            "cpu_ms_per_tile": 1e3 * cpu_s / n if n else 0.0, "peak_rss_mib": rss, "gpu_mem_mib": gpu,
            "simulated_engine_tiles_per_s": simulate_engine,
            "ideal_engine_seconds": n / simulate_engine if simulate_engine else None,
            "trace": [{"start": a - t0, "end": b - t0, "tiles": k, "cpu": c, "inside": i}
                      for a, b, k, c, i in timed.records],
        }
    finally:
        scorer.close()
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def stream_case(slide: str, threads: int = 2, batch_size: int = 64) -> dict:
    """The TileStream alone over the slide's whole grid (bench.stream's stream case)."""
    coords, size = pick_tiles(slide, 1 << 62)
    c0, t0 = cpu_seconds(), time.perf_counter()
    reader = stream_tiles(slide, coords, size, threads, batch_size=batch_size)
    seconds, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    n = max(len(coords), 1)
    return {"tiles": len(coords), "seconds": seconds, "tiles_per_s": len(coords) / seconds if seconds else 0.0,
            "cpu_ms_per_tile": 1e3 * cpu / n, "peak_rss_mib": peak_rss_mib(), "reader": reader}


def bench_e2e(slide, model=None, backend: str = "auto", precision: str = "fp32", batch_size: int = 64,
              threads: int = 2, engine_threads: int | None = None, engine_seconds: float = 5.0,
              out: str | None = None, isolate: bool = True, simulate_engine: float | None = None) -> dict:
    """e2e_case and stream_case, each in its own process; the combined fields (module docstring)."""
    kwargs = dict(slide=str(slide), model=None if model is None else str(model), backend=backend,
                  precision=precision, batch_size=batch_size, threads=threads, engine_threads=engine_threads,
                  engine_seconds=engine_seconds, out=None if out is None else str(out),
                  simulate_engine=simulate_engine)
    result = _in_subprocess("e2e", **kwargs) if isolate else e2e_case(**kwargs)
    stream_kwargs = dict(slide=str(slide), threads=threads, batch_size=batch_size)
    stream = _in_subprocess("stream", **stream_kwargs) if isolate else stream_case(**stream_kwargs)
    result.update({"stream_tiles_per_s": stream["tiles_per_s"], "stream_cpu_ms_per_tile": stream["cpu_ms_per_tile"],
                   "stream_peak_rss_mib": stream["peak_rss_mib"], "stream_reader": stream["reader"]})
    return result


def format_e2e(r: dict) -> str:
    def f3(x):
        return f"{x:.3f}" if x is not None else "n/a"

    eff = f3(r["pipeline_efficiency"])
    if r.get("pipeline_efficiency_steady") is not None:
        eff += f" ({f3(r['pipeline_efficiency_steady'])} after batch 1)"
    busy = f"{100 * r['engine_busy']:.1f} %" if r["engine_busy"] is not None else "n/a"
    gpu = r["gpu_mem_mib"] if isinstance(r["gpu_mem_mib"], str) else f"{r['gpu_mem_mib']:.0f} MiB"
    stages = ", ".join(f"{k} {v:.2f}" for k, v in r["seconds"].items())
    alone = [m for m in (r.get("engine_before"), r.get("engine_after")) if m]
    return "\n".join([
        f"{Path(r['slide']).name}: {r['tiles']} tiles of {r['tile_px']} px; {r['describe']}; batch {r['batch_size']}, "
        f"{r['threads']} stream threads",
        "| slide s (Scorer.score) | e2e tiles/s (stream+hex) | engine-only tiles/s | stream-only tiles/s "
        "| pipeline efficiency | engine busy | CPU efficiency | load-robust efficiency | whole-slide tiles/s "
        "| CPU ms/tile | peak RSS MiB | GPU memory |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        f"| {r['e2e_seconds']:.2f} | {_rate(r['e2e_tiles_per_s'])} | {_rate(r['engine_tiles_per_s'])} "
        f"| {_rate(r['stream_tiles_per_s'])} | {eff} | {busy} | {f3(r.get('cpu_efficiency'))} "
        f"| {f3(r.get('pipeline_efficiency_load_robust'))} | {_rate(r['slide_tiles_per_s'])} "
        f"| {r['cpu_ms_per_tile']:.2f} | {r['peak_rss_mib']:.0f} | {gpu} |",
        f"engine alone (before / after the slide): {' / '.join(_rate(m['tiles_per_s']) for m in alone)} tiles/s; "
        f"stages (s): {stages}; model load {r['model_load_seconds']:.2f} s",
    ])


if __name__ == "__main__":
    _case, _kwargs = sys.argv[1], json.loads(sys.argv[2])
    if _case == "engine":
        _out = engine_rows(_kwargs.pop("model"), **_kwargs)
    elif _case == "e2e":
        _out = e2e_case(**_kwargs)
    elif _case == "stream":
        _out = stream_case(**_kwargs)
    else:
        raise SystemExit(f"unknown case {_case}")
    print(json.dumps(_out))
