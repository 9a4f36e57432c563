"""hexfast: fast whole-slide inference for HEX (virtual CODEX) and MICA.

The `hexfast` command. Errors are one line, `hexfast: error: FILE: problem`, exit code 2; `--debug`
shows the traceback instead."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from pathlib import Path

from . import __version__
from .bench import CASES
from .bench_cli import add_bench_commands
from .cli_models import add_model_commands
from .cli_types import positive_float as _positive_float
from .cli_types import positive_int as _positive_int
from .cli_score import add_score_commands
from .errors import HexfastError
from .outputs import prepare_output_dir, write_tiles_h5, write_tissue_png
from .slide import Slide, open_slide
from .tiling import DEFAULT_MIN_TISSUE, TissueParams, tile_slide

EXIT_ERROR = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of usage + message
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")




def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"'{text}' must be within [0, 1]")
    return value


def _threshold(text: str) -> int | str | None:
    if text in ("auto", "otsu"):
        return None if text == "auto" else text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is neither 'otsu' nor a whole number") from None
    if not 0 <= value <= 255:
        raise argparse.ArgumentTypeError(f"'{text}' must be within 0..255")
    return value


def build_parser() -> argparse.ArgumentParser:
    # --debug works before or after the subcommand; SUPPRESS keeps the
    # subcommand's default from overwriting a value given before it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks on errors")
    mpp = argparse.ArgumentParser(add_help=False)
    mpp.add_argument(
        "--mpp", type=_positive_float, help="µm per level-0 pixel; overrides the slide's metadata"
    )

    parser = _Parser(prog="hexfast", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser.add_argument("--version", action="version", version=f"hexfast {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    info = sub.add_parser("info", parents=[common, mpp], help="print a slide's metadata")
    info.add_argument("slides", nargs="+", type=Path, metavar="SLIDE")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.set_defaults(run=cmd_info)

    tiles = sub.add_parser(
        "tiles",
        parents=[common, mpp],
        help="detect tissue and write the tile grid (<stem>.h5) and a check image (<stem>.tissue.png)",
    )
    tiles.add_argument("slides", nargs="+", type=Path, metavar="SLIDE")
    tiles.add_argument("-o", "--out", type=Path, required=True, help="output directory")
    tiles.add_argument(
        "--stride", type=_positive_int, help="level-0 px between tiles (default: the tile size, no overlap)"
    )
    tiles.add_argument(
        "--min-tissue",
        type=_fraction,
        default=DEFAULT_MIN_TISSUE,
        help=f"keep tiles at least this fraction tissue (default {DEFAULT_MIN_TISSUE})",
    )
    tiles.add_argument(
        "--saturation-threshold",
        type=_threshold,
        default="auto",
        metavar="auto|otsu|N",
        help="HSV saturation above which a pixel is tissue: auto (default) is Otsu clamped to [8, 20], "
        "otsu is plain Otsu, N a fixed value (CLAM uses 8)",
    )
    tiles.set_defaults(run=cmd_tiles)

    add_score_commands(sub, common, mpp)

    bench = sub.add_parser("bench", parents=[common], help="measure throughput against the reference path")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True, parser_class=_Parser)
    stream = bench_sub.add_parser(
        "stream", parents=[common], help="TileStream tiles/s against openslide-python + PIL, same tiles, one run"
    )
    stream.add_argument("slide", type=Path, metavar="SLIDE")
    stream.add_argument("--tiles", type=_positive_int, default=6000, help="first N tissue tiles (default 6000)")
    stream.add_argument("--repeat", type=_positive_int, default=3,
                        help="rounds of all cases, interleaved; the table gives medians (default 3)")
    stream.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {','.join(CASES)}")
    stream.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    stream.set_defaults(run=cmd_bench_stream)
    add_bench_commands(bench_sub, common)  # engine, e2e, roofline (bench_cli.py)

    add_model_commands(sub, common)  # export, build-engines (cli_models.py)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)  # batch schedulers stop jobs with SIGTERM: clean up as for Ctrl-C
    try:
        return args.run(args)
    except Terminated:
        print("hexfast: terminated", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("hexfast: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if args.debug:
            raise
        _error(e)
        return EXIT_ERROR


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so every `finally` runs (temp files go, threads stop)."""


def _terminate(signum, frame) -> None:
    raise Terminated()


def _error(e: BaseException) -> None:
    if isinstance(e, HexfastError):
        print(f"hexfast: error: {e}", file=sys.stderr)
    else:  # a bug, not bad input: still one line, the traceback is one flag away
        print(f"hexfast: internal error: {type(e).__name__}: {e} (rerun with --debug)", file=sys.stderr)


def _warn(message: str) -> None:
    print(f"hexfast: WARNING: {message}", file=sys.stderr)


def _for_each_slide(args, work) -> int:
    """Runs `work(path)` per slide; a failed slide is reported and the others go on."""
    failed = 0
    for path in args.slides:
        try:
            work(path)
        except Exception as e:
            if args.debug:
                raise
            _error(e)
            failed += 1
    return EXIT_ERROR if failed else 0


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
        print(f"{info['path']}")
        print(f"  vendor          {info['vendor']}")
        print(f"  dimensions      {w} x {h} px")
        for i, level in enumerate(info["levels"]):
            lw, lh = level["dimensions"]
            print(f"  level {i:<9} {lw} x {lh} px (downsample {level['downsample']:.3f})")
        print(f"  mpp             {info['mpp']:.4f} µm/px (from {info['mpp_source']})")
        print(f"  objective power {info['objective_power'] or 'unknown'}")
        print(f"  size on glass   {w * info['mpp'] / 1000:.2f} x {h * info['mpp'] / 1000:.2f} mm")
        bucket = "" if info["in_reference_bucket"] else " (outside the reference's magnification buckets)"
        print(
            f"  HEX tile        {info['tile_size_level0']} px at level 0 = {info['tile_um']:.1f} µm, "
            f"{info['magnification']:g}x{bucket}"
        )

    return _for_each_slide(args, work)


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
                _warn(
                    f"{path}: {slide.mpp:.3f} µm/px is outside the reference's magnification buckets; "
                    f"using {slide.tile.size} px (56 µm) tiles"
                )
            grid = tile_slide(slide, stride=args.stride, min_tissue=args.min_tissue, params=params)
            stem = slide.path.stem
            write_tiles_h5(out / f"{stem}.h5", slide, grid)
            write_tissue_png(out / f"{stem}.tissue.png", slide, grid)
        if len(grid) == 0:
            _warn(
                f"{path}: NO TISSUE FOUND (tissue area {grid.tissue.area_mm2:.3f} mm², "
                f"saturation threshold {grid.tissue.threshold}); wrote an empty tile grid"
            )
        seconds = time.perf_counter() - start
        print(
            f"{stem}: {len(grid)} tiles, tissue {grid.tissue.area_mm2:.2f} mm², {seconds:.2f} s "
            f"-> {out / (stem + '.h5')}"
        )

    return _for_each_slide(args, work)


def cmd_bench_stream(args) -> int:
    from .bench import bench_stream, format_table

    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        raise HexfastError(f"unknown benchmark case(s) {', '.join(unknown)}; choose from {', '.join(CASES)}")
    with open_slide(args.slide) as slide:  # a bad slide fails here, with the usual one-line error
        print(f"{slide.path.name}: {slide.dimensions[0]} x {slide.dimensions[1]} px, first {args.tiles} tissue "
              f"tiles of {slide.tile.size} px; one process per case", file=sys.stderr)

    def show(row: dict) -> None:
        print(f"  {row['case']:<12} {row['tiles_per_s']:8.0f} tiles/s  peak RSS {row['peak_rss_mib']:.0f} MiB",
              file=sys.stderr)

    rows = bench_stream(str(args.slide), args.tiles, cases, on_row=show, repeat=args.repeat)
    print(format_table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
