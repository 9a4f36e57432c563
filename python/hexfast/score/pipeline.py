"""Scoring one slide, or many: TileStream → HEX engine → virtual CODEX →
CODEX encoder → MICA, then the per-slide outputs.

MICA reads the bag its bundle declares (score.mica_bag): for the official pipeline's
"resnet50-trunc", CLAM's patches are laid out beside hexfast's grid (slide.clam_patches) and a
second TileStream reads them in the same run, filling its ring while HEX runs, through the
bundle's he_features model (always fp32, like the slide-level models); `mica_bag` reads a lab's
own CLAM bags instead.

Reading overlaps inference: the stream's C++ workers fill a bounded ring of
batches while the engine runs (ONNX Runtime and TensorRT release the GIL).
With several slides, the next slide is opened, tiled and its first batches
read while the current one is still in the engine.

    scorer = hexfast.Scorer(backend="auto")
    result = scorer.score("slide.svs", out="results/")
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import importlib.util
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from ..bundle import MANIFEST, Bundle, BundleError, MissingModelError, load_bundle
from ..engines import BackendUnavailable, Engine, create_engine
from ..engines.build import engine_key
from ..engines.devices import gpu_name
from ..errors import HexfastError
from ..outputs import SlideWriter
from ..outputs.writer import OUTPUTS, checked_outputs
from .._core import __version__
from ..slide import DEFAULT_MAX_TILES, DEFAULT_MIN_TISSUE, Slide, TileGrid, TissueParams, open_slide, tile_slide
from ..slide.clam_patches import ClamParams, ClamPatches, clam_patches
from ..slide.region import Region
from ..stream import TileStream
from .codex_grid import codex_encoder_input, virtual_codex
from .mica_bag import MicaBag, find_bag, open_bag
from .mica_stream import CHUNK_TILES, stream_mica
from .precision import choose as choose_precision
from .tile_pass import Cancelled, HexTiles, run_he_features, run_hex

log = logging.getLogger("hexfast.pipeline")
PER_TILE_MODELS = ("hex", "he_features")  # one row per tile, each independent of the others

# progress(stage, done, total): stage is "tiles" while the slide streams.
Progress = Callable[[str, int, int], None]


@dataclass
class SlideResult:
    """What scoring one slide gives. Arrays are in grid order."""

    path: Path
    coords: np.ndarray                 # (N, 2) int64 level-0 top-left
    markers: np.ndarray                # (N, 40) float32, the virtual CODEX per tile
    marker_names: list[str]
    tile_size: int                     # level-0 px
    stride: int
    mpp: float
    backend: str
    demo: bool
    features: np.ndarray | None = None  # (N, 1024) when kept in memory (no output directory)
    codex_grid: np.ndarray | None = None  # (gh, gw, 40), one cell per stride
    mica: dict | None = None            # mica_stream.mica_summary: hazards, survival, risk, most_attended tiles,
    #                                     the bag it read; or {"skipped": why} when the bag is empty
    mica_coords: np.ndarray | None = None  # (M, 2) level-0 top-left of MICA's bag (CLAM's patches)
    mica_features: np.ndarray | None = None  # (M, 1024) when kept in memory (no output directory)
    mica_attention: np.ndarray | None = None  # (M,) co-attention per bag tile, averaged over the markers
    region: dict | None = None          # the part of the slide scored (Region.describe()), None: all of it
    seconds: dict[str, float] = field(default_factory=dict)
    outputs: dict[str, Path] = field(default_factory=dict)
    skipped: list = field(default_factory=list)
    worker: str | None = None           # "host:pid" of the Ray worker that scored it (None: this process)

    @property
    def wall_seconds(self) -> float:
        """The slide's time: its stages, each counted once (the engine's share of streaming is shown as
        "hex engine (within stream+hex)"), from opening it to its outputs written -- report.json's
        seconds.total. A slide opened ahead while another was scored does not count its wait."""
        if "total" in self.seconds:  # report.json's, once written: the same figure everywhere
            return self.seconds["total"]
        return sum(v for k, v in self.seconds.items() if "within" not in k)

    @property
    def tiles_per_s(self) -> float:
        """Tiles over the slide's time (wall_seconds): the figure the terminal, the summary and report.json give."""
        wall = self.wall_seconds
        return len(self.coords) / wall if wall > 0 else 0.0

    @property
    def hex_tiles_per_s(self) -> float:
        """Tiles over the streaming + HEX stage alone (what the live bar shows while it runs)."""
        busy = self.seconds.get("stream+hex", 0.0)
        return len(self.coords) / busy if busy > 0 else 0.0

    @property
    def out_dir(self) -> Path | None:
        """OUT/<stem>/, where the outputs went (None when nothing was written)."""
        report = self.outputs.get("report")
        return report.parent if report is not None else None


@dataclass
class _Prepared:
    slide: Slide
    grid: TileGrid
    stream: TileStream | None
    seconds: dict[str, float]
    clam: ClamPatches | None = None  # MICA's patches, when the Scorer computes its bag
    clam_stream: TileStream | None = None
    bag: MicaBag | None = None  # a --mica-bag file, opened and checked
    clam_outside: int = 0  # CLAM's patches left out by the region
    started_at: datetime.datetime | None = None

    def close(self) -> None:
        for stream in (self.stream, self.clam_stream):
            if stream is not None:
                stream.close()
        self.slide.close()


class Scorer:
    """Loads a model bundle's engines once; scores slides with them.

    `model`: a bundle directory, a Bundle, or None for the bundled demo model
    (untrained: everything it writes says so).

    `cancel()` may be called from any thread. It stops every score() and
    score_many() in progress at its next batch (they raise Cancelled, and write
    no partial outputs); called when none is in progress, it cancels the next one
    to start, before that reads anything -- so a Cancel clicked while a job is
    still being handed to its thread is never lost.

    `mica_bag`: a directory of CLAM features h5 files (one per slide, named after it), fed to MICA
    instead of the bag the Scorer would compute (score.mica_bag).

    `region`: score only the tiles (and MICA patches) whose centre lies in it (slide.region: a
    rectangle or QuPath annotations); every output says so, MICA's risk is labelled partial.
    """

    def __init__(self, model: str | os.PathLike | Bundle | None = None, backend: str = "auto", *,
                 precision: str = "fp32", batch_size: int = 64, threads: int = 2, stain_norm: str = "none",
                 stride: int | None = None, mpp: float | None = None, min_tissue: float = DEFAULT_MIN_TISSUE,
                 max_tiles: int = DEFAULT_MAX_TILES, allow_non_brightfield: bool = False,
                 engine_threads: int | None = None, device: int = 0, cuda_graphs: bool = False,
                 mica_bag: str | os.PathLike | None = None, region: Region | None = None,
                 tissue: TissueParams | None = None, mica: bool = True, outputs: Sequence[str] = OUTPUTS):
        self.bundle = model if isinstance(model, Bundle) else load_bundle(model)
        self.precision = precision
        self.batch_size = batch_size
        self.threads = threads
        self.stain_norm = stain_norm
        self.stride = stride
        self.mpp = mpp
        self.min_tissue = min_tissue
        self.tissue = tissue or TissueParams()
        self.outputs = checked_outputs(outputs)
        self.max_tiles = max_tiles
        self.allow_non_brightfield = allow_non_brightfield
        self._calls = _Calls()

        def engine(name: str, precision: str):
            return open_engine(self.bundle, name, backend, precision, engine_threads, device, cuda_graphs)

        self.hex_precision = choose_precision(self.bundle, backend, precision)
        self.precision = self.hex_precision.precision
        self.hex = open_engine(self.bundle, "hex", self.hex_precision.backend, self.precision, engine_threads, device,
                               cuda_graphs)
        # The slide-level models run once per slide (under 1 % of the work): always fp32, which keeps
        # MICA's online softmax and the CODEX encoder's quantisation exact.
        self.codex_encoder = engine("codex_encoder", "fp32") if self.bundle.has("codex_encoder") else None
        self.mica = engine("mica", "fp32") if mica and self.bundle.has("mica") and self.codex_encoder else None
        self.mica_off = not mica and self.bundle.has("mica")  # asked not to run it (--no-mica)
        self.mica_bag = Path(mica_bag) if mica_bag is not None else None
        self.region = region
        self.clam_params: ClamParams | None = None
        self.he_features = None
        if self.mica_bag is not None:
            if self.mica_off:
                raise HexfastError(f"{self.mica_bag}: --mica-bag feeds MICA, which --no-mica turns off")
            if self.mica is None:
                raise HexfastError(f"{self.mica_bag}: --mica-bag feeds MICA, and bundle {self.bundle.path} has no "
                                   "MICA model")
            if not self.mica_bag.is_dir():
                raise HexfastError(f"{self.mica_bag}: --mica-bag needs a directory of CLAM features h5 files")
        elif self.mica is not None and self.bundle.mica_features["kind"] == "resnet50-trunc":
            self.clam_params = ClamParams.from_manifest(self.bundle.mica_features["patching"],
                                                        self.bundle.path / MANIFEST)
            self.he_features = engine("he_features", "fp32")
        self.backend = self.hex.backend
        log.info("HEX engine: %s; precision %s (%s)", self.hex.describe(), self.precision, self.hex_precision.why)

    def describe(self) -> str:
        """The HEX engine, one line: backend, runtime, precision, device."""
        return self.hex.describe()

    @property
    def settings(self) -> dict:
        """Every option that changes what score() writes (report.json's "settings")."""
        return score_settings(stride=self.stride, mpp=self.mpp, min_tissue=self.min_tissue,
                              stain_norm=self.stain_norm, precision=self.precision, mica_bag=self.mica_bag,
                              region=self.region, tissue=self.tissue, mica=not self.mica_off, outputs=self.outputs)

    # ------------------------------------------------------------- control

    def cancel(self) -> None:
        self._calls.cancel()

    def close(self) -> None:
        for engine in (self.hex, self.codex_encoder, self.mica, self.he_features):
            if engine is not None:
                engine.close()

    def __enter__(self) -> Scorer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------- scoring

    def score(self, path: str | os.PathLike, out: str | os.PathLike | None = None,
              progress: Progress | None = None) -> SlideResult:
        """Scores one slide; with `out`, writes OUT/<stem>/ and keeps features on disk only."""
        with self._calls.running() as cancelled:
            _check(cancelled, Path(path))
            return self._finish(self._prepare(Path(path)), out, progress, cancelled)

    def score_many(self, paths: Iterable[str | os.PathLike], out: str | os.PathLike | None = None,
                   progress: Callable[[Path], Progress | None] | None = None
                   ) -> Iterator[tuple[Path, SlideResult | BaseException]]:
        """Scores slides in turn, preparing the next (open, tile, first batches)
        while the current one runs. Yields (path, result or the exception it
        raised): a failed slide does not stop the others; Cancelled stops them all."""
        todo = collections.deque((Path(p), None) for p in paths)
        with self._calls.running() as cancelled:
            _check(cancelled, todo[0][0] if todo else Path("."))
            yield from self._score_queue(lambda wait: todo.popleft() if todo else None, out, progress, cancelled)

    def score_queue(self, take: Callable[[bool], tuple[Path, str | None] | None], out: str | os.PathLike | None = None,
                    progress: Callable[[Path], Progress | None] | None = None
                    ) -> Iterator[tuple[Path, SlideResult | BaseException]]:
        """score_many for slides that arrive over time (hexfast watch): `take(wait)` hands out the next
        (path, output name or None for the slide's own): take(True) waits for one (None: stop),
        take(False) returns one only if it is ready now, to be prepared while the current slide runs."""
        with self._calls.running() as cancelled:
            yield from self._score_queue(take, out, progress, cancelled)

    def _score_queue(self, take, out, progress, cancelled: threading.Event):
        pool = ThreadPoolExecutor(1, thread_name_prefix="hexfast-prepare")
        ahead: tuple[tuple[Path, str | None], Future] | None = None
        try:
            while True:
                if ahead is None:
                    job = take(True)
                    if job is None:
                        return
                    _check(cancelled, job[0])
                    ahead = (job, pool.submit(self._prepare, job[0]))
                (path, name), current = ahead
                ahead = None
                try:
                    prepared = current.result()
                except Exception as e:  # noqa: BLE001 - reported per slide
                    prepared = e
                if not cancelled.is_set():
                    following = take(False)
                    if following is not None:
                        ahead = (following, pool.submit(self._prepare, following[0]))
                if isinstance(prepared, Exception):
                    yield path, prepared
                    continue
                try:
                    result: SlideResult | Exception = self._finish(prepared, out, progress(path) if progress else None,
                                                                   cancelled, name)
                except Cancelled:
                    raise
                except Exception as e:  # noqa: BLE001 - reported per slide
                    result = e
                yield path, result
        finally:  # cancelled, failed or abandoned: close the slide prepared ahead
            if ahead is not None:
                ahead[1].add_done_callback(_discard)
            # Wait for the prepare thread (at most one open + tiling) so nothing outlives the call.
            pool.shutdown(wait=True)

    def _prepare(self, path: Path) -> _Prepared:
        """Open, tile and start streaming (the workers begin filling the ring); the same for MICA's
        patches, or open and check its --mica-bag file."""
        start = time.perf_counter()
        started_at = datetime.datetime.now(datetime.timezone.utc)
        slide = open_slide(path, self.mpp)
        prep = _Prepared(slide, None, None, {}, started_at=started_at)
        try:
            prep.grid = tile_slide(slide, stride=self.stride, min_tissue=self.min_tissue, params=self.tissue,
                                   max_tiles=self.max_tiles,
                                   allow_non_brightfield=self.allow_non_brightfield)
            if self.region is not None:
                self.region.check_on(slide.path, slide.dimensions)
                prep.grid = _restrict(prep.grid, self.region)
            tiled = time.perf_counter()
            if len(prep.grid):
                prep.stream = TileStream(slide, prep.grid.coords, batch_size=self.batch_size, threads=self.threads,
                                         stain_norm=self.stain_norm)
            prep.seconds = {"tissue+grid": tiled - start, "stream start": time.perf_counter() - tiled}
            if self.mica is not None and len(prep.grid):
                t = time.perf_counter()
                if self.mica_bag is not None:
                    prep.bag = open_bag(find_bag(self.mica_bag, slide), slide, self._mica_width())
                    if self.region is not None:  # CLAM's patches are 256 px unless the file says otherwise
                        prep.bag = prep.bag.restrict(self.region.contains_squares(prep.bag.coords,
                                                                                  prep.bag.info["patch_size"]))
                    prep.seconds["mica bag check"] = time.perf_counter() - t
                else:
                    self._prepare_clam(prep)
                    prep.seconds["clam patching"] = time.perf_counter() - t
        except BaseException:
            prep.close()
            raise
        return prep

    def _prepare_clam(self, prep: _Prepared) -> None:
        if self.clam_params is None:  # hex-embedding: MICA reads the HEX pass's features
            return
        prep.clam = clam_patches(prep.slide, self.clam_params)
        if self.region is not None:
            keep = self.region.contains_squares(prep.clam.coords, prep.clam.patch_size)
            prep.clam_outside = int((~keep).sum())
            prep.clam = replace(prep.clam, coords=prep.clam.coords[keep])
        if len(prep.clam):  # CLAM's features see the plain pixels: no stain normalisation
            size = prep.clam.patch_size
            prep.clam_stream = TileStream(prep.slide, prep.clam.coords, read_size=size, out_size=size,
                                          batch_size=self.batch_size, threads=self.threads)

    def _mica_width(self) -> int:
        return int(self.bundle.model("mica")["inputs"]["h_path"]["shape"][1])

    def _finish(self, prep: _Prepared, out, progress: Progress | None, cancelled: threading.Event,
                name: str | None = None) -> SlideResult:
        slide, grid = prep.slide, prep.grid
        writer = None
        region = self.region.describe(slide.mpp) if self.region is not None else None
        if out is not None:
            writer = SlideWriter(Path(out), slide, grid, self.bundle, self.backend, settings=self.settings,
                                 mica_bag=self._bag_spec(prep), region=region, name=name,
                                 precision=self.hex_precision.describe(), outputs=self.outputs,
                                 started_at=prep.started_at)
        try:
            tiles = run_hex(prep.stream, self.hex, writer, slide.path, len(grid), progress, cancelled)
            seconds = {**prep.seconds, **tiles.seconds}
            start = time.perf_counter()
            # One cell per stride (finer with overlapping tiles): the OME-TIFF and the overview show it.
            codex_grid = virtual_codex(tiles.coords, tiles.markers, grid.stride, slide.dimensions)
            seconds["virtual codex"] = time.perf_counter() - start
            mica = bag = attention = None
            if self.mica is not None and len(tiles.coords):
                bag = self._mica_bag(prep, tiles, writer, progress, cancelled, seconds)
                start = time.perf_counter()
                if len(bag):
                    mica, attention = self._run_mica(tiles, grid.tile_size, slide.dimensions, bag)
                    mica["bag"] = bag.info
                    if region is not None:
                        mica["partial"] = ("MICA saw only the region's tiles and patches; it was trained on whole "
                                           "slides, so this risk describes the region, not the patient")
                else:
                    why = bag.info.get("empty", "none of the bag's patches lies in the scored region")
                    mica = {"skipped": why, "bag": bag.info}
                    log.warning("%s: MICA not run: %s", slide.path, why)
                seconds["codex encoder+mica"] = time.perf_counter() - start
            result = SlideResult(
                path=slide.path, coords=tiles.coords, markers=tiles.markers, marker_names=list(self.bundle.markers),
                tile_size=grid.tile_size, stride=grid.stride, mpp=slide.mpp, backend=self.backend,
                demo=self.bundle.demo, features=tiles.features, codex_grid=codex_grid, mica=mica, seconds=seconds,
                skipped=tiles.skipped, mica_coords=bag.coords if bag is not None else None,
                mica_features=bag.features if bag is not None else None, mica_attention=attention, region=region)
            if writer is not None:
                own_grid = bag is not None and bag.info.get("features") == "hex-embedding"
                result.outputs = writer.finish(result.coords, result.markers, codex_grid, mica=mica,
                                               mica_attention=attention,
                                               bag_coords=None if own_grid or bag is None else bag.coords,
                                               seconds=result.seconds, skipped=result.skipped,
                                               hex_tiles_per_s=result.hex_tiles_per_s)
                result.seconds = writer.seconds  # report.json's: the same figures everywhere
            return result
        except BaseException:
            if writer is not None:
                writer.abort()
            raise
        finally:
            prep.close()

    def _bag_spec(self, prep: _Prepared) -> tuple[int, int, dict] | None:
        """What the h5 holds of MICA's bag: (patches, width, mica_coords attributes), or None."""
        if prep.bag is not None:
            return len(prep.bag), self._mica_width(), {"source": prep.bag.info["source"]}
        if prep.clam is not None:
            return len(prep.clam), self._mica_width(), prep.clam.attrs(prep.slide)
        return None

    def _mica_bag(self, prep: _Prepared, tiles: HexTiles, writer: SlideWriter | None, progress,
                  cancelled: threading.Event, seconds: dict) -> MicaBag:
        """The bag MICA reads, in chunks: CLAM's patches through he_features (computed now, into the
        h5), a --mica-bag file (copied into the h5), or the HEX pass's own features."""
        if prep.bag is not None:
            bag = prep.bag
            if writer is not None:  # the h5 keeps what MICA read
                start = 0
                for chunk in bag.chunks(CHUNK_TILES):
                    writer.append_mica(bag.coords[start:start + len(chunk)], chunk)
                    start += len(chunk)
            return bag
        if prep.clam is not None:
            info = {"features": "resnet50-trunc", "grid": "CLAM create_patches_fp.py", "tiles": len(prep.clam),
                    "contours": prep.clam.contours, "seg_level": prep.clam.seg_level,
                    "patching": self.clam_params.as_manifest()}
            if prep.clam_outside:
                info["outside_region"] = prep.clam_outside
            if not len(prep.clam) and prep.clam_outside:
                info["empty"] = f"none of CLAM's {prep.clam_outside} patches lies in the scored region"
            elif not len(prep.clam):
                info["empty"] = (f"CLAM's patching found no tissue contour above its minimum area (a_t = "
                                 f"{self.clam_params.a_t:g} reference patches of {self.clam_params.ref_patch_size}"
                                 f" px at level 0)")
                return MicaBag(prep.clam.coords, lambda rows: iter(()), info)
            feats = run_he_features(prep.clam_stream, self.he_features, writer, prep.slide.path, len(prep.clam),
                                    progress, cancelled)
            seconds.update(feats.seconds)
            info["skipped_patches"] = len(feats.skipped)
            if writer is not None:
                bag = MicaBag(feats.coords, writer.mica_feature_chunks, info)
            else:
                bag = MicaBag(feats.coords, _chunks_of(feats.features), info, feats.features)
            return bag
        info = {"features": "hex-embedding", "grid": "hexfast's HEX grid", "tiles": len(tiles.coords)}
        if writer is not None:  # read back from the h5 a chunk at a time: memory independent of the tile count
            return MicaBag(tiles.coords, writer.feature_chunks, info)
        return MicaBag(tiles.coords, _chunks_of(tiles.features), info, tiles.features)

    def _run_mica(self, tiles: HexTiles, tile_size: int, level0_size: tuple[int, int], bag: MicaBag
                  ) -> tuple[dict, np.ndarray]:
        """CODEX encoder over the reference's grid, then MICA streamed over the bag: its summary (the
        most-attended tiles in the bag's level-0 coords) and each bag tile's attention over the markers."""
        # The encoder sees the reference's grid: whole slide from (0, 0), one cell per tile size.
        codex = codex_encoder_input(tiles.coords, tiles.markers, tile_size, level0_size)
        codex_features = self.codex_encoder.run({"codex": np.ascontiguousarray(codex, np.float32)})["features"]
        state_width = self.bundle.model("mica")["inputs"]["coattn_mean_in"]["shape"][1]
        out = stream_mica(self.mica.run, codex_features, lambda: bag.chunks(CHUNK_TILES), state_width=state_width)
        return out.summary(bag.coords, self.bundle.markers), out.overall


def _restrict(grid: TileGrid, region: Region) -> TileGrid:
    """The grid's tiles whose centre lies in the region."""
    keep = region.contains_squares(grid.coords, grid.tile_size)
    return replace(grid, coords=np.ascontiguousarray(grid.coords[keep]), fraction=grid.fraction[keep])


def _chunks_of(features: np.ndarray):
    def chunks(rows: int):
        return (features[i:i + rows] for i in range(0, len(features), rows))
    return chunks


def open_engine(bundle: Bundle, name: str, backend: str = "auto", precision: str = "fp32",
                threads: int | None = None, device: int = 0, cuda_graphs: bool = False) -> Engine:
    """The engine Scorer runs for the bundle's model `name`. Every file a loader reads is the
    manifest's, checked against its sha256 as it is read (the fp32 ONNX, the torch program it
    lists for `precision`), or a TensorRT plan build-engines made on this machine for this bundle,
    checked against the sha256 recorded then. TensorRT and ONNX Runtime build fp16/bf16 from the
    fp32 graph; torch runs the program exported at that precision. The engine's outputs must be
    the ones the manifest promises (else a one-line BundleError). CUDA graphs are used for the
    per-tile models only: they pad a short batch, which a slide-level model's rows would feel."""
    program = bundle.program_file(name, precision)
    if backend == "torch" and program is None and bundle.program_file(name) is not None:
        raise BackendUnavailable("torch", f"needs a {precision} torch.export program of the {name} model, and the "
                                          f"bundle has none (export it with --{precision}), or use --precision fp32")
    model = _int8_file(bundle, name) if precision == "int8" else bundle.model_file(name)
    engine = create_engine(model, backend, precision=precision, plan_dir=_plan_dir(bundle, backend),
                           threads=threads, device_id=device, program=program,
                           output_names=list(bundle.model(name).get("outputs", {})) or None,
                           cuda_graphs=cuda_graphs and name in PER_TILE_MODELS)
    try:
        _check_outputs(bundle, name, engine)
    except BaseException:
        engine.close()
        raise
    return engine


def _int8_file(bundle: Bundle, name: str):
    """The model's int8 CPU variant, quantized at export (score.precision)."""
    variant = bundle.model(name).get("cpu_variants", {}).get("int8")
    if variant is None:
        raise MissingModelError(bundle.path / MANIFEST, f"the bundle has no int8 CPU variant of {name}; export it "
                                                        f"again (hexfast export writes it)")
    return bundle.listed(variant["file"])


def _check_outputs(bundle: Bundle, name: str, engine: Engine) -> None:
    """The graph's outputs against the manifest's (names; every fixed dimension both give)."""
    promised = bundle.model(name).get("outputs", {})
    found = {spec.name: spec for spec in engine.outputs}
    where = bundle.path / "manifest.json"
    if promised and found and set(promised) != set(found):
        raise BundleError(where, f"the {name} model's outputs are {sorted(found)}, the manifest lists {sorted(promised)}")
    for output, spec in found.items():
        want = promised.get(output, {}).get("shape")
        if not want or not spec.shape:
            continue
        fixed = [(i, a, b) for i, (a, b) in enumerate(zip(spec.shape, want))
                 if isinstance(a, int) and isinstance(b, int) and a != b]
        if len(spec.shape) != len(want) or fixed:
            raise BundleError(where, f"the {name} model's output {output!r} has shape {list(spec.shape)} but the "
                                     f"manifest says {list(want)} (edited manifest, or files from another bundle)")


def _plan_dir(bundle: Bundle, backend: str) -> Path | None:
    """The TensorRT plans build-engines made for this bundle on this GPU + TensorRT version (outside
    the bundle, see Bundle.engine_cache_dir), or None: no TensorRT/GPU here, or a CPU backend."""
    if backend in ("ort-cpu", "ort-cuda") or importlib.util.find_spec("tensorrt") is None:
        return None
    gpu = gpu_name()
    if gpu is None:
        return None
    import tensorrt

    return bundle.engine_cache_dir(engine_key(gpu, tensorrt.__version__))


def score_settings(*, stride: int | None = None, mpp: float | None = None, min_tissue: float = DEFAULT_MIN_TISSUE,
                   stain_norm: str = "none", precision: str = "fp32", mica_bag: str | os.PathLike | None = None,
                   region: Region | None = None, tissue: TissueParams | None = None, mica: bool = True,
                   outputs: Sequence[str] = OUTPUTS) -> dict:
    """The options that change a slide's outputs, as --resume compares them (None: the slide's own,
    stride = the tile size, MPP from the file; report.json records the values used, resolved_settings).
    The tissue detection's parameters are recorded with hexfast's version, which stands for its code."""
    return {"stride": stride, "mpp": mpp, "min_tissue": min_tissue, "stain_norm": stain_norm,
            "precision": precision, "mica_bag": os.fspath(Path(mica_bag).resolve()) if mica_bag else None,
            "region": region.describe() if region is not None else None, "mica": bool(mica),
            "outputs": sorted(checked_outputs(outputs)),
            "tissue": asdict(tissue or TissueParams()) | {"hexfast": __version__}}


class _Calls:
    """The score() / score_many() calls in progress, each with its own cancel flag: cancel() sets
    every one, or, when there is none, the flag of the next call to start."""

    def __init__(self):
        self._lock = threading.Lock()
        self._flags: set[threading.Event] = set()
        self._pending = False

    @contextlib.contextmanager
    def running(self):
        flag = threading.Event()
        with self._lock:
            if self._pending:
                self._pending = False
                flag.set()
            self._flags.add(flag)
        try:
            yield flag
        finally:
            with self._lock:
                self._flags.discard(flag)

    def cancel(self) -> None:
        with self._lock:
            for flag in self._flags:
                flag.set()
            self._pending = not self._flags


def _check(cancelled: threading.Event, path: Path) -> None:
    if cancelled.is_set():
        raise Cancelled(f"{path}: cancelled before it started")


def _discard(future: Future) -> None:
    """Closes a slide prepared ahead that will not be scored."""
    try:
        prepared = future.result()
    except Exception:  # noqa: BLE001 - it was never going to be used
        return
    prepared.close()
