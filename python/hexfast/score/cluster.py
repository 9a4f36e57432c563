"""A cohort scored on a Ray cluster: `RayScorer`, what `hexfast score --ray` runs.

One actor per device: a GPU actor (num_gpus=1) per GPU for the GPU backends
(and for auto/torch when the cluster has GPUs), else CPU actors (num_cpus=1;
`workers`, default cluster CPUs // 2). Each actor loads the bundle's engines
once (a Scorer) and scores many slides. The driver hands out one slide per
actor call and gives the next slide to whichever actor frees up first
(ray.wait over the calls in flight).

    with RayScorer("auto", model=None, backend="ort-cpu", workers=2) as scorer:
        for path, result in scorer.score_many(paths, out):   # as Scorer.score_many
            ...  # a SlideResult (its .worker says where), or the exception the slide raised

Outputs go to the shared OUT exactly as a local run writes them (SlideWriter:
temp names renamed into place, report.json last; a new attempt removes the
stale temp files of a killed one).

Faults: a slide that fails (bad file, read error) comes back as its exception
and the others go on. An actor that dies mid-slide (process killed, node lost)
is replaced and its slide goes to another actor, at most RETRIES more times;
each retry is a warning on the "hexfast.cluster" logger. Nothing is printed.

Ray is imported only here, and only when a RayScorer is made.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import pickle
import socket
import traceback
from collections.abc import Iterable, Iterator
from pathlib import Path

from ..bundle import load_bundle
from ..errors import HexfastError
from ..outputs.writer import OUTPUTS, drop_partial
from ..slide import DEFAULT_MAX_TILES, DEFAULT_MIN_TISSUE, slide_name
from .pipeline import Scorer, SlideResult

log = logging.getLogger("hexfast.cluster")

RETRIES = 2  # more attempts for a slide whose actor died under it
GPU_BACKENDS = ("trt", "ort-trt", "ort-cuda")
# Test-only: the actor's first attempt at a slide exits the process (os._exit) after this many batches.
DIE_AFTER_ENV = "HEXFAST_RAY_TEST_DIE_AFTER_BATCHES"
LOCAL = "local"  # no address: join the cluster `ray start` left here, else start one


class WorkerError(HexfastError):
    """A slide the cluster could not score: its workers kept dying, or Ray failed."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = os.fspath(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


def import_ray():
    try:
        import ray
    except ImportError as e:
        raise HexfastError(f"--ray needs Ray, which is not installed ({e}): pip install 'hexfast[cluster]'") from None
    return ray


class SlideWorker:
    """The actor: one Scorer (engines loaded once), many slides."""

    def __init__(self, scorer_kwargs: dict, die_after_batches: int = 0):
        self.scorer = Scorer(**scorer_kwargs)
        self.die_after = die_after_batches
        self.where = f"{socket.gethostname()}:{os.getpid()}"

    def describe(self) -> str:
        return f"{self.where} {self.scorer.describe()}"

    def score(self, path: str, out: str, attempt: int) -> SlideResult | BaseException:
        """The slide's result, or the exception it raised (returned, so that it arrives as itself)."""
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
            return _sendable(e)
        result.worker = self.where
        return result


def _sendable(e: Exception) -> Exception:
    """`e` with the worker's traceback attached (`remote_traceback`), or a plain Exception with its
    text where `e` would not survive pickling."""
    text = traceback.format_exc()
    try:
        pickle.loads(pickle.dumps(e))
    except Exception:  # noqa: BLE001 - whatever it is, the driver still gets a message
        e = Exception(f"{type(e).__name__}: {e}")
    e.remote_traceback = text
    return e


class RayScorer:
    """Scorer's score_many over the workers of a Ray cluster.

    address: "local" (join the cluster `ray start` runs here, or start one), "auto", HOST:6379 or
    ray://HOST:10001. The other arguments are Scorer's; workers: how many actors (default: one
    per GPU; CPU backends: cluster CPUs // 2, the engine threads shared out among them)."""

    def __init__(self, address: str = LOCAL, model=None, backend: str = "auto", *, precision: str = "fp32",
                 batch_size: int = 64, threads: int = 2, stain_norm: str = "none", stride: int | None = None,
                 mpp: float | None = None, max_tiles: int = DEFAULT_MAX_TILES, allow_non_brightfield: bool = False,
                 mica_bag=None, region=None, min_tissue: float = DEFAULT_MIN_TISSUE, tissue=None, mica: bool = True,
                 outputs=OUTPUTS, workers: int | None = None, slides: int | None = None, log_to_driver: bool = False):
        """slides: how many slides are coming, when known (no more actors than that). mica_bag: a
        directory every worker reads (a shared filesystem on a multi-node cluster)."""
        self.bundle = load_bundle(model)
        self._ray = ray = import_ray()
        self._started = _connect(ray, address, log_to_driver)
        self._actors: list = []
        try:
            n, options, engine_threads = _plan(ray, backend, workers, slides)
            scorer_kwargs = dict(model=None if model is None else str(model), backend=backend, precision=precision,
                                 batch_size=batch_size, threads=threads, stain_norm=stain_norm, stride=stride,
                                 mpp=mpp, max_tiles=max_tiles, allow_non_brightfield=allow_non_brightfield,
                                 engine_threads=engine_threads,
                                 mica_bag=None if mica_bag is None else os.fspath(Path(mica_bag).resolve()),
                                 region=region, min_tissue=min_tissue, tissue=tissue, mica=mica,
                                 outputs=tuple(outputs))
            die_after = int(os.environ.get(DIE_AFTER_ENV, "0") or 0)
            worker_cls = ray.remote(SlideWorker)
            self._new_actor = lambda: worker_cls.options(**options).remote(scorer_kwargs, die_after)
            self._actors = [self._new_actor() for _ in range(n)]
            try:
                described = ray.get([a.describe.remote() for a in self._actors])
            except ray.exceptions.RayActorError as e:
                raise HexfastError(f"a Ray worker could not load the model: {_cause(e)}") from None
            self._description = (f"{n} Ray worker{'s' * (n > 1)} ({'1 GPU' if 'num_gpus' in options else '1 CPU'} "
                                 f"each): " + "; ".join(described))
        except BaseException:
            self.close()
            raise

    def describe(self) -> str:
        return self._description

    def score_many(self, paths: Iterable[str | os.PathLike], out: str | os.PathLike
                   ) -> Iterator[tuple[Path, SlideResult | BaseException]]:
        """Yields (path, SlideResult or the exception it raised) as slides finish, in that order.
        Interrupted (an exception, Ctrl-C, the iterator dropped), the slides in flight are stopped:
        --resume redoes them."""
        ray, out = self._ray, Path(out)
        pending = collections.deque((Path(p), 0) for p in paths)
        idle = list(self._actors)
        inflight: dict = {}
        replacements = RETRIES * max(1, len(self._actors))
        try:
            while pending or inflight:
                while pending and idle:
                    actor = idle.pop()
                    path, attempt = pending.popleft()
                    inflight[actor.score.remote(str(path), str(out), attempt)] = (actor, path, attempt)
                if not inflight:  # every actor died and none could be replaced
                    while pending:
                        path, _ = pending.popleft()
                        yield path, WorkerError(path, "no Ray workers left")
                    return
                (ref,), _ = ray.wait(list(inflight), num_returns=1)
                actor, path, attempt = inflight.pop(ref)
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayActorError as e:  # the process died mid-slide
                    with contextlib.suppress(Exception):
                        ray.kill(actor)
                    self._actors.remove(actor)
                    if replacements > 0:
                        replacements -= 1
                        replacement = self._new_actor()
                        self._actors.append(replacement)
                        idle.append(replacement)
                    if attempt < RETRIES:
                        log.warning("%s: Ray worker died (%s); retrying on another (attempt %d of %d)",
                                    path, _cause(e), attempt + 2, RETRIES + 1)
                        pending.appendleft((path, attempt + 1))
                    else:
                        drop_partial(out, slide_name(path))
                        yield path, WorkerError(path, f"Ray worker died {attempt + 1} times ({_cause(e)})")
                    continue
                except ray.exceptions.RayError as e:
                    result = WorkerError(path, _cause(e))
                idle.append(actor)
                yield path, result
        finally:  # abandoned mid-cohort: stop the slides in flight (--resume redoes them)
            for actor, _, _ in inflight.values():
                with contextlib.suppress(Exception):
                    ray.kill(actor)
                self._actors.remove(actor)
                self._actors.append(self._new_actor())

    def close(self) -> None:
        """Stops the actors (and the cluster, when this scorer started it)."""
        for actor in self._actors:
            with contextlib.suppress(Exception):
                self._ray.kill(actor)
        self._actors = []
        if self._started:
            self._started = False
            self._ray.shutdown()

    def __enter__(self) -> RayScorer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _connect(ray, address: str, log_to_driver: bool) -> bool:
    """Connects (or starts a local cluster); True when this call did, so it shuts down after."""
    if ray.is_initialized():  # e.g. a test or a notebook that called ray.init() itself
        return False
    try:
        ray.init(address=None if address == LOCAL else address, include_dashboard=False,
                 log_to_driver=log_to_driver, logging_level="INFO" if log_to_driver else "WARNING")
    except (ConnectionError, ValueError, RuntimeError) as e:
        raise HexfastError(f"--ray {address}: cannot connect to a Ray cluster: {e}") from None
    return True


def _plan(ray, backend: str, workers: int | None, slides: int | None) -> tuple[int, dict, int | None]:
    """(actors, actor resource options, engine threads per CPU actor)."""
    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 1))
    most = slides if slides else 1 << 30
    use_gpu = backend in GPU_BACKENDS or (backend in ("auto", "torch") and gpus > 0)
    if use_gpu:
        if gpus == 0:
            raise HexfastError(f"--backend {backend} needs GPUs, and the Ray cluster has none")
        return max(1, min(workers or gpus, most)), {"num_gpus": 1, "num_cpus": 1}, None
    n = max(1, min(workers or cpus // 2, most))
    return n, {"num_cpus": 1}, max(1, cpus // n)  # the CPUs shared out among the engines


def _cause(e: BaseException) -> str:
    """Ray's messages run to paragraphs: the gist, one line."""
    text = " ".join(str(e).split())
    if "worker process has died" in text or "exit type" in text.lower():
        detail = text.split("Worker exit detail:", 1)[-1].split(". ")[0].strip() if "exit detail" in text else ""
        return "its worker process died" + (f": {detail}" if detail else "")
    return text[:200] or type(e).__name__
