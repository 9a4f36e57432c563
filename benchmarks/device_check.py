"""The GPU measurements issue 15 asks for, in one run, on the H200 this project borrows (or, with
--cpu, the same steps, tiny, on a CPU: the dry run CI does so this cannot rot).

    python benchmarks/device_check.py OUT [--cpu]          (benchmarks/device_check.sh sets it up)

Steps, each timed, each writing its part of OUT/device_check.json as it ends (a failed step is
recorded with its error and the rest go on):

  env        torch, CUDA, the GPU, hexfast, whether the direct JPEG reader was built
  export     the full-size demo bundle (MUSK-L/16 @ 384, DINOv2, MICA; random weights) with
             torch.export programs fp32 / fp16 / bf16 (tiny with --cpu)
  peak       dense matmul TFLOP/s measured now: bf16, fp16, tf32 (fp32 numpy/torch with --cpu)
  engine     the torch backend alone, HEX at bf16 and fp16 over batch sizes, fp32 (TF32) once, CUDA
             graphs on and off: tiles/s, latency, GPU memory, TFLOP/s achieved vs the bf16 peak
  parity     bf16 and fp16 programs against the fp32 program on the real H&E tiles of shared/data
  slide      a generated 40x slide with 10-20k tissue tiles (benchmarks/make_slide.py)
  e2e        Scorer.score on it with the torch backend, bf16, 16 stream threads: pipeline efficiency,
             where the time goes, projected 50k-tile slide time
  score      `hexfast score --backend torch` on it (the command users run, HEX + MICA)
  reference  HEX's research path (torch eager, fp16 autocast, a DataLoader of PIL tiles) against
             hexfast on the same 4,096 tiles (benchmarks/reference_hex.py), and the ratio

The real H&E tiles come from shared/data: ../shared beside the checkout, or shared/ inside it (as
the device tool carries it), or $HEXFAST_SHARED.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
GFLOP_PER_TILE = 369.63  # full HEX, MUSK-L/16 @ 384 (hexfast bench roofline)
TARGET_TILES = 50_000


def find_shared() -> Path | None:
    for candidate in (os.environ.get("HEXFAST_SHARED"), ROOT.parent / "shared", ROOT / "shared"):
        if candidate and (Path(candidate) / "data").is_dir():
            return Path(candidate) / "data"
    return None


class Run:
    """The steps and their JSON: OUT/device_check.json rewritten after every step."""

    def __init__(self, out: Path, cpu: bool):
        self.out, self.cpu = out, cpu
        self.results: dict = {"mode": "cpu dry run" if cpu else "gpu", "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                              "steps": {}}

    def step(self, name: str, fn, *args, **kwargs):
        print(f"### {name}", flush=True)
        start = time.perf_counter()
        try:
            value = fn(*args, **kwargs)
            entry = {"ok": True, **(value or {})}
        except Exception as e:  # noqa: BLE001 - a failed step is recorded; the others still run
            traceback.print_exc()
            entry, value = {"ok": False, "error": f"{type(e).__name__}: {e}"}, None
        entry["seconds"] = round(time.perf_counter() - start, 2)
        self.results["steps"][name] = entry
        print(f"### {name}: {'ok' if entry['ok'] else 'FAILED'} after {entry['seconds']} s", flush=True)
        self.save()
        return value

    def save(self) -> None:
        (self.out / "device_check.json").write_text(json.dumps(self.results, indent=1, default=str))


def sh(*command, timeout=None) -> str:
    """Runs a command, echoing its output; raises with its last line when it fails."""
    print("$ " + " ".join(map(str, command)), flush=True)
    proc = subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    sys.stdout.write(proc.stdout[-20000:])
    sys.stdout.write(proc.stderr[-20000:])
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or proc.stdout.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"exit {proc.returncode}: {last}")
    return proc.stdout


# ----------------------------------------------------------------------------- steps


def env(cpu: bool) -> dict:
    import torch

    from hexfast import __version__, _core

    info = {"python": platform.python_version(), "torch": torch.__version__, "hexfast": __version__,
            "direct_jpeg_reader": bool(_core.HAVE_JPEG), "cpus": os.cpu_count(),
            "cuda": torch.version.cuda, "gpu": None}
    if torch.cuda.is_available() and not cpu:
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    capability=f"{props.major}.{props.minor}")
        info["flash_sdp"] = torch.backends.cuda.flash_sdp_enabled()
        info["mem_efficient_sdp"] = torch.backends.cuda.mem_efficient_sdp_enabled()
    elif not cpu:
        raise RuntimeError("no CUDA device visible to torch (run with --cpu for the dry run)")
    return info


def export(out: Path, cpu: bool) -> dict:
    bundle = out / "bundle"
    sh(sys.executable, "-m", "hexfast", "export", "--demo", "--size", "tiny" if cpu else "full",
       "--mica-features", "resnet50-trunc", "--fp16", "--bf16", "-o", bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    hex_entry = manifest["models"]["hex"]
    return {"bundle": str(bundle), "programs": hex_entry.get("programs"),
            "parity_program": hex_entry.get("parity_program"),
            "bytes": sum(p.stat().st_size for p in bundle.iterdir())}


def peak(cpu: bool) -> dict:
    from hexfast.bench.roofline import measure_peak

    result = measure_peak("cpu" if cpu else "cuda", n=1024 if cpu else 8192, seconds=0.5 if cpu else 2.0)
    return {"device": result.device, "rows": result.rows,
            "bf16_tflops": result.peak("bf16"), "fp16_tflops": result.peak("fp16"), "tf32_tflops": result.peak("tf32"),
            "fp32_tflops": result.peak("fp32")}


def engine(bundle: Path, cpu: bool, peak_tflops: float | None) -> dict:
    """The torch backend alone on random 224-px tiles (a 40x tile as read)."""
    import torch

    from hexfast.bench.measure import measure
    from hexfast.bench.model import random_tiles
    from hexfast.bundle import load_bundle
    from hexfast.score import open_engine

    b = load_bundle(bundle)
    seconds = 0.5 if cpu else 4.0
    batches = [1, 2] if cpu else [16, 32, 64, 128]
    plan = [(p, False, batches) for p in ("bf16", "fp16")] + [("fp32", False, [2 if cpu else 64])]
    plan += [("bf16", True, [2 if cpu else 64])]  # CUDA graphs (the CPU runs it without)
    rows = []
    torch.backends.cuda.matmul.allow_tf32 = True  # "fp32" on the GPU is TF32, as TensorRT's default
    for precision, graphs, sizes in plan:
        with open_engine(b, "hex", "torch", precision, cuda_graphs=graphs and not cpu) as e:
            if not cpu:
                torch.cuda.reset_peak_memory_stats()
            for m in measure(e, lambda n: random_tiles(n, 224), sizes, seconds=seconds, warmup=2):
                rate = m["tiles_per_s"]
                rows.append({**m, "precision": precision, "cuda_graphs": graphs and not cpu,
                             "describe": e.describe(),
                             "tflops": rate * GFLOP_PER_TILE / 1e3 if not cpu else None,
                             "share_of_bf16_peak": rate * GFLOP_PER_TILE / 1e3 / peak_tflops
                             if peak_tflops and not cpu else None,
                             "gpu_mem_mib": torch.cuda.max_memory_allocated() / 2**20 if not cpu else None})
                print(f"  {precision:<5} graphs={graphs!s:<5} batch {m['batch']:<4} {rate:9.1f} tiles/s", flush=True)
    best = max((r for r in rows if r["precision"] == "bf16"), key=lambda r: r["tiles_per_s"])
    return {"rows": rows, "best_bf16_tiles_per_s": best["tiles_per_s"], "best_bf16_batch": best["batch"],
            "projected_50k_engine_seconds": TARGET_TILES / best["tiles_per_s"]}


def parity(bundle: Path, shared: Path | None, cpu: bool) -> dict:
    """bf16 / fp16 programs against the fp32 one on real H&E tiles (shared/data, and the exporter's
    CMU crops), on the device."""
    from PIL import Image

    from hexfast.bundle import load_bundle
    from hexfast.score import open_engine

    paths = sorted((shared / "hex-official" / "he_patches").glob("*.png")) if shared else []
    paths += sorted((ROOT / "export" / "hexfast_export" / "data" / "parity_tiles").glob("*.png"))
    groups: dict[tuple, list] = {}
    for p in paths:
        tile = np.asarray(Image.open(p).convert("RGB"))
        groups.setdefault(tile.shape, []).append(tile)
    b = load_bundle(bundle)
    outputs = {}
    for precision in ("fp32", "bf16", "fp16"):
        with open_engine(b, "hex", "torch", precision) as e:
            outputs[precision] = [e.run({"tiles": np.stack(g)}) for g in groups.values()]
    figures = {}
    for precision in ("bf16", "fp16"):
        figures[precision] = {
            name: max(float(np.abs(o[name] - r[name]).max() / max(np.abs(r[name]).max(), 1e-30))
                      for o, r in zip(outputs[precision], outputs["fp32"]))
            for name in ("markers", "embedding")}
    return {"tiles": len(paths), "sizes": sorted({f"{s[0]} px" for s in groups}), "from_shared": shared is not None,
            "max_rel_vs_fp32": figures}


def slide(out: Path, shared: Path | None, cpu: bool) -> dict:
    texture = (shared / "slides" / "CMU-1-Small-Region.svs") if shared else None
    if texture is None or not texture.is_file():
        raise RuntimeError("needs shared/data/slides/CMU-1-Small-Region.svs for the tissue texture")
    path = out / "slide-40x.svs"
    width, height = (6000, 4000) if cpu else (66000, 50000)
    sh(sys.executable, "benchmarks/make_slide.py", "--texture", texture, "--width", width, "--height", height,
       "--tissue", "0.3", "-o", path)
    import hexfast

    with hexfast.open_slide(path) as s:
        tiles = len(hexfast.tile_slide(s))
    return {"slide": str(path), "size": [width, height], "tiles": tiles}


def e2e(slide_path: str, bundle: Path, out: Path, cpu: bool) -> dict:
    target = out / "e2e.json"
    sh(sys.executable, "-m", "hexfast", "bench", "e2e", slide_path, "--model", bundle, "--backend", "torch",
       "--precision", "fp32" if cpu else "bf16", "--threads", "2" if cpu else "16", "--batch-size",
       "8" if cpu else "64", "--seconds", "0.5" if cpu else "3", "--json", target)
    r = json.loads(target.read_text())
    fixed = sum(v for k, v in r["seconds"].items() if "within" not in k and k != "stream+hex")
    return {"tiles": r["tiles"], "e2e_tiles_per_s": r["e2e_tiles_per_s"], "engine_tiles_per_s": r["engine_tiles_per_s"],
            "stream_tiles_per_s": r["stream_tiles_per_s"], "stream_reader": r["stream_reader"],
            "pipeline_efficiency": r["pipeline_efficiency"], "engine_busy": r["engine_busy"],
            "stages": r["seconds"], "peak_rss_mib": r["peak_rss_mib"], "gpu_mem_mib": r["gpu_mem_mib"],
            "projected_50k_seconds": TARGET_TILES / r["e2e_tiles_per_s"] + fixed if r["e2e_tiles_per_s"] else None}


def score(slide_path: str, bundle: Path, out: Path, cpu: bool) -> dict:
    target = out / "score"
    start = time.perf_counter()
    sh(sys.executable, "-m", "hexfast", "score", slide_path, "--model", bundle, "--backend", "torch",
       "--precision", "fp32" if cpu else "bf16", "--threads", "2" if cpu else "16", "-o", target)
    report = json.loads(next(target.glob("*/report.json")).read_text())
    return {"wall_seconds": time.perf_counter() - start, "tiles": report["tile_count"],
            "tiles_per_s": report["tiles_per_s"], "backend": report["backend"], "stages": report["seconds"],
            "mica_risk": (report.get("mica") or {}).get("risk")}


def reference(slide_path: str, bundle: Path, out: Path, cpu: bool) -> dict:
    target = out / "reference.json"
    sh(sys.executable, "benchmarks/reference_hex.py", slide_path, "--model", bundle, "--tiles",
       "64" if cpu else "4096", "--backend", "torch", "--precision", "fp32" if cpu else "bf16",
       "--threads", "2" if cpu else "16", "--json", target)
    r = json.loads(target.read_text())
    return {"reference_tiles_per_s": r["reference"]["tiles_per_s"], "hexfast_tiles_per_s": r["hexfast"]["tiles_per_s"],
            "speedup": r["speedup"], "reference_how": r["reference"]["how"], "hexfast_how": r["hexfast"]["how"],
            "max_rel_diff": r.get("max_rel_diff")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--cpu", action="store_true", help="the dry run: the same steps, tiny, on the CPU")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    run = Run(args.out, args.cpu)
    shared = find_shared()
    run.results["shared"] = str(shared) if shared else None
    run.step("env", env, args.cpu)
    exported = run.step("export", export, args.out, args.cpu)
    measured = run.step("peak", peak, args.cpu)
    if exported:
        bundle = Path(exported["bundle"])
        run.step("engine", engine, bundle, args.cpu, (measured or {}).get("bf16_tflops"))
        run.step("parity", parity, bundle, shared, args.cpu)
        made = run.step("slide", slide, args.out, shared, args.cpu)
        if made:
            run.step("e2e", e2e, made["slide"], bundle, args.out, args.cpu)
            run.step("score", score, made["slide"], bundle, args.out, args.cpu)
            run.step("reference", reference, made["slide"], bundle, args.out, args.cpu)
    run.results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    run.save()
    failed = [name for name, step in run.results["steps"].items() if not step["ok"]]
    print(f"device check: {len(run.results['steps']) - len(failed)} of {len(run.results['steps'])} steps ok"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
