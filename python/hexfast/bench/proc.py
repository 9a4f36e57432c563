"""What a benchmark measures about its own process, and running a benchmark case in a fresh one.

CPU time (all threads, user + system) barely moves when other processes share the cores, unlike
wall time; peak RSS is per process, so cases that must not share it run in their own.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys

from ..errors import HexfastError


def cpu_seconds() -> float:
    """CPU time of this process, all threads (user + system)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_in_subprocess(module: str, *args: str) -> dict | list:
    """`python -m MODULE ARGS...` in a fresh interpreter; the JSON its last stdout line holds. A case
    that fails is a one-line HexfastError with the last line of its stderr."""
    out = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True)
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["no output"])[-1]
        raise HexfastError(f"benchmark case {' '.join(args[:1])} failed: {last}")
    return json.loads(out.stdout.strip().splitlines()[-1])
