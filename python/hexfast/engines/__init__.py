"""Inference backends: one interface over ONNX Runtime (CPU, CUDA, TensorRT EP), native
TensorRT plans and torch.export programs.

    from hexfast.engines import create_engine, available_backends

    with create_engine("my/hex.onnx", backend="auto") as engine:     # your own file; a bundle's: score.open_engine
        log.info(engine.describe())          # e.g. "ort-cpu: onnxruntime 1.22.0, providers ..., fp32, <CPU> (8 threads)"
        out = engine.run({"tiles": tiles})   # uint8 [B, H, W, 3] → {"markers": [B, 40], "embedding": [B, 1024]}

Backends, fastest first (what `auto` tries, in order, skipping any that cannot run):

  trt       native TensorRT 10 plan from `hexfast build-engines` (<plan_dir>/<stem>.<precision>.plan and
            the record of its sha256 beside it); needs tensorrt, cuda-python, a GPU and the plan
  ort-trt   ONNX Runtime's TensorRT EP (onnxruntime-gpu + TensorRT); engine cache in plan_dir
  ort-cuda  ONNX Runtime's CUDA EP (onnxruntime-gpu); fp32 only
  torch     a torch.export program (`program`: a bundle's listed .pt2), on CUDA (auto: only with a
            program and torch with a GPU)
  ort-cpu   ONNX Runtime on the CPU (onnxruntime); fp32 only

A model is a path (your own file, loaded as its runtime loads it) or a bundle's ListedFile (every
loader gets the bytes checked against the manifest's sha256; see hexfast.bundle).

`auto` picks the first that can run the requested precision and logs its choice (logger
"hexfast.engines"); an explicitly requested backend that cannot run raises BackendUnavailable,
one line saying what is missing and how to get it. Nothing here imports torch unless the torch
backend is chosen, nor onnxruntime / tensorrt before they are needed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..bundle import ListedFile
from . import ort as _ort
from . import torch_backend as _torch
from . import trt as _trt
from .base import PRECISIONS, Engine, TensorSpec, check_precision, log
from .errors import BackendUnavailable, EngineClosedError, EngineError, ModelFileError
from .trt import plan_meta_path, plan_path

BACKENDS = ("auto", "trt", "ort-trt", "ort-cuda", "ort-cpu", "torch")
_ORDER = ("trt", "ort-trt", "ort-cuda", "torch", "ort-cpu")  # auto's preference, fastest first
_SUPPORTS = {"trt": _trt.PRECISIONS, "ort-trt": _ort.PRECISIONS["ort-trt"], "ort-cuda": _ort.PRECISIONS["ort-cuda"],
             "torch": _torch.PRECISIONS, "ort-cpu": _ort.PRECISIONS["ort-cpu"]}

__all__ = [
    "BACKENDS",
    "PRECISIONS",
    "BackendUnavailable",
    "Engine",
    "EngineClosedError",
    "EngineError",
    "ModelFileError",
    "TensorSpec",
    "available_backends",
    "create_engine",
    "plan_meta_path",
    "plan_path",
]


def _machine_problem(backend: str) -> BackendUnavailable | None:
    """Why `backend` cannot run on this machine at all (any model), or None."""
    if backend == "trt":
        return _trt.problem()
    if backend == "torch":
        if not _torch.installed():
            return BackendUnavailable("torch", "needs torch (pip install torch, from the index that matches the machine)")
        if not _torch.cuda_build_and_gpu():
            return BackendUnavailable("torch", "needs a CUDA build of torch and a GPU (for auto)")
        return None
    return _ort.problem(backend)


def available_backends() -> list[str]:
    """Concrete backends usable on this machine, fastest first. Model-specific needs are not
    checked here: trt also needs a plan for the model, torch a .pt2 program (torch is listed only
    for a CUDA build of torch with a GPU; an explicit `torch` still runs on the CPU)."""
    return [b for b in _ORDER if _machine_problem(b) is None]


def create_engine(model: str | os.PathLike | ListedFile, backend: str = "auto", *, precision: str = "fp32",
                  plan_dir: str | os.PathLike | None = None, threads: int | None = None, device_id: int = 0,
                  program: str | os.PathLike | ListedFile | None = None,
                  output_names: list[str] | None = None, cuda_graphs: bool = False) -> Engine:
    """Load `model` (its ONNX file) on `backend` ("auto" or one of BACKENDS).

    precision: fp32 (all backends), fp16 / bf16 (trt: the plan built at that precision; ort-trt:
      TensorRT EP's fp16 / bf16 flags; torch: the program exported at that precision).
    plan_dir: trt reads `<plan_dir>/<stem>.<precision>.plan`; ort-trt keeps its engine and timing
      caches there (default ~/.cache/hexfast/ort-trt/<the ONNX's sha256[:16]>).
    threads: CPU threads (ORT intra-op threads; torch.set_num_threads); None = the runtime's default.
    device_id: the CUDA device for the GPU backends.
    program, output_names: the torch backend's torch.export program and the names of its outputs
      (a model given as a .pt2 path is its own program); cuda_graphs: the torch backend replays
      CUDA graphs captured per batch shape.
    """
    if backend not in BACKENDS:
        raise EngineError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    check_precision(precision)
    if program is None and not isinstance(model, ListedFile) and os.fspath(model).endswith(".pt2"):
        program = model
    files = _Files(model, program, output_names, plan_dir, cuda_graphs)
    if backend != "auto":
        if precision not in _SUPPORTS[backend]:
            raise EngineError(f"{backend} runs {'/'.join(_SUPPORTS[backend])} only, not {precision}; "
                              f"{precision} needs {' or '.join(b for b in _ORDER if precision in _SUPPORTS[b])}")
        engine = _create(backend, files, precision, threads, device_id)
        log.info("engine: %s", engine.describe())
        return engine

    skipped = []
    for candidate in _ORDER:
        if precision not in _SUPPORTS[candidate]:
            skipped.append(f"{candidate}: no {precision}")
            continue
        reason = _auto_problem(candidate, files, precision)
        if reason is not None:
            skipped.append(str(reason))
            continue
        try:
            engine = _create(candidate, files, precision, threads, device_id)
        except BackendUnavailable as exc:  # e.g. the CUDA EP's libraries failed to load: try the next
            log.warning("auto: %s", exc)
            skipped.append(str(exc))
            continue
        log.info("auto chose %s (%s)", candidate, "; ".join(skipped) if skipped else "the fastest")
        log.info("engine: %s", engine.describe())
        return engine
    raise BackendUnavailable("auto", f"found no backend for {precision} on this machine ({'; '.join(skipped)})")


@dataclass(frozen=True)
class _Files:
    """What a backend may load for the model: its ONNX, its torch program, its TensorRT plans."""

    model: str | os.PathLike | ListedFile
    program: str | os.PathLike | ListedFile | None
    output_names: list[str] | None
    plan_dir: str | os.PathLike | None
    cuda_graphs: bool

    @property
    def onnx_path(self) -> Path:
        return self.model.path if isinstance(self.model, ListedFile) else Path(self.model)


def _auto_problem(backend: str, files: _Files, precision: str):
    """Why auto skips `backend` for this model: the machine-level reasons plus the model-level ones
    (trt without a plan; torch without a program, decided before torch is imported)."""
    if backend == "trt":
        return _trt.plan_problem(files.plan_dir, files.onnx_path, precision) or _trt.problem()
    if backend == "torch":
        return _torch.problem(files.program, model=files.model) or _machine_problem("torch")
    return _machine_problem(backend)


def _create(backend: str, files: _Files, precision: str, threads, device_id) -> Engine:
    if backend == "trt":
        return _trt.TrtEngine(files.model, precision=precision, plan_dir=files.plan_dir, device_id=device_id)
    if backend == "torch":
        missing = _torch.problem(files.program, model=files.model)
        if missing is not None:
            raise missing
        return _torch.TorchEngine(files.program, precision=precision, threads=threads, device_id=device_id,
                                  output_names=files.output_names, cuda_graphs=files.cuda_graphs)
    return _ort.OrtEngine(files.model, backend, precision=precision, plan_dir=files.plan_dir, threads=threads,
                          device_id=device_id)
