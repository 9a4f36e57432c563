"""ONNX Runtime backends: ort-cpu, ort-cuda (CUDA execution provider), ort-trt (TensorRT
execution provider).

* ort-cpu: numpy in, numpy out (`InferenceSession.run`); `threads` → intra_op_num_threads;
  graph optimisation level ORT_ENABLE_ALL.
* ort-cuda / ort-trt: IOBinding. Each input lives in a device OrtValue that is kept while the
  input's shape stays the same and refilled in place (`update_inplace`: one host→device copy per
  run, no allocation); outputs of shape [batch, fixed...] go to device OrtValues kept per batch size
  (others are bound by device and allocated by ORT); one device→host copy per output at the end.
* ort-trt: TensorRT EP with its engine cache and timing cache in `plan_dir` (default
  ~/.cache/hexfast/ort-trt/<the ONNX file's sha256[:16]>: the EP names its cached engines after
  the graph's structure, not its weights, so two models of one architecture must never share a
  cache), fp16 / bf16 via trt_fp16_enable / trt_bf16_enable. TensorRT EP builds
  an engine for the range of shapes it has seen and rebuilds (minutes for a ViT-L) when a shape
  falls outside it, so for a one-input model a batch smaller than the largest seen at that tile
  size is zero-padded up to it and the outputs cut back: a slide's short last batch costs no rebuild.

A bundle's model comes as a ListedFile: the session is built from the bytes read() checked against
the manifest, after refusing any graph that keeps tensors in external data files (ONNX Runtime
would read those by path, unhashed). A plain path (your own file) is loaded as ONNX Runtime loads it.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import numpy as np

from ..bundle import ListedFile
from ..files import sha256_file
from . import devices
from .base import Engine, TensorSpec, check_model_file
from .errors import BackendUnavailable, EngineError, ModelFileError, one_line
from .onnx_external import single_file_onnx

PROVIDER = {
    "ort-trt": "TensorrtExecutionProvider",
    "ort-cuda": "CUDAExecutionProvider",
    "ort-cpu": "CPUExecutionProvider",
}
PRECISIONS = {"ort-trt": ("fp32", "fp16", "bf16"), "ort-cuda": ("fp32",), "ort-cpu": ("fp32", "int8")}

_NEEDS_PACKAGE = {
    "ort-cpu": "needs onnxruntime (pip install onnxruntime; on a CUDA machine onnxruntime-gpu instead, never both)",
    "ort-cuda": "needs onnxruntime-gpu (pip install onnxruntime-gpu; do not install it beside onnxruntime)",
    "ort-trt": "needs onnxruntime-gpu and TensorRT 10 (pip install onnxruntime-gpu tensorrt; "
               "do not install onnxruntime-gpu beside onnxruntime)",
}

_ORT_TYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(uint8)": np.uint8, "tensor(int8)": np.int8, "tensor(uint16)": np.uint16, "tensor(int16)": np.int16,
    "tensor(int32)": np.int32, "tensor(int64)": np.int64, "tensor(uint32)": np.uint32, "tensor(uint64)": np.uint64,
    "tensor(bool)": np.bool_,
}

# Exception class names ONNX Runtime raises for a file it cannot use as a model.
_MODEL_FAILURES = {"InvalidProtobuf", "InvalidGraph", "NoSuchFile", "NotImplemented", "InvalidArgument"}


def import_ort():
    """onnxruntime, imported on first use (ImportError where it is not installed)."""
    return importlib.import_module("onnxruntime")


def problem(backend: str) -> BackendUnavailable | None:
    """Why `backend` cannot run on this machine, or None if it can (as far as can be told without
    a model: ONNX Runtime may still fail to load its CUDA / TensorRT libraries at session start)."""
    try:
        ort = import_ort()
    except ImportError:
        return BackendUnavailable(backend, _NEEDS_PACKAGE[backend])
    if backend == "ort-cpu":
        return None
    if PROVIDER[backend] not in ort.get_available_providers():
        return BackendUnavailable(backend, _NEEDS_PACKAGE[backend])
    if devices.device_count() == 0:
        return BackendUnavailable(backend, "needs an NVIDIA GPU with its driver; onnxruntime-gpu is installed "
                                           "but no CUDA device is visible")
    return None


def trt_cache_dir(model_sha256: str) -> Path:
    """ort-trt's engine and timing caches for one ONNX file, by its content."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "hexfast" / "ort-trt" / model_sha256[:16]


class OrtEngine(Engine):
    def __init__(self, model: str | os.PathLike | ListedFile, backend: str, *, precision: str = "fp32",
                 plan_dir=None, threads=None, device_id: int = 0, iobinding_device: str | None = None):
        """`iobinding_device` overrides where IOBinding buffers live ("cuda" for the GPU backends, the
        default; "cpu" lets the tests exercise the IOBinding path on a CPU-only machine)."""
        listed = model if isinstance(model, ListedFile) else None
        super().__init__(listed.path if listed else model, precision)
        self.backend = backend
        self.threads = threads
        self.device_id = int(device_id)
        self.cache_dir: Path | None = None
        missing = problem(backend)
        if missing is not None:
            raise missing
        if precision not in PRECISIONS[backend]:
            raise EngineError(f"{backend} runs the ONNX graph as exported (fp32, or the int8 graph an export "
                              f"quantized); {precision} needs trt, ort-trt or torch")
        check_model_file(self.model_path)
        source = str(self.model_path) if listed is None else single_file_onnx(listed)
        self._ort = ort = import_ort()

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # errors only; a provider fallback is detected and reported below
        if threads:
            options.intra_op_num_threads = int(threads)
        if backend == "ort-cpu":
            # The arena keeps the high-water mark of every batch's activations
            # (measured: 1.5 GB vs 0.84 GB peak RSS for the demo model at batch
            # 64, same speed); large buffers come straight from malloc instead.
            options.enable_cpu_mem_arena = False
        providers = self._providers(plan_dir, listed)
        try:
            self.session = ort.InferenceSession(source, options, providers=providers)
        except Exception as exc:  # noqa: BLE001 - ORT's pybind exceptions have no common public base
            if backend == "ort-cpu" or type(exc).__name__ in _MODEL_FAILURES:
                raise ModelFileError(self.model_path, f"not a usable ONNX model ({one_line(exc)})") from None
            raise BackendUnavailable(backend, f"could not start on {self.model_path} ({one_line(exc)})") from None
        active = self.session.get_providers()
        if active[0] != PROVIDER[backend]:
            self.session = None
            raise BackendUnavailable(backend, f"could not start {PROVIDER[backend]}: ONNX Runtime fell back to "
                                              f"{active[0]} (check the CUDA, cuDNN and TensorRT libraries "
                                              f"onnxruntime-gpu needs)")

        self.inputs = tuple(TensorSpec(i.name, _np_dtype(i.type), tuple(_dim(d) for d in i.shape))
                            for i in self.session.get_inputs())
        self.outputs = tuple(TensorSpec(o.name, _np_dtype(o.type), tuple(_dim(d) for d in o.shape))
                             for o in self.session.get_outputs())

        self._device = iobinding_device or ("cuda" if backend in ("ort-cuda", "ort-trt") else None)
        self._binding = self.session.io_binding() if self._device else None
        self._in_values: dict[str, object] = {}      # input name → device OrtValue (reused while shape is unchanged)
        self._out_values: dict[tuple, object] = {}   # (output name, shape) → device OrtValue
        self._largest: dict[tuple, int] = {}         # per-sample shape → largest batch seen (ort-trt padding)
        self.pad_batches = backend == "ort-trt" and len(self.inputs) == 1

    def _providers(self, plan_dir, listed: ListedFile | None) -> list:
        if self.backend == "ort-cpu":
            return ["CPUExecutionProvider"]
        cuda = ("CUDAExecutionProvider", {"device_id": self.device_id})
        if self.backend == "ort-cuda":
            return [cuda, "CPUExecutionProvider"]
        if plan_dir is not None:
            self.cache_dir = Path(plan_dir)
        else:
            self.cache_dir = trt_cache_dir(listed.sha256 if listed else sha256_file(self.model_path))
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise EngineError(f"{self.cache_dir}: cannot create the TensorRT engine cache ({one_line(exc)})") from None
        trt = {
            "device_id": self.device_id,
            "trt_fp16_enable": self.precision == "fp16",
            "trt_bf16_enable": self.precision == "bf16",
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(self.cache_dir),
            "trt_timing_cache_enable": True,
            "trt_timing_cache_path": str(self.cache_dir),
        }
        if self.precision != "bf16":
            del trt["trt_bf16_enable"]  # older onnxruntime-gpu builds reject the key
        return [("TensorrtExecutionProvider", trt), cuda, "CPUExecutionProvider"]

    # -- run ----------------------------------------------------------------------------------
    def _run(self, feeds):
        if self._binding is None:
            values = self.session.run(self.output_names, feeds)
            return dict(zip(self.output_names, values))
        if self.pad_batches:
            return self._run_padded(feeds)
        return self._run_bound(feeds)

    def _run_padded(self, feeds):
        (name, array), = feeds.items()
        if array.ndim == 0:
            return self._run_bound(feeds)
        key = array.shape[1:]
        batch = array.shape[0]
        largest = self._largest.get(key, 0)
        if batch >= largest:
            self._largest[key] = batch
            return self._run_bound(feeds)
        padded = np.zeros((largest, *key), array.dtype)
        padded[:batch] = array
        out = self._run_bound({name: padded})
        return {k: (v[:batch] if v.ndim and v.shape[0] == largest else v) for k, v in out.items()}

    def _run_bound(self, feeds):
        ort, binding, device = self._ort, self._binding, self._device
        binding.clear_binding_inputs()
        binding.clear_binding_outputs()
        for name, array in feeds.items():
            value = self._in_values.get(name)
            if value is not None and tuple(value.shape()) == array.shape and _same_dtype(value, array):
                value.update_inplace(array)
            else:
                # A CPU OrtValue wraps the numpy array rather than copying it: give it its own copy.
                source = array.copy() if device == "cpu" else array
                value = ort.OrtValue.ortvalue_from_numpy(source, device, self.device_id)
                self._in_values[name] = value
            binding.bind_ortvalue_input(name, value)
        batch = next(iter(feeds.values())).shape[0] if feeds and next(iter(feeds.values())).ndim else None
        for spec in self.outputs:
            shape = _batch_shape(spec, batch)
            if shape is None or spec.dtype is None:
                binding.bind_output(spec.name, device, self.device_id)
                continue
            key = (spec.name, shape)
            value = self._out_values.get(key)
            if value is None:
                if len(self._out_values) >= 4 * max(1, len(self.outputs)):
                    self._out_values.clear()  # bounded: a few batch sizes per output
                value = ort.OrtValue.ortvalue_from_shape_and_type(shape, spec.dtype, device, self.device_id)
                self._out_values[key] = value
            binding.bind_ortvalue_output(spec.name, value)
        self.session.run_with_iobinding(binding)
        arrays = binding.copy_outputs_to_cpu()
        return {spec.name: np.array(a, copy=True) if device == "cpu" else a
                for spec, a in zip(self.outputs, arrays)}

    # -- describe / close -----------------------------------------------------------------------
    def _describe_runtime(self) -> str:
        providers = ",".join(self.session.get_providers()) if self.session is not None else "-"
        text = f"onnxruntime {self._ort.__version__}, providers {providers}"
        if self.cache_dir is not None:
            text += f", engine cache {self.cache_dir}"
        return text

    def _describe_device(self) -> str:
        if self.backend == "ort-cpu":
            threads = self.threads or os.cpu_count()
            return f"{devices.cpu_name()} ({threads} threads)"
        return f"{devices.device_name(self.device_id)} (cuda:{self.device_id})"

    def _release(self) -> None:
        self._in_values.clear()
        self._out_values.clear()
        self._binding = None
        self.session = None


def _np_dtype(ort_type: str):
    dtype = _ORT_TYPES.get(ort_type)
    return np.dtype(dtype) if dtype is not None else None


def _dim(d):
    return int(d) if isinstance(d, int) and d >= 0 else (d if isinstance(d, str) else None)


def _batch_shape(spec: TensorSpec, batch: int | None) -> tuple | None:
    """[batch, fixed...] for an output whose first dimension is dynamic and the rest fixed."""
    if batch is None or not spec.shape or isinstance(spec.shape[0], int):
        return None
    rest = spec.shape[1:]
    if not all(isinstance(d, int) for d in rest):
        return None
    return (batch, *rest)


def _same_dtype(value, array: np.ndarray) -> bool:
    return _ORT_TYPES.get(value.data_type()) == array.dtype.type
