"""`hexfast bench engine | e2e | roofline` (registered beside `bench stream` by cli.py)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .cli_types import positive_float as _positive_float
from .cli_types import positive_int as _positive_int
from .cli_types import positive_int_list as _int_list
from .errors import HexfastError

PRECISIONS = ("fp32", "fp16", "bf16")





def _backends(text: str) -> list[str]:
    from .engines import BACKENDS

    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [n for n in names if n not in (*BACKENDS, "all")]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"'{text}': choose from all, {', '.join(BACKENDS)}")
    if "all" in names and len(names) > 1:
        raise argparse.ArgumentTypeError("'all' stands alone")
    return names


def add_bench_commands(bench_sub, common: argparse.ArgumentParser) -> None:
    model = argparse.ArgumentParser(add_help=False)
    model.add_argument("--model", type=Path, metavar="BUNDLE", help="model bundle (default: the bundled tiny demo)")
    model.add_argument("--precision", choices=PRECISIONS, default="fp32", help="engine precision (default fp32)")
    model.add_argument("--engine-threads", type=_positive_int, metavar="N",
                       help="CPU threads of the engine (ORT intra-op); default: the runtime's")
    model.add_argument("--json", type=Path, help="also write the results to this JSON file")

    engine = bench_sub.add_parser("engine", parents=[common, model],
                                  help="HEX engine alone: tiles/s and latency per backend and batch size")
    engine.add_argument("--backend", type=_backends, default=["auto"], metavar="B[,B]",
                        help="backends to measure, comma-separated, or 'all' (those available here); default auto")
    engine.add_argument("--batch-sizes", type=_int_list, default=[1, 8, 32, 64], metavar="N,N",
                        help="default 1,8,32,64")
    engine.add_argument("--tile", type=_positive_int, default=224, help="input tile px (default 224, 40x tiles)")
    engine.add_argument("--seconds", type=_positive_float, default=5.0, help="timed seconds per batch size")
    engine.set_defaults(run=cmd_bench_engine)

    e2e = bench_sub.add_parser("e2e", parents=[common, model],
                               help="one slide through Scorer: seconds, pipeline efficiency vs the engine alone")
    e2e.add_argument("slide", type=Path, metavar="SLIDE")
    e2e.add_argument("--backend", default="auto", help="engine backend (default auto)")
    e2e.add_argument("--batch-size", type=_positive_int, default=64, help="HEX batch (default 64, as hexfast score)")
    e2e.add_argument("--threads", type=_positive_int, default=2, help="TileStream threads (default 2)")
    e2e.add_argument("--seconds", type=_positive_float, default=5.0, help="timed seconds of the engine-only run")
    e2e.add_argument("--out", type=Path, help="keep the slide's outputs here (default: a scratch directory)")
    e2e.set_defaults(run=cmd_bench_e2e)

    roof = bench_sub.add_parser("roofline", parents=[common, model],
                                help="FLOPs per tile (formula and ONNX graph), matmul peak, achieved share")
    roof.add_argument("--backend", default="auto", help="engine backend (default auto)")
    roof.add_argument("--batch-size", type=_positive_int, default=8, help="engine batch (default 8)")
    roof.add_argument("--tile", type=_positive_int, default=224, help="input tile px (default 224)")
    roof.add_argument("--seconds", type=_positive_float, default=10.0, help="timed seconds of the engine run")
    roof.add_argument("--peak-seconds", type=_positive_float, default=2.0, help="seconds per peak GEMM")
    roof.set_defaults(run=cmd_bench_roofline)


def _write_json(path: Path | None, data) -> None:
    if path is not None:
        path.write_text(json.dumps(data, indent=1))


def cmd_bench_engine(args) -> int:
    from .bench_model import bench_engine, format_engine_table

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
    from .bench_model import bench_e2e, format_e2e
    from .slide import open_slide

    with open_slide(args.slide):  # a bad slide fails here, with the usual one-line error
        pass
    result = bench_e2e(args.slide, args.model, args.backend, args.precision, args.batch_size, args.threads,
                       args.engine_threads, args.seconds, args.out)
    print(format_e2e(result))
    _write_json(args.json, result)
    return 0


def cmd_bench_roofline(args) -> int:
    from .bench_roofline import format_roofline, roofline

    result = roofline(args.model, args.backend, args.precision, args.batch_size, args.tile, args.seconds,
                      args.peak_seconds, args.engine_threads)
    print(format_roofline(result))
    _write_json(args.json, result)
    return 0
