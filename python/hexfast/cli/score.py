"""`hexfast score` and `hexfast demo`: the product as users meet it.

One loop renders every run, local or on Ray: both scorers yield (path, result or exception) as
slides finish, and each becomes a line, a warning or an error, and a row of the summary table."""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import sys
import time
from pathlib import Path

from tqdm import tqdm

from ..bundle import load_bundle
from ..engines import BACKENDS
from ..errors import OutputError, SlideError
from ..files import prepare_output_dir
from ..outputs import output_paths, outputs_complete
from ..outputs.writer import OUTPUTS, checked_outputs
from ..score.pipeline import Scorer, score_settings
from ..slide import DEFAULT_MAX_TILES, dicom_files, slide_name, slide_source
from ..slide.slide import DICOM_SUFFIX, SLIDE_SUFFIXES
from ..slide.synthetic import write_demo_slide
from ..stream import STAIN_METHODS
from . import console
from .console import Row, Summary
from .slides import grid_options, tissue_params
from .types import non_negative_int, positive_float, positive_int

PROGRESS_EVERY_S = 30.0
DEMO_DIR_HELP = "$HEXFAST_DEMO_DIR, else ~/.cache/hexfast/demo"


def engine_options(model: bool = True) -> argparse.ArgumentParser:
    """The options that choose the model, the engine, the tissue and what is run (score, demo, watch)."""
    run = argparse.ArgumentParser(add_help=False, parents=[grid_options()])
    if model:
        run.add_argument("--model", type=Path, metavar="BUNDLE",
                         help="model bundle directory (default: the bundled, untrained demo model)")
    run.add_argument("--backend", choices=BACKENDS, default="auto", help="inference backend (default: fastest available)")
    run.add_argument("--precision", choices=("auto", "fp32", "fp16", "bf16", "int8"), default="fp32",
                     help="HEX's precision (default fp32; the slide-level models always run fp32). On a GPU: fp16 or "
                          "bf16. On a CPU: int8 (VNNI/AMX-INT8) or bf16 (AVX512-BF16/AMX), the bundle's CPU variants "
                          "with the fidelity its export measured; auto picks the fastest this CPU runs fast whose "
                          "variant is fit")
    run.add_argument("--device", type=non_negative_int, default=0, metavar="N", help="CUDA device (default 0)")
    run.add_argument("--cuda-graphs", action="store_true",
                     help="torch backend on a GPU: replay CUDA graphs captured per batch shape")
    run.add_argument("--batch-size", type=positive_int, default=64, metavar="N",
                     help="tiles per HEX engine call (default 64; smaller uses less GPU memory)")
    run.add_argument("--threads", type=positive_int, default=2, metavar="N",
                     help="tile-reading threads (default 2)")
    run.add_argument("--stain-norm", choices=STAIN_METHODS, default="none",
                     help="stain normalisation in the readers (default none: HEX was trained without it)")
    run.add_argument("--no-mica", action="store_true",
                     help="run HEX only: no MICA risk, no MICA bag (faster when only the markers are wanted)")
    run.add_argument("--outputs", type=outputs_list, default=OUTPUTS, metavar="LIST",
                     help=f"files to write per slide, comma-separated from {','.join(OUTPUTS)} (default all; the "
                          f"h5 and report.json are always written)")
    run.add_argument("--allow-non-brightfield", action="store_true",
                     help="score a slide whose dark background says it is not brightfield H&E (fluorescence): "
                          "HEX was trained on H&E, so its output there means nothing")
    run.add_argument("--max-tiles", type=positive_int, default=DEFAULT_MAX_TILES, metavar="N",
                     help=f"refuse a slide of more tiles (default {DEFAULT_MAX_TILES:,}: a typo such as --stride 1 "
                          f"would mean days of compute)")
    return run


def shown_options() -> argparse.ArgumentParser:
    """What a run prints (score, demo)."""
    shown = argparse.ArgumentParser(add_help=False)
    shown.add_argument("--quiet", "-q", action="store_true",
                       help="print only warnings and errors (no progress, no per-slide lines, no summary table)")
    shown.add_argument("--json", action="store_true",
                       help="one JSON line per slide on stdout (slide, status, tiles, seconds, tiles_per_s, output, "
                            "MICA risk, error); the summary table goes to stderr")
    shown.add_argument("--progress-every", type=positive_float, default=PROGRESS_EVERY_S, metavar="S",
                       help=f"when stderr is not a terminal (a log file, systemd): a progress line every S seconds "
                            f"(default {PROGRESS_EVERY_S:g}); on a terminal, progress bars")
    return shown


def outputs_list(text: str) -> tuple[str, ...]:
    try:
        return checked_outputs(text)
    except OutputError as e:
        raise argparse.ArgumentTypeError(f"--outputs: {e}") from None


def scorer_options(args) -> dict:
    """Scorer's keyword arguments from the engine_options() parsed into `args` (the model and backend apart)."""
    return dict(precision=args.precision, batch_size=args.batch_size, threads=args.threads,
                stain_norm=args.stain_norm, stride=args.stride, max_tiles=args.max_tiles,
                allow_non_brightfield=args.allow_non_brightfield, min_tissue=args.min_tissue,
                tissue=tissue_params(args.saturation_threshold), mica=not args.no_mica, outputs=args.outputs)


def add_score_commands(sub, common: argparse.ArgumentParser, mpp: argparse.ArgumentParser) -> None:
    run = engine_options()
    run.add_argument("--mica-bag", type=Path, metavar="DIR",
                     help="feed MICA a lab's own CLAM bags: DIR/<slide>.h5 or DIR/h5_files/<slide>.h5 "
                          "(extract_features_fp.py's features + coords) instead of computing them")
    where = run.add_mutually_exclusive_group()
    where.add_argument("--roi", type=Path, metavar="FILE.geojson",
                       help="score only inside these annotations (QuPath's GeoJSON export: Polygon/MultiPolygon in "
                            "level-0 px, holes respected; one slide)")
    where.add_argument("--region", metavar="X,Y,W,H", help="score only this level-0 rectangle (one slide)")

    shown = shown_options()
    score = sub.add_parser("score", parents=[common, mpp, run, shown],
                           help="score slides: virtual CODEX (40 markers), features, MICA risk")
    # "*", checked in cmd_score: `score --ray SLIDE` must not fail in argparse (--ray's optional ADDRESS takes SLIDE)
    score.add_argument("slides", nargs="*", metavar="SLIDE|DIR|GLOB",
                       help="slide files (any format OpenSlide reads, or a DICOM series folder), folders of them, "
                            "or glob patterns")
    score.add_argument("-o", "--out", type=Path, default=Path("hexfast-out"), help="output directory (default hexfast-out)")
    score.add_argument("--resume", action="store_true",
                       help="skip slides whose outputs in OUT are complete and were made with this bundle and these "
                            "settings (without it, such outputs are replaced, and the run says so)")
    score.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                       help="score on a Ray cluster, one worker per GPU (or --ray-workers CPU workers): "
                            "--ray alone joins the cluster `ray start` runs here or starts one; "
                            "--ray auto / HOST:6379 / ray://HOST:10001 connects (pip install 'hexfast[cluster]')")
    score.add_argument("--ray-workers", type=positive_int, metavar="N",
                       help="with --ray: number of workers (default: one per GPU; CPU backend: cluster CPUs // 2)")
    score.set_defaults(run=cmd_score)

    demo = sub.add_parser("demo", parents=[common, engine_options(model=False), shown],
                          help="write a small synthetic H&E slide and score it with the bundled demo model",
                          description="Write a small synthetic H&E slide and score it with the bundled, untrained "
                                      "demo model: a check that the install works, end to end.")
    demo.add_argument("-o", "--out", type=Path, default=None,
                      help=f"output directory (default {DEMO_DIR_HELP})")
    demo.set_defaults(run=cmd_demo, mpp=None, resume=False, ray=None, ray_workers=None, model=None, mica_bag=None,
                      roi=None, region=None)


def expand_slides(args: list[str]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Slides named by paths, directories and glob patterns; plus (argument, problem) for arguments
    that name nothing, and for slides whose name an earlier slide has: both would write OUT/<name>/.

    A directory holding .dcm files is one DICOM WSI series, so one slide (named after the
    directory); any other directory stands for its slide files and its series subdirectories. A
    .dcm file, named or matched, stands for its series."""
    found: list[Path] = []
    problems: list[tuple[str, str]] = []
    for arg in args:
        path = Path(arg)
        if path.is_dir() and not dicom_files(path):
            inside = sorted(path.iterdir())
            slides = [p for p in inside if (p.is_file() and p.suffix.lower() in SLIDE_SUFFIXES
                                            and p.suffix.lower() != DICOM_SUFFIX) or (p.is_dir() and dicom_files(p))]
            if not slides:
                problems.append((arg, "directory holds no slide files (" + ", ".join(sorted(SLIDE_SUFFIXES))
                                 + ") nor DICOM series folders"))
            found.extend(slides)
        elif not path.exists() and any(c in arg for c in "*?["):
            matches = sorted(Path(p) for p in glob.glob(arg))
            if not matches:
                problems.append((arg, "no file matches this pattern"))
            found.extend(slide_source(p) for p in matches)
        else:
            found.append(slide_source(path))  # missing files fail per slide, with the usual message
    by_name: dict[str, Path] = {}
    for path in dict.fromkeys(found):
        name = slide_name(path)
        if name in by_name:
            problems.append((str(path), f"has the same name as {by_name[name]}, whose outputs go to "
                                        f"OUT/{name}/ too; score it with another -o"))
        else:
            by_name[name] = path
    return list(by_name.values()), problems


def cmd_score(args) -> int:
    if args.ray is not None and _looks_like_slide(args.ray):  # `--ray SLIDE ...`: a slide, not an address
        args.slides.insert(0, args.ray)
        args.ray = "local"
    if not args.slides:  # as argparse words it for nargs="+"
        print("hexfast score: error: the following arguments are required: SLIDE|DIR|GLOB "
              "(see hexfast score --help)", file=sys.stderr)
        return console.EXIT_ERROR
    if args.ray is not None:
        from ..score.cluster import import_ray

        import_ray()  # not installed: one line, before anything else happens
    created = not Path(args.out).exists()
    out = prepare_output_dir(args.out)
    try:
        return _score_into(args, out)
    finally:
        if created:  # a run refused before any slide was written leaves no empty OUT behind
            with contextlib.suppress(OSError):
                out.rmdir()


def _score_into(args, out: Path) -> int:
    slides, problems = expand_slides(args.slides)
    missing = [p for p in slides if not p.exists()]  # fail these before loading a model for them
    if missing and args.debug:
        raise SlideError(missing[0], "no such file")
    problems += [(str(p), "no such file") for p in missing]
    summary = Summary()
    for arg, problem in problems:
        console.error(f"{arg}: {problem}")
        summary.failed(arg, problem)
        if args.json:
            _json_line(slide=arg, status="failed", error=problem)

    todo = [p for p in slides if p not in missing]
    args.region_obj = _region(args, todo)
    if args.resume:  # a slide scored with other weights or other settings is not "done"
        from ..score.precision import choose

        bundle = load_bundle(args.model)
        bundle_hash = bundle.hash
        precision = choose(bundle, args.backend, args.precision).precision  # what auto resolves to here
        settings = score_settings(stride=args.stride, mpp=args.mpp, min_tissue=args.min_tissue,
                                  stain_norm=args.stain_norm, precision=precision, mica_bag=args.mica_bag,
                                  region=args.region_obj, tissue=tissue_params(args.saturation_threshold),
                                  mica=not (args.no_mica and bundle.has("mica")), outputs=args.outputs)
        done = [p for p in todo if outputs_complete(out, slide_name(p), bundle_hash=bundle_hash, settings=settings)]
        for path in done:
            summary.add(Row(path.name, "done before", detail=str(out / slide_name(path))))
            if args.json:
                _json_line(slide=str(path), status="done before", out=str(out / slide_name(path)))
        if done:
            console.note(f"--resume: {len(done)} of {len(todo)} slides already complete")
        todo = [p for p in todo if p not in done]

    for path in todo:  # outputs a rerun replaces: said, never silently (--resume skips complete ones)
        before = _scored_at(out, slide_name(path))
        if before:
            console.note(f"replacing {out / slide_name(path)} (scored {before}); --resume skips complete outputs")
    if todo:
        with _open_scorer(args, len(todo)) as scorer:
            if scorer.bundle.demo:
                console.warn_demo()
            console.note(scorer.describe())
            _score_all(scorer, todo, out, summary, args, tile_bars=args.ray is None)
    if not args.quiet:
        summary.print(file=sys.stderr if args.json else sys.stdout)
    return console.EXIT_ERROR if summary.failures else 0


def _scored_at(out: Path, stem: str) -> str | None:
    """When OUT/<stem>/ was scored (its report's finished_at, to the minute), or None when it holds no report."""
    report = output_paths(out, stem).report
    if not report.is_file():
        return None
    try:
        finished = json.loads(report.read_text(encoding="utf-8"))["finished_at"]
        return finished[:16].replace("T", " ") + " UTC"
    except Exception:  # noqa: BLE001 - a damaged report: still a set being replaced
        return "at an unknown time"


def _open_scorer(args, slides: int):
    """A Scorer here, or a RayScorer over the cluster --ray names: the same score_many."""
    options = scorer_options(args) | dict(mpp=args.mpp, mica_bag=args.mica_bag, region=args.region_obj)
    if args.ray is None:
        return Scorer(args.model, args.backend, device=args.device, cuda_graphs=args.cuda_graphs, **options)
    from ..score.cluster import RayScorer

    return RayScorer(args.ray, args.model, args.backend, workers=args.ray_workers, slides=slides,
                     log_to_driver=bool(args.debug), **options)


def _region(args, slides: list[Path]):
    """--roi / --region, read before any model is loaded; a region belongs to one slide."""
    from ..slide.region import RegionError, parse_rectangle, read_roi

    if args.roi is None and args.region is None:
        return None
    if len(slides) != 1:
        raise RegionError(f"{'--roi' if args.roi else '--region'} describes one slide's pixels; {len(slides)} "
                          "slides were given (score them one at a time)")
    return read_roi(args.roi) if args.roi is not None else parse_rectangle(args.region)


def _looks_like_slide(arg: str) -> bool:
    return Path(arg).exists() or Path(arg).suffix.lower() in SLIDE_SUFFIXES or any(c in arg for c in "*?[")


def _score_all(scorer, slides: list[Path], out: Path, summary: Summary, args, tile_bars: bool) -> None:
    """The one result loop: a line per slide as it finishes (or a JSON line with --json), a row each in
    `summary`. The figures are the slide's own (SlideResult.wall_seconds, tiles_per_s), as in report.json."""
    bars = _progress(len(slides), args)
    start = time.perf_counter()
    scored = tiles = 0
    results = scorer.score_many(slides, out, progress=bars.for_slide) if tile_bars else scorer.score_many(slides, out)
    try:
        for path, result in results:
            bars.slide_done(path)
            if isinstance(result, BaseException):
                if args.debug:
                    if getattr(result, "remote_traceback", None):  # raised on a Ray worker
                        print(result.remote_traceback, file=sys.stderr)
                    raise result
                console.error(result)
                problem = str(result).removeprefix(f"{path}: ")
                summary.failed(path.name, problem)
                if args.json:
                    _json_line(slide=str(path), status="failed", error=problem)
                continue
            n = len(result.coords)
            scored, tiles = scored + 1, tiles + n
            where = result.out_dir or out / slide_name(path)
            if n == 0:  # not an error: complete, empty outputs, and a warning nobody misses
                console.warn_no_tissue(path, where)
            summary.add(Row(path.name, "ok" if n else "NO TISSUE", str(n), f"{result.tiles_per_s:.1f}",
                            f"{result.wall_seconds:.1f}", str(where)))
            on = f" on {result.worker}" if result.worker else ""
            console.line(f"{path.name}: {n} tiles in {result.wall_seconds:.1f} s ({result.tiles_per_s:.1f} tiles/s; "
                         f"HEX alone {result.hex_tiles_per_s:.1f} tiles/s){on} -> {where}")
            if args.json:
                mica = result.mica or {}
                _json_line(slide=str(path), status="ok" if n else "no tissue", tiles=n,
                           seconds=round(result.wall_seconds, 2), tiles_per_s=round(result.tiles_per_s, 2),
                           hex_tiles_per_s=round(result.hex_tiles_per_s, 2), out=str(where),
                           mica_risk=mica.get("risk"), demo=result.demo, worker=result.worker)
            bars.rate(tiles / (time.perf_counter() - start))
    finally:
        bars.close()
    if len(slides) > 1:
        wall = time.perf_counter() - start
        console.note(f"{scored} of {len(slides)} slides in {wall:.1f} s ({60 * scored / wall:.2f} slides/min, "
                     f"{tiles / wall:.1f} tiles/s over the run), {len(slides) - scored} failed")


def _json_line(**fields) -> None:
    print(json.dumps(fields), flush=True)


def _progress(slides: int, args):
    """Bars on a terminal, a line every --progress-every seconds otherwise (a log file, systemd), nothing
    with --quiet."""
    if args.quiet:
        return _Silent()
    if sys.stderr.isatty():
        return _Bars(slides)
    return _Lines(slides, args.progress_every)


class _Silent:
    def for_slide(self, path: Path):
        return None

    def slide_done(self, path: Path) -> None:
        pass

    def rate(self, tiles_per_s: float) -> None:
        pass

    def close(self) -> None:
        pass


STAGES = {"tiles": "HEX", "mica tiles": "MICA bag (CLAM patches)"}  # what the pipeline's progress stages are, in words


class _Lines(_Silent):
    """Progress where no bar can be drawn: one line every `every` seconds, e.g.
    `hexfast: progress: slide.svs: HEX 1200/5000 tiles (24%), 18.3 tiles/s, ETA 3 min 27 s; slide 1 of 4`."""

    def __init__(self, slides: int, every: float):
        self.slides, self.every = slides, every
        self.done = 0
        self.last = time.monotonic()
        self.stage_start: dict[tuple[Path, str], float] = {}

    def for_slide(self, path: Path):
        def progress(stage: str, done: int, total: int) -> None:
            now = time.monotonic()
            began = self.stage_start.setdefault((path, stage), now)
            if now - self.last < self.every:
                return
            self.last = now
            rate = done / (now - began) if now > began else 0.0
            eta = f", ETA {_duration((total - done) / rate)}" if rate > 0 and done < total else ""
            which = f"; slide {self.done + 1} of {self.slides}" if self.slides > 1 else ""
            speed = f", {rate:.1f}/s" if rate > 0 else ""
            console.note(f"progress: {path.name}: {STAGES.get(stage, stage)} {done}/{total} "
                         f"({100 * done / max(total, 1):.0f}%){speed}{eta}{which}")
        return progress

    def slide_done(self, path: Path) -> None:
        self.done += 1
        self.stage_start = {k: v for k, v in self.stage_start.items() if k[0] != path}


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


class _Bars:
    """tqdm bars on stderr: slides done (with the run's tiles/s), and the current slide's stage."""

    def __init__(self, slides: int):
        self.overall = tqdm(total=slides, desc="slides", unit="slide", position=0, file=sys.stderr,
                            dynamic_ncols=True)
        self.slides: dict[Path, tqdm] = {}

    def for_slide(self, path: Path):
        def progress(stage: str, done: int, total: int) -> None:
            bar = self.slides.get(path)
            if bar is not None and bar.stage != stage:  # HEX's tiles done; MICA's patches next
                bar.close()
                bar = None
            if bar is None:
                name = console.printable(path.name[:30])
                bar = self.slides[path] = tqdm(total=total, desc=f"{name} {STAGES.get(stage, stage)}",
                                               unit="tile", position=1, leave=False, file=sys.stderr,
                                               dynamic_ncols=True)
                bar.stage = stage
            bar.update(done - bar.n)
        return progress

    def slide_done(self, path: Path) -> None:
        bar = self.slides.pop(path, None)
        if bar is not None:
            bar.close()
        self.overall.update(1)

    def rate(self, tiles_per_s: float) -> None:
        self.overall.set_postfix_str(f"{tiles_per_s:.1f} tiles/s over the run")

    def close(self) -> None:
        for bar in self.slides.values():
            bar.close()
        self.overall.close()


def demo_dir() -> Path:
    """Where `hexfast demo` writes by default: a user folder, never the current directory."""
    return Path(os.environ.get("HEXFAST_DEMO_DIR") or Path.home() / ".cache" / "hexfast" / "demo")


def cmd_demo(args) -> int:
    if args.out is None:
        args.out = demo_dir()
    out = prepare_output_dir(args.out)
    slide = out / "demo-slide.tif"
    if not slide.exists():
        start = time.perf_counter()
        write_demo_slide(slide)
        console.note(f"wrote a synthetic H&E slide {slide} ({time.perf_counter() - start:.1f} s)")
    args.slides = [str(slide)]
    code = cmd_score(args)
    if code == 0 and not args.quiet:
        console.note(f"demo outputs in {out / slide.stem}/ (look at overview.png, or: hexfast view {out / slide.stem})")
    return code
