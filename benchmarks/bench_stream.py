"""TileStream throughput against the path users run today, same tiles, one run.

    python benchmarks/make_slide.py --texture ../shared/data/slides/CMU-1-Small-Region.svs -o /tmp/big.svs
    python benchmarks/bench_stream.py /tmp/big.svs [--tiles 6000]

The same as `hexfast bench stream SLIDE`; the cases live in hexfast.bench.stream.
"""

import sys

from hexfast.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "stream", *sys.argv[1:]]))
