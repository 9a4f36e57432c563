"""A/B of the scoring pipeline itself: two hexfast trees, the same slide, HEX replaced by an engine
that only waits as long as a GPU at RATE tiles/s would (as `hexfast bench e2e --simulate-engine`),
each tree in its own process, in turn.

    python benchmarks/ab_pipeline.py OLD_TREE/python NEW_TREE/python SLIDE [--rates 2000,5000] [--runs 3]

(e.g. `git worktree add /tmp/old HEAD~1` and its _core build copied into /tmp/old/python/hexfast).
Prints each run's pipeline efficiency: ideal engine time (tiles ÷ rate) ÷ the stream+hex stage.
The stand-in engine is defined here, not taken from either tree, so both run the same one (a tree
whose pipeline calls run() gets a synchronous sleep; one that calls submit()/collect() an
asynchronous timeline, as a GPU behind torch's stream)."""

from __future__ import annotations

import argparse
import subprocess
import sys

CASE = r'''
import sys, tempfile, time
import numpy as np
sys.path.insert(0, sys.argv[1])
from hexfast.score import Scorer

class Stand_in:
    backend = "simulated"
    def __init__(self, rate): self.rate, self.busy = rate, 0.0
    def _out(self, n): return {"markers": np.zeros((n, 40), np.float32), "embedding": np.zeros((n, 1024), np.float32)}
    def run(self, feeds):
        n = feeds["tiles"].shape[0]; time.sleep(n / self.rate); return self._out(n)
    def submit(self, feeds):
        n = feeds["tiles"].shape[0]; self.busy = max(time.perf_counter(), self.busy) + n / self.rate; return self.busy, n
    def collect(self, handle):
        done, n = handle; wait = done - time.perf_counter()
        if wait > 0: time.sleep(wait)
        return self._out(n)
    def describe(self): return "stand-in"
    def close(self): pass

rate, runs = float(sys.argv[3]), int(sys.argv[4])
with Scorer(backend="ort-cpu") as scorer:
    scorer.hex = Stand_in(rate)
    for _ in range(runs):
        r = scorer.score(sys.argv[2], out=tempfile.mkdtemp())
        print(f"{len(r.coords) / rate / r.seconds['stream+hex']:.3f}")
'''


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("slide")
    ap.add_argument("--rates", default="2000,5000")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args(argv)
    print("| rate | old | new |\n|---|---|---|")
    for rate in args.rates.split(","):
        got = {}
        for side in ("old", "new"):
            out = subprocess.run([sys.executable, "-c", CASE, getattr(args, side), args.slide, rate, str(args.runs)],
                                 capture_output=True, text=True, check=True)
            got[side] = ", ".join(out.stdout.split())
        print(f"| {rate} | {got['old']} | {got['new']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
