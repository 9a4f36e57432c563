"""What this machine runs on, without torch: the CUDA driver probed through ctypes (is there a GPU,
what is it called) and the CPU's model name. The one place hexfast names its devices: engine
descriptions, TensorRT plan keys and benchmark reports all ask here.

The probe loads libcuda (the driver, present wherever a GPU is usable) and calls cuInit,
cuDeviceGetCount and cuDeviceGetName; nothing else is initialised. Where the library is absent or
cuInit fails (no GPU, no driver, a container without the GPU mounted) there are 0 devices. The
driver numbers the devices CUDA_VISIBLE_DEVICES leaves visible, as every CUDA program sees them.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
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


@functools.cache
def device_name(device_id: int = 0) -> str:
    """The GPU's marketing name, e.g. 'NVIDIA H100 80GB HBM3', or 'CUDA device N' if unknown."""
    lib = _driver()
    if lib is not None:
        dev = ctypes.c_int(0)
        buf = ctypes.create_string_buffer(256)
        if lib.cuDeviceGet(ctypes.byref(dev), int(device_id)) == 0 and lib.cuDeviceGetName(buf, 256, dev) == 0:
            return buf.value.decode(errors="replace")
    return f"CUDA device {device_id}"


def gpu_name() -> str | None:
    """The name of the first visible GPU, or None when there is none."""
    return device_name(0) if device_count() > 0 else None


@functools.lru_cache(maxsize=1)
def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else platform's guess."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "CPU"


CPU_FLAGS_ENV = "HEXFAST_CPU_FLAGS"  # another CPU's flags, space-separated: for tests of what a CPU may run


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux names them (avx2, avx512_vnni, avx512_bf16, amx_bf16, amx_int8, ...);
    empty where /proc/cpuinfo is not there."""
    override = os.environ.get(CPU_FLAGS_ENV)
    if override is not None:
        return frozenset(override.replace(",", " ").split())
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()
