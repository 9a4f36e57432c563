"""What MICA's CLAM bag costs: a second grid (CLAM's patches), a second TileStream, CLAM's resnet50_trunc.

    python benchmarks/mica_features_cost.py [--slide40x /tmp/mica40x.svs] [--work /tmp/mica-cost]

Measured in one run, on this machine's CPU, with ONNX Runtime:

1. per slide (CMU-1-Small-Region at 20x; a synthetic 40x slide from make_slide.py, 40000 x 30000): HEX's
   tiles vs CLAM's patches, and the seconds CLAM's patching takes;
2. per tile, full-size models with random weights: HEX (MUSK large, 224-px tiles; batch 2) and
   ResNet50-trunc (256-px patches; batch 16), as engine seconds per tile, and FLOPs per tile counted
   from the ONNX graphs (bench.roofline.onnx_flops);
3. the pipeline: `Scorer.score` on the 40x slide with the shipped demo bundle (tiny models, MICA on
   CLAM's bag) and the same bundle declared `hex-embedding` (no second grid), in turn: the stages the
   bag adds ("clam patching", "stream+mica features") and the wall-clock difference.

Then the projected GPU share of the bag: engine work scales with FLOPs on a GPU where both models run
near the same efficiency, so share = F_rn * N_clam / (F_hex * N_hex + F_rn * N_clam) per slide; the CPU
share (measured seconds per tile instead of FLOPs) is printed beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CMU = ROOT.parent / "shared" / "data" / "slides" / "CMU-1-Small-Region.svs"


def timed_engine(path: Path, tiles: np.ndarray, repeats: int = 3) -> float:
    """Seconds per tile of an ONNX graph on `tiles` (the first run, a warm-up, not counted)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    session.run(None, {"tiles": tiles})
    start = time.perf_counter()
    for _ in range(repeats):
        session.run(None, {"tiles": tiles})
    return (time.perf_counter() - start) / (repeats * len(tiles))


def grids(slide_path: Path, params) -> dict:
    from hexfast.slide import open_slide, tile_slide
    from hexfast.slide.clam_patches import clam_patches

    with open_slide(slide_path) as slide:
        t = time.perf_counter()
        grid = tile_slide(slide)
        hex_s = time.perf_counter() - t
        t = time.perf_counter()
        patches = clam_patches(slide, params)
        clam_s = time.perf_counter() - t
        return {"slide": slide_path.name, "size": list(slide.dimensions), "mpp": slide.mpp,
                "hex_tile_px": grid.tile_size, "hex_tiles": len(grid), "hex_grid_s": hex_s,
                "clam_patches": len(patches), "clam_contours": patches.contours, "clam_seg_level": patches.seg_level,
                "clam_patching_s": clam_s}


def hex_embedding_copy(bundle: Path, out: Path) -> Path:
    """The demo bundle declared hex-embedding (MICA on the HEX features; no he_features, no second grid)."""
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(bundle, out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["models"].pop("he_features")
    manifest["mica_features"] = {"kind": "hex-embedding", "model": "hex", "output": "embedding",
                                 "grid": "hexfast's HEX tile grid"}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return out


def pipeline(slide_path: Path, bundles: dict[str, Path], runs: int) -> dict:
    from hexfast import Scorer

    out = {}
    for name, bundle in bundles.items():
        with Scorer(bundle, "ort-cpu") as scorer:
            scorer.score(slide_path)  # warm-up (page cache, sessions)
            walls, stages = [], []
            for _ in range(runs):
                result = scorer.score(slide_path)
                walls.append(result.wall_seconds)
                stages.append(result.seconds)
        out[name] = {"wall_s": float(np.median(walls)), "walls": walls,
                     "stages": {k: float(np.median([s.get(k, 0.0) for s in stages])) for k in stages[-1]},
                     "bag": result.mica.get("bag", {}).get("tiles") if result.mica else None}
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slide40x", type=Path, default=Path("/tmp/mica40x.svs"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/mica-cost"))
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    if not args.slide40x.exists():
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "make_slide.py"), "--texture", str(CMU),
                        "--width", "40000", "--height", "30000", "-o", str(args.slide40x)], check=True)

    import torch

    from hexfast.bench.roofline import onnx_flops
    from hexfast.bundle import DEFAULT_BUNDLE
    from hexfast.slide.clam_patches import ClamParams
    from hexfast_export.demo import demo_he_features, demo_models
    from hexfast_export.onnx_export import export_he_features_onnx, export_hex_onnx

    torch.set_num_threads(os.cpu_count() or 1)
    print(f"# {platform.node()}: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"onnxruntime CPU; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")

    slides = {}
    for path in (CMU, args.slide40x):
        slides[path.name] = grids(path, ClamParams())  # CLAM's defaults
        if path == CMU:
            slides[path.name + " (a_t 1)"] = grids(path, ClamParams(a_t=1.0))
    for name, g in slides.items():
        print(f"{name}: {g['size'][0]} x {g['size'][1]} at {g['mpp']:.3f} µm/px; HEX {g['hex_tiles']} tiles of "
              f"{g['hex_tile_px']} px; CLAM {g['clam_patches']} patches of 256 px ({g['clam_contours']} contours, "
              f"seg level {g['clam_seg_level']}, {g['clam_patching_s']:.2f} s)")

    hex_onnx, rn_onnx = args.work / "hex_full.onnx", args.work / "he_features_full.onnx"
    if not hex_onnx.exists():
        hex_model, _, _ = demo_models("full", 0)
        export_hex_onnx(hex_model, hex_onnx)
        del hex_model
    if not rn_onnx.exists():
        export_he_features_onnx(demo_he_features("full", 0), rn_onnx)
    rng = np.random.default_rng(0)
    hex_s = timed_engine(hex_onnx, rng.integers(0, 256, (2, 224, 224, 3), dtype=np.uint8))
    rn_s = timed_engine(rn_onnx, rng.integers(0, 256, (16, 256, 256, 3), dtype=np.uint8))
    hex_f, rn_f = onnx_flops(hex_onnx, tile=224)["total"], onnx_flops(rn_onnx, tile=256)["total"]
    print(f"HEX (MUSK large, 224 px): {hex_s * 1e3:.0f} ms/tile, {hex_f / 1e9:.0f} GFLOP/tile; "
          f"ResNet50-trunc (256 px → 224): {rn_s * 1e3:.1f} ms/tile, {rn_f / 1e9:.2f} GFLOP/tile; "
          f"per tile the feature model costs {rn_s / hex_s:.2%} of HEX's time ({rn_f / hex_f:.2%} of its FLOPs)")
    for name, g in slides.items():
        n_hex, n_clam = g["hex_tiles"], g["clam_patches"]
        gpu = rn_f * n_clam / (hex_f * n_hex + rn_f * n_clam) if n_hex else 0.0
        cpu = rn_s * n_clam / (hex_s * n_hex + rn_s * n_clam) if n_hex else 0.0
        g.update(gpu_share=gpu, cpu_share=cpu)
        print(f"{name}: the bag's share of engine work: projected GPU (FLOPs) {gpu:.2%}, CPU (measured s/tile) "
              f"{cpu:.2%}")

    bundles = {"resnet50-trunc (CLAM bag)": DEFAULT_BUNDLE,
               "hex-embedding": hex_embedding_copy(DEFAULT_BUNDLE, args.work / "demo-hex-embedding")}
    runs = pipeline(args.slide40x, bundles, args.runs)
    a, b = runs["resnet50-trunc (CLAM bag)"], runs["hex-embedding"]
    added = {k: v for k, v in a["stages"].items() if "clam" in k or "mica features" in k}
    print(f"pipeline, {args.slide40x.name}, demo bundle (tiny models), median of {args.runs}: CLAM bag "
          f"{a['wall_s']:.2f} s (bag {a['bag']} patches) vs hex-embedding {b['wall_s']:.2f} s: "
          f"+{a['wall_s'] - b['wall_s']:.2f} s; stages the bag adds: "
          + ", ".join(f"{k} {v:.2f} s" for k, v in added.items() if "within" not in k))
    (args.work / "mica_features_cost.json").write_text(json.dumps(
        {"slides": slides, "hex_s_per_tile": hex_s, "rn_s_per_tile": rn_s, "hex_flops": hex_f, "rn_flops": rn_f,
         "pipeline": runs}, indent=1))


if __name__ == "__main__":
    main()
