"""Soak: `hexfast watch` over many slides in one process, RSS sampled as it goes.

    python benchmarks/watch_soak.py [--slides 500] [--work /tmp/watch-soak]

The inbox gets `--slides` copies (hard links) of one small real H&E slide (a 896 x 896 crop of
CMU-1-Small-Region at its MPP: 49 tissue tiles and a 13-patch MICA bag, through every output), all present from the
start; a Watcher (the API `hexfast watch` runs) with the bundled demo model scores them in arrival
order. RSS (VmRSS) is sampled after every 50th slide; the verdict: after the warm-up (the first 100
slides), every sample within ±5 % of their median.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import threading
import time
from pathlib import Path

import numpy as np
import openslide
import tifffile

ROOT = Path(__file__).resolve().parents[1]
CMU = ROOT.parent / "shared" / "data" / "slides" / "CMU-1-Small-Region.svs"


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slides", type=int, default=500)
    ap.add_argument("--work", type=Path, default=Path("/tmp/watch-soak"))
    ap.add_argument("--every", type=int, default=50)
    args = ap.parse_args(argv)
    from hexfast.watch import Watcher

    shutil.rmtree(args.work, ignore_errors=True)
    inbox, out = args.work / "inbox", args.work / "out"
    inbox.mkdir(parents=True)
    with openslide.OpenSlide(str(CMU)) as osr:
        rgb = np.asarray(osr.read_region((600, 1000), 0, (896, 896)).convert("RGB"))
    first = inbox / "slide0000.tif"
    tifffile.imwrite(first, rgb, tile=(256, 256), photometric="rgb", resolution=(1e4 / 0.499, 1e4 / 0.499),
                     resolutionunit="CENTIMETER")
    for i in range(1, args.slides):
        os.link(first, inbox / f"slide{i:04d}.tif")
    samples: list[tuple[int, float, float]] = []
    done = threading.Event()
    start = time.perf_counter()

    def on_event(record: dict) -> None:
        if record["event"] in ("done", "failed"):
            n = on_event.count + 1
            on_event.count = n
            if n % args.every == 0:
                samples.append((n, rss_mb(), time.perf_counter() - start))
                print(f"{n:5d} slides  RSS {samples[-1][1]:7.1f} MB  {samples[-1][2]:7.1f} s", flush=True)
            if n == args.slides:
                done.set()

    on_event.count = 0
    watcher = Watcher(inbox, out, settle=0.5, poll=0.5, on_event=on_event)
    thread = threading.Thread(target=watcher.run, daemon=True)
    thread.start()
    done.wait()
    status = watcher.status()
    watcher.stop()
    thread.join(60)
    after = [mb for n, mb, _ in samples if n > 100]
    median = statistics.median(after)
    spread = max(abs(mb - median) / median for mb in after)
    wall = samples[-1][2]
    print(f"# {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"{args.slides} slides in {wall:.0f} s ({args.slides / wall * 60:.1f} slides/min), "
          f"{status['counts']['done']} done, {status['counts']['failed']} failed; RSS after the first 100: median "
          f"{median:.1f} MB, largest deviation {spread:.1%} ({'flat within ±5 %' if spread <= 0.05 else 'NOT flat'})")


if __name__ == "__main__":
    main()
