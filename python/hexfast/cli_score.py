"""`hexfast score` and `hexfast demo`: the product as users meet it."""

from __future__ import annotations

import argparse
import glob
import sys
import tempfile
import time
from pathlib import Path

SLIDE_SUFFIXES = {".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif", ".dcm"}
DEMO_BANNER = ("DEMO MODEL: untrained random weights. The markers and risk it writes are NOT predictions; "
               "pass --model BUNDLE with real HEX weights (hexfast export).")


def add_score_commands(sub, common: argparse.ArgumentParser, mpp: argparse.ArgumentParser) -> None:
    from .cli import _positive_int
    from .engines import BACKENDS
    from .stain import METHODS

    run = argparse.ArgumentParser(add_help=False)
    run.add_argument("--model", type=Path, help="model bundle directory (default: the bundled, untrained demo model)")
    run.add_argument("--backend", choices=BACKENDS, default="auto", help="inference backend (default: fastest available)")
    run.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default="fp32")
    run.add_argument("--batch-size", type=_positive_int, default=64)
    run.add_argument("--threads", type=_positive_int, default=2, help="tile-reading threads")
    run.add_argument("--stain-norm", choices=METHODS, default="none",
                     help="stain normalisation in the readers (default none: HEX was trained without it)")
    run.add_argument("--stride", type=_positive_int, help="level-0 px between tiles (default: tile size)")

    score = sub.add_parser("score", parents=[common, mpp, run],
                           help="score slides: virtual CODEX (40 markers), features, MICA risk")
    # "*", checked in cmd_score: `score --ray SLIDE` must not fail in argparse (--ray's optional ADDRESS takes SLIDE)
    score.add_argument("slides", nargs="*", metavar="SLIDE|DIR|GLOB")
    score.add_argument("-o", "--out", type=Path, default=Path("hexfast-out"), help="output directory (default hexfast-out)")
    score.add_argument("--resume", action="store_true", help="skip slides whose outputs are complete")
    score.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                       help="score on a Ray cluster, one worker per GPU (or --ray-workers CPU workers): "
                            "--ray alone joins the cluster `ray start` runs here or starts one; "
                            "--ray auto / HOST:6379 / ray://HOST:10001 connects (pip install 'hexfast[cluster]')")
    score.add_argument("--ray-workers", type=_positive_int, metavar="N",
                       help="with --ray: number of workers (default: one per GPU; CPU backend: cluster CPUs // 2)")
    score.set_defaults(run=cmd_score)

    demo = sub.add_parser("demo", parents=[common, run],
                          help="write a small synthetic H&E slide and score it with the bundled demo model")
    demo.add_argument("-o", "--out", type=Path, default=Path("hexfast-demo"), help="output directory (default hexfast-demo)")
    demo.set_defaults(run=cmd_demo, mpp=None)


def expand_slides(args: list[str]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Slides named by paths, directories (their slide files) and glob patterns;
    plus (argument, problem) for arguments that name nothing, and for slides whose
    name (stem) an earlier slide has: both would write OUT/<stem>/."""
    found: list[Path] = []
    problems: list[tuple[str, str]] = []
    for arg in args:
        path = Path(arg)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix.lower() in SLIDE_SUFFIXES and p.is_file())
            if not files:
                problems.append((arg, "directory holds no slide files (" + ", ".join(sorted(SLIDE_SUFFIXES)) + ")"))
            found.extend(files)
        elif not path.exists() and any(c in arg for c in "*?["):
            matches = sorted(Path(p) for p in glob.glob(arg))
            if not matches:
                problems.append((arg, "no file matches this pattern"))
            found.extend(matches)
        else:
            found.append(path)  # missing files fail per slide, with the usual message
    by_stem: dict[str, Path] = {}
    for path in dict.fromkeys(found):
        if path.stem in by_stem:
            problems.append((str(path), f"has the same name as {by_stem[path.stem]}, whose outputs go to "
                                        f"OUT/{path.stem}/ too; score it with another -o"))
        else:
            by_stem[path.stem] = path
    return list(by_stem.values()), problems


def _scorer(args):
    from .pipeline import Scorer

    return Scorer(args.model, args.backend, precision=args.precision, batch_size=args.batch_size,
                  threads=args.threads, stain_norm=args.stain_norm, stride=args.stride, mpp=args.mpp)


def _warn_demo() -> None:
    bar = "!" * 100
    print(f"{bar}\nhexfast: WARNING: {DEMO_BANNER}\n{bar}", file=sys.stderr)


def cmd_score(args) -> int:
    from .cli import EXIT_ERROR
    from .outputs import prepare_output_dir
    from .results import outputs_complete

    ray_address = getattr(args, "ray", None)
    if ray_address is not None and _looks_like_slide(ray_address):  # `--ray SLIDE ...`: a slide, not an address
        args.slides.insert(0, ray_address)
        ray_address = args.ray = "local"
    if not args.slides:  # as argparse words it for nargs="+"
        print("hexfast score: error: the following arguments are required: SLIDE|DIR|GLOB "
              "(see hexfast score --help)", file=sys.stderr)
        return EXIT_ERROR
    if ray_address is not None:
        from .cluster import import_ray

        import_ray()  # not installed: one line, before anything else happens
    out = prepare_output_dir(args.out)
    slides, problems = expand_slides(args.slides)
    rows: list[tuple[str, str, str, str, str, str]] = []
    missing = [p for p in slides if not p.exists()]  # fail these before loading a model for them
    if missing and args.debug:
        from .errors import SlideError

        raise SlideError(missing[0], "no such file")
    problems += [(str(p), "no such file") for p in missing]
    slides = [p for p in slides if p not in missing]
    for arg, problem in problems:
        print(f"hexfast: error: {arg}: {problem}", file=sys.stderr)
        rows.append((arg, "FAILED", "-", "-", "-", problem))
    todo = []
    bundle_hash = None
    if args.resume:  # a slide scored with other weights is not "done"
        from .bundle import load_bundle

        bundle_hash = load_bundle(args.model).hash
    for path in slides:
        if args.resume and outputs_complete(out, path.stem, bundle_hash=bundle_hash):
            rows.append((path.name, "done before", "-", "-", "-", str(out / path.stem)))
        else:
            todo.append(path)
    if args.resume and len(todo) < len(slides):
        print(f"hexfast: --resume: {len(slides) - len(todo)} of {len(slides)} slides already complete", file=sys.stderr)

    failed = len(problems)
    if todo and ray_address is not None:
        from .cluster import score_on_ray

        failed += score_on_ray(todo, out, rows, args)
    elif todo:
        with _scorer(args) as scorer:
            if scorer.bundle.demo:
                _warn_demo()
            print(f"hexfast: {scorer.hex.describe()}", file=sys.stderr)
            failed += _score_all(scorer, todo, out, rows, args)
    _summary(rows)
    return EXIT_ERROR if failed else 0


def _looks_like_slide(arg: str) -> bool:
    return Path(arg).exists() or Path(arg).suffix.lower() in SLIDE_SUFFIXES or any(c in arg for c in "*?[")


def _score_all(scorer, slides: list[Path], out: Path, rows: list, args) -> int:
    from tqdm import tqdm

    from .cli import _error, _warn

    failed = 0
    overall = tqdm(total=len(slides), desc="slides", unit="slide", position=0, file=sys.stderr,
                   dynamic_ncols=True, disable=None)
    bars: dict[Path, tqdm] = {}

    def progress_for(path: Path):
        def progress(stage: str, done: int, total: int) -> None:
            bar = bars.get(path)
            if bar is None:
                bar = bars[path] = tqdm(total=total, desc=path.name[:30], unit="tile", position=1, leave=False,
                                        file=sys.stderr, dynamic_ncols=True, disable=None)
            bar.update(done - bar.n)
        return progress

    try:
        for path, result in scorer.score_many(slides, out, progress=progress_for):
            bar = bars.pop(path, None)
            if bar is not None:
                bar.close()
            overall.update(1)
            if isinstance(result, BaseException):
                failed += 1
                if args.debug:
                    raise result
                overall.clear()
                _error(result)
                rows.append((path.name, "FAILED", "-", "-", "-", str(result).removeprefix(f"{path}: ")))
                continue
            total = result.wall_seconds
            where = result.outputs["report"].parent if "report" in result.outputs else out / path.stem
            status = "ok"
            if len(result.coords) == 0:  # not an error: complete, empty outputs, and a warning nobody misses
                status = "NO TISSUE"
                overall.clear()
                _warn(f"{path}: NO TISSUE FOUND: no tiles were scored; wrote empty outputs (empty h5, blank "
                      f"virtual CODEX, no MICA risk) to {where}; check overview.png")
            rows.append((path.name, status, str(len(result.coords)), f"{result.tiles_per_s:.0f}", f"{total:.1f}",
                         str(where)))
            tqdm.write(f"{path.name}: {len(result.coords)} tiles, {result.tiles_per_s:.0f} tiles/s, "
                       f"{total:.1f} s -> {where}", file=sys.stderr)
    finally:
        for bar in bars.values():
            bar.close()
        overall.close()
    return failed


def _summary(rows: list) -> None:
    if not rows:
        return
    header = ("slide", "status", "tiles", "tiles/s", "seconds", "output / problem")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(5)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)) + "  " + header[5])
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[5])
    bad = sum(r[1] == "FAILED" for r in rows)
    print(f"{len(rows) - bad} of {len(rows)} slides ok" + (f", {bad} FAILED" if bad else ""))


def cmd_demo(args) -> int:
    from .demo_slide import write_demo_slide
    from .outputs import prepare_output_dir

    out = prepare_output_dir(args.out)
    slide = out / "demo-slide.tif"
    if not slide.exists():
        start = time.perf_counter()
        write_demo_slide(slide)
        print(f"hexfast: wrote a synthetic H&E slide {slide} ({time.perf_counter() - start:.1f} s)", file=sys.stderr)
    args.slides = [str(slide)]
    args.resume = False
    args.mpp = None
    return cmd_score(args)
