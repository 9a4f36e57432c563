"""Inference backends: one interface over ONNX Runtime (CPU, CUDA, TensorRT EP), native
TensorRT plans and torch.export programs.

    from hexfast.engines import create_engine, available_backends

    with create_engine("bundle/hex.onnx", backend="auto", plan_dir="bundle/plans") as engine:
        log.info(engine.describe())          # e.g. "ort-cpu: onnxruntime 1.22.0, providers ..., fp32, <CPU> (8 threads)"
        out = engine.run({"tiles": tiles})   # uint8 [B, H, W, 3] → {"markers": [B, 40], "embedding": [B, 1024]}

Backends, fastest first (what `auto` tries, in order, skipping any that cannot run):

  trt       native TensorRT 10 plan from `hexfast build-engines` (<plan_dir>/<stem>.<precision>.plan);
            needs tensorrt, cuda-python, a GPU and the plan
  ort-trt   ONNX Runtime's TensorRT EP (onnxruntime-gpu + TensorRT); engine cache in plan_dir
  ort-cuda  ONNX Runtime's CUDA EP (onnxruntime-gpu); fp32 only
  torch     a torch.export program <stem>.pt2 beside the ONNX file, on CUDA (auto: only if that file
            exists and torch has a GPU)
  ort-cpu   ONNX Runtime on the CPU (onnxruntime); fp32 only

`auto` picks the first that can run the requested precision and logs its choice (logger
"hexfast.engines"); an explicitly requested backend that cannot run raises BackendUnavailable,
one line saying what is missing and how to get it. Nothing here imports torch unless the torch
backend is chosen, nor onnxruntime / tensorrt before they are needed.
"""

from __future__ import annotations

import os

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


def create_engine(onnx_path: str | os.PathLike, backend: str = "auto", *, precision: str = "fp32",
                  plan_dir: str | os.PathLike | None = None, threads: int | None = None,
                  device_id: int = 0) -> Engine:
    """Load `onnx_path` on `backend` ("auto" or one of BACKENDS).

    precision: fp32 (all backends), fp16 / bf16 (trt: the plan built at that precision; ort-trt:
      TensorRT EP's fp16 / bf16 flags; torch: autocast).
    plan_dir: trt reads `<plan_dir>/<stem>.<precision>.plan`; ort-trt keeps its engine and timing
      caches there (default ~/.cache/hexfast/ort-trt).
    threads: CPU threads (ORT intra-op threads; torch.set_num_threads); None = the runtime's default.
    device_id: the CUDA device for the GPU backends.
    """
    if backend not in BACKENDS:
        raise EngineError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    check_precision(precision)
    if backend != "auto":
        if precision not in _SUPPORTS[backend]:
            raise EngineError(f"{backend} runs {'/'.join(_SUPPORTS[backend])} only, not {precision}; "
                              f"{precision} needs {' or '.join(b for b in _ORDER if precision in _SUPPORTS[b])}")
        engine = _create(backend, onnx_path, precision, plan_dir, threads, device_id)
        log.info("engine: %s", engine.describe())
        return engine

    skipped = []
    for candidate in _ORDER:
        if precision not in _SUPPORTS[candidate]:
            skipped.append(f"{candidate}: no {precision}")
            continue
        reason = _auto_problem(candidate, onnx_path, precision, plan_dir)
        if reason is not None:
            skipped.append(str(reason))
            continue
        try:
            engine = _create(candidate, onnx_path, precision, plan_dir, threads, device_id)
        except BackendUnavailable as exc:  # e.g. the CUDA EP's libraries failed to load: try the next
            log.warning("auto: %s", exc)
            skipped.append(str(exc))
            continue
        log.info("auto chose %s (%s)", candidate, "; ".join(skipped) if skipped else "the fastest")
        log.info("engine: %s", engine.describe())
        return engine
    raise BackendUnavailable("auto", f"found no backend for {precision} on this machine ({'; '.join(skipped)})")


def _auto_problem(backend, onnx_path, precision, plan_dir):
    """Why auto skips `backend` for this model: the machine-level reasons plus the model-level ones
    (trt without a plan; torch without a .pt2, decided before torch is imported)."""
    if backend == "trt":
        return _trt.plan_problem(plan_dir, onnx_path, precision) or _trt.problem()
    if backend == "torch":
        return _torch.problem(onnx_path) or _machine_problem("torch")
    return _machine_problem(backend)


def _create(backend, onnx_path, precision, plan_dir, threads, device_id) -> Engine:
    if backend == "trt":
        return _trt.TrtEngine(onnx_path, precision=precision, plan_dir=plan_dir, device_id=device_id)
    if backend == "torch":
        return _torch.TorchEngine(onnx_path, precision=precision, threads=threads, device_id=device_id)
    return _ort.OrtEngine(onnx_path, backend, precision=precision, plan_dir=plan_dir, threads=threads,
                          device_id=device_id)
