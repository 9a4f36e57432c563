"""torch backend: runs a torch.export program (`.pt2`), not the ONNX file.

torch cannot execute ONNX, and converting ONNX graphs to torch (onnx2torch and the like) is a
heavy, lossy dependency. So the torch backend runs the model's own torch.export program
(hexfast_export.torch_export writes one per model, and HEX's also in fp16 / bf16 with the weights
cast). A bundle's program is the one its manifest lists (`programs`), loaded from the bytes checked
against the manifest's sha256: `torch.export.load` unpickles parts of the archive, so a .pt2 is
code, and no file that merely lies beside the ONNX is ever opened. Given a plain `.pt2` path
instead (your own file), it loads that. torch is imported only when this backend is chosen.

On CUDA (`cuda:<device_id>`), what production needs:

* uint8 tiles go through pinned (page-locked) host staging buffers with non-blocking
  host-to-device copies on the engine's own stream, and outputs come back into pinned buffers;
  `submit()` returns once the work is queued, `collect()` waits for it, so a caller can read the
  next batch while the GPU runs this one (two batches in flight, each with its own buffers);
* optional CUDA graphs (`cuda_graphs=True`): each batch shape is captured once, after a warm-up,
  and replayed (measured by benchmarks/device_check.sh, off by default);
* memory is bounded by the largest batch seen (the staging buffers grow, never multiply), and a
  batch that does not fit raises an EngineError naming the largest batch that does, found by
  trying halves.

On the CPU the same program runs (explicit `torch` only: tests and parity checks; `auto` never
picks it there), synchronously.

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
from .errors import BackendUnavailable, EngineError, ModelFileError, one_line

PRECISIONS = ("fp32", "fp16", "bf16")
IN_FLIGHT = 2  # batches queued on the GPU at once, each with its own staging buffers


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
                 device_id: int = 0, output_names: list[str] | None = None, cuda_graphs: bool = False):
        """precision: the program's (its weights were cast when it was exported); it is described,
        not applied."""
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
        self.device = torch.device("cpu")
        if torch.cuda.is_available():
            if not 0 <= int(device_id) < torch.cuda.device_count():
                raise EngineError(f"no CUDA device {device_id}: this machine has {torch.cuda.device_count()} "
                                  f"(0..{torch.cuda.device_count() - 1})")
            self.device = torch.device(f"cuda:{int(device_id)}")
        source = io.BytesIO(listed.read()) if listed else str(path)
        try:
            exported = torch.export.load(source)
        except Exception as exc:  # noqa: BLE001 - torch raises many types for a bad archive
            raise ModelFileError(path, f"not a loadable torch.export program ({one_line(exc)})") from None
        self._module = exported.module().to(self.device)

        placeholders = {n.name: n for n in exported.graph.nodes if n.op == "placeholder"}
        specs = []
        for name in exported.graph_signature.user_inputs:
            meta = placeholders[name].meta.get("val") if name in placeholders else None
            dtype = np.dtype(str(meta.dtype).removeprefix("torch.")) if meta is not None else None
            shape = tuple(int(d) if isinstance(d, int) else None for d in meta.shape) if meta is not None else ()
            specs.append(TensorSpec(name, dtype, shape))
        self.inputs = tuple(specs)
        n_out = len(exported.graph_signature.user_outputs)
        names = list(output_names) if output_names else [f"output{i}" for i in range(n_out)]
        self.outputs = tuple(TensorSpec(name, None, ()) for name in names)
        self._cuda = self.device.type == "cuda"
        self._slots = [_Slot() for _ in range(IN_FLIGHT)] if self._cuda else []
        self._next_slot = 0
        self._stream = torch.cuda.Stream(self.device) if self._cuda else None
        self._graphs: dict | None = {} if cuda_graphs and self._cuda else None

    # -- run: submit then collect ---------------------------------------------------------------
    def _run(self, feeds):
        return self._collect(self._submit(feeds))

    def submit(self, feeds) -> _Pending:
        """Queue one batch on the GPU and return at once (on the CPU: run it); collect() its outputs."""
        checked = self._check_feeds(feeds)
        empty = self._empty_result(checked)
        if empty is not None:
            return _Pending(done=empty)
        with self._lock:
            self._check_open()
            return self._submit(checked)

    def collect(self, pending: _Pending) -> dict[str, np.ndarray]:
        with self._lock:
            return self._collect(pending)

    def _submit(self, feeds) -> _Pending:
        torch = self._torch
        if not self._cuda:
            with torch.inference_mode():
                out = self._module(*(torch.from_numpy(feeds[s.name]) for s in self.inputs))
            return _Pending(done=self._named(out, lambda t: _host(t)))
        slot = self._slots[self._next_slot]
        self._next_slot = (self._next_slot + 1) % len(self._slots)
        slot.wait()  # its previous batch is collected: its buffers are free
        try:
            with torch.cuda.stream(self._stream), torch.inference_mode():
                inputs = [slot.stage(torch, s.name, feeds[s.name], self.device) for s in self.inputs]
                out = self._forward(inputs)
                named = self._named(out, lambda t: t)
                slot.outputs = {k: slot.receive(torch, k, v) for k, v in named.items()}
                slot.event = torch.cuda.Event()
                slot.event.record(self._stream)
        except torch.cuda.OutOfMemoryError:
            slot.event = None
            raise self._out_of_memory(feeds) from None
        return _Pending(slot=slot)

    def _collect(self, pending: _Pending) -> dict[str, np.ndarray]:
        if pending.done is not None:
            return pending.done
        slot = pending.slot
        slot.wait()
        return {k: np.array(v.numpy(), copy=True) for k, v in slot.outputs.items()}  # the pinned buffer is reused

    def _forward(self, inputs):
        """The program on device tensors, through a captured CUDA graph when those are on."""
        if self._graphs is None:
            return self._module(*inputs)
        key = tuple((tuple(t.shape), t.dtype) for t in inputs)
        graph = self._graphs.get(key)
        if graph is None:
            graph = self._graphs[key] = _CapturedGraph(self._torch, self._module, inputs, self._stream)
        return graph.replay(inputs)

    def _named(self, out, convert) -> dict:
        if isinstance(out, dict):
            if [s.name for s in self.outputs] != [str(k) for k in out]:
                self.outputs = tuple(TensorSpec(str(k), None, ()) for k in out)
            return {str(k): convert(v) for k, v in out.items()}
        values = list(out) if isinstance(out, (tuple, list)) else [out]
        return {name: convert(v) for name, v in zip(self.output_names, values)}

    def _out_of_memory(self, feeds) -> EngineError:
        """The largest batch (halving) that runs, for the message; the GPU is left usable."""
        torch = self._torch
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        batch = next(iter(feeds.values())).shape[0]
        fits = batch // 2
        while fits >= 1:
            try:
                with torch.inference_mode():
                    self._module(*(torch.from_numpy(feeds[s.name][:fits]).to(self.device) for s in self.inputs))
                torch.cuda.synchronize(self.device)
                break
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                fits //= 2
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(self.device).total_memory / 2**30
        advice = f"batch {fits} does: pass --batch-size {fits}" if fits else "not even batch 1 does"
        return EngineError(f"{self.model_path}: a batch of {batch} does not fit in the memory of "
                           f"{torch.cuda.get_device_name(self.device)} ({total:.0f} GiB); {advice}")

    # -- describe / close -----------------------------------------------------------------------
    def _describe_runtime(self) -> str:
        graphs = ", CUDA graphs" if self._graphs is not None else ""
        return f"torch {self._torch.__version__}, torch.export program {self.model_path}{graphs}"

    def _describe_device(self) -> str:
        if self.device.type == "cuda":
            return f"{self._torch.cuda.get_device_name(self.device)} ({self.device})"
        return f"{devices.cpu_name()} (cpu, {self._torch.get_num_threads()} threads)"

    def _check_open(self) -> None:
        from .errors import EngineClosedError

        if self._closed:
            raise EngineClosedError(f"{self.backend} engine for {self.model_path} is closed; create a new one to run")

    def _release(self) -> None:
        for slot in self._slots:
            slot.wait()
        self._slots = []
        self._graphs = None
        self._module = None
        if self._cuda:
            self._torch.cuda.empty_cache()


class _Pending:
    """A submitted batch: finished outputs (CPU, empty batch), or a slot whose event says when."""

    def __init__(self, done: dict | None = None, slot: _Slot | None = None):
        self.done, self.slot = done, slot


class _Slot:
    """One batch in flight on the GPU: pinned host buffers in and out (grown to the largest batch
    seen, never shrunk), device copies of the inputs, and the event recorded after its last copy."""

    def __init__(self):
        self.pinned: dict[str, object] = {}
        self.outputs: dict[str, object] = {}
        self.event = None

    def wait(self) -> None:
        if self.event is not None:
            self.event.synchronize()
            self.event = None

    def _buffer(self, torch, key: str, shape, dtype):
        numel = int(np.prod(shape, dtype=np.int64))
        buf = self.pinned.get(key)
        if buf is None or buf.dtype != dtype or buf.numel() < numel:
            buf = self.pinned[key] = torch.empty(max(numel, 1), dtype=dtype, pin_memory=True)
        return buf[:numel].view(shape)

    def stage(self, torch, name: str, array: np.ndarray, device):
        """array (host) → its pinned buffer → the device, without waiting for the copy."""
        host = self._buffer(torch, "in:" + name, array.shape, torch.from_numpy(array[:0]).dtype)
        host.numpy()[...] = array
        return host.to(device, non_blocking=True)

    def receive(self, torch, name: str, tensor):
        """A device output → its pinned buffer (float32), without waiting."""
        tensor = tensor.detach()
        if tensor.dtype in (torch.float16, torch.bfloat16):
            tensor = tensor.float()
        host = self._buffer(torch, "out:" + name, tuple(tensor.shape), tensor.dtype)
        host.copy_(tensor, non_blocking=True)
        return host


class _CapturedGraph:
    """The program captured as a CUDA graph for one set of input shapes: static device inputs,
    replayed after copying the new ones in."""

    def __init__(self, torch, module, inputs, stream):
        self.static = [t.clone() for t in inputs]
        side = torch.cuda.Stream(inputs[0].device)
        side.wait_stream(stream)
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up: lazy initialisation must not be captured
                module(*self.static)
        stream.wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, stream=stream):
            self.out = module(*self.static)

    def replay(self, inputs):
        for static, new in zip(self.static, inputs):
            static.copy_(new, non_blocking=True)
        self.graph.replay()
        return self.out


def _host(tensor) -> np.ndarray:
    import torch

    tensor = tensor.detach()
    if tensor.dtype in (torch.float16, torch.bfloat16):
        tensor = tensor.float()
    return tensor.cpu().numpy()
