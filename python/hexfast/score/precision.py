"""The precision HEX runs at: on a GPU as asked, on a CPU what the CPU computes fast and the bundle's export
measured as faithful.

A bundle's export writes CPU variants of HEX with their fidelity against fp32 (manifest
models.hex.cpu_variants, see hexfast_export.cpu_variants): int8 (hex.int8.onnx, ONNX Runtime) and bf16
(the bf16 torch program, torch on the CPU). On a CPU:

    fp32   the fp32 ONNX graph (ort-cpu)
    int8   needs VNNI (AVX512-VNNI, AVX-VNNI) or AMX-INT8 to be fast; runs on plain AVX2 too
    bf16   needs AVX512-BF16 or AMX-BF16: elsewhere it is emulated and slower than fp32, so it is refused
           (where the system lists no CPU features, e.g. not Linux, a precision asked for by name runs unchecked)
    auto   bf16 where it is fast, torch is installed and its variant is fit; else int8 where it is fast and fit;
           else fp32. An unfit variant (a marker below the export's Pearson floor) is never picked by auto;
           asked for by name, it runs with a warning.

On a GPU, fp32 / fp16 / bf16 go to the GPU backends as before, and auto means fp32.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ..bundle import Bundle, MissingModelError
from ..engines import BackendUnavailable, EngineError
from ..engines import torch_backend as _torch
from ..engines.devices import cpu_flags, cpu_name, gpu_name

log = logging.getLogger("hexfast.score")

CHOICES = ("auto", "fp32", "fp16", "bf16", "int8")
FAST = {"bf16": ("amx_bf16", "avx512_bf16"), "int8": ("amx_int8", "avx512_vnni", "avx_vnni")}
RUNS = {"bf16": FAST["bf16"], "int8": (*FAST["int8"], "avx2")}
UNITS = {"bf16": "AVX512-BF16 or AMX-BF16", "int8": "AVX512-VNNI, AVX-VNNI or AMX-INT8"}


@dataclass(frozen=True)
class HexPrecision:
    """What HEX runs at: the precision, the backend for the HEX engine, the bundle's record of the CPU
    variant (None for fp32 and the GPU precisions), and why, in one line."""

    precision: str
    backend: str
    variant: dict | None
    why: str

    def describe(self) -> dict:
        """What report.json and the h5 say of it."""
        out = {"precision": self.precision, "backend": self.backend, "chosen": self.why}
        if self.variant is not None:
            out |= {"runtime": self.variant.get("runtime"), "fit": self.variant.get("fit"),
                    "fidelity": {k: v for k, v in self.variant.get("fidelity", {}).items() if k != "markers_pearson"}}
        return out


def on_cpu(backend: str) -> bool:
    """Whether HEX runs on the CPU with this backend choice."""
    return backend == "ort-cpu" or (backend in ("auto", "torch") and gpu_name() is None)


def choose(bundle: Bundle, backend: str, precision: str) -> HexPrecision:
    """The HexPrecision for `precision` (one of CHOICES) with `backend`; a one-line error when the CPU or
    the bundle cannot run it."""
    if precision not in CHOICES:
        raise EngineError(f"precision {precision!r} is not one of {', '.join(CHOICES)}")
    if not on_cpu(backend):
        if precision == "int8":
            raise EngineError("int8 is HEX's CPU variant; on a GPU ask for fp16 or bf16 (trt, ort-trt, torch)")
        return HexPrecision("fp32" if precision == "auto" else precision, backend, None, "asked for, on the GPU")
    if precision == "fp16":
        raise EngineError("fp16 runs on a GPU; on a CPU ask for int8 or bf16 (or auto)")
    if precision == "fp32":
        return HexPrecision("fp32", backend, None, "asked for")
    flags = cpu_flags()
    variants = bundle.model("hex").get("cpu_variants", {})
    if precision == "auto":
        return _auto(backend, variants, flags)
    variant = variants.get(precision)
    if variant is None:
        raise MissingModelError(bundle.path / "manifest.json", f"the bundle has no {precision} CPU variant of HEX; "
                                                               f"export it again (hexfast export writes int8 and bf16)")
    missing = _cannot_run(precision, flags) if flags else None  # no flags to read (not Linux): as asked
    if missing:
        raise EngineError(missing)
    if precision == "bf16" and not _torch.installed():
        raise BackendUnavailable("torch", "runs HEX's bf16 CPU variant and is not installed (pip install torch, "
                                          "the CPU build); or use --precision int8")
    why = "asked for"
    if not flags:
        why += " (this system does not list the CPU's features: not checked)"
    elif not any(f in flags for f in FAST[precision]):
        why += f" (slow here: this CPU has no {UNITS[precision]})"
    if not variant.get("fit"):
        figure = variant.get("fidelity", {}).get("markers_pearson_min")
        log.warning("HEX %s variant is marked unfit by its export (a marker's Pearson r vs fp32 %s, below %s): "
                    "its markers may differ from fp32's", precision, figure,
                    variant.get("floor", {}).get("markers_pearson_min"))
        why += ", marked unfit by its export"
    return HexPrecision(precision, _backend_for(precision, backend), variant, why)


def _auto(backend: str, variants: dict, flags: frozenset[str]) -> HexPrecision:
    skipped = []
    for precision in ("bf16", "int8"):
        variant = variants.get(precision)
        if variant is None:
            skipped.append(f"no {precision} variant in the bundle")
        elif not any(f in flags for f in FAST[precision]):
            skipped.append(f"{precision}: no {UNITS[precision]} on this CPU")
        elif not variant.get("fit"):
            skipped.append(f"{precision}: marked unfit by its export")
        elif precision == "bf16" and not _torch.installed():
            skipped.append("bf16: torch not installed")
        elif precision == "bf16" and backend == "ort-cpu":
            skipped.append("bf16: runs on torch, and --backend ort-cpu was asked for")
        else:
            return HexPrecision(precision, _backend_for(precision, backend), variant,
                                f"auto: {precision} is fast on this CPU and fit")
    return HexPrecision("fp32", backend, None, "auto: fp32 (" + "; ".join(skipped) + ")")


def _cannot_run(precision: str, flags: frozenset[str]) -> str | None:
    if any(f in flags for f in RUNS[precision]):
        return None
    if precision == "bf16":
        return (f"bf16 on this CPU ({cpu_name()}) would be emulated: it has neither AVX512-BF16 nor AMX-BF16, so "
                f"bf16 runs slower than fp32; use --precision int8 (or auto, or fp32)")
    return f"int8 needs at least AVX2, and this CPU ({cpu_name()}) has none; use --precision fp32"


def _backend_for(precision: str, backend: str) -> str:
    if precision == "int8":
        if backend == "torch":
            raise EngineError("HEX's int8 CPU variant is an ONNX graph: it runs on ort-cpu, not torch")
        return "ort-cpu"
    if backend == "ort-cpu":
        raise EngineError("HEX's bf16 CPU variant is a torch program: it runs with --backend torch (or auto), "
                          "not ort-cpu")
    return "torch"
