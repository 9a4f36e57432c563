"""torch backend: runs a torch.export program (`.pt2`), not the ONNX file.

torch cannot execute ONNX, and converting ONNX graphs to torch (onnx2torch and the like) is a
heavy, lossy dependency. So the torch backend runs the model's own torch.export program, saved
with `torch.export.save` beside the ONNX file as `<onnx stem>.pt2` (or passed directly as a
`.pt2` path). Where the bundle has none, asking for `torch` is a one-line error saying so, and
`auto` never considers it. It runs on CUDA (`cuda:<device_id>`) when torch sees a GPU, else on the
CPU (explicit `torch` only: useful for parity checks, never picked by `auto`); fp16 / bf16 through
torch.autocast. torch is imported only when this backend is chosen.

Output names: a program that returns a dict names its outputs; one that returns a tuple takes
the names of the ONNX file beside it (read with `onnx`, if installed), else output0, output1, ...
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path

import numpy as np

from . import devices
from .base import Engine, TensorSpec, check_model_file
from .errors import BackendUnavailable, ModelFileError, one_line

PRECISIONS = ("fp32", "fp16", "bf16")


def program_path(model_path) -> Path:
    """The torch.export program for a model: the path itself if it is a .pt2, else `<stem>.pt2` beside it."""
    path = Path(model_path)
    return path if path.suffix == ".pt2" else path.with_suffix(".pt2")


def installed() -> bool:
    return importlib.util.find_spec("torch") is not None


def cuda_build_and_gpu() -> bool:
    """torch is installed, is not a CPU-only / ROCm build, and the driver sees a GPU: decided
    without importing torch (its version string says the build)."""
    if not installed():
        return False
    try:
        version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return False
    return "+cpu" not in version and "+rocm" not in version and devices.device_count() > 0


def problem(model_path, backend: str = "torch") -> BackendUnavailable | None:
    if not installed():
        return BackendUnavailable(backend, "needs torch (pip install torch, from the index that matches the machine)")
    program = program_path(model_path)
    if not program.is_file():
        return BackendUnavailable(backend, f"needs a torch.export program at {program} (torch cannot run the ONNX "
                                           f"file, and this bundle has no .pt2); use ort-* or trt")
    return None


class TorchEngine(Engine):
    backend = "torch"

    def __init__(self, model_path, *, precision: str = "fp32", threads=None, device_id: int = 0):
        missing = problem(model_path)
        if missing is not None:
            raise missing
        program = check_model_file(program_path(model_path), "torch.export program")
        super().__init__(program, precision)
        import torch

        self._torch = torch
        if threads:
            torch.set_num_threads(int(threads))
        self.device = torch.device(f"cuda:{int(device_id)}" if torch.cuda.is_available() else "cpu")
        try:
            exported = torch.export.load(str(program))
        except Exception as exc:  # noqa: BLE001 - torch raises many types for a bad archive
            raise ModelFileError(program, f"not a loadable torch.export program ({one_line(exc)})") from None
        self._module = exported.module().to(self.device)
        self._autocast = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)

        user_inputs = list(exported.graph_signature.user_inputs)
        placeholders = {n.name: n for n in exported.graph.nodes if n.op == "placeholder"}
        specs = []
        for name in user_inputs:
            meta = placeholders[name].meta.get("val") if name in placeholders else None
            dtype = np.dtype(str(meta.dtype).removeprefix("torch.")) if meta is not None else None
            shape = tuple(int(d) if isinstance(d, int) else None for d in meta.shape) if meta is not None else ()
            specs.append(TensorSpec(name, dtype, shape))
        self.inputs = tuple(specs)
        self._output_names = _onnx_output_names(Path(model_path)) if Path(model_path).suffix != ".pt2" else None
        n_out = len(exported.graph_signature.user_outputs)
        names = self._output_names or [f"output{i}" for i in range(n_out)]
        self.outputs = tuple(TensorSpec(name, None, ()) for name in names)
        self._names_from_dict = False

    def _run(self, feeds):
        torch = self._torch
        args = [torch.from_numpy(feeds[spec.name]).to(self.device, non_blocking=False) for spec in self.inputs]
        with torch.inference_mode():
            if self._autocast is not None:
                with torch.autocast(self.device.type, dtype=self._autocast):
                    out = self._module(*args)
            else:
                out = self._module(*args)
        if isinstance(out, dict):
            if not self._names_from_dict:
                self.outputs = tuple(TensorSpec(str(k), None, ()) for k in out)
                self._names_from_dict = True
            items = [(str(k), v) for k, v in out.items()]
        else:
            values = list(out) if isinstance(out, (tuple, list)) else [out]
            items = list(zip(self.output_names, values))
        return {k: _host(v) for k, v in items}

    def _describe_runtime(self) -> str:
        return f"torch {self._torch.__version__}, torch.export program {self.model_path}"

    def _describe_device(self) -> str:
        if self.device.type == "cuda":
            return f"{self._torch.cuda.get_device_name(self.device)} ({self.device})"
        return f"{devices.cpu_name()} (cpu, {self._torch.get_num_threads()} threads)"

    def _release(self) -> None:
        self._module = None


def _host(tensor) -> np.ndarray:
    import torch

    tensor = tensor.detach()
    if tensor.dtype in (torch.float16, torch.bfloat16):
        tensor = tensor.float()
    return tensor.cpu().numpy()


def _onnx_output_names(onnx_path: Path) -> list[str] | None:
    if not onnx_path.is_file() or importlib.util.find_spec("onnx") is None:
        return None
    import onnx

    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception:  # noqa: BLE001 - names are a nicety; fall back to output0..
        return None
    return [o.name for o in model.graph.output]
