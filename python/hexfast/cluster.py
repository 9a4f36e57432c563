"""`hexfast score --ray`: a cohort scored on a Ray cluster.

One actor per device: a GPU actor (num_gpus=1) per GPU for the GPU backends
(and for auto/torch when the cluster has GPUs), else CPU actors (num_cpus=1;
--ray-workers, default cluster CPUs // 2). Each actor loads the bundle's
engines once (a Scorer) and scores many slides. The driver hands out one slide
per actor call and gives the next slide to whichever actor frees up first
(ray.wait over the calls in flight).

Outputs go to the shared OUT exactly as a local run writes them (SlideWriter:
temp names renamed into place, report.json last; a new attempt removes the
stale temp files of a killed one). --resume skips complete slides before
anything is dispatched.

Faults: a slide that fails (bad file, read error) is reported and the others
go on. An actor that dies mid-slide (process killed, node lost) is replaced
and its slide goes to another actor, at most RETRIES more times.

Ray is imported only here, and only when --ray is given.
"""

from __future__ import annotations

import collections
import contextlib
import os
import sys
import time
import traceback
from pathlib import Path

from .errors import HexfastError

RETRIES = 2  # more attempts for a slide whose actor died under it
GPU_BACKENDS = ("trt", "ort-trt", "ort-cuda")
# Test-only: the actor's first attempt at a slide exits the process (os._exit) after this many batches.
DIE_AFTER_ENV = "HEXFAST_RAY_TEST_DIE_AFTER_BATCHES"
LOCAL = "local"  # `--ray` without an address: join the cluster `ray start` left here, else start one


def import_ray():
    try:
        import ray
    except ImportError as e:
        raise HexfastError(f"--ray needs Ray, which is not installed ({e}): pip install 'hexfast[cluster]'") from None
    return ray


class SlideWorker:
    """The actor: one Scorer (engines loaded once), many slides."""

    def __init__(self, scorer_kwargs: dict, die_after_batches: int = 0):
        import socket

        from .pipeline import Scorer

        self.scorer = Scorer(**scorer_kwargs)
        self.die_after = die_after_batches
        self.where = f"{socket.gethostname()}:{os.getpid()}"

    def describe(self) -> str:
        return f"{self.where} {self.scorer.hex.describe()}"

    def score(self, path: str, out: str, attempt: int) -> dict:
        batches = 0

        def progress(stage: str, done: int, total: int) -> None:
            nonlocal batches
            if done > 0:
                batches += 1
                if self.die_after and attempt == 0 and batches >= self.die_after:
                    os._exit(1)  # test hook: a process killed mid-slide, partial files left behind

        try:
            result = self.scorer.score(path, out, progress=progress)
        except Exception as e:  # noqa: BLE001 - reported per slide on the driver
            return {"ok": False, "error": str(e), "hexfast": isinstance(e, HexfastError),
                    "type": type(e).__name__, "traceback": traceback.format_exc(), "where": self.where}
        report = result.outputs.get("report")
        return {"ok": True, "tiles": len(result.coords), "tiles_per_s": result.tiles_per_s,
                "seconds": result.wall_seconds, "where": self.where,
                "dir": str(report.parent) if report is not None else str(Path(out) / Path(path).stem)}


def _connect(ray, address: str, debug: bool) -> bool:
    """Connects (or starts a local cluster); True when this call did, so it shuts down after."""
    if ray.is_initialized():  # e.g. a test or a notebook that called ray.init() itself
        return False
    try:
        ray.init(address=None if address == LOCAL else address, include_dashboard=False,
                 log_to_driver=debug, logging_level="WARNING" if not debug else "INFO")
    except (ConnectionError, ValueError, RuntimeError) as e:
        raise HexfastError(f"--ray {address}: cannot connect to a Ray cluster: {e}") from None
    return True


def _plan(ray, args, n_slides: int) -> tuple[int, dict, int | None]:
    """(actors, actor resource options, engine threads per CPU actor)."""
    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 1))
    use_gpu = args.backend in GPU_BACKENDS or (args.backend in ("auto", "torch") and gpus > 0)
    if use_gpu:
        if gpus == 0:
            raise HexfastError(f"--backend {args.backend} needs GPUs, and the Ray cluster has none")
        n = max(1, min(args.ray_workers or gpus, n_slides))
        return n, {"num_gpus": 1, "num_cpus": 1}, None
    n = max(1, min(args.ray_workers or cpus // 2, n_slides))
    return n, {"num_cpus": 1}, max(1, cpus // n)  # the CPUs shared out among the engines


def score_on_ray(slides: list[Path], out: Path, rows: list, args) -> int:
    """Scores `slides` on the cluster `args.ray` names; appends summary rows; returns the failures."""
    from tqdm import tqdm

    from .cli_score import _warn_demo

    ray = import_ray()
    started = _connect(ray, args.ray, bool(args.debug))
    actors: list = []
    try:
        n, options, engine_threads = _plan(ray, args, len(slides))
        scorer_kwargs = dict(model=str(args.model) if args.model else None, backend=args.backend,
                             precision=args.precision, batch_size=args.batch_size, threads=args.threads,
                             stain_norm=args.stain_norm, stride=args.stride, mpp=args.mpp,
                             engine_threads=engine_threads)
        die_after = int(os.environ.get(DIE_AFTER_ENV, "0") or 0)
        worker_cls = ray.remote(SlideWorker)

        def new_actor():
            return worker_cls.options(**options).remote(scorer_kwargs, die_after)

        actors = [new_actor() for _ in range(n)]
        try:
            described = ray.get([a.describe.remote() for a in actors])
        except ray.exceptions.RayActorError as e:
            raise HexfastError(f"a Ray worker could not load the model: {_cause(e)}") from None
        from .bundle import load_bundle

        if load_bundle(args.model).demo:
            _warn_demo()
        print(f"hexfast: {n} Ray worker{'s' * (n > 1)} ({'1 GPU' if 'num_gpus' in options else '1 CPU'} each): "
              + "; ".join(described), file=sys.stderr)
        return _dispatch(ray, actors, new_actor, slides, out, rows, args, tqdm)
    finally:
        for actor in actors:  # interrupted: stop the slides in flight (--resume redoes them)
            with contextlib.suppress(Exception):
                ray.kill(actor)
        if started:
            ray.shutdown()


def _cause(e: BaseException) -> str:
    """Ray's messages run to paragraphs: the gist, one line."""
    text = " ".join(str(e).split())
    if "worker process has died" in text or "exit type" in text.lower():
        detail = text.split("Worker exit detail:", 1)[-1].split(". ")[0].strip() if "exit detail" in text else ""
        return "its worker process died" + (f": {detail}" if detail else "")
    return text[:200] or type(e).__name__


def _dispatch(ray, actors: list, new_actor, slides: list[Path], out: Path, rows: list, args, tqdm) -> int:
    from .cli import _warn

    pending = collections.deque((path, 0) for path in slides)
    idle = list(actors)
    inflight: dict = {}
    failed = tiles = 0
    replacements = RETRIES * max(1, len(actors))
    start = time.perf_counter()
    bar = tqdm(total=len(slides), desc="slides", unit="slide", file=sys.stderr, dynamic_ncols=True, disable=None)

    def fail(path: Path, problem: str, line: str) -> None:
        nonlocal failed
        failed += 1
        tqdm.write(line, file=sys.stderr)
        rows.append((path.name, "FAILED", "-", "-", "-", problem))
        bar.update(1)

    try:
        while pending or inflight:
            while pending and idle:
                actor = idle.pop()
                path, attempt = pending.popleft()
                inflight[actor.score.remote(str(path), str(out), attempt)] = (actor, path, attempt)
            if not inflight:  # every actor died and none could be replaced
                while pending:
                    path, _ = pending.popleft()
                    fail(path, "no Ray workers left", f"hexfast: error: {path}: no Ray workers left")
                break
            (ref,), _ = ray.wait(list(inflight), num_returns=1)
            actor, path, attempt = inflight.pop(ref)
            try:
                res = ray.get(ref)
            except ray.exceptions.RayActorError as e:  # the process died mid-slide
                with contextlib.suppress(Exception):
                    ray.kill(actor)
                if replacements > 0:
                    replacements -= 1
                    idle.append(new_actor())
                if attempt < RETRIES:
                    tqdm.write(f"hexfast: {path}: Ray worker died ({_cause(e)}); retrying on another "
                               f"(attempt {attempt + 2} of {RETRIES + 1})", file=sys.stderr)
                    pending.appendleft((path, attempt + 1))
                else:
                    _drop_temp_files(out / path.stem)
                    fail(path, f"Ray worker died {attempt + 1} times", f"hexfast: error: {path}: Ray worker "
                         f"died {attempt + 1} times ({_cause(e)})")
                continue
            except ray.exceptions.RayError as e:
                idle.append(actor)
                fail(path, _cause(e), f"hexfast: error: {path}: {_cause(e)}")
                continue
            idle.append(actor)
            if not res["ok"]:
                if args.debug:
                    tqdm.write(res["traceback"], file=sys.stderr)
                msg = res["error"]
                line = (f"hexfast: error: {msg}" if res["hexfast"] else
                        f"hexfast: internal error: {res['type']}: {msg} (rerun with --debug)")
                fail(path, msg.removeprefix(f"{path}: "), line)
                continue
            tiles += res["tiles"]
            bar.update(1)
            bar.set_postfix_str(f"{tiles / (time.perf_counter() - start):.0f} tiles/s, {failed} failed")
            status = "ok"
            if res["tiles"] == 0:
                status = "NO TISSUE"
                bar.clear()
                _warn(f"{path}: NO TISSUE FOUND: no tiles were scored; wrote empty outputs (empty h5, blank "
                      f"virtual CODEX, no MICA risk) to {res['dir']}; check overview.png")
            rows.append((path.name, status, str(res["tiles"]), f"{res['tiles_per_s']:.0f}",
                         f"{res['seconds']:.1f}", res["dir"]))
            tqdm.write(f"{path.name}: {res['tiles']} tiles, {res['tiles_per_s']:.0f} tiles/s, "
                       f"{res['seconds']:.1f} s on {res['where']} -> {res['dir']}", file=sys.stderr)
    finally:
        bar.close()
    wall = time.perf_counter() - start
    done = len(slides) - failed
    print(f"hexfast: Ray: {done} of {len(slides)} slides in {wall:.1f} s ({60 * done / wall:.2f} slides/min, "
          f"{tiles / wall:.0f} tiles/s overall), {failed} failed", file=sys.stderr)
    return failed


def _drop_temp_files(d: Path) -> None:
    """What a worker killed on its last attempt left in OUT/<stem>/ (as SlideWriter does on the next run)."""
    if not d.is_dir():
        return
    for stale in d.glob(".*.tmp"):
        stale.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        d.rmdir()  # only when empty
