"""HEX on this CPU at fp32, int8 and bf16: speed, efficiency against the GEMM peak of each precision, memory and
fidelity, in one run, precisions alternating.

    python benchmarks/cpu_precision.py --model FULL_BUNDLE [--slide SLIDE] [--batch 4] [--seconds 40] [--rounds 2]
                                       [--json OUT.json]

For each precision, in round-robin order `--rounds` times, `hexfast bench engine` at `--batch` in a fresh
process (its own peak RSS): fp32 and int8 on ort-cpu (hex.onnx, hex.int8.onnx), bf16 on torch (the bf16
program on the CPU). Each row keeps its best round by CPU ms per tile (getrusage over all threads: what other
load on a shared VM moves least). Then:

  GFLOP per CPU-second   HEX's FLOPs per tile (the encoder's formula, bench.roofline.hex_flops) over CPU s per tile
  of GEMM peak           that figure over the measured GEMM peak of the same precision (GFLOP per CPU-second of
                         an n=2048 matmul: ONNX Runtime MatMul fp32, MatMulInteger u8 x s8, torch bf16)
  vs fp32 engine         fp32 CPU ms per tile / this precision's
  vs reference           the torch fp32 reference path (benchmarks/reference_hex.py, `--ref-tiles` tiles of
                         `--slide`), measured in the same run: its CPU ms per tile / this precision's
  fidelity               the bundle manifest's record of the variant (hexfast export measured it)

bf16 on a CPU without AVX512-BF16 or AMX-BF16 is emulated by oneDNN; its row is measured and labelled so
(the runtime refuses it there).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from hexfast.bench.model import bench_engine
from hexfast.bench.roofline import HexShape, hex_flops, measure_peak
from hexfast.bundle import load_bundle
from hexfast.engines.devices import cpu_flags, cpu_name

BACKEND = {"fp32": "ort-cpu", "int8": "ort-cpu", "bf16": "torch"}
FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, required=True, help="a full-size bundle with CPU variants")
    p.add_argument("--slide", type=Path, help="a 40x slide for the reference path (default: no reference row)")
    p.add_argument("--ref-tiles", type=int, default=16, help="tiles for the reference path (default 16)")
    p.add_argument("--batch", type=int, default=4, help="engine batch (default 4)")
    p.add_argument("--seconds", type=float, default=40.0, help="timed seconds per row and round (default 40)")
    p.add_argument("--rounds", type=int, default=2, help="round-robin rounds (default 2)")
    p.add_argument("--precisions", default="fp32,int8,bf16", help="default fp32,int8,bf16")
    p.add_argument("--json", type=Path, help="write everything measured here")
    args = p.parse_args()

    bundle = load_bundle(args.model)
    variants = bundle.model("hex").get("cpu_variants", {})
    precisions = args.precisions.split(",")
    flags = sorted(f for f in FLAGS if f in cpu_flags())
    print(f"CPU: {cpu_name()}; flags {' '.join(flags)}", flush=True)
    best: dict[str, dict] = {}
    rounds = []
    for r in range(args.rounds):
        for precision in precisions:
            row = bench_engine(bundle.path, (BACKEND[precision],), precision, [args.batch], seconds=args.seconds)[0]
            rounds.append({"round": r, **row})
            print(f"round {r} {precision}: {row['tiles_per_s']:.3f} tiles/s, {row['cpu_ms_per_tile']:.0f} CPU ms/tile, "
                  f"peak RSS {row['peak_rss_mib']:.0f} MiB", flush=True)
            if precision not in best or row["cpu_ms_per_tile"] < best[precision]["cpu_ms_per_tile"]:
                best[precision] = row
    peak = measure_peak("cpu", seconds=3.0, dtypes=tuple(precisions))
    peak_by = {"fp32": max((r["tflop_per_cpu_s"] for r in peak.rows if r["dtype"] == "fp32"
                            and "onnxruntime" in r["kernel"]), default=0.0),
               "int8": peak.peak("int8", "tflop_per_cpu_s"), "bf16": peak.peak("bf16", "tflop_per_cpu_s")}
    flops = sum(hex_flops(HexShape.from_manifest(bundle.manifest), 224).values())
    reference = _reference(args, bundle.path) if args.slide else None
    table = []
    for precision in precisions:
        row = best[precision]
        gflop_per_cpu_s = flops / (row["cpu_ms_per_tile"] / 1e3) / 1e9
        entry = {"precision": precision, "backend": row["backend"], "tiles_per_s": row["tiles_per_s"],
                 "cpu_ms_per_tile": row["cpu_ms_per_tile"], "peak_rss_mib": row["peak_rss_mib"],
                 "gflop_per_cpu_s": gflop_per_cpu_s, "gemm_peak_gflop_per_cpu_s": peak_by[precision] * 1e3,
                 "of_gemm_peak": gflop_per_cpu_s / (peak_by[precision] * 1e3) if peak_by[precision] else None,
                 "vs_fp32_engine": best["fp32"]["cpu_ms_per_tile"] / row["cpu_ms_per_tile"] if "fp32" in best else None,
                 "vs_reference": reference["cpu_ms_per_tile"] / row["cpu_ms_per_tile"] if reference else None,
                 "fidelity": (variants.get(precision) or {}).get("fidelity"), "fit": (variants.get(precision) or {}).get("fit"),
                 "emulated": precision == "bf16" and not {"avx512_bf16", "amx_bf16"} & cpu_flags()}
        table.append(entry)
    print(_markdown(table, reference))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"cpu": cpu_name(), "flags": flags, "model": str(bundle.path),
                                         "hex_gflop_per_tile": flops / 1e9, "batch": args.batch,
                                         "seconds": args.seconds, "rounds": rounds, "peak": peak.rows,
                                         "reference": reference, "table": table}, indent=1))
    return 0


def _reference(args, model: Path) -> dict:
    """The torch fp32 reference path on the slide's first tiles (benchmarks/reference_hex.py), this run."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ref.json"
        subprocess.run([sys.executable, str(Path(__file__).with_name("reference_hex.py")), str(args.slide), "--model",
                        str(model), "--tiles", str(args.ref_tiles), "--ref-batch", str(args.batch), "--batch-size",
                        str(args.batch), "--backend", "ort-cpu", "--json", str(out)], check=True)
        result = json.loads(out.read_text())
    ref = result["reference"]
    print(f"reference (torch fp32 eager): {ref['tiles_per_s']:.3f} tiles/s, {ref['cpu_ms_per_tile']:.0f} CPU ms/tile",
          flush=True)
    return {"tiles": args.ref_tiles, "tiles_per_s": ref["tiles_per_s"], "cpu_ms_per_tile": ref["cpu_ms_per_tile"]}


def _markdown(table: list[dict], reference: dict | None) -> str:
    lines = ["| precision | runtime | tiles/s | CPU ms/tile | GFLOP per CPU-s | of that precision's GEMM peak | "
             "peak RSS MiB | vs fp32 engine | vs torch fp32 reference | markers Pearson r min | max abs/range | "
             "embedding cosine min | MICA risk Δ |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for e in table:
        f = e["fidelity"] or {}
        risk = (f.get("mica_risk") or {}).get("delta")
        label = e["precision"] + (" (emulated: no BF16 unit)" if e["emulated"] else "")
        lines.append(
            f"| {label} | {e['backend']} | {e['tiles_per_s']:.3f} | {e['cpu_ms_per_tile']:.0f} | "
            f"{e['gflop_per_cpu_s']:.1f} | "
            + (f"{100 * e['of_gemm_peak']:.0f} % of {e['gemm_peak_gflop_per_cpu_s']:.0f}" if e["of_gemm_peak"] else "-")
            + f" | {e['peak_rss_mib']:.0f} | {e['vs_fp32_engine']:.2f}× | "
            + (f"{e['vs_reference']:.2f}×" if e["vs_reference"] else "-")
            + " | " + (f"{f['markers_pearson_min']:.5f}" if f else "(fp32)")
            + " | " + (f"{f['markers_max_abs_of_range']:.2g}" if f else "-")
            + " | " + (f"{f['embedding_cosine_min']:.5f}" if f else "-")
            + " | " + (f"{risk:.2g}" if risk is not None else "-") + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
