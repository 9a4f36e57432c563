"""Two exports of the same HEX model, A against B: same outputs? how much faster?

    python benchmarks/ab_engines.py A/hex.onnx B/hex.onnx [--batch-size 4] [--pairs 12] [--json OUT]

Both engines live in one process and run the same random uint8 tiles in alternating order
(A B, B A, A B, ...), so slow drifts in the machine's load hit both alike. Reports the outputs'
max|Δ|/max|A| and, per pair, A's time ÷ B's: the median of those ratios, for CPU time (this
process, all threads) and wall clock. Used for the last-layer-CLS-only change (RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from hexfast.bench.proc import cpu_seconds
from hexfast.engines import create_engine


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("a", type=Path)
    p.add_argument("b", type=Path)
    p.add_argument("--backend", default="ort-cpu")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--tile", type=int, default=224)
    p.add_argument("--pairs", type=int, default=12)
    p.add_argument("--threads", type=int, default=None, help="engine threads (default: the runtime's)")
    p.add_argument("--json", type=Path)
    args = p.parse_args()

    feeds = {"tiles": np.random.default_rng(0).integers(0, 256, (args.batch_size, args.tile, args.tile, 3),
                                                        dtype=np.uint8)}
    engines = {k: create_engine(path, args.backend, threads=args.threads) for k, path in (("a", args.a), ("b", args.b))}
    outputs = {k: e.run(feeds) for k, e in engines.items()}  # also the warm-up run
    agreement = {name: float(np.abs(outputs["a"][name] - outputs["b"][name]).max() / np.abs(outputs["a"][name]).max())
                 for name in outputs["a"]}
    times: dict[str, list] = {"a": [], "b": []}
    for i in range(args.pairs):
        for k in ("a", "b") if i % 2 == 0 else ("b", "a"):
            c0, t0 = cpu_seconds(), time.perf_counter()
            engines[k].run(feeds)
            times[k].append((time.perf_counter() - t0, cpu_seconds() - c0))
    n = args.batch_size
    result = {
        "a": str(args.a), "b": str(args.b), "backend": engines["a"].describe(), "batch_size": n,
        "tile": args.tile, "pairs": args.pairs, "max_rel_diff": agreement,
        **{f"{k}_{what}_ms_per_tile_median": float(1e3 * np.median([t[i] for t in times[k]]) / n)
           for k in ("a", "b") for i, what in ((0, "wall"), (1, "cpu"))},
        "a_over_b_cpu_median": float(np.median([a[1] / b[1] for a, b in zip(times["a"], times["b"])])),
        "a_over_b_wall_median": float(np.median([a[0] / b[0] for a, b in zip(times["a"], times["b"])])),
        "runs": times,
    }
    for name, value in agreement.items():
        print(f"{name}: max|Δ|/max|A| {value:.2e}")
    for k in ("a", "b"):
        print(f"{k.upper()} {result[k]}: {result[f'{k}_wall_ms_per_tile_median']:.1f} ms/tile wall, "
              f"{result[f'{k}_cpu_ms_per_tile_median']:.1f} CPU ms/tile (medians)")
    print(f"A ÷ B, median of {args.pairs} pairs: CPU {result['a_over_b_cpu_median']:.3f}, "
          f"wall {result['a_over_b_wall_median']:.3f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
