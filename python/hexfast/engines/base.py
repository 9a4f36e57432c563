"""The Engine interface every backend implements, and the input checks they share."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import EngineClosedError, EngineError

log = logging.getLogger("hexfast.engines")

PRECISIONS = ("fp32", "fp16", "bf16", "int8")  # int8: a graph quantized at export, run as it is


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output: name, numpy dtype (None if unknown), shape (int, or None / a
    name for a dynamic dimension)."""

    name: str
    dtype: np.dtype | None
    shape: tuple

    def describe(self) -> str:
        dims = ", ".join(str(d) if isinstance(d, int) else (d or "?") for d in self.shape)
        return f"{self.dtype if self.dtype is not None else '?'} [{dims}]"


class Engine:
    """A loaded model on one backend. `run` takes and returns host numpy arrays, synchronously.

    Not re-entrant across threads at the same time (GPU backends reuse their buffers): calls from
    several threads are serialised by a lock."""

    backend: str = "?"

    def __init__(self, model_path: str | os.PathLike, precision: str):
        self.model_path = Path(model_path)
        self.precision = precision
        self.inputs: tuple[TensorSpec, ...] = ()
        self.outputs: tuple[TensorSpec, ...] = ()
        self._closed = False
        self._lock = threading.Lock()

    # -- public API -------------------------------------------------------------------------
    @property
    def input_names(self) -> list[str]:
        return [spec.name for spec in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [spec.name for spec in self.outputs]

    @property
    def closed(self) -> bool:
        return self._closed

    def describe(self) -> str:
        """One line for logs and reports: backend, runtime and providers, precision, device."""
        return f"{self.backend}: {self._describe_runtime()}, {self.precision}, {self._describe_device()}"

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Inputs by name → outputs by name (host numpy arrays, owned by the caller)."""
        if self._closed:
            raise EngineClosedError(f"{self.backend} engine for {self.model_path} is closed; create a new one to run")
        checked = self._check_feeds(feeds)
        empty = self._empty_result(checked)
        if empty is not None:
            return empty
        with self._lock:
            if self._closed:
                raise EngineClosedError(f"{self.backend} engine for {self.model_path} is closed; create a new one to run")
            return self._run(checked)

    def submit(self, feeds: Mapping[str, np.ndarray]):
        """Start one batch; `collect(handle)` returns its outputs. An engine that can overlap the
        transfer and the compute with the caller's work (torch on CUDA) returns at once; the others
        run the batch here. Submit the next batch before collecting this one to keep a GPU busy."""
        return self.run(feeds)

    def collect(self, handle) -> dict[str, np.ndarray]:
        return handle

    def __call__(self, *args, **feeds) -> dict[str, np.ndarray]:
        """engine(tiles) for a one-input model, or engine(name=array, ...)."""
        if args:
            if len(args) != 1 or feeds or len(self.inputs) != 1:
                raise EngineError(f"{self.model_path}: call the engine with one array only for a one-input model; "
                                  f"this one takes {', '.join(self.input_names)} (use run({{name: array}}))")
            feeds = {self.inputs[0].name: args[0]}
        return self.run(feeds)

    def close(self) -> None:
        """Release the session / device memory. Safe to call more than once."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._release()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            if not self._closed:
                self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown; nothing useful to report
            pass

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<{type(self).__name__} {self.backend} {self.model_path.name} {self.precision} {state}>"

    # -- for backends -------------------------------------------------------------------------
    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _release(self) -> None:
        pass

    def _describe_runtime(self) -> str:
        return "?"

    def _describe_device(self) -> str:
        return "?"

    def _check_feeds(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not isinstance(feeds, Mapping):
            raise EngineError(f"{self.model_path}: run() takes a dict of input name → array "
                              f"({', '.join(self.input_names)}), got {type(feeds).__name__}")
        expected = self.input_names
        missing = [name for name in expected if name not in feeds]
        unknown = [name for name in feeds if name not in expected]
        if missing or unknown:
            parts = []
            if missing:
                parts.append(f"missing input {', '.join(map(repr, missing))}")
            if unknown:
                parts.append(f"unknown input {', '.join(map(repr, unknown))}")
            raise EngineError(f"{self.model_path}: {'; '.join(parts)} (the model takes {', '.join(map(repr, expected))})")
        checked = {}
        for spec in self.inputs:
            array = np.asarray(feeds[spec.name])
            if spec.dtype is not None and array.dtype != spec.dtype:
                raise EngineError(f"{self.model_path}: input {spec.name!r} is {array.dtype} {list(array.shape)}; "
                                  f"the model takes {spec.describe()}")
            if spec.shape and (array.ndim != len(spec.shape) or any(
                    isinstance(d, int) and d >= 0 and d != n for d, n in zip(spec.shape, array.shape))):
                raise EngineError(f"{self.model_path}: input {spec.name!r} has shape {list(array.shape)}; "
                                  f"the model takes {spec.describe()}")
            checked[spec.name] = np.ascontiguousarray(array)
        return checked

    def _empty_result(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray] | None:
        """A zero-size batch of a one-input model whose outputs are [batch, fixed...]: empty outputs,
        without asking the backend (TensorRT profiles start at batch 1)."""
        if len(self.inputs) != 1:
            return None
        array = feeds[self.inputs[0].name]
        if array.ndim == 0 or array.shape[0] != 0:
            return None
        result = {}
        for spec in self.outputs:
            rest = spec.shape[1:]
            if spec.dtype is None or not spec.shape or not all(isinstance(d, int) and d >= 0 for d in rest):
                return None
            result[spec.name] = np.zeros((0, *rest), spec.dtype)
        return result


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise EngineError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    return precision


def check_model_file(path: str | os.PathLike, what: str = "ONNX model") -> Path:
    """The path, if it is a readable file; a one-line ModelFileError naming it otherwise."""
    from .errors import ModelFileError

    path = Path(path)
    if not path.exists():
        raise ModelFileError(path, f"no such {what} file")
    if path.is_dir():
        raise ModelFileError(path, f"is a directory, not the {what} file")
    if not os.access(path, os.R_OK):
        raise ModelFileError(path, f"{what} file is not readable (permissions)")
    if path.stat().st_size == 0:
        raise ModelFileError(path, f"{what} file is empty")
    return path
