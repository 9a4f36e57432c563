"""CUDA without torch: a driver probe through ctypes (is there a GPU, what is it called) and the
cuda-python runtime bindings the native TensorRT backend uses for memory and streams.

The probe loads libcuda (the driver, present wherever a GPU is usable) and calls cuInit,
cuDeviceGetCount and cuDeviceGetName; nothing else is initialised. Where the library is absent or
cuInit fails (no GPU, no driver, a container without the GPU mounted) there are 0 devices.
"""

from __future__ import annotations

import ctypes
import functools
import sys

_DRIVER_NAMES = ("nvcuda.dll",) if sys.platform == "win32" else ("libcuda.so.1", "libcuda.so")


@functools.lru_cache(maxsize=1)
def _driver():
    for name in _DRIVER_NAMES:
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        try:
            if lib.cuInit(0) != 0:
                return None
        except AttributeError:
            return None
        return lib
    return None


@functools.lru_cache(maxsize=1)
def device_count() -> int:
    """CUDA devices the driver sees (0 without a driver or GPU)."""
    lib = _driver()
    if lib is None:
        return 0
    count = ctypes.c_int(0)
    if lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return int(count.value)


@functools.lru_cache(maxsize=None)
def device_name(device_id: int = 0) -> str:
    """The GPU's marketing name, e.g. 'NVIDIA H100 80GB HBM3', or 'CUDA device N' if unknown."""
    lib = _driver()
    if lib is not None:
        dev = ctypes.c_int(0)
        buf = ctypes.create_string_buffer(256)
        if lib.cuDeviceGet(ctypes.byref(dev), int(device_id)) == 0 and lib.cuDeviceGetName(buf, 256, dev) == 0:
            return buf.value.decode(errors="replace")
    return f"CUDA device {device_id}"


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else platform's guess."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine() or "CPU"


def cudart():
    """cuda-python's runtime API module: `cuda.bindings.runtime` (cuda-python >= 12.6), or the older
    `cuda.cudart`. Raises ImportError where neither imports."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        from cuda import cudart as runtime  # cuda-python < 12.6 (removed in 13)
    return runtime


class CudaError(RuntimeError):
    pass


def check(result):
    """Unpack a cuda-python call's (err, *values) tuple; raise CudaError unless err is cudaSuccess.
    Returns None, the one value, or a tuple of values."""
    rt = cudart()
    if isinstance(result, tuple):
        err, values = result[0], result[1:]
    else:
        err, values = result, ()
    if err != rt.cudaError_t.cudaSuccess:
        try:
            name = rt.cudaGetErrorName(err)[1].decode()
            text = rt.cudaGetErrorString(err)[1].decode()
            message = f"{name}: {text}"
        except Exception:  # noqa: BLE001 - the error itself is what matters
            message = str(err)
        raise CudaError(message)
    if not values:
        return None
    return values[0] if len(values) == 1 else values
