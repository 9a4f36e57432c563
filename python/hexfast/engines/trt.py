"""Native TensorRT backend (`trt`): runs a serialized plan built for this GPU.

The plan comes from `hexfast build-engines` (the bundle side); this module only loads it. It lies
at `plan_path(plan_dir, onnx_path, precision)` = `<plan_dir>/<onnx stem>.<precision>.plan`, with
`<onnx stem>.<precision>.json` beside it, written by the same build: the plan's sha256, the sha256
of the model's fp32 ONNX it was built for, the TensorRT version and GPU. A plan is code the GPU
runs, so it is loaded only from the bytes that match the recorded sha256, only when it was built
for this model's ONNX, and never without its record. Names, dtypes and profile ranges are read
from the plan itself.

Memory and streams use cuda-python's runtime bindings (`cuda.bindings.runtime`, or the older
`cuda.cudart`), not torch: page-locked host buffers (cudaMallocHost) and device buffers
(cudaMalloc) per input/output, grown only when a larger batch arrives; per run, one
cudaMemcpyAsync host→device per input on the engine's own stream, execute_async_v3, one
cudaMemcpyAsync device→host per output, cudaStreamSynchronize. Dynamic batch via
set_input_shape within the plan's optimisation profile 0; a one-input batch larger than the
profile's maximum is run in chunks of that maximum.
"""

from __future__ import annotations

import ctypes
import importlib
import json
import os
from pathlib import Path

import numpy as np

from ..bundle import ListedFile
from . import _cuda, devices
from .base import Engine, TensorSpec, check_model_file, log
from .errors import BackendUnavailable, EngineError, ModelFileError, one_line

PRECISIONS = ("fp32", "fp16", "bf16")
BF16 = "bf16"  # marker dtype: TensorRT bfloat16 tensors, moved as uint16 and widened to float32


def plan_path(plan_dir: str | os.PathLike, onnx_path: str | os.PathLike, precision: str) -> Path:
    """Where the TensorRT plan for `onnx_path` at `precision` lives: `<plan_dir>/<stem>.<precision>.plan`."""
    return Path(plan_dir) / f"{Path(onnx_path).stem}.{precision}.plan"


def plan_meta_path(plan_dir: str | os.PathLike, onnx_path: str | os.PathLike, precision: str) -> Path:
    """The JSON written beside the plan: `<plan_dir>/<stem>.<precision>.json`."""
    return plan_path(plan_dir, onnx_path, precision).with_suffix(".json")


def import_trt():
    return importlib.import_module("tensorrt")


def tensorrt_problem() -> str | None:
    """What is missing for TensorRT 10's Python package to be used here ("needs ..."), or None.
    Shared by this backend and `hexfast build-engines` (engines.build)."""
    try:
        trt = import_trt()
    except ImportError:
        return "needs TensorRT 10's Python package (pip install tensorrt)"
    except Exception as exc:  # noqa: BLE001 - a broken install (missing libnvinfer) raises OSError etc.
        return f"needs a working TensorRT install (import tensorrt failed: {one_line(exc)})"
    if _major(getattr(trt, "__version__", "0")) < 10:
        return f"needs TensorRT 10 or newer (found {trt.__version__}; pip install 'tensorrt>=10')"
    return None


def problem(backend: str = "trt") -> BackendUnavailable | None:
    """Why native TensorRT cannot run on this machine (tensorrt, cuda-python, a GPU), or None."""
    why = tensorrt_problem()
    if why is not None:
        return BackendUnavailable(backend, why)
    try:
        _cuda.cudart()
    except ImportError:
        return BackendUnavailable(backend, "needs cuda-python for pinned and device memory (pip install cuda-python)")
    if devices.device_count() == 0:
        return BackendUnavailable(backend, "needs an NVIDIA GPU with its driver; no CUDA device is visible")
    return None


def plan_problem(plan_dir, onnx_path, precision, backend: str = "trt") -> BackendUnavailable | None:
    """Why there is no plan to load for this model and precision, or None."""
    if plan_dir is None:
        return BackendUnavailable(backend, f"needs plan_dir, the folder with {Path(onnx_path).stem}.{precision}.plan "
                                           f"(build it with `hexfast build-engines`)")
    path = plan_path(plan_dir, onnx_path, precision)
    if not path.is_file():
        return BackendUnavailable(backend, f"needs a TensorRT plan at {path} (build it on this GPU with "
                                           f"`hexfast build-engines`, or use ort-trt, which builds and caches its own)")
    return None


class TrtEngine(Engine):
    backend = "trt"

    def __init__(self, model: str | os.PathLike | ListedFile, *, precision: str = "fp32", plan_dir=None,
                 device_id: int = 0):
        """model: the model's fp32 ONNX file (a bundle's ListedFile, whose sha256 the plan's record
        must name), or a plain path (the record's model hash is then not compared)."""
        onnx_path = model.path if isinstance(model, ListedFile) else Path(model)
        super().__init__(onnx_path, precision)
        self.device_id = int(device_id)
        self._stream = None
        self._buffers: dict[str, _Buffer] = {}
        self._context = self._engine = self._runtime = None
        missing = problem() or plan_problem(plan_dir, onnx_path, precision)
        if missing is not None:
            raise missing
        self.plan_path = check_model_file(plan_path(plan_dir, onnx_path, precision), "TensorRT plan")
        self.meta = _read_meta(plan_meta_path(plan_dir, onnx_path, precision))
        blob = _checked_plan(self.plan_path, self.meta, model.sha256 if isinstance(model, ListedFile) else None)
        self._trt = trt = import_trt()
        self._rt = rt = _cuda.cudart()
        _cuda.check(rt.cudaSetDevice(self.device_id))

        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        engine = self._runtime.deserialize_cuda_engine(blob)
        if engine is None:
            built = ""
            if self.meta.get("tensorrt") or self.meta.get("gpu"):
                built = f" (built with TensorRT {self.meta.get('tensorrt', '?')} on {self.meta.get('gpu', '?')})"
            raise ModelFileError(self.plan_path, f"TensorRT {trt.__version__} cannot load this plan{built} on "
                                                 f"{devices.device_name(self.device_id)}; rebuild it with "
                                                 f"`hexfast build-engines`")
        self._engine = engine
        self._context = engine.create_execution_context()
        if self._context is None:
            raise EngineError(f"{self.plan_path}: TensorRT could not create an execution context (out of GPU memory?)")

        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        is_input = {n: engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self._dtypes = {n: _np_dtype(trt, engine.get_tensor_dtype(n)) for n in names}
        self.inputs = tuple(self._spec(n) for n in names if is_input[n])
        self.outputs = tuple(self._spec(n) for n in names if not is_input[n])
        self.profiles = {spec.name: tuple(tuple(int(d) for d in dims) for dims in
                                          engine.get_tensor_profile_shape(spec.name, 0))
                         for spec in self.inputs}
        _check_meta_names(self.meta, self.plan_path, self.input_names, self.output_names)
        self._stream = _cuda.check(rt.cudaStreamCreate())
        self._buffers = {n: _Buffer(rt) for n in names}
        log.debug("trt: loaded %s (inputs %s, profiles %s)", self.plan_path, self.input_names, self.profiles)

    def _spec(self, name: str) -> TensorSpec:
        dtype = self._dtypes[name]
        shape = tuple(int(d) if int(d) >= 0 else None for d in self._engine.get_tensor_shape(name))
        # bf16 tensors have no numpy dtype: inputs must come as float32 and outputs leave as float32.
        return TensorSpec(name, np.dtype(np.float32) if dtype is BF16 else np.dtype(dtype), shape)

    # -- run ----------------------------------------------------------------------------------
    def _run(self, feeds):
        if len(self.inputs) == 1:
            (name, array), = feeds.items()
            most = self.profiles[name][2][0] if self.profiles[name][2] else 0
            if array.ndim and most > 0 and array.shape[0] > most:
                parts = [self._run_once({name: array[i:i + most]}) for i in range(0, array.shape[0], most)]
                return {k: np.concatenate([p[k] for p in parts]) for k in self.output_names}
        return self._run_once(feeds)

    def _run_once(self, feeds):
        rt, ctx, stream = self._rt, self._context, self._stream
        _cuda.check(rt.cudaSetDevice(self.device_id))
        h2d = rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        d2h = rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        for spec in self.inputs:
            array = feeds[spec.name]
            if not ctx.set_input_shape(spec.name, tuple(array.shape)):
                low, _, high = self.profiles[spec.name]
                raise EngineError(f"{self.plan_path}: input {spec.name!r} shape {list(array.shape)} is outside the "
                                  f"plan's profile {list(low)}..{list(high)}; rebuild the plan with a wider profile")
            if self._dtypes[spec.name] is BF16:
                array = _to_bf16(array)
            data = array.reshape(-1).view(np.uint8)
            buf = self._buffers[spec.name]
            buf.ensure(data.nbytes)
            buf.host[:data.nbytes] = data
            if data.nbytes:
                _cuda.check(rt.cudaMemcpyAsync(buf.dev_ptr, buf.host_ptr, data.nbytes, h2d, stream))
            ctx.set_tensor_address(spec.name, buf.dev_ptr)
        shapes = {}
        for spec in self.outputs:
            shape = tuple(int(d) for d in ctx.get_tensor_shape(spec.name))
            if any(d < 0 for d in shape):
                raise EngineError(f"{self.plan_path}: TensorRT could not infer the shape of output {spec.name!r} "
                                  f"({list(shape)}) from the inputs")
            shapes[spec.name] = shape
            buf = self._buffers[spec.name]
            buf.ensure(_nbytes(shape, self._dtypes[spec.name]))
            ctx.set_tensor_address(spec.name, buf.dev_ptr)
        if not ctx.execute_async_v3(int(stream)):
            raise EngineError(f"{self.plan_path}: TensorRT execution failed (see the TensorRT log above)")
        for spec in self.outputs:
            buf, nbytes = self._buffers[spec.name], _nbytes(shapes[spec.name], self._dtypes[spec.name])
            if nbytes:
                _cuda.check(rt.cudaMemcpyAsync(buf.host_ptr, buf.dev_ptr, nbytes, d2h, stream))
        _cuda.check(rt.cudaStreamSynchronize(stream))
        result = {}
        for spec in self.outputs:
            shape, dtype = shapes[spec.name], self._dtypes[spec.name]
            raw = self._buffers[spec.name].host[:_nbytes(shape, dtype)]
            if dtype is BF16:
                result[spec.name] = _from_bf16(raw.view(np.uint16).reshape(shape))
            else:
                result[spec.name] = raw.view(dtype).reshape(shape).copy()  # the pinned buffer is reused
        return result

    # -- describe / close -----------------------------------------------------------------------
    def _describe_runtime(self) -> str:
        return f"TensorRT {self._trt.__version__}, plan {self.plan_path}"

    def _describe_device(self) -> str:
        return f"{devices.device_name(self.device_id)} (cuda:{self.device_id})"

    def _release(self) -> None:
        rt = getattr(self, "_rt", None)
        if self._stream is not None and rt is not None:
            try:
                rt.cudaStreamSynchronize(self._stream)
            finally:
                for buf in self._buffers.values():
                    buf.free()
                rt.cudaStreamDestroy(self._stream)
        self._buffers = {}
        self._stream = None
        self._context = None  # context before engine before runtime
        self._engine = None
        self._runtime = None


class _Buffer:
    """A page-locked host buffer and a device buffer of the same capacity (bytes)."""

    def __init__(self, rt):
        self._rt = rt
        self.host_ptr = 0
        self.dev_ptr = 0
        self.capacity = 0
        self.host: np.ndarray | None = None

    def ensure(self, nbytes: int) -> None:
        if nbytes <= self.capacity and self.dev_ptr:
            return
        self.free()
        size = max(int(nbytes), 256)
        self.host_ptr = int(_cuda.check(self._rt.cudaMallocHost(size)))
        try:
            self.dev_ptr = int(_cuda.check(self._rt.cudaMalloc(size)))
        except _cuda.CudaError as exc:
            self.free()
            raise EngineError(f"cannot allocate {size / 2**20:.0f} MiB on the GPU ({exc}); use a smaller batch") from None
        self.host = np.ctypeslib.as_array((ctypes.c_uint8 * size).from_address(self.host_ptr))
        self.capacity = size

    def free(self) -> None:
        self.host = None
        if self.host_ptr:
            self._rt.cudaFreeHost(self.host_ptr)
        if self.dev_ptr:
            self._rt.cudaFree(self.dev_ptr)
        self.host_ptr = self.dev_ptr = 0
        self.capacity = 0


def _np_dtype(trt, dt):
    table = {}
    for name, np_type in (("FLOAT", np.float32), ("HALF", np.float16), ("INT8", np.int8), ("UINT8", np.uint8),
                          ("INT32", np.int32), ("INT64", np.int64), ("BOOL", np.bool_)):
        member = getattr(trt.DataType, name, None)
        if member is not None:
            table[member] = np.dtype(np_type)
    bf16 = getattr(trt.DataType, "BF16", None)
    if bf16 is not None and dt == bf16:
        return BF16
    if dt in table:
        return table[dt]
    raise EngineError(f"TensorRT tensor type {dt} is not supported by hexfast's trt backend")


def _nbytes(shape, dtype) -> int:
    itemsize = 2 if dtype is BF16 else np.dtype(dtype).itemsize
    return int(np.prod(shape, dtype=np.int64)) * itemsize


def _to_bf16(array: np.ndarray) -> np.ndarray:
    """float32 → bfloat16 bits (round to nearest even) as uint16."""
    bits = np.ascontiguousarray(array, np.float32).view(np.uint32)
    rounded = bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    return (rounded >> np.uint32(16)).astype(np.uint16)


def _from_bf16(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


def _major(version: str) -> int:
    try:
        return int(str(version).split(".")[0])
    except ValueError:
        return 0


def _read_meta(path: Path) -> dict:
    if not path.is_file():
        raise ModelFileError(path, "missing: a plan is loaded only with the record build-engines writes beside it "
                                   "(its sha256); rebuild the plan with `hexfast build-engines`")
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelFileError(path, f"unreadable plan description ({one_line(exc)})") from None
    if not isinstance(meta, dict):
        raise ModelFileError(path, "is not a plan description (a JSON object)")
    return meta


def _checked_plan(plan: Path, meta: dict, model_sha256: str | None) -> bytes:
    """The plan's bytes, after checking them against the sha256 its record gives, and the record's
    model against the ONNX it is loaded for."""
    recorded = meta.get("plan_sha256")
    if not isinstance(recorded, str) or not recorded:
        raise ModelFileError(plan, "has no recorded sha256 (built by an older hexfast?); rebuild it with "
                                   "`hexfast build-engines`")
    built_for = meta.get("model_sha256")
    if model_sha256 is not None and built_for != model_sha256:
        raise ModelFileError(plan, f"was built for another model (ONNX sha256 {str(built_for)[:12]}…, this one is "
                                   f"{model_sha256[:12]}…); rebuild it with `hexfast build-engines`")
    return ListedFile(plan, recorded, recorded_by="build-engines' record").read()


def _names(entries) -> list[str] | None:
    if not isinstance(entries, list):
        return None
    return [e["name"] if isinstance(e, dict) else str(e) for e in entries]


def _check_meta_names(meta: dict, plan: Path, inputs: list[str], outputs: list[str]) -> None:
    for key, actual in (("inputs", inputs), ("outputs", outputs)):
        listed = _names(meta.get(key))
        if listed is not None and sorted(listed) != sorted(actual):
            raise ModelFileError(plan, f"plan {key} {actual} differ from its JSON's {listed}; rebuild the plan")
