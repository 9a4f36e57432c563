"""`hexfast info` and `hexfast tiles`: a slide's metadata, and its tissue and tile grid."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ..files import prepare_output_dir
from ..outputs import write_tiles_h5, write_tissue_png
from ..slide import DEFAULT_MAX_TILES, DEFAULT_MIN_TISSUE, Slide, TissueParams, open_slide, slide_source, tile_slide
from ..slide.tiling import GRID_BYTES_PER_TILE
from . import console
from .types import fraction, positive_int, saturation_threshold


def add_slide_commands(sub, common: argparse.ArgumentParser, mpp: argparse.ArgumentParser) -> None:
    info = sub.add_parser("info", parents=[common, mpp], help="print a slide's metadata")
    info.add_argument("slides", nargs="+", type=Path, metavar="SLIDE")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.set_defaults(run=cmd_info)

    tiles = sub.add_parser(
        "tiles",
        parents=[common, mpp, grid_options()],
        help="detect tissue and write the tile grid (<stem>.h5) and a check image (<stem>.tissue.png)",
    )
    tiles.add_argument("slides", nargs="+", type=Path, metavar="SLIDE")
    tiles.add_argument("-o", "--out", type=Path, required=True, help="output directory")
    tiles.add_argument("--allow-non-brightfield", action="store_true",
                       help="tile a slide whose dark background says it is not brightfield H&E (fluorescence)")
    tiles.add_argument("--max-tiles", type=positive_int, default=DEFAULT_MAX_TILES, metavar="N",
                       help=f"refuse a grid of more tiles (default {DEFAULT_MAX_TILES:,}; the grid holds "
                            f"{GRID_BYTES_PER_TILE} bytes a tile)")
    tiles.set_defaults(run=cmd_tiles)


def for_each_slide(args, work) -> int:
    """Runs `work(path)` per slide (the .dcm files of one DICOM series are one slide); a failed slide
    is reported and the others go on."""
    failed = 0
    for path in dict.fromkeys(slide_source(p) for p in args.slides):
        try:
            work(path)
        except BrokenPipeError:  # the reader (`| head`) has gone: a normal end, for main to close
            raise
        except Exception as e:
            if args.debug:
                raise
            console.error(e)
            failed += 1
    return console.EXIT_ERROR if failed else 0


def slide_info(slide: Slide) -> dict:
    return {
        "path": str(slide.path),
        "vendor": slide.vendor,
        "dimensions": list(slide.dimensions),
        "levels": [
            {"dimensions": list(d), "downsample": ds}
            for d, ds in zip(slide.level_dimensions, slide.level_downsamples)
        ],
        "mpp": slide.mpp,
        "mpp_source": slide.mpp_source,
        "objective_power": slide.objective_power,
        "magnification": slide.tile.magnification,
        "tile_size_level0": slide.tile.size,
        "tile_um": slide.tile.size * slide.mpp,
        "in_reference_bucket": slide.tile.in_reference_bucket,
    }


def cmd_info(args) -> int:
    def work(path: Path) -> None:
        with open_slide(path, args.mpp) as slide:
            info = slide_info(slide)
        if args.json:
            print(json.dumps(info))
            return
        w, h = info["dimensions"]
        console.out(f"{info['path']}")
        console.out(f"  vendor          {info['vendor']}")
        console.out(f"  dimensions      {w} x {h} px")
        for i, level in enumerate(info["levels"]):
            lw, lh = level["dimensions"]
            console.out(f"  level {i:<9} {lw} x {lh} px (downsample {level['downsample']:.3f})")
        console.out(f"  mpp             {info['mpp']:.4f} µm/px (from {info['mpp_source']})")
        console.out(f"  objective power {info['objective_power'] or 'unknown'}")
        console.out(f"  size on glass   {w * info['mpp'] / 1000:.2f} x {h * info['mpp'] / 1000:.2f} mm")
        bucket = "" if info["in_reference_bucket"] else " (outside the reference's magnification buckets)"
        console.out(
            f"  HEX tile        {info['tile_size_level0']} px at level 0 = {info['tile_um']:.1f} µm, "
            f"{info['magnification']:g}x{bucket}"
        )

    return for_each_slide(args, work)


def grid_options() -> argparse.ArgumentParser:
    """Which tiles are taken (tiles, score, demo, watch): stride and the tissue detection."""
    grid = argparse.ArgumentParser(add_help=False)
    grid.add_argument("--stride", type=positive_int, metavar="PX",
                      help="level-0 px between tiles (default: the tile size, no overlap)")
    grid.add_argument("--min-tissue", type=fraction, default=DEFAULT_MIN_TISSUE, metavar="F",
                      help=f"take tiles at least this fraction tissue (default {DEFAULT_MIN_TISSUE})")
    grid.add_argument("--saturation-threshold", type=saturation_threshold, default="auto", metavar="auto|otsu|N",
                      help="HSV saturation above which a pixel is tissue: auto (default) is Otsu clamped to "
                           "[8, 20], otsu is plain Otsu, N a fixed value (CLAM uses 8)")
    return grid


def tissue_params(threshold: int | str | None) -> TissueParams:
    if threshold == "otsu":
        return TissueParams(min_threshold=0, max_threshold=255)
    return TissueParams(threshold=threshold)


def cmd_tiles(args) -> int:
    out = prepare_output_dir(args.out)
    params = tissue_params(args.saturation_threshold)

    def work(path: Path) -> None:
        start = time.perf_counter()
        with open_slide(path, args.mpp) as slide:
            if not slide.tile.in_reference_bucket:
                console.warn(
                    f"{path}: {slide.mpp:.3f} µm/px is outside the reference's magnification buckets; "
                    f"using {slide.tile.size} px (56 µm) tiles"
                )
            grid = tile_slide(slide, stride=args.stride, min_tissue=args.min_tissue, params=params,
                              max_tiles=args.max_tiles, allow_non_brightfield=args.allow_non_brightfield)
            stem = slide.name
            write_tiles_h5(out / f"{stem}.h5", slide, grid)
            write_tissue_png(out / f"{stem}.tissue.png", slide, grid)
        if len(grid) == 0:
            console.warn(
                f"{path}: NO TISSUE FOUND (tissue area {grid.tissue.area_mm2:.3f} mm², "
                f"saturation threshold {grid.tissue.threshold}); wrote an empty tile grid"
            )
        seconds = time.perf_counter() - start
        console.out(
            f"{stem}: {len(grid)} tiles, tissue {grid.tissue.area_mm2:.2f} mm², {seconds:.2f} s "
            f"-> {out / (stem + '.h5')}"
        )

    return for_each_slide(args, work)
