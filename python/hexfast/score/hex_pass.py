"""The HEX pass over one slide: tiles → engine → outputs, as stages joined by bounded queues.

    TileStream workers (C++ threads)  ──ring of batches──►  this thread: submit / collect  ──queue──►  writer thread
    read, decode, resize                                   (two batches in flight)              h5 appends (features)

* The C++ TileStream fills its ring ahead of the engine (its own threads, no GIL).
* This thread submits a batch to the engine and collects the batch before it: an engine that
  overlaps (torch on CUDA: pinned copies and kernels queued on its stream) computes one batch while
  the next is fetched and staged; a synchronous one (ONNX Runtime) simply runs in submit().
* The h5 appends run on their own thread behind a queue of WRITER_DEPTH batches, so HDF5's writes
  and gzip overlap the engine instead of adding to it.

Everything is bounded: the ring (the stream's prefetch), IN_FLIGHT engine batches, WRITER_DEPTH
queued writes. Markers and coords stay in memory (176 bytes a tile); features go to the writer
(or into memory when there is none). Cancel, an engine or writer error, Ctrl-C and SIGTERM stop
every stage: the writer thread is told to drop what is queued and joined before the error goes on.

Where the time goes is kept in seconds: "hex wait: tiles" (this thread waiting for the stream),
"hex wait: engine" (for collect), "hex wait: writer" (for a place in its queue, and at the end).
"""

from __future__ import annotations

import collections
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import HexfastError

IN_FLIGHT = 2  # engine batches submitted and not yet collected
WRITER_DEPTH = 4  # batches queued for the writer thread


class Cancelled(HexfastError):
    """Scoring was cancelled (Scorer.cancel())."""


@dataclass
class HexTiles:
    """What the HEX pass over a slide gives: the scored tiles in grid order (features only when
    no writer took them), the tiles the stream skipped, and its timings."""

    coords: np.ndarray
    markers: np.ndarray
    features: np.ndarray | None
    skipped: list
    seconds: dict[str, float]


def run_hex(stream, engine, writer, path: Path, total: int, progress: Callable | None,
            cancelled: threading.Event) -> HexTiles:
    """`stream` (a TileStream, or None for a slide without tiles) through `engine`, into `writer`
    (a SlideWriter, or None: features kept in memory)."""
    parts: dict[str, list[np.ndarray]] = {"coords": [], "markers": [], "features": []}
    waits = dict.fromkeys(("tiles", "engine", "writer"), 0.0)
    engine_s = 0.0
    done = 0
    start = time.perf_counter()
    if progress:
        progress("tiles", 0, total)
    sink = _WriterThread(writer) if writer is not None and stream is not None else None
    in_flight: collections.deque = collections.deque()
    try:
        batches = iter(stream) if stream is not None else iter(())
        exhausted = False
        while not exhausted or in_flight:
            if not exhausted:
                t = time.perf_counter()
                batch = next(batches, None)
                waits["tiles"] += time.perf_counter() - t
                exhausted = batch is None
                if batch is not None:
                    if cancelled.is_set():
                        raise Cancelled(f"{path}: cancelled after {done} of {total} tiles")
                    coords, tiles = batch
                    t = time.perf_counter()
                    in_flight.append((np.array(coords), engine.submit({"tiles": tiles})))
                    engine_s += time.perf_counter() - t
                    del batch, tiles  # the ring buffer goes back to the readers (the engine copied it)
            if in_flight and (exhausted or len(in_flight) >= IN_FLIGHT):
                coords, handle = in_flight.popleft()
                t = time.perf_counter()
                out = engine.collect(handle)
                wait = time.perf_counter() - t
                waits["engine"] += wait
                engine_s += wait
                markers = np.asarray(out["markers"], np.float32)
                features = np.asarray(out["embedding"], np.float32)
                parts["coords"].append(coords)
                parts["markers"].append(markers)
                if sink is not None:
                    t = time.perf_counter()
                    sink.put(coords, markers, features)
                    waits["writer"] += time.perf_counter() - t
                else:
                    parts["features"].append(features)
                done += len(coords)
                if progress:
                    progress("tiles", done, total)
        if sink is not None:
            t = time.perf_counter()
            sink.close()
            waits["writer"] += time.perf_counter() - t
    except BaseException:
        if sink is not None:
            sink.abandon()
        raise
    seconds = {"stream+hex": time.perf_counter() - start, "hex engine (within stream+hex)": engine_s}
    seconds |= {f"hex wait: {k} (within stream+hex)": v for k, v in waits.items()}
    features = None
    if writer is None:
        features = np.concatenate(parts["features"]) if parts["features"] else np.zeros((0, 1024), np.float32)
    return HexTiles(
        coords=np.concatenate(parts["coords"]) if parts["coords"] else np.zeros((0, 2), np.int64),
        markers=np.concatenate(parts["markers"]) if parts["markers"] else np.zeros((0, 40), np.float32),
        features=features, skipped=stream.skipped if stream is not None else [], seconds=seconds)


class _WriterThread:
    """writer.append on its own thread, behind a bounded queue. An append that fails stops it; the
    error is raised to the producer at its next put() or at close()."""

    def __init__(self, writer, depth: int = WRITER_DEPTH):
        self._writer = writer
        self._queue: queue.Queue = queue.Queue(depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name="hexfast-writer", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is None:
                try:
                    self._writer.append(*item)
                except BaseException as e:  # noqa: BLE001 - raised in the producer's thread
                    self._error = e

    def put(self, *item) -> None:
        self._raise()
        self._queue.put(item)

    def close(self) -> None:
        """Waits until everything queued is written; raises the writer's error, if any."""
        self._queue.put(None)
        self._thread.join()
        self._raise()

    def abandon(self) -> None:
        """Drops what is queued and waits for the append in progress (the slide is failing anyway)."""
        self._error = self._error or _Abandoned()
        while self._thread.is_alive():
            try:
                while True:
                    self._queue.get_nowait()
            except queue.Empty:
                pass
            try:
                self._queue.put(None, timeout=0.1)
            except queue.Full:
                continue
            self._thread.join()

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error


class _Abandoned(Exception):
    pass
