"""torch backend: runs a torch.export program (`.pt2`), not the ONNX file.

torch cannot execute ONNX, and converting ONNX graphs to torch (onnx2torch and the like) is a
heavy, lossy dependency. So the torch backend runs the model's own torch.export program. A
bundle's program is the one its manifest lists (`programs`), loaded from the bytes checked against
the manifest's sha256: `torch.export.load` unpickles parts of the archive, so a .pt2 is code, and
no file that merely lies beside the ONNX is ever opened. Given a plain `.pt2` path instead (your
own file), it loads that. It runs on CUDA (`cuda:<device_id>`) when torch sees a GPU, else on the
CPU (explicit `torch` only: useful for parity checks, never picked by `auto`); fp16 / bf16 through
torch.autocast. torch is imported only when this backend is chosen.

Output names: a program that returns a dict names its outputs; one that returns a tuple takes
`output_names` (a bundle gives its manifest's), else output0, output1, ...
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import io
import os

import numpy as np

from ..bundle import ListedFile
from . import devices
from .base import Engine, TensorSpec, check_model_file
from .errors import BackendUnavailable, ModelFileError, one_line

PRECISIONS = ("fp32", "fp16", "bf16")


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


def problem(program, backend: str = "torch") -> BackendUnavailable | None:
    """Why the torch backend cannot run `program` (a bundle's ListedFile, a .pt2 path, or None)."""
    if not installed():
        return BackendUnavailable(backend, "needs torch (pip install torch, from the index that matches the machine)")
    if program is None:
        return BackendUnavailable(backend, "needs a torch.export program (.pt2) the bundle's manifest lists, and this "
                                           "bundle lists none for the model (torch cannot run ONNX); use ort-* or trt")
    return None


class TorchEngine(Engine):
    backend = "torch"

    def __init__(self, program: str | os.PathLike | ListedFile | None, *, precision: str = "fp32", threads=None,
                 device_id: int = 0, output_names: list[str] | None = None):
        missing = problem(program)
        if missing is not None:
            raise missing
        listed = program if isinstance(program, ListedFile) else None
        path = check_model_file(listed.path if listed else program, "torch.export program")
        super().__init__(path, precision)
        import torch

        self._torch = torch
        if threads:
            torch.set_num_threads(int(threads))
        self.device = torch.device(f"cuda:{int(device_id)}" if torch.cuda.is_available() else "cpu")
        source = io.BytesIO(listed.read()) if listed else str(path)
        try:
            exported = torch.export.load(source)
        except Exception as exc:  # noqa: BLE001 - torch raises many types for a bad archive
            raise ModelFileError(path, f"not a loadable torch.export program ({one_line(exc)})") from None
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
        n_out = len(exported.graph_signature.user_outputs)
        names = list(output_names) if output_names else [f"output{i}" for i in range(n_out)]
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
