"""HEX on a GPU: torch variants (fp16 / bf16 autocast, fp16 / bf16 weights, CUDA graphs,
torch.compile) and the bundle's engines (ONNX Runtime CUDA / TensorRT EP, native TensorRT),
each checked against fp32 torch on the same tiles, with a projection for a 40x resection slide.

    python benchmarks/gpu_bench.py torch   [--size full] [--batch-sizes 32,64,128] [--json OUT]
    python benchmarks/gpu_bench.py engines --model BUNDLE [--batch-size 64] [--json OUT]
    python benchmarks/gpu_bench.py env     [--json OUT]       # device, driver, versions

`benchmarks/gpu_bench.sh` runs them all (plus roofline, e2e and the reference path) and writes
everything under one directory. On a machine without CUDA, `torch --device cpu --size tiny` runs
the same code paths that do not need a GPU (a smoke test of this script).

Weights: the full-size demo models (random, seeded: hexfast_export.demo) — throughput does not
depend on weight values; the engines case uses the bundle given (export it with
`hexfast export --demo --size full --mica-features resnet50-trunc --fp16 -o BUNDLE`, or a real one).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SLIDE_TILES = 50_000  # a 40x resection slide's tissue tiles (order of magnitude)


def versions() -> dict:
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in ("torch", "onnxruntime", "onnxruntime-gpu", "tensorrt", "cuda-python", "onnx", "numpy", "hexfast"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    if shutil.which("nvidia-smi"):
        q = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit",
                            "--format=csv,noheader"], capture_output=True, text=True)
        out["nvidia-smi"] = q.stdout.strip()
    try:
        import torch

        out["torch.cuda"] = torch.version.cuda
        out["cudnn"] = torch.backends.cudnn.version() if torch.cuda.is_available() else None
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            out["device"] = f"{p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs, sm_{p.major}{p.minor}"
    except ImportError:
        pass
    return out


def tiles_for(batch: int, tile: int = 224, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(batch, tile, tile, 3), dtype=np.uint8)


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


# ----------------------------------------------------------------------------- torch variants

class Split:
    """uint8 tiles → fp32 PIL-exact preprocessing (never in reduced precision: its sums need 24 bits)
    → the model with weights cast to `dtype` and/or under autocast to `autocast` → fp32 outputs."""

    def __init__(self, graph, dtype=None, autocast=None):
        self.graph, self.dtype, self.autocast = graph, dtype, autocast

    def __call__(self, tiles):
        import torch

        x = self.graph.preprocess(tiles)
        if self.dtype is not None:
            x = x.to(self.dtype)
        with torch.autocast(tiles.device.type, dtype=self.autocast or torch.float32, enabled=self.autocast is not None):
            embedding = self.graph.model.encode(x)
            markers, _ = self.graph.model.forward_head(embedding)
        return markers.float(), embedding.float()


def torch_cases(size: str, device: str, batch_sizes: list[int], seconds: float, tile: int) -> list[dict]:
    import torch

    from hexfast_export.demo import demo_models
    from hexfast_export.onnx_export import HexGraph

    dev = torch.device(device)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    hex_model = demo_models(size)[0]
    base = HexGraph(hex_model).eval().to(dev)
    check = torch.from_numpy(tiles_for(8, tile, seed=1)).to(dev)
    with torch.inference_mode():
        ref_m, ref_e = (t.float().cpu().numpy() for t in base(check))  # fp32 reference on this device

    variants = [("eager fp32", "eager", None),
                ("eager fp16 autocast (the reference's)", "autocast", torch.float16),
                ("eager bf16 autocast", "autocast", torch.bfloat16),
                ("eager fp16 weights", "eager", torch.float16),
                ("eager bf16 weights", "eager", torch.bfloat16),
                ("CUDA graph fp16 weights", "graph", torch.float16),
                ("CUDA graph bf16 weights", "graph", torch.bfloat16),
                ("torch.compile max-autotune-no-cudagraphs fp16 weights", "compile", torch.float16),
                ("torch.compile reduce-overhead (CUDA graphs) fp16 weights", "compile-ro", torch.float16),
                ("torch.compile max-autotune-no-cudagraphs bf16 weights", "compile", torch.bfloat16)]
    rows = []
    for name, how, dtype in variants:
        if dev.type != "cuda" and ("CUDA graph" in name or "compile" in name or "fp16" in name):
            rows.append({"case": name, "skipped": "needs CUDA"})
            continue
        graph = base
        if dtype is not None and how != "autocast":
            graph = HexGraph(demo_models(size)[0]).eval().to(dev)
            graph.model.to(dtype)
            fn = Split(graph, dtype=dtype)
        else:
            fn = Split(graph, autocast=dtype)
        if how == "compile":
            fn = torch.compile(fn, mode="max-autotune-no-cudagraphs", dynamic=False)
        elif how == "compile-ro":
            fn = torch.compile(fn, mode="reduce-overhead", dynamic=False)
        for batch in batch_sizes:
            x = torch.from_numpy(tiles_for(batch, tile)).to(dev)
            try:
                row = _time_torch(fn, x, how == "graph", seconds, dev)
                with torch.inference_mode():
                    got = _run_batch(fn, check, how == "graph", dev)
            except Exception as e:  # noqa: BLE001 - report and go on (e.g. out of memory at batch 128)
                rows.append({"case": name, "batch": batch, "skipped": f"{type(e).__name__}: {str(e).splitlines()[0]}"})
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            row.update({"case": name, "batch": batch, "tile": tile, "size": size,
                        "markers_rel": rel(got[0], ref_m), "embedding_rel": rel(got[1], ref_e),
                        "slide_50k_s": SLIDE_TILES / row["tiles_per_s"]})
            rows.append(row)
            print(f"  {name:<58} batch {batch:<4} {row['tiles_per_s']:9.1f} tiles/s  markers Δ {row['markers_rel']:.1e}",
                  file=sys.stderr)
        del graph, fn
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _run_batch(fn, x, graphed, dev):
    """One forward of a (possibly smaller) batch, for the accuracy check (CUDA graphs re-capture for its shape)."""
    import torch

    if graphed:
        return [t.cpu().numpy() for t in _capture(fn, x)[1]()]
    m, e = fn(x)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return m.float().cpu().numpy(), e.float().cpu().numpy()


def _capture(fn, x):
    import torch

    static_x = x.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.inference_mode(), torch.cuda.stream(stream):
        for _ in range(3):
            fn(static_x)
    torch.cuda.current_stream().wait_stream(stream)
    g = torch.cuda.CUDAGraph()
    with torch.inference_mode(), torch.cuda.graph(g):
        static_out = fn(static_x)

    def replay():
        g.replay()
        torch.cuda.synchronize()
        return static_out

    return static_x, replay


def _time_torch(fn, x, graphed, seconds, dev) -> dict:
    import torch

    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        if graphed:
            _, step = _capture(fn, x)
        else:
            def step():
                out = fn(x)
                if cuda:
                    torch.cuda.synchronize()
                return out
        for _ in range(3):  # warm-up (and compilation / autotuning for torch.compile)
            step()
        times = []
        start = time.perf_counter()
        while len(times) < 5 or time.perf_counter() - start < seconds:
            t = time.perf_counter()
            step()
            times.append(time.perf_counter() - t)
    batch = x.shape[0]
    return {"tiles_per_s": batch * len(times) / sum(times), "latency_ms": float(np.median(times) * 1e3),
            "runs": len(times), "gpu_mem_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else "n/a"}


# ----------------------------------------------------------------------------- bundle engines

def engine_cases(model: str, batch: int, seconds: float, tile: int) -> list[dict]:
    """Every backend × precision that loads here, timed (engines.measure) and checked against
    the bundle's fp32 model run by ONNX Runtime on the CPU... or the first fp32 engine that loads."""
    from hexfast.bench.measure import measure
    from hexfast.bundle import load_bundle
    from hexfast.engines import available_backends
    from hexfast.score import open_engine

    bundle = load_bundle(model)
    check = tiles_for(8, tile, seed=1)
    ref = None
    rows = []
    for backend in available_backends():
        for precision in ("fp32", "fp16", "bf16"):
            try:
                engine = open_engine(bundle, "hex", backend, precision)
            except Exception as e:  # noqa: BLE001 - a missing plan, an unsupported precision: say so, go on
                rows.append({"backend": backend, "precision": precision, "skipped": str(e).splitlines()[0]})
                continue
            with engine:
                out = engine.run({"tiles": check})
                if ref is None and precision == "fp32":
                    ref = out
                (m,) = measure(engine, lambda b: tiles_for(b, tile), [batch], seconds=seconds)
                row = {"backend": backend, "precision": precision, "describe": engine.describe(), **m,
                       "slide_50k_s": SLIDE_TILES / m["tiles_per_s"]}
                if ref is not None:
                    row.update({"markers_rel": rel(out["markers"], ref["markers"]),
                                "embedding_rel": rel(out["embedding"], ref["embedding"])})
                rows.append(row)
                print(f"  {backend:<9} {precision:<5} batch {batch} {m['tiles_per_s']:9.1f} tiles/s", file=sys.stderr)
    return rows


def table(rows: list[dict], key: str) -> str:
    lines = [f"| {key} | batch | tiles/s | latency ms | GPU MiB | markers max|Δ|/max|ref| vs fp32 | 50k-tile slide, s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        label = r.get(key) or f"{r.get('backend')} {r.get('precision')}"
        if key == "backend":
            label = f"{r['backend']} {r['precision']}"
        if "skipped" in r:
            lines.append(f"| {label} | {r.get('batch', '-')} | skipped: {r['skipped']} | | | | |")
            continue
        mem = r.get("gpu_mem_mib", "n/a")
        mem = mem if isinstance(mem, str) else f"{mem:.0f}"
        delta = f"{r['markers_rel']:.1e}" if "markers_rel" in r else "-"
        lines.append(f"| {label} | {r['batch']} | {r['tiles_per_s']:.1f} | {r['latency_ms']:.1f} | {mem} | {delta} "
                     f"| {r['slide_50k_s']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=("torch", "engines", "env"))
    p.add_argument("--size", choices=("tiny", "full"), default="full", help="demo model size for the torch cases")
    p.add_argument("--device", default="cuda", help="torch device (cpu: smoke test)")
    p.add_argument("--model", help="bundle for the engines case")
    p.add_argument("--batch-sizes", default="32,64,128")
    p.add_argument("--batch-size", type=int, default=64, help="engines case batch")
    p.add_argument("--tile", type=int, default=224)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)

    env = versions()
    if args.what == "env":
        result = env
        print(json.dumps(env, indent=1))
    elif args.what == "torch":
        rows = torch_cases(args.size, args.device, [int(b) for b in args.batch_sizes.split(",")], args.seconds,
                           args.tile)
        result = {"env": env, "rows": rows}
        print(table(rows, "case"))
    else:
        if not args.model:
            p.error("engines needs --model BUNDLE")
        rows = engine_cases(args.model, args.batch_size, args.seconds, args.tile)
        result = {"env": env, "rows": rows}
        print(table(rows, "backend"))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
