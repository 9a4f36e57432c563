"""TensorRT plans for a model bundle, built on (and for) the local GPU. TensorRT 10 Python API.

Where: `bundle.engine_cache_dir(key)`, outside the bundle, with key = GPU name + TensorRT
version, sanitised (`engine_key`): ~/.cache/hexfast/engines/<bundle hash[:16]>/NVIDIA_H100_80GB_HBM3-trt10.3.0/
(HEXFAST_ENGINE_CACHE moves the root). What, per model and precision:

    <model>.<precision>.plan    serialized engine (ICudaEngine)
    <model>.<precision>.json    its record: plan_sha256 (checked before every load), model_sha256 (the
                                model's fp32 ONNX, which the runtime loads it for), the ONNX it was
                                parsed from + sha256, bundle hash, GPU, TensorRT version,
                                optimisation profiles (index → input shapes min/opt/max), build time
    timing.cache                TensorRT timing cache shared by the builds for this key

The ONNX is parsed from the bytes its manifest entry was checked against, never by path.

Optimisation profiles:
* hex: one profile per tile size S in `tile_sizes` (default 224 and 384):
  tiles [1..max_batch, S, S, 3] uint8, opt = max_batch. 224 is a 40x tile as
  read; 384 is a tile the C++ TileStream already resized (the in-graph resize
  is then the identity). 20x (112 px) or 80x (448 px) slides either go through
  the TileStream's resize to 384 or need those sizes added (--tile-sizes).
  A runtime selects the profile whose tile size matches its batch.
* codex_encoder: codex [40, 1..4095, 1..4095], opt 64x64.
* mica: h_path [1..4096, 1024] (a chunk of tiles), opt 4096; h_codex [40, 384], coattn_lse_in [40],
  coattn_mean_in [40, 256] fixed.

Precision:
* fp32: the fp32 ONNX, TF32 off.
* fp16: the bundle's fp16 ONNX as a strongly typed network (its types, with
  the preprocessing in float32, come from the file); without an fp16 file,
  the fp32 ONNX with BuilderFlag.FP16 and the `/preprocess/` layers pinned to
  float32 (OBEY_PRECISION_CONSTRAINTS).
* bf16: the fp32 ONNX with BuilderFlag.BF16, preprocessing pinned to float32.
The preprocessing must stay float32: the exact resize sums integers up to 2^24.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable
from pathlib import Path

from ..bundle import Bundle
from ..errors import HexfastError
from ..files import write_bytes_atomic
from . import devices
from . import trt as trt_backend
from .onnx_external import single_file_onnx

_log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "bf16")
KEEP_FP32_PREFIX = "/preprocess/"
TIMING_CACHE = "timing.cache"
CODEX_MAX_GRID = 4095
CODEX_OPT_GRID = 64
MICA_MAX_TILES = 4096  # score.mica_stream.CHUNK_TILES: the runtime feeds MICA chunks of at most this many tiles
MICA_OPT_TILES = 4096


class EngineBuildError(HexfastError):
    """TensorRT or a GPU is missing, or a build failed; one line."""


def engine_key(gpu_name: str, trt_version: str) -> str:
    """Cache key: GPU name + TensorRT version with everything but [A-Za-z0-9._+-] replaced by '_'."""
    gpu = re.sub(r"[^A-Za-z0-9._+-]+", "_", gpu_name.strip()).strip("_") or "gpu"
    version = re.sub(r"[^A-Za-z0-9._+-]+", "_", trt_version.strip()) or "unknown"
    return f"{gpu}-trt{version}"


def plan_name(model: str, precision: str) -> str:
    return f"{model}.{precision}.plan"


def import_tensorrt():
    """tensorrt, or an EngineBuildError saying why build-engines cannot have it."""
    why = trt_backend.tensorrt_problem()
    if why is not None:
        raise EngineBuildError(f"build-engines {why}, and a CUDA GPU; ONNX Runtime runs the bundle without it")
    return trt_backend.import_trt()


def profiles_for(model: str, inputs: dict, *, max_batch: int, tile_sizes: list[int]) -> list[dict]:
    """Optimisation profiles [{"tile_size"?, "shapes": {input: {"min","opt","max"}}}] for a model."""
    if model == "hex":
        return [{"tile_size": s, "shapes": {"tiles": {"min": [1, s, s, 3], "opt": [max_batch, s, s, 3],
                                                      "max": [max_batch, s, s, 3]}}} for s in tile_sizes]
    if model == "codex_encoder":
        c = inputs["codex"]["shape"][0]
        return [{"shapes": {"codex": {"min": [c, 1, 1], "opt": [c, CODEX_OPT_GRID, CODEX_OPT_GRID],
                                      "max": [c, CODEX_MAX_GRID, CODEX_MAX_GRID]}}}]
    if model == "mica":
        d = inputs["h_path"]["shape"][1]
        fixed = {name: {"min": inputs[name]["shape"], "opt": inputs[name]["shape"], "max": inputs[name]["shape"]}
                 for name in ("h_codex", "coattn_lse_in", "coattn_mean_in")}
        return [{"shapes": {"h_path": {"min": [1, d], "opt": [MICA_OPT_TILES, d], "max": [MICA_MAX_TILES, d]},
                            **fixed}}]
    raise EngineBuildError(f"no engine profile for model '{model}'")


def plan_specs(bundle: Bundle, *, precision: str, max_batch: int, tile_sizes: list[int], models: list[str]) -> list[dict]:
    """What would be built, without TensorRT: model, source ONNX, strongly typed or not, profiles."""
    if precision not in PRECISIONS:
        raise EngineBuildError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision}")
    specs = []
    for model in models:
        entry = bundle.model(model)  # MissingModelError for a model the bundle lacks
        strongly_typed = precision == "fp16" and "fp16" in entry["files"]
        onnx_file = entry["files"]["fp16" if strongly_typed else "fp32"]
        specs.append({"model": model, "precision": precision, "onnx": onnx_file, "strongly_typed": strongly_typed,
                      "plan": plan_name(model, precision),
                      "profiles": profiles_for(model, entry["inputs"], max_batch=max_batch, tile_sizes=tile_sizes)})
    return specs


def build_engines(bundle: Bundle, *, precision: str = "fp32", max_batch: int = 64, tile_sizes: list[int] | None = None,
                  models: list[str] | None = None, workspace_gb: float = 8.0,
                  log: Callable[[str], None] = _log.info) -> list[dict]:
    """Build (or rebuild) the plans; returns the JSON descriptions written beside them."""
    specs = plan_specs(bundle, precision=precision, max_batch=max_batch, tile_sizes=tile_sizes or [224, 384],
                       models=models or ["hex"])
    trt = import_tensorrt()
    gpu = devices.gpu_name()
    if gpu is None:
        raise EngineBuildError("no CUDA GPU is visible (nvidia-smi lists none): TensorRT plans are built on the GPU "
                               "that will run them")
    key = engine_key(gpu, trt.__version__)
    directory = bundle.engine_cache_dir(key)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EngineBuildError(f"{directory}: cannot create the engine cache ({exc.strerror}); set "
                               f"HEXFAST_ENGINE_CACHE to a writable directory") from None
    logger = trt.Logger(trt.Logger.WARNING)
    results = []
    for spec in specs:
        log(f"building {spec['model']} {precision} for {gpu} (TensorRT {trt.__version__}) -> {directory}")
        start = time.perf_counter()
        plan = _build_one(trt, logger, bundle, spec, directory / TIMING_CACHE, workspace_gb)
        seconds = time.perf_counter() - start
        write_bytes_atomic(directory / spec["plan"], plan)  # the record after it: a plan without one is refused
        onnx_path = bundle.path / spec["onnx"]
        info = {
            "model": spec["model"], "precision": precision, "plan": spec["plan"],
            "plan_sha256": hashlib.sha256(plan).hexdigest(), "model_sha256": bundle.model_file(spec["model"]).sha256,
            "onnx": spec["onnx"], "onnx_sha256": bundle.manifest["files"].get(spec["onnx"]), "bundle_hash": bundle.hash,
            "strongly_typed": spec["strongly_typed"], "gpu": gpu, "tensorrt": trt.__version__, "key": key,
            "max_batch": max_batch if spec["model"] == "hex" else None,
            "profiles": [dict(p, index=i) for i, p in enumerate(spec["profiles"])],
            "built": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z"),
            "seconds": round(seconds, 1), "directory": os.fspath(directory),
        }
        write_bytes_atomic(directory / f"{spec['model']}.{precision}.json", (json.dumps(info, indent=1) + "\n").encode())
        log(f"  {spec['plan']}: {len(plan) / 1e6:.1f} MB in {seconds:.0f} s (from {onnx_path.name})")
        results.append(info)
    return results


def _build_one(trt, logger, bundle: Bundle, spec: dict, cache_path: Path, workspace_gb: float) -> bytes:
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if spec["strongly_typed"] else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    onnx_path = bundle.path / spec["onnx"]
    if not parser.parse(single_file_onnx(bundle.listed(spec["onnx"]))):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors)) or "unknown parser error"
        raise EngineBuildError(f"{onnx_path}: TensorRT cannot parse it ({errors.splitlines()[0]})")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    precision = spec["precision"]
    if precision == "fp32":
        config.clear_flag(trt.BuilderFlag.TF32)
    elif not spec["strongly_typed"]:
        config.set_flag(trt.BuilderFlag.FP16 if precision == "fp16" else trt.BuilderFlag.BF16)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        _pin_preprocessing_fp32(trt, network)
    for p in spec["profiles"]:
        profile = builder.create_optimization_profile()
        for name, shapes in p["shapes"].items():
            profile.set_shape(name, shapes["min"], shapes["opt"], shapes["max"])
        config.add_optimization_profile(profile)
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(cache, False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineBuildError(f"{onnx_path}: TensorRT failed to build a {precision} engine (see the messages above)")
    write_bytes_atomic(cache_path, bytes(memoryview(config.get_timing_cache().serialize())))
    return bytes(memoryview(plan))


def _pin_preprocessing_fp32(trt, network) -> None:
    """Keep the in-graph resize and normalisation in float32 under FP16/BF16 builder flags."""
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if not layer.name.startswith(KEEP_FP32_PREFIX) or layer.type in (trt.LayerType.SHAPE, trt.LayerType.CAST):
            continue
        floats = [j for j in range(layer.num_outputs) if layer.get_output(j).dtype == trt.float32]
        if not floats:
            continue
        layer.precision = trt.float32
        for j in floats:
            layer.set_output_type(j, trt.float32)
