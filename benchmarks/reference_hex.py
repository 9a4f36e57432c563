"""hexfast against the HEX inference path users run today, same model, same tiles, one run.

    python benchmarks/reference_hex.py SLIDE [--model BUNDLE] [--tiles N] [--json OUT]

The reference path, as the public HEX research code describes its slide inference
(lilab-stanford/HEX, hex/infer_slide_h5.py; re-implemented here from its description,
not copied): a torch Dataset that, per tile, calls openslide-python's
read_region at level 0 → PIL RGB → resize to 384×384 (PIL bilinear, what
torchvision's Resize does to a PIL image) → tensor /255 → normalise with mean =
std = 0.5; a DataLoader with batch 128 (num_workers 0, pin_memory on CUDA); the
model in torch eager mode under no_grad, fp16 autocast on CUDA, fp32 on CPU;
outputs copied back to the host per batch.

hexfast: the pipeline's own HEX pass (hexfast.score.tile_pass.run_hex): C++ TileStream (2 threads,
uint8 tiles, batch 64) → the bundle's HEX engine (backend auto; resize and normalisation inside the
graph), two batches in flight.

Both run the same weights: the bundle's source model rebuilt in torch (hexfast_export's
HexModel; demo bundles from their seed, real bundles from the checkpoint files named in
the manifest or given with --hex / --musk --hex-heads). Each side runs in its own process
(its own peak RSS); tiles are the slide's first N tissue tiles in grid order. Each side first
runs its own first batch once, untimed (--warmup), as it would be warm after the first of a
slide's many batches (ONNX Runtime's first run at a batch shape costs ~30 % more). The script
checks that both give the same markers and embeddings (max |Δ| / max |ref|), then reports
tiles/s, CPU ms per tile (getrusage: barely moved by other load) and hexfast ÷ reference.

Needs torch and hexfast_export (`pip install -c constraints.txt '.[export,bench]'`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from hexfast.bench.proc import cpu_seconds, peak_rss_mib


def load_torch_model(bundle, hex_path=None, musk=None, hex_heads=None):
    """The bundle's HEX model in torch (eval, fp32): the same weights the ONNX file holds."""
    from hexfast_export.demo import demo_models

    if bundle.demo:
        info = bundle.manifest.get("demo_models") or {}
        if "size" not in info:
            raise SystemExit(f"{bundle.path}: demo bundle without demo_models.size/seed in its manifest")
        return demo_models(info["size"], int(info.get("seed", 0)))[0]
    from hexfast_export import MUSK_LARGE_384, MuskConfig, build_hex

    sources = bundle.manifest.get("sources", {})
    hex_path = hex_path or (sources.get("hex") or {}).get("path")
    musk = musk or (sources.get("musk") or {}).get("path")
    hex_heads = hex_heads or (sources.get("hex_heads") or {}).get("path")
    enc = bundle.manifest.get("hex_encoder") or {}
    cfg = MuskConfig(**{k: enc[k] for k in ("img_size", "patch_size", "dim", "depth", "heads", "ffn_dim") if k in enc}) \
        if enc else MUSK_LARGE_384
    if hex_path and Path(hex_path).is_file():
        model, _ = build_hex(hex=hex_path, cfg=cfg)
    elif musk and hex_heads and Path(musk).is_file() and Path(hex_heads).is_file():
        model, _ = build_hex(musk=musk, hex_heads=hex_heads, cfg=cfg)
    else:
        raise SystemExit(f"{bundle.path}: give the checkpoint the bundle was exported from (--hex H, or --musk W "
                         f"--hex-heads C)")
    return model.eval()


# ----------------------------------------------------------------------------- the reference side

class SlideTiles:
    """torch Dataset: one tile per item, read with openslide-python and transformed as the reference does."""

    def __init__(self, path, coords, size):
        self.path, self.coords, self.size = str(path), coords, int(size)
        self._slide = None

    def __len__(self):
        return len(self.coords)

    def __getitem__(self, i):
        import openslide
        import torch
        from PIL import Image

        if self._slide is None:  # opened lazily: one handle per DataLoader worker
            self._slide = openslide.open_slide(self.path)
        x, y = (int(v) for v in self.coords[i])
        img = self._slide.read_region((x, y), 0, (self.size, self.size)).convert("RGB")
        img = img.resize((384, 384), Image.Resampling.BILINEAR)
        t = torch.from_numpy(np.asarray(img, np.float32) / 255.0).permute(2, 0, 1)
        return (t - 0.5) / 0.5


def run_reference(args, coords, size, out_dir: Path) -> dict:
    import torch
    from torch.utils.data import DataLoader

    from hexfast.bundle import load_bundle

    device = torch.device("cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu")
    t = time.perf_counter()
    model = load_torch_model(load_bundle(args.model), args.hex, args.musk, args.hex_heads).to(device).eval()
    load_s = time.perf_counter() - t
    autocast = torch.autocast("cuda", dtype=torch.float16) if device.type == "cuda" else torch.autocast("cpu",
                                                                                                      enabled=False)

    def infer(tiles):
        loader = DataLoader(SlideTiles(args.slide, tiles, size), batch_size=args.ref_batch, shuffle=False,
                            num_workers=args.num_workers, pin_memory=device.type == "cuda")
        markers, embeddings = [], []
        with torch.no_grad(), autocast:
            for batch in loader:
                out = model(batch.to(device, non_blocking=device.type == "cuda"))
                markers.append(out.markers.float().cpu().numpy())
                embeddings.append(out.embedding.float().cpu().numpy())
        return markers, embeddings

    for _ in range(args.warmup):
        infer(coords[:args.ref_batch])
    c0, t0 = cpu_seconds(), time.perf_counter()
    markers, embeddings = infer(coords)
    seconds, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    np.save(out_dir / "ref_markers.npy", np.concatenate(markers))
    np.save(out_dir / "ref_embedding.npy", np.concatenate(embeddings))
    return {"side": "reference", "how": f"torch {torch.__version__} eager, {device.type}, "
            f"{'fp16 autocast' if device.type == 'cuda' else 'fp32'}, DataLoader batch {args.ref_batch}, "
            f"{args.num_workers} workers, {torch.get_num_threads()} torch threads",
            "seconds": seconds, "cpu_seconds": cpu, "model_load_seconds": load_s, "peak_rss_mib": peak_rss_mib(),
            "gpu_mem_mib": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else "n/a"}


# ----------------------------------------------------------------------------- the hexfast side

def run_hexfast(args, coords, size, out_dir: Path) -> dict:
    from hexfast.bundle import load_bundle
    from hexfast.score import open_engine
    from hexfast.score.tile_pass import run_hex
    from hexfast.slide import open_slide
    from hexfast.stream import TileStream

    bundle = load_bundle(args.model)
    t = time.perf_counter()
    precision = args.precision
    engine = open_engine(bundle, "hex", args.backend, precision)
    load_s = time.perf_counter() - t

    def infer(slide, tiles):  # the pipeline's own HEX pass (two batches in flight), features kept in memory
        with TileStream(slide, tiles, read_size=size, batch_size=args.batch_size, threads=args.threads) as stream:
            out = run_hex(stream, engine, None, slide.path, len(tiles), None, threading.Event())
        return [out.markers], [out.features]

    with open_slide(args.slide) as slide:
        for _ in range(args.warmup):
            infer(slide, coords[:args.batch_size])
        c0, t0 = cpu_seconds(), time.perf_counter()
        markers, embeddings = infer(slide, coords)
        seconds, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    np.save(out_dir / "hexfast_markers.npy", np.concatenate(markers))
    np.save(out_dir / "hexfast_embedding.npy", np.concatenate(embeddings))
    from hexfast.bench.model import gpu_memory_mib

    gpu = gpu_memory_mib(engine)
    describe = engine.describe()
    engine.close()
    return {"side": "hexfast", "how": f"TileStream {args.threads} threads, batch {args.batch_size} → {describe}",
            "seconds": seconds, "cpu_seconds": cpu, "model_load_seconds": load_s, "peak_rss_mib": peak_rss_mib(),
            "gpu_mem_mib": gpu}


# ----------------------------------------------------------------------------- driver

def first_tiles(slide, n):
    from hexfast.bench.stream import pick_tiles

    coords, size = pick_tiles(str(slide), n)
    return np.asarray(coords), int(size)


def rel(a, b) -> float:
    return float(np.abs(a.astype(np.float64) - b).max() / max(float(np.abs(b).max()), 1e-30)) if b.size else 0.0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("slide", type=Path)
    p.add_argument("--model", type=Path, help="model bundle (default: the bundled tiny demo)")
    p.add_argument("--tiles", type=int, default=512, help="first N tissue tiles (default 512)")
    p.add_argument("--ref-batch", type=int, default=128, help="reference DataLoader batch (default 128, as HEX)")
    p.add_argument("--num-workers", type=int, default=0, help="reference DataLoader workers (default 0, as HEX)")
    p.add_argument("--batch-size", type=int, default=64, help="hexfast batch (default 64, as hexfast score)")
    p.add_argument("--threads", type=int, default=2, help="hexfast TileStream threads (default 2)")
    p.add_argument("--backend", default="auto", help="hexfast engine backend (default auto)")
    p.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "bf16"), help="hexfast engine precision")
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed runs of each side's first batch before timing (default 1): a slide has many "
                        "batches, so first-run costs (allocations, kernel choice) are amortised in real use")
    p.add_argument("--device", default="auto", choices=("auto", "cpu"), help="reference device (auto: CUDA if any)")
    p.add_argument("--hex", help="full HEX checkpoint the bundle came from (real bundles)")
    p.add_argument("--musk", help="MUSK weights the bundle came from (real bundles, with --hex-heads)")
    p.add_argument("--hex-heads", help="HEX heads checkpoint (with --musk)")
    p.add_argument("--json", type=Path, help="write the result here")
    p.add_argument("--side", choices=("reference", "hexfast"), help=argparse.SUPPRESS)  # one side, in a subprocess
    p.add_argument("--scratch", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    coords, size = first_tiles(args.slide, args.tiles)
    if args.side:
        run = run_reference if args.side == "reference" else run_hexfast
        print(json.dumps(run(args, coords, size, args.scratch)))
        return 0

    rows = {}
    with tempfile.TemporaryDirectory(prefix="hexfast-ref-") as scratch:
        for side in ("reference", "hexfast"):
            cmd = [sys.executable, os.path.abspath(__file__), *(argv if argv is not None else sys.argv[1:]),
                   "--side", side, "--scratch", scratch]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                sys.stderr.write(out.stderr)
                raise SystemExit(f"{side} side failed")
            rows[side] = json.loads(out.stdout.strip().splitlines()[-1])
            r = rows[side]
            print(f"  {side:<9} {len(coords) / r['seconds']:8.2f} tiles/s  {1e3 * r['cpu_seconds'] / len(coords):8.1f} "
                  f"CPU ms/tile  peak RSS {r['peak_rss_mib']:.0f} MiB", file=sys.stderr)
        s = Path(scratch)
        agree = {name: rel(np.load(s / f"hexfast_{name}.npy"), np.load(s / f"ref_{name}.npy"))
                 for name in ("markers", "embedding")}

    from hexfast.bundle import load_bundle

    bundle = load_bundle(args.model)
    n = len(coords)
    ref, fast = rows["reference"], rows["hexfast"]
    result = {
        "slide": str(args.slide), "tiles": n, "tile_px": size, "model": str(bundle.path), "demo": bundle.demo,
        "model_size": (bundle.manifest.get("demo_models") or {}).get("size", "checkpoint"),
        "reference": {**ref, "tiles_per_s": n / ref["seconds"], "cpu_ms_per_tile": 1e3 * ref["cpu_seconds"] / n},
        "hexfast": {**fast, "tiles_per_s": n / fast["seconds"], "cpu_ms_per_tile": 1e3 * fast["cpu_seconds"] / n},
        "speedup": ref["seconds"] / fast["seconds"], "speedup_cpu": ref["cpu_seconds"] / fast["cpu_seconds"],
        "max_rel_diff": agree, "warmup_batches": args.warmup,
    }
    print(f"{args.slide.name}: first {n} tissue tiles of {size} px; model {bundle.path} "
          f"({result['model_size']}{', demo' if bundle.demo else ''})")
    print("| path | how | tiles/s | CPU ms/tile | peak RSS MiB |")
    print("|---|---|---|---|---|")
    for side in ("reference", "hexfast"):
        r = result[side]
        print(f"| {side} | {r['how']} | {r['tiles_per_s']:.3g} | {r['cpu_ms_per_tile']:.1f} | {r['peak_rss_mib']:.0f} |")
    print(f"hexfast ÷ reference: {result['speedup']:.2f}× tiles/s, {result['speedup_cpu']:.2f}× CPU time per tile; "
          f"outputs agree to max|Δ|/max|ref| markers {agree['markers']:.1e}, embedding {agree['embedding']:.1e}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
