"""The GPU figures of benchmarks/RESULTS.md in one run on the borrowed H100 / H200, or with --cpu the same
steps, tiny, on a CPU (the dry run CI does, so this cannot rot). benchmarks/device_check.sh installs what
it needs (no venv) and runs this under a time limit; its header has the device call.

    python benchmarks/device_check.py OUT --work DIR [--cpu]

Steps, in order of value, each timed and each writing its part of OUT/device_check.json as it ends (a failed
step is recorded with its error and the rest go on; a failed preflight stops the run). Heavy files (the
bundle, the slide) go under --work; OUT gets only JSON (and the shell script's log).

  preflight     cv2, openslide and hexfast._core import (hexfast from the installed wheel when
                HEXFAST_DEVICE_SITE is set); CUDA visible; one tile through a bf16 HEX program on the GPU
  export        the full-size demo bundle (MUSK-L/16 @ 384, DINOv2, MICA on CLAM's ResNet50 features;
                random weights): ONNX fp32 and torch.export programs fp32 + HEX bf16 (tiny with --cpu)
  engine        the torch backend alone, HEX bf16, batch 64 (random 224-px tiles: a 40x tile as read)
  engine_sweep  bf16 at batch 32 and 128, bf16 with CUDA graphs at 64, fp32 with TF32 matmuls at 64
  peak          dense bf16 / TF32 matmul TFLOP/s measured now (the engine's share of the bf16 peak)
  slide         a generated 40x slide (benchmarks/make_slide.py), made in the background since `engine`
  e2e           `hexfast bench e2e` on it: Scorer (HEX + MICA, every output), torch bf16, 16 stream
                threads: pipeline efficiency, where the time goes, the projected 50k-tile slide
  parity        the bf16 program against the fp32 one on the GPU, true fp32 (TF32 off), and the fp32
                program on the GPU against the CPU, on real H&E tiles
  reference     HEX's research path (torch eager, fp16 autocast, DataLoader of PIL tiles) against hexfast
                on the same 1,024 tiles (benchmarks/reference_hex.py)

"summary" holds the figures RESULTS.md's GPU table takes. On SIGTERM (the script's time limit) the
step in progress is recorded as stopped, the JSON saved, and the exit code is 124.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
GFLOP_PER_TILE = 369.63  # full HEX, MUSK-L/16 @ 384 (hexfast bench roofline)
TARGET_TILES = 50_000
SLIDE_PX = {"gpu": (48_000, 40_000), "cpu": (6_000, 4_000)}  # ~13k and ~200 tissue tiles at 40x


class TimeLimit(BaseException):
    """SIGTERM: the time limit of device_check.sh."""


class Run:
    """The steps and their JSON: OUT/device_check.json rewritten after every step."""

    def __init__(self, out: Path, cpu: bool):
        self.out, self.cpu = out, cpu
        self.results: dict = {"mode": "cpu dry run" if cpu else "gpu", "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                              "steps": {}, "summary": {}}
        self._t0 = time.perf_counter()

    def step(self, name: str, fn, *args, **kwargs):
        print(f"### {name} (at {time.perf_counter() - self._t0:.0f} s)", flush=True)
        start = time.perf_counter()
        entry: dict = {"ok": False}
        self.results["steps"][name] = entry
        try:
            value = fn(*args, **kwargs)
            entry.update(ok=True, **(value or {}))
        except TimeLimit:
            entry.update(error="stopped by the time limit")
            raise
        except Exception as e:  # noqa: BLE001 - a failed step is recorded; the others still run
            traceback.print_exc()
            entry["error"], value = f"{type(e).__name__}: {e}", None
        finally:
            entry["seconds"] = round(time.perf_counter() - start, 2)
            print(f"### {name}: {'ok' if entry['ok'] else 'FAILED'} after {entry['seconds']} s", flush=True)
            self.save()
        return value

    def save(self) -> None:
        self.results["summary"] = summary(self.results["steps"])
        path = self.out / "device_check.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.results, indent=1, default=str))
        os.replace(tmp, path)


def summary(steps: dict) -> dict:
    """The figures of RESULTS.md's GPU table, from whichever steps have run."""
    s: dict = {}
    engine, sweep, peak = steps.get("engine") or {}, steps.get("engine_sweep") or {}, steps.get("peak") or {}
    rows = [r for r in (engine.get("rows") or []) + (sweep.get("rows") or []) if r["precision"] == "bf16"]
    if rows:
        best = max(rows, key=lambda r: r["tiles_per_s"])
        s.update(bf16_tiles_per_s=best["tiles_per_s"], bf16_batch=best["batch"], bf16_cuda_graphs=best["cuda_graphs"],
                 bf16_tflops=best["tflops"])  # None on the CPU dry run (tiny model)
        if best["tflops"] and peak.get("bf16_tflops"):
            s["share_of_bf16_peak"] = s["bf16_tflops"] / peak["bf16_tflops"]
    e2e = steps.get("e2e") or {}
    for key in ("pipeline_efficiency", "e2e_tiles_per_s", "projected_50k_seconds"):
        if e2e.get(key) is not None:
            s[key] = e2e[key]
    if (steps.get("reference") or {}).get("speedup") is not None:
        s["speedup_vs_reference"] = steps["reference"]["speedup"]
    return s


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


def find_shared() -> Path | None:
    """Test data: $HEXFAST_SHARED (the payload's copy, on the device), else ../shared beside the checkout."""
    for candidate in (os.environ.get("HEXFAST_SHARED"), ROOT.parent / "shared"):
        if candidate and (Path(candidate) / "data").is_dir():
            return Path(candidate) / "data"
    return None


@contextlib.contextmanager
def tf32(enabled: bool):
    """TF32 matmuls and convolutions on or off inside the block, as they were after it."""
    import torch

    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


# ----------------------------------------------------------------------------- steps


def preflight(work: Path, cpu: bool) -> dict:
    """What every later step needs, checked in seconds: a failure here stops the run."""
    import cv2
    import openslide
    import torch

    import hexfast
    from hexfast import _core
    from hexfast.engines.devices import cpu_name

    info = {"python": f"{sys.executable} {platform.python_version()}", "hexfast": hexfast.__version__,
            "hexfast_from": str(Path(hexfast.__file__).parent), "direct_jpeg_reader": bool(_core.HAVE_JPEG),
            "opencv": cv2.__version__, "openslide": openslide.__library_version__, "torch": torch.__version__,
            "cuda": torch.version.cuda, "cpus": os.cpu_count(), "cpu": cpu_name()}
    site = os.environ.get("HEXFAST_DEVICE_SITE")
    if site:
        if Path(site).resolve() not in Path(hexfast.__file__).resolve().parents:
            raise RuntimeError(f"hexfast was imported from {hexfast.__file__}, not from the wheels installed in {site}")
        stale = stale_files(Path(site))
        if stale:
            raise RuntimeError(f"the payload's hexfast wheel was built from other sources than this checkout "
                               f"({', '.join(stale[:3])}{' ...' if len(stale) > 3 else ''}): rerun "
                               "benchmarks/device_payload.sh")
    if not cpu:
        if not torch.cuda.is_available():
            raise RuntimeError(f"torch {torch.__version__} sees no CUDA device (run with --cpu for the dry run)")
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    capability=f"{props.major}.{props.minor}", driver=_nvidia_smi("driver_version"))
    from hexfast_export.demo import demo_models
    from hexfast_export.torch_export import export_hex_program

    from hexfast.engines.torch_backend import TorchEngine

    program = export_hex_program(demo_models("tiny")[0], work / "preflight-hex.bf16.pt2", "bf16")
    tile = np.random.default_rng(0).integers(0, 256, (1, 224, 224, 3), dtype=np.uint8)
    with TorchEngine(program, precision="bf16", output_names=["markers", "embedding"]) as engine:
        out = engine.run({"tiles": tile})
        info["forward"] = engine.describe()
    if out["markers"].shape != (1, 40) or not all(np.isfinite(v).all() for v in out.values()):
        raise RuntimeError(f"one bf16 HEX tile gave {({k: v.shape for k, v in out.items()})} with non-finite values")
    if not cpu and "cuda" not in info["forward"]:
        raise RuntimeError(f"the bf16 HEX forward did not run on the GPU: {info['forward']}")
    return info


@functools.cache
def verified_bundle(path: Path):
    """The exported bundle, its 3 GB of files hashed once for the steps of this process."""
    from hexfast.bundle import load_bundle

    return load_bundle(path)


def stale_files(site: Path) -> list[str]:
    """The checkout's Python files that the installed wheel holds in another version, or not at all."""
    stale = []
    for package, source in (("hexfast", ROOT / "python" / "hexfast"), ("hexfast_export", ROOT / "export" / "hexfast_export")):
        for path in sorted(source.rglob("*.py")):
            installed = site / package / path.relative_to(source)
            if not installed.is_file() or installed.read_bytes() != path.read_bytes():
                stale.append(f"{package}/{path.relative_to(source)}")
    return stale


def export(work: Path, cpu: bool) -> dict:
    """The demo bundle; one left in --work by an earlier run on this machine (a rerun while it is still
    warm) is reused: export writes a bundle whole or not at all, and load_bundle checks every file."""
    from hexfast.bundle import load_bundle

    bundle = work / "bundle"
    size = "tiny" if cpu else "full"
    reused = False
    if (bundle / "manifest.json").is_file():
        earlier = load_bundle(bundle)
        reused = earlier.manifest["demo_models"]["size"] == size and "bf16" in earlier.model("hex")["programs"]
    if not reused:
        sh(sys.executable, "-m", "hexfast", "export", "--demo", "--size", size, "--mica-features", "resnet50-trunc",
           "--bf16", "--cpu-variants", "none", "-o", bundle)  # the CPU variants are not this check's: its time
    manifest = json.loads((bundle / "manifest.json").read_text())
    hex_entry = manifest["models"]["hex"]
    return {"bundle": str(bundle), "reused": reused, "programs": hex_entry.get("programs"),
            "parity_program": hex_entry.get("parity_program"),
            "bytes": sum(p.stat().st_size for p in bundle.iterdir())}


def engine_rows(bundle: Path, cpu: bool, plan: list[tuple[str, bool, list[int]]]) -> dict:
    """The torch backend alone on random 224-px tiles, for each (precision, CUDA graphs, batch sizes)."""
    import torch

    from hexfast.bench.measure import measure
    from hexfast.bench.model import random_tiles
    from hexfast.score import open_engine

    b = verified_bundle(bundle)
    rows = []
    for precision, graphs, sizes in plan:
        graphs = graphs and not cpu
        # "fp32" on the GPU runs TF32 matmuls here, as TensorRT's and ONNX Runtime's CUDA fp32 do by default
        with tf32(precision == "fp32"), open_engine(b, "hex", "torch", precision, cuda_graphs=graphs) as e:
            if not cpu:
                torch.cuda.reset_peak_memory_stats()
            for m in measure(e, lambda n: random_tiles(n, 224), sizes, seconds=0.5 if cpu else 4.0, warmup=2):
                rate = m["tiles_per_s"]
                rows.append({**m, "precision": precision + (" (TF32 matmuls)" if precision == "fp32" and not cpu
                                                            else ""), "cuda_graphs": graphs, "describe": e.describe(),
                             "tflops": rate * GFLOP_PER_TILE / 1e3 if not cpu else None,
                             "gpu_mem_mib": torch.cuda.max_memory_allocated() / 2**20 if not cpu else None})
                print(f"  {precision:<5} graphs={graphs!s:<5} batch {m['batch']:<4} {rate:9.1f} tiles/s", flush=True)
    return {"rows": rows}


def peak(cpu: bool) -> dict:
    from hexfast.bench.roofline import measure_peak

    result = measure_peak("cpu" if cpu else "cuda", n=1024 if cpu else 8192, seconds=0.5 if cpu else 2.0)
    return {"device": result.device, "rows": result.rows,
            "bf16_tflops": result.peak("bf16"), "fp16_tflops": result.peak("fp16"), "tf32_tflops": result.peak("tf32"),
            "fp32_tflops": result.peak("fp32")}


def start_slide(work: Path, shared: Path | None, cpu: bool) -> tuple[subprocess.Popen | None, Path, str]:
    """benchmarks/make_slide.py in the background (CPU work, while the GPU steps run)."""
    texture = (shared / "slides" / "CMU-1-Small-Region.svs") if shared else None
    path = work / "slide-40x.svs"
    if texture is None or not texture.is_file():
        return None, path, "needs shared/data/slides/CMU-1-Small-Region.svs for the tissue texture"
    width, height = SLIDE_PX["cpu" if cpu else "gpu"]
    command = [sys.executable, "benchmarks/make_slide.py", "--texture", str(texture), "--width", str(width),
               "--height", str(height), "--tissue", "0.35", "-o", str(path)]
    print("$ " + " ".join(command) + " &", flush=True)
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True), path, ""


def slide(started: tuple[subprocess.Popen | None, Path, str]) -> dict:
    proc, path, problem = started
    if proc is None:
        raise RuntimeError(problem)
    output, _ = proc.communicate()
    sys.stdout.write(output[-5000:])
    if proc.returncode != 0:
        raise RuntimeError(f"make_slide.py exit {proc.returncode}")
    import hexfast

    with hexfast.open_slide(path) as s:
        tiles = len(hexfast.tile_slide(s))
        size = s.dimensions
    return {"slide": str(path), "size": list(size), "tiles": tiles}


def e2e(slide_path: str, bundle: Path, out: Path, cpu: bool) -> dict:
    target = out / "e2e.json"
    sh(sys.executable, "-m", "hexfast", "bench", "e2e", slide_path, "--model", bundle, "--backend", "torch",
       "--precision", "fp32" if cpu else "bf16", "--threads", "2" if cpu else "16", "--batch-size",
       "8" if cpu else "64", "--seconds", "0.5" if cpu else "3", "--json", target)
    r = json.loads(target.read_text())
    r.pop("trace", None)  # per batch: the JSON stays small
    target.write_text(json.dumps(r, indent=1))
    fixed = sum(v for k, v in r["seconds"].items() if "within" not in k and k != "stream+hex")
    return {"tiles": r["tiles"], "describe": r["describe"], "e2e_tiles_per_s": r["e2e_tiles_per_s"],
            "engine_tiles_per_s": r["engine_tiles_per_s"], "stream_tiles_per_s": r["stream_tiles_per_s"],
            "stream_reader": r["stream_reader"], "pipeline_efficiency": r["pipeline_efficiency"],
            "pipeline_efficiency_steady": r["pipeline_efficiency_steady"], "engine_busy": r["engine_busy"],
            "stages": r["seconds"], "wall_seconds": r["wall_seconds"], "peak_rss_mib": r["peak_rss_mib"],
            "gpu_mem_mib": r["gpu_mem_mib"],
            "projected_50k_seconds": TARGET_TILES / r["e2e_tiles_per_s"] + fixed if r["e2e_tiles_per_s"] else None}


def parity(bundle: Path, shared: Path | None, cpu: bool) -> dict:
    """On real H&E tiles: bf16 against fp32, both on the device with TF32 off (a true fp32 reference),
    and the fp32 program on the device against the same program on the CPU."""
    import torch
    from PIL import Image

    from hexfast.engines.torch_backend import load_program

    paths = sorted((shared / "hex-official" / "he_patches").glob("*.png")) if shared else []
    paths += sorted((ROOT / "export" / "hexfast_export" / "data" / "parity_tiles").glob("*.png"))
    groups: dict[tuple, list] = {}
    for p in paths:
        tile = np.asarray(Image.open(p).convert("RGB"))
        groups.setdefault(tile.shape, []).append(tile)
    b = verified_bundle(bundle)
    device = "cpu" if cpu else "cuda:0"
    outputs = {}
    with tf32(False):
        for key, precision, where in (("fp32", "fp32", device), ("bf16", "bf16", device), ("fp32 cpu", "fp32", "cpu")):
            module = load_program(b.program_file("hex", precision), where)
            with torch.inference_mode():
                outputs[key] = [[o.float().cpu().numpy() for o in module(torch.from_numpy(np.stack(g)).to(where))]
                                for g in groups.values()]
            del module
        tf32_off = not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32

    def worst(a, r):
        return {name: max(float(np.abs(x[i] - y[i]).max() / max(np.abs(y[i]).max(), 1e-30)) for x, y in zip(a, r))
                for i, name in enumerate(("markers", "embedding"))}

    return {"tiles": len(paths), "sizes": sorted({f"{s[0]} px" for s in groups}), "from_shared": shared is not None,
            "reference_tf32_off": tf32_off, "bf16_vs_fp32": worst(outputs["bf16"], outputs["fp32"]),
            "fp32_device_vs_cpu": worst(outputs["fp32"], outputs["fp32 cpu"])}


def reference(slide_path: str, bundle: Path, out: Path, cpu: bool) -> dict:
    target = out / "reference.json"
    sh(sys.executable, "benchmarks/reference_hex.py", slide_path, "--model", bundle, "--tiles",
       "64" if cpu else "1024", "--backend", "torch", "--precision", "fp32" if cpu else "bf16",
       "--threads", "2" if cpu else "16", "--json", target)
    r = json.loads(target.read_text())
    return {"reference_tiles_per_s": r["reference"]["tiles_per_s"], "hexfast_tiles_per_s": r["hexfast"]["tiles_per_s"],
            "speedup": r["speedup"], "reference_how": r["reference"]["how"], "hexfast_how": r["hexfast"]["how"],
            "max_rel_diff": r.get("max_rel_diff")}


def _nvidia_smi(field: str) -> str | None:
    try:
        return subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=30).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _stop(signum, frame):
    raise TimeLimit()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="where the JSON goes (small files only)")
    ap.add_argument("--work", type=Path, required=True, help="where the bundle and the slide go (GBs)")
    ap.add_argument("--cpu", action="store_true", help="the dry run: the same steps, tiny, on the CPU")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, _stop)
    run = Run(args.out, args.cpu)
    shared = find_shared()
    run.results["shared"] = str(shared) if shared else None
    background = None
    try:
        if run.step("preflight", preflight, args.work, args.cpu) is None:
            print("device check: preflight FAILED; nothing else is run", flush=True)
            return 2
        exported = run.step("export", export, args.work, args.cpu)
        if exported:
            bundle = Path(exported["bundle"])
            background = start_slide(args.work, shared, args.cpu)
            run.step("engine", engine_rows, bundle, args.cpu, [("bf16", False, [2 if args.cpu else 64])])
            run.step("engine_sweep", engine_rows, bundle, args.cpu,
                     [("bf16", False, [1] if args.cpu else [32, 128]), ("bf16", True, [2 if args.cpu else 64]),
                      ("fp32", False, [2 if args.cpu else 64])])
            run.step("peak", peak, args.cpu)
            made = run.step("slide", slide, background)
            if made:
                run.step("e2e", e2e, made["slide"], bundle, args.out, args.cpu)
            run.step("parity", parity, bundle, shared, args.cpu)
            if made:
                run.step("reference", reference, made["slide"], bundle, args.out, args.cpu)
    except TimeLimit:
        run.results["stopped"] = "time limit (SIGTERM) reached"
        print("device check: stopped by the time limit", flush=True)
    finally:
        if background and background[0] is not None and background[0].poll() is None:
            background[0].kill()
        run.results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
        run.save()
    if "stopped" in run.results:
        return 124
    failed = [name for name, step in run.results["steps"].items() if not step["ok"]]
    print(f"device check: {len(run.results['steps']) - len(failed)} of {len(run.results['steps'])} steps ok"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""), flush=True)
    print("summary: " + json.dumps(run.results["summary"]), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
