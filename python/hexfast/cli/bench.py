"""`hexfast bench stream | engine | e2e | roofline`: throughput against the reference path, measured
in one run. The benchmark code (hexfast.bench) is imported only when one runs."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import HexfastError
from ..slide import open_slide
from . import console
from .types import backend_list, positive_float, positive_int, positive_int_list

PRECISIONS = ("fp32", "fp16", "bf16", "int8")


def add_bench_commands(sub, common: argparse.ArgumentParser, parser_class) -> None:
    bench = sub.add_parser("bench", parents=[common], help="measure throughput against the reference path")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True, parser_class=parser_class)
    stream = bench_sub.add_parser(
        "stream", parents=[common], help="TileStream tiles/s against openslide-python + PIL, same tiles, one run"
    )
    stream.add_argument("slide", type=Path, metavar="SLIDE")
    stream.add_argument("--tiles", type=positive_int, default=6000, help="first N tissue tiles (default 6000)")
    stream.add_argument("--repeat", type=positive_int, default=3,
                        help="rounds of all cases, interleaved; the table gives medians (default 3)")
    stream.add_argument("--cases", help="comma-separated subset of reference, decode, stream-1, stream-2, "
                                        "openslide-2, macenko, resize (default: all)")
    stream.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    stream.set_defaults(run=cmd_bench_stream)

    model = argparse.ArgumentParser(add_help=False)
    model.add_argument("--model", type=Path, metavar="BUNDLE", help="model bundle (default: the bundled tiny demo)")
    model.add_argument("--precision", choices=PRECISIONS, default="fp32", help="engine precision (default fp32)")
    model.add_argument("--engine-threads", type=positive_int, metavar="N",
                       help="CPU threads of the engine (ORT intra-op); default: the runtime's")
    model.add_argument("--json", type=Path, help="also write the results to this JSON file")

    engine = bench_sub.add_parser("engine", parents=[common, model],
                                  help="HEX engine alone: tiles/s and latency per backend and batch size")
    engine.add_argument("--backend", type=backend_list, default=["auto"], metavar="B[,B]",
                        help="backends to measure, comma-separated, or 'all' (those available here); default auto")
    engine.add_argument("--batch-sizes", type=positive_int_list, default=[1, 8, 32, 64], metavar="N,N",
                        help="default 1,8,32,64")
    engine.add_argument("--tile", type=positive_int, default=224, help="input tile px (default 224, 40x tiles)")
    engine.add_argument("--seconds", type=positive_float, default=5.0, help="timed seconds per batch size")
    engine.set_defaults(run=cmd_bench_engine)

    e2e = bench_sub.add_parser("e2e", parents=[common, model],
                               help="one slide through Scorer: seconds, pipeline efficiency vs the engine alone")
    e2e.add_argument("slide", type=Path, metavar="SLIDE")
    e2e.add_argument("--backend", default="auto", help="engine backend (default auto)")
    e2e.add_argument("--batch-size", type=positive_int, default=64, help="HEX batch (default 64, as hexfast score)")
    e2e.add_argument("--threads", type=positive_int, default=2, help="TileStream threads (default 2)")
    e2e.add_argument("--seconds", type=positive_float, default=5.0, help="timed seconds of the engine-only run")
    e2e.add_argument("--out", type=Path, help="keep the slide's outputs here (default: a scratch directory)")
    e2e.add_argument("--simulate-engine", type=positive_float, metavar="TILES_PER_S",
                     help="replace HEX with an engine that only waits as long as a GPU at this rate would "
                          "(benchmark only): the pipeline's efficiency without a GPU")
    e2e.set_defaults(run=cmd_bench_e2e)

    roof = bench_sub.add_parser("roofline", parents=[common, model],
                                help="FLOPs per tile (formula and ONNX graph), matmul peak, achieved share")
    roof.add_argument("--backend", default="auto", help="engine backend (default auto)")
    roof.add_argument("--batch-size", type=positive_int, default=8, help="engine batch (default 8)")
    roof.add_argument("--tile", type=positive_int, default=224, help="input tile px (default 224)")
    roof.add_argument("--seconds", type=positive_float, default=10.0, help="timed seconds of the engine run")
    roof.add_argument("--peak-seconds", type=positive_float, default=2.0, help="seconds per peak GEMM")
    roof.set_defaults(run=cmd_bench_roofline)


def _write_json(path: Path | None, data) -> None:
    if path is not None:
        path.write_text(json.dumps(data, indent=1))


def cmd_bench_stream(args) -> int:
    from ..bench.stream import CASES, bench_stream, format_table

    cases = [c.strip() for c in args.cases.split(",") if c.strip()] if args.cases else list(CASES)
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        raise HexfastError(f"unknown benchmark case(s) {', '.join(unknown)}; choose from {', '.join(CASES)}")
    with open_slide(args.slide) as slide:  # a bad slide fails here, with the usual one-line error
        console.line(f"{slide.path.name}: {slide.dimensions[0]} x {slide.dimensions[1]} px, first {args.tiles} "
                     f"tissue tiles of {slide.tile.size} px; one process per case")

    def show(row: dict) -> None:
        print(f"  {row['case']:<12} {row['tiles_per_s']:8.0f} tiles/s  peak RSS {row['peak_rss_mib']:.0f} MiB",
              file=sys.stderr)

    rows = bench_stream(str(args.slide), args.tiles, cases, on_row=show, repeat=args.repeat)
    print(format_table(rows))
    _write_json(args.json, rows)
    return 0


def cmd_bench_engine(args) -> int:
    from ..bench.model import bench_engine, format_engine_table

    def show(row: dict) -> None:
        if "error" in row:
            print(f"  {row['backend']:<9} skipped: {row['error']}", file=sys.stderr)
        else:
            print(f"  {row['backend']:<9} batch {row['batch']:<4} {row['tiles_per_s']:9.2f} tiles/s  "
                  f"{row['latency_ms']:9.1f} ms", file=sys.stderr)

    rows = bench_engine(args.model, args.backend, args.precision, args.batch_sizes, args.tile, args.seconds,
                        args.engine_threads, on_row=show)
    if rows and all("error" in r for r in rows):
        raise HexfastError("no backend could run the model: " + "; ".join(r["error"] for r in rows))
    print(rows[0]["describe"] if rows and "describe" in rows[0] else "")
    print(format_engine_table(rows))
    _write_json(args.json, rows)
    return 0


def cmd_bench_e2e(args) -> int:
    from ..bench.model import bench_e2e, format_e2e

    with open_slide(args.slide):  # a bad slide fails here, with the usual one-line error
        pass
    result = bench_e2e(args.slide, args.model, args.backend, args.precision, args.batch_size, args.threads,
                       args.engine_threads, args.seconds, args.out, simulate_engine=args.simulate_engine)
    print(format_e2e(result))
    _write_json(args.json, result)
    return 0


def cmd_bench_roofline(args) -> int:
    from ..bench.roofline import format_roofline, roofline

    result = roofline(args.model, args.backend, args.precision, args.batch_size, args.tile, args.seconds,
                      args.peak_seconds, args.engine_threads)
    print(format_roofline(result))
    _write_json(args.json, result)
    return 0
