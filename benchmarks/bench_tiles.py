"""Tissue detection + tile grid timing on one slide, stage by stage, with a
CLAM-style reference (whole segmentation level read at once, OpenCV
segmentation) measured in the same run.

    python benchmarks/make_slide.py --texture ../shared/data/slides/CMU-1-Small-Region.svs -o /tmp/big.svs
    python benchmarks/bench_tiles.py /tmp/big.svs

Needs the `[test]` extra for the OpenCV reference."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

import hexfast
from hexfast import _core
from hexfast.bench.proc import peak_rss_mib
from hexfast.slide import mask_downsample

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_core import clam_reference_mask  # noqa: E402  (the independent OpenCV pipeline)


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("slide", type=Path)
    args = ap.parse_args(argv)
    params = hexfast.TissueParams()

    slide, t_open = timed(lambda: hexfast.open_slide(args.slide))
    w, h = slide.dimensions
    ds = mask_downsample(slide, params)
    thumb, t_read = timed(lambda: slide.read_reduced(ds))
    (mask, _), t_seg = timed(lambda: _core.segment_tissue(thumb, ds * slide.mpp))
    (coords, _), t_grid = timed(
        lambda: _core.tile_grid(mask, ds, ds, w, h, slide.tile.size, slide.tile.size, 0.5)
    )
    rss_hexfast = peak_rss_mib()
    grid, t_total = timed(lambda: hexfast.tile_slide(slide))
    assert len(grid) == len(coords)

    # Reference: CLAM reads the segmentation level whole, then segments with OpenCV.
    level = slide._osr.get_best_level_for_downsample(ds)
    whole, t_ref_read = timed(lambda: np.asarray(slide._osr.read_region((0, 0), level, slide.level_dimensions[level]).convert("RGB")))
    _, t_ref_seg = timed(lambda: clam_reference_mask(thumb, ds * slide.mpp, params))
    rss_ref = peak_rss_mib()

    print(f"slide {args.slide.name}: {w} x {h} px, {slide.level_count} levels, {slide.mpp} µm/px")
    print(f"mask {mask.shape[1]} x {mask.shape[0]} px at {ds * slide.mpp:.2f} µm/px (read from level {level}), "
          f"{len(coords)} tiles, tissue {grid.tissue.area_mm2:.1f} mm²")
    print("| stage | seconds |")
    print("|---|---|")
    for name, t in [("open", t_open), ("read reduced image (strips)", t_read), ("segment (C++)", t_seg),
                    ("tile grid (C++)", t_grid), ("**tile_slide total**", t_total)]:
        print(f"| {name} | {t:.2f} |")
    print(f"| reference: read level {level} whole ({whole.shape[1]} x {whole.shape[0]}) | {t_ref_read:.2f} |")
    print(f"| reference: OpenCV CLAM-style segmentation of the same image | {t_ref_seg:.2f} |")
    print(f"C++ segmentation vs OpenCV reference: {t_ref_seg / t_seg:.2f}x; "
          f"peak RSS after hexfast {rss_hexfast:.0f} MiB, after reference {rss_ref:.0f} MiB")


if __name__ == "__main__":
    main()
