"""cuda-python's runtime bindings, which the native TensorRT backend uses for pinned memory, device
memory and streams (torch is never needed for them)."""

from __future__ import annotations


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
