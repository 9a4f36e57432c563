"""Passes over one slide's tiles: tiles → engine → outputs, as stages joined by bounded queues.

    TileStream workers (C++ threads)  ──ring of batches──►  this thread: submit / collect  ──queue──►  writer thread
    read, decode, resize                                   (two batches in flight)              h5 appends (features)

Two passes use it: the HEX pass (run_hex: markers and the embedding of every tile of hexfast's grid)
and, for a MICA trained on CLAM's bags, the H&E feature pass (run_he_features: the he_features model
over CLAM's patches).

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

Where the time goes is kept in seconds, per pass: "<pass> wait: tiles" (this thread waiting for
the stream), "<pass> wait: engine" (for collect), "<pass> wait: writer" (for a place in its queue,
and at the end).
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


@dataclass
class FeatureTiles:
    """What the H&E feature pass gives: CLAM's patches in order and their features (None when the
    writer took them), the tiles the stream skipped, and its timings."""

    coords: np.ndarray
    features: np.ndarray | None
    skipped: list
    seconds: dict[str, float]


def run_hex(stream, engine, writer, path: Path, total: int, progress: Callable | None,
            cancelled: threading.Event) -> HexTiles:
    """`stream` (a TileStream, or None for a slide without tiles) through the HEX `engine`, into
    `writer` (a SlideWriter, or None: features kept in memory)."""
    markers: list[np.ndarray] = []
    kept: list[np.ndarray] = []

    def take(coords, out, sink):
        batch_markers = np.asarray(out["markers"], np.float32)
        features = np.asarray(out["embedding"], np.float32)
        markers.append(batch_markers)
        if sink is None:
            kept.append(features)
        else:
            sink.put(coords, batch_markers, features)

    coords, seconds = _run(stream, engine, writer.append if writer is not None else None, take, path, total,
                           progress, cancelled, "tiles", "hex")
    return HexTiles(coords=coords, markers=_stack(markers, 40),
                    features=None if writer is not None else _stack(kept, 1024),
                    skipped=stream.skipped if stream is not None else [], seconds=seconds)


def run_he_features(stream, engine, writer, path: Path, total: int, progress: Callable | None,
                    cancelled: threading.Event) -> FeatureTiles:
    """CLAM's patches (`stream`) through the he_features `engine`, into the writer's MICA bag
    (SlideWriter.append_mica) or memory."""
    kept: list[np.ndarray] = []

    def take(coords, out, sink):
        features = np.asarray(out["features"], np.float32)
        if sink is None:
            kept.append(features)
        else:
            sink.put(coords, features)

    coords, seconds = _run(stream, engine, writer.append_mica if writer is not None else None, take, path, total,
                           progress, cancelled, "mica tiles", "mica features")
    return FeatureTiles(coords=coords, features=None if writer is not None else _stack(kept, 1024),
                        skipped=stream.skipped if stream is not None else [], seconds=seconds)


def _run(stream, engine, write: Callable | None, take: Callable, path: Path, total: int,
         progress: Callable | None, cancelled: threading.Event, stage: str, name: str
         ) -> tuple[np.ndarray, dict[str, float]]:
    """The loop both passes share: stream → engine (IN_FLIGHT batches) → take(coords, outputs, sink),
    where sink is the writer thread running `write` (None: no writer). Returns the coords in order
    and the pass's timings."""
    coords_seen: list[np.ndarray] = []
    waits = dict.fromkeys(("tiles", "engine", "writer"), 0.0)
    engine_s = 0.0
    done = 0
    start = time.perf_counter()
    if progress:
        progress(stage, 0, total)
    sink = _WriterThread(write) if write is not None and stream is not None else None
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
                        raise Cancelled(f"{path}: cancelled after {done} of {total} {stage}")
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
                coords_seen.append(coords)
                t = time.perf_counter()
                take(coords, out, sink)
                waits["writer"] += time.perf_counter() - t
                done += len(coords)
                if progress:
                    progress(stage, done, total)
        if sink is not None:
            t = time.perf_counter()
            sink.close()
            waits["writer"] += time.perf_counter() - t
    except BaseException:
        if sink is not None:
            sink.abandon()
        raise
    seconds = {f"stream+{name}": time.perf_counter() - start, f"{name} engine (within stream+{name})": engine_s}
    seconds |= {f"{name} wait: {k} (within stream+{name})": v for k, v in waits.items()}
    coords = np.concatenate(coords_seen) if coords_seen else np.zeros((0, 2), np.int64)
    return coords, seconds


def _stack(parts: list[np.ndarray], width: int) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros((0, width), np.float32)


class _WriterThread:
    """`write` (a writer's append) on its own thread, behind a bounded queue. An append that fails
    stops it; the error is raised to the producer at its next put() or at close()."""

    def __init__(self, write: Callable, depth: int = WRITER_DEPTH):
        self._write = write
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
                    self._write(*item)
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
