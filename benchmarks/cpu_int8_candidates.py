"""Which runtime should run HEX at int8 on a CPU: the candidates on the full-size model, one run, alternating.

    python benchmarks/cpu_int8_candidates.py --model FULL_BUNDLE [--batch 2] [--runs 3] [--rounds 2] [--json OUT]

Candidates, each in a fresh process (its own threads and peak RSS), on the same seeded random tiles:

  ort fp32        hex.onnx on ONNX Runtime (the fp32 engine)
  ort int8        hex.int8.onnx (the bundle's int8 variant: dynamic int8, MatMulInteger)
  torch fp32      the demo HEX in torch eager (the reference path's model), 2 threads
  torch int8      the same with torch.ao.quantization.quantize_dynamic on every nn.Linear (fbgemm, int8
                  weights, dynamic activations: the torch counterpart of the ORT variant)
  openvino fp32   hex.onnx compiled by OpenVINO's CPU plugin, when openvino imports (not a dependency)
  openvino int8   hex.int8.onnx compiled by OpenVINO (its own int8 path, NNCF's static quantization, is another
                  toolchain: not tried)

Per candidate: CPU ms per tile (getrusage, all threads; the best round), tiles/s, peak RSS, and max |Δ| of
the markers against ort fp32 over max |ort fp32| (a sanity check that it computes the same model; the
variants' fidelity proper is the manifest's). Demo bundles only (torch rebuilds the model from the manifest's
seed). OpenVINO is not a dependency: put it on PYTHONPATH to include it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

CANDIDATES = ("ort fp32", "ort int8", "torch fp32", "torch int8", "openvino fp32", "openvino int8")


def tiles(batch: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(batch, 224, 224, 3), dtype=np.uint8)


def run_one(candidate: str, model: Path, batch: int, runs: int) -> dict:
    """In this process: load, warm up, time `runs` batches; markers of the first batch."""
    from hexfast.bench.proc import cpu_seconds, peak_rss_mib

    x = tiles(batch)
    if candidate.startswith("ort"):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = 2
        file = "hex.onnx" if candidate == "ort fp32" else "hex.int8.onnx"
        session = ort.InferenceSession(str(model / file), options, providers=["CPUExecutionProvider"])

        def run():
            return session.run(["markers"], {"tiles": x})[0]
    elif candidate.startswith("torch"):
        import torch

        from hexfast_export.demo import demo_models
        from hexfast_export.onnx_export import HexGraph

        torch.set_num_threads(2)
        manifest = json.loads((model / "manifest.json").read_text())
        graph = HexGraph(demo_models(manifest["demo_models"]["size"], manifest["demo_models"]["seed"])[0]).eval()
        if candidate == "torch int8":  # the encoder, as the ORT variant (the heads stay fp32)
            graph.model.visual = torch.ao.quantization.quantize_dynamic(graph.model.visual, {torch.nn.Linear},
                                                                         dtype=torch.qint8)
        t = torch.from_numpy(x)

        def run():
            with torch.inference_mode():
                return graph(t)[0].numpy()
    else:
        import openvino as ov

        file = "hex.onnx" if candidate == "openvino fp32" else "hex.int8.onnx"
        compiled = ov.Core().compile_model(str(model / file), "CPU", {"INFERENCE_NUM_THREADS": 2})
        request = compiled.create_infer_request()

        def run():
            return request.infer({0: x})[compiled.output("markers")]
    markers = run()  # warm-up
    c0, t0 = cpu_seconds(), time.perf_counter()
    for _ in range(runs):
        run()
    cpu, wall = cpu_seconds() - c0, time.perf_counter() - t0
    return {"candidate": candidate, "cpu_ms_per_tile": 1e3 * cpu / (runs * batch), "tiles_per_s": runs * batch / wall,
            "peak_rss_mib": peak_rss_mib(), "markers": np.asarray(markers, np.float64).tolist()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--candidates", default=",".join(CANDIDATES))
    p.add_argument("--json", type=Path)
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.model, args.batch, args.runs)))
        return 0
    best: dict[str, dict] = {}
    for _ in range(args.rounds):
        for candidate in args.candidates.split(","):
            r = subprocess.run([sys.executable, __file__, "--model", str(args.model), "--batch", str(args.batch),
                                "--runs", str(args.runs), "--one", candidate], capture_output=True, text=True)
            if r.returncode != 0:
                last = (r.stderr.strip().splitlines() or ["failed"])[-1]
                print(f"{candidate}: not run ({last})", flush=True)
                best.setdefault(candidate, {"candidate": candidate, "error": last})
                continue
            row = json.loads(r.stdout.strip().splitlines()[-1])
            print(f"{candidate}: {row['cpu_ms_per_tile']:.0f} CPU ms/tile, {row['tiles_per_s']:.3f} tiles/s, "
                  f"peak RSS {row['peak_rss_mib']:.0f} MiB", flush=True)
            if "error" in best.get(candidate, {}) or candidate not in best \
                    or row["cpu_ms_per_tile"] < best[candidate]["cpu_ms_per_tile"]:
                best[candidate] = row
    ref = np.asarray(best["ort fp32"]["markers"])
    lines = ["| candidate | CPU ms/tile | vs ort fp32 | tiles/s | peak RSS MiB | markers max abs / max ref vs ort fp32 |",
             "|---|---|---|---|---|---|"]
    for name, row in best.items():
        if "error" in row:
            lines.append(f"| {name} | not run: {row['error']} | | | | |")
            continue
        diff = float(np.abs(np.asarray(row["markers"]) - ref).max() / np.abs(ref).max())
        row["markers_max_rel"] = diff
        lines.append(f"| {name} | {row['cpu_ms_per_tile']:.0f} | "
                     f"{best['ort fp32']['cpu_ms_per_tile'] / row['cpu_ms_per_tile']:.2f}× | {row['tiles_per_s']:.3f} | "
                     f"{row['peak_rss_mib']:.0f} | {diff:.2g} |")
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "markers"}
                                         for k, v in best.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
