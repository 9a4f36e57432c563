"""torch backend: runs a torch.export program (`.pt2`), not the ONNX file.

torch cannot execute ONNX, and converting ONNX graphs to torch (onnx2torch and the like) is a
heavy, lossy dependency. So the torch backend runs the model's own torch.export program
(hexfast_export.torch_export writes one per model, and HEX's also in fp16 / bf16 with the weights
cast). A bundle's program is the one its manifest lists (`programs`), loaded from the bytes checked
against the manifest's sha256: `torch.export.load` unpickles parts of the archive, so a .pt2 is
code, and no file that merely lies beside the ONNX is ever opened. Given a plain `.pt2` path
instead (your own file), it loads that. torch is imported only when this backend is chosen.

Programs are exported on the CPU, and torch.export writes the device it traced on into the graph
as constants (`_assert_tensor_metadata(..., device=cpu)`, `arange(..., device=cpu)`), which
`module.to()` does not touch: `load_program` moves them with the parameters, the one way every
program is loaded for a device.

On CUDA (`cuda:<device_id>`), what production needs:

* uint8 tiles go through pinned (page-locked) host staging buffers with non-blocking
  host-to-device copies on the engine's own stream, and outputs come back into pinned buffers;
  `submit()` returns once the work is queued, `collect()` waits for it, so a caller can read the
  next batch while the GPU runs this one (IN_FLIGHT batches, each with its own buffers; a batch
  still uncollected when its buffers come round again is copied out first, never overwritten);
* optional CUDA graphs (`cuda_graphs=True`, for models whose rows are independent tiles): one
  graph per tile shape, captured at the largest batch seen; a smaller batch (a slide's last) is
  replayed in it and its rows sliced back, so memory stays flat over any number of slides;
* memory is bounded by the largest batch seen (the staging buffers grow, never multiply), and a
  batch that does not fit raises an EngineError naming the largest batch that does, found by
  trying halves; any other CUDA error is one line naming the program file and the device.

On the CPU the same program runs (explicit `torch` only: tests and parity checks; `auto` never
picks it there), synchronously.

Output names: a program that returns a dict names its outputs; one that returns a tuple takes
`output_names` (a bundle gives its manifest's), else output0, output1, ...
"""

from __future__ import annotations

import collections
import contextlib
import importlib.metadata
import importlib.util
import io
import os
from pathlib import Path

import numpy as np

from ..bundle import ListedFile
from . import devices
from .base import Engine, TensorSpec, check_model_file
from .errors import BackendUnavailable, EngineClosedError, EngineError, ModelFileError, one_line

PRECISIONS = ("fp32", "fp16", "bf16")
IN_FLIGHT = 2  # batches queued on the GPU at once, each with its own staging buffers
GRAPH_SHAPES = 4  # captured CUDA graphs kept (one per tile shape; least recently used dropped)


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


def problem(program, backend: str = "torch", model=None) -> BackendUnavailable | None:
    """Why the torch backend cannot run `program` (a bundle's ListedFile, a .pt2 path, or None) for
    `model` (the ONNX file it stands beside, named in the message)."""
    if not installed():
        return BackendUnavailable(backend, "needs torch (pip install torch, from the index that matches the machine)")
    if program is None:
        where = ""
        if model is not None:
            onnx = Path(getattr(model, "path", model))
            where = f" ({onnx.parent / 'manifest.json'} lists none for {onnx.name}; an unlisted .pt2 is never loaded)"
        return BackendUnavailable(backend, "needs a torch.export program (.pt2) the bundle's manifest lists, and this "
                                           f"bundle lists none for the model{where}; torch cannot run ONNX: use ort-* "
                                           "or trt")
    return None


# ----------------------------------------------------------------------------- loading


def load_program(program, device="cpu"):
    """The torch.export program `program` (a .pt2 path; a bundle's ListedFile, whose bytes checked
    against the manifest are loaded; or an ExportedProgram already loaded) as a torch.nn.Module
    that runs on `device` (a torch.device or its name: "cpu", "cuda:0", "meta")."""
    if hasattr(program, "graph_signature"):  # an ExportedProgram
        return _module_on(program, device, Path("<torch.export program>"))
    exported, path = _read(program)
    return _module_on(exported, device, path)


def device_constants(program) -> set[str]:
    """The devices an ExportedProgram's graph (or a GraphModule's: load_program's result) names as
    constants in its ops' arguments, as strings ("cpu", "cuda:0")."""
    import torch

    found = set()
    for module in getattr(program, "graph_module", program).modules():
        if not isinstance(module, torch.fx.GraphModule):
            continue
        for node in module.graph.nodes:
            if node.op != "call_function":
                continue
            # where torch.export writes a device: a `device` keyword, and aten.to.device's second argument
            values = [node.kwargs["device"]] if "device" in node.kwargs else []
            if node.target is torch.ops.aten.to.device:
                values.append(node.args[1])
            found.update(str(torch.device(v)) for v in values if v is not None)
    return found


def _read(program: str | os.PathLike | ListedFile):
    """(the ExportedProgram, its path): loaded from the checked bytes of a ListedFile, or a path."""
    import torch

    listed = program if isinstance(program, ListedFile) else None
    path = check_model_file(listed.path if listed else program, "torch.export program")
    source = io.BytesIO(listed.read()) if listed else str(path)
    try:
        return torch.export.load(source), path
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a bad archive
        raise ModelFileError(path, f"not a loadable torch.export program ({one_line(exc)})") from None


def _module_on(exported, device, path: Path):
    """The program as a module on `device`: parameters, buffers and the device constants of its
    graph moved (torch.export.passes.move_to_device_pass), none left behind."""
    import torch

    try:
        from torch.export.passes import move_to_device_pass
    except ImportError:
        raise BackendUnavailable("torch", f"needs torch 2.5 or newer to move {path.name} to a device "
                                          f"(torch.export.passes; this is torch {torch.__version__})") from None
    device = torch.device(device)
    try:
        moved = move_to_device_pass(exported, device)
    except torch.cuda.OutOfMemoryError:
        raise EngineError(f"{path}: the program's weights do not fit in the memory of {device}") from None
    except RuntimeError as exc:
        raise EngineError(f"{path}: cannot move the program to {device} ({one_line(exc)})") from None
    left = device_constants(moved) - {str(device)}
    if left:
        raise EngineError(f"{path}: the program still names {', '.join(sorted(left))} after moving it to {device} "
                          f"(torch {torch.__version__}'s move_to_device_pass is too old for it: use 2.9 or newer)")
    return moved.module()


def _input_specs(exported) -> tuple[TensorSpec, ...]:
    placeholders = {n.name: n for n in exported.graph.nodes if n.op == "placeholder"}
    specs = []
    for name in exported.graph_signature.user_inputs:
        meta = placeholders[name].meta.get("val") if name in placeholders else None
        dtype = np.dtype(str(meta.dtype).removeprefix("torch.")) if meta is not None else None
        shape = tuple(int(d) if isinstance(d, int) else None for d in meta.shape) if meta is not None else ()
        specs.append(TensorSpec(name, dtype, shape))
    return tuple(specs)


# ----------------------------------------------------------------------------- the engine


class TorchEngine(Engine):
    backend = "torch"

    def __init__(self, program: str | os.PathLike | ListedFile | None, *, precision: str = "fp32", threads=None,
                 device_id: int = 0, output_names: list[str] | None = None, cuda_graphs: bool = False):
        """precision: the program's (its weights were cast when it was exported); it is described,
        not applied. cuda_graphs: only for programs whose inputs' first dimension is a batch of
        independent rows (HEX, the H&E features): a short batch is run padded to a captured one."""
        missing = problem(program)
        if missing is not None:
            raise missing
        exported, path = _read(program)
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
        self.inputs = _input_specs(exported)
        n_out = len(exported.graph_signature.user_outputs)
        names = list(output_names) if output_names else [f"output{i}" for i in range(n_out)]
        self.outputs = tuple(TensorSpec(name, None, ()) for name in names)
        self._module = _module_on(exported, self.device, path)
        del exported
        self._gpu = _Cuda(torch, self.device) if self.device.type == "cuda" else None
        self._slots = [_Slot() for _ in range(IN_FLIGHT)] if self._gpu else []
        self._next_slot = 0
        self._graphs = _Graphs(self._gpu, self._module) if cuda_graphs and self._gpu else None

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
        if self._gpu is None:
            try:
                with torch.inference_mode():
                    out = self._module(*(torch.from_numpy(feeds[s.name]) for s in self.inputs))
                return _Pending(done=self._named(out, _host))
            except RuntimeError as exc:
                raise self._failed(exc) from None
        slot = self._slots[self._next_slot]
        self._next_slot = (self._next_slot + 1) % len(self._slots)
        if slot.owner is not None:  # its batch was never collected: keep its outputs before reusing the buffers
            self._detach(slot)  # (a collected or failed batch left no event behind: the buffers are free)
        try:
            with self._gpu.stream(), torch.inference_mode():
                inputs = [slot.stage(self._gpu, s.name, feeds[s.name], self.device) for s in self.inputs]
                out = self._forward(inputs)
                named = self._named(out, lambda t: t)
                slot.outputs = {k: slot.receive(self._gpu, k, v) for k, v in named.items()}
                slot.event = self._gpu.record()
        except torch.cuda.OutOfMemoryError:
            self._abandon(slot)
            raise self._out_of_memory(feeds) from None
        except RuntimeError as exc:  # a CUDA error (torch.AcceleratorError), a device mismatch, a failed capture
            self._abandon(slot)
            raise self._failed(exc) from None
        pending = slot.owner = _Pending(slot=slot)
        return pending

    def _collect(self, pending: _Pending) -> dict[str, np.ndarray]:
        if pending.done is None:
            if pending.slot is None:
                raise EngineError(f"{self.model_path}: this batch failed on {self.device} (see the error it raised)")
            self._detach(pending.slot)
        return pending.done

    def _detach(self, slot: _Slot) -> None:
        """Hand the slot's batch its outputs (copied out of the pinned buffers) and free the slot."""
        owner = slot.owner
        try:
            owner.done = slot.take()  # waits for the batch: an asynchronous CUDA error surfaces here
        except RuntimeError as exc:
            slot.owner = owner.slot = None
            raise self._failed(exc) from None
        owner.slot = None

    def _abandon(self, slot: _Slot) -> None:
        """After a failed submit: nothing of it is left queued on the slot's buffers."""
        slot.event = None
        slot.outputs = {}
        with contextlib.suppress(RuntimeError):
            self._gpu.synchronize()

    def _forward(self, inputs):
        """The program on device tensors, through a captured CUDA graph when those are on."""
        if self._graphs is None:
            return self._module(*inputs)
        return self._graphs.run(inputs)

    def _named(self, out, convert) -> dict:
        if isinstance(out, dict):
            if [s.name for s in self.outputs] != [str(k) for k in out]:
                self.outputs = tuple(TensorSpec(str(k), None, ()) for k in out)
            return {str(k): convert(v) for k, v in out.items()}
        values = list(out) if isinstance(out, (tuple, list)) else [out]
        return {name: convert(v) for name, v in zip(self.output_names, values)}

    def _failed(self, exc: BaseException) -> EngineError:
        return EngineError(f"{self.model_path}: the torch backend failed on {self._describe_device()}: {one_line(exc)}")

    def _out_of_memory(self, feeds) -> EngineError:
        """The largest batch (halving) that runs, for the message; the GPU is left usable."""
        torch = self._torch
        self._gpu.free()
        batch = next(iter(feeds.values())).shape[0]
        fits = batch // 2
        while fits >= 1:
            try:
                with torch.inference_mode():
                    self._module(*(torch.from_numpy(feeds[s.name][:fits]).to(self.device) for s in self.inputs))
                self._gpu.synchronize()
                break
            except torch.cuda.OutOfMemoryError:
                self._gpu.free()
                fits //= 2
        self._gpu.free()
        advice = f"batch {fits} does: pass --batch-size {fits}" if fits else "not even batch 1 does"
        return EngineError(f"{self.model_path}: a batch of {batch} does not fit in the memory of "
                           f"{self._gpu.name()} ({self._gpu.total_gib():.0f} GiB); {advice}")

    # -- describe / close -----------------------------------------------------------------------
    def _describe_runtime(self) -> str:
        graphs = ", CUDA graphs" if self._graphs is not None else ""
        return f"torch {self._torch.__version__}, torch.export program {self.model_path}{graphs}"

    def _describe_device(self) -> str:
        if self._gpu is not None:
            return f"{self._gpu.name()} ({self.device})"
        return f"{devices.cpu_name()} (cpu, {self._torch.get_num_threads()} threads)"

    def _check_open(self) -> None:
        if self._closed:
            raise EngineClosedError(f"{self.backend} engine for {self.model_path} is closed; create a new one to run")

    def _release(self) -> None:
        for slot in self._slots:
            with contextlib.suppress(RuntimeError):
                slot.wait()
        self._slots = []
        self._graphs = None
        self._module = None
        if self._gpu is not None:
            with contextlib.suppress(RuntimeError):
                self._gpu.free()


class _Pending:
    """A submitted batch: its outputs once known (CPU, empty batch, collected, or copied out when
    its slot was needed), else the slot whose event says when."""

    def __init__(self, done: dict | None = None, slot: _Slot | None = None):
        self.done, self.slot = done, slot


class _Slot:
    """One batch in flight on the GPU: pinned host buffers in and out (grown to the largest batch
    seen, never shrunk), the event recorded after its last copy, and the batch it holds (`owner`,
    until collected)."""

    def __init__(self):
        self.pinned: dict[str, object] = {}
        self.outputs: dict[str, object] = {}
        self.event = None
        self.owner: _Pending | None = None

    def wait(self) -> None:
        if self.event is not None:
            event, self.event = self.event, None
            event.synchronize()

    def take(self) -> dict[str, np.ndarray]:
        """Its batch's outputs, copied out of the pinned buffers (the next batch reuses them)."""
        self.wait()
        out = {k: np.array(v.numpy(), copy=True) for k, v in self.outputs.items()}
        self.outputs, self.owner = {}, None
        return out

    def _buffer(self, gpu: _Cuda, key: str, shape, dtype):
        numel = int(np.prod(shape, dtype=np.int64))
        buf = self.pinned.get(key)
        if buf is None or buf.dtype != dtype or buf.numel() < numel:
            buf = self.pinned[key] = gpu.pinned(max(numel, 1), dtype)
        return buf[:numel].view(shape)

    def stage(self, gpu: _Cuda, name: str, array: np.ndarray, device):
        """array (host) → its pinned buffer → the device, without waiting for the copy."""
        host = self._buffer(gpu, "in:" + name, array.shape, gpu.torch.from_numpy(array[:0]).dtype)
        host.numpy()[...] = array
        return host.to(device, non_blocking=True)

    def receive(self, gpu: _Cuda, name: str, tensor):
        """A device output → its pinned buffer (float32), without waiting."""
        torch = gpu.torch
        tensor = tensor.detach()
        if tensor.dtype in (torch.float16, torch.bfloat16):
            tensor = tensor.float()
        host = self._buffer(gpu, "out:" + name, tuple(tensor.shape), tensor.dtype)
        host.copy_(tensor, non_blocking=True)
        return host


class _Graphs:
    """Captured CUDA graphs, one per input shape apart from the batch, captured at the largest batch
    seen: a smaller batch is copied into the first rows of the graph's static inputs, replayed, and
    its rows sliced back (the rows are independent tiles; the rest hold the previous batch's). A
    larger batch replaces the graph. At most GRAPH_SHAPES shapes are kept, least recently used
    dropped, so memory stays flat however many slides (and last partial batches) a process runs."""

    def __init__(self, gpu: _Cuda, module):
        self._gpu, self._module = gpu, module
        self._graphs: collections.OrderedDict = collections.OrderedDict()
        self.captures = 0  # how many graphs were captured (the tests count them)

    def run(self, inputs):
        n = int(inputs[0].shape[0])
        key = tuple((tuple(t.shape[1:]), t.dtype) for t in inputs)
        graph = self._graphs.pop(key, None)
        if graph is None or graph.batch < n:
            del graph  # its memory pool goes before the larger one is captured
            while len(self._graphs) >= GRAPH_SHAPES:
                self._graphs.popitem(last=False)
            graph = self._gpu.capture(self._module, inputs)
            self.captures += 1
        self._graphs[key] = graph
        out = graph.replay(inputs)
        if n == graph.batch:
            return out
        if isinstance(out, dict):
            return {k: v[:n] for k, v in out.items()}
        return type(out)(v[:n] for v in out) if isinstance(out, (tuple, list)) else out[:n]

    def __len__(self) -> int:
        return len(self._graphs)


class _Cuda:
    """The CUDA calls the engine makes, in one place (the tests put a host stand-in here)."""

    def __init__(self, torch, device):
        self.torch, self.device = torch, device
        self._stream = torch.cuda.Stream(device)

    def stream(self):
        return self.torch.cuda.stream(self._stream)

    def pinned(self, numel: int, dtype):
        return self.torch.empty(numel, dtype=dtype, pin_memory=True)

    def record(self):
        event = self.torch.cuda.Event()
        event.record(self._stream)
        return event

    def capture(self, module, inputs) -> _CapturedGraph:
        return _CapturedGraph(self.torch, module, inputs, self._stream)

    def synchronize(self) -> None:
        self.torch.cuda.synchronize(self.device)

    def free(self) -> None:
        self.synchronize()
        self.torch.cuda.empty_cache()

    def name(self) -> str:
        return self.torch.cuda.get_device_name(self.device)

    def total_gib(self) -> float:
        return self.torch.cuda.get_device_properties(self.device).total_memory / 2**30


class _CapturedGraph:
    """The program captured as a CUDA graph for one set of input shapes: static device inputs,
    replayed after copying the new ones into their first rows."""

    def __init__(self, torch, module, inputs, stream):
        self.batch = int(inputs[0].shape[0])
        self.static = [t.clone() for t in inputs]
        side = torch.cuda.Stream(inputs[0].device)
        side.wait_stream(stream)
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up: lazy initialisation must not be captured
                module(*self.static)
        stream.wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: CUDA work of the embedding application's other threads does not break the capture
        with torch.cuda.graph(self.graph, stream=stream, capture_error_mode="thread_local"):
            self.out = module(*self.static)

    def replay(self, inputs):
        for static, new in zip(self.static, inputs):
            static[: new.shape[0]].copy_(new, non_blocking=True)
        self.graph.replay()
        return self.out


def _host(tensor) -> np.ndarray:
    import torch

    tensor = tensor.detach()
    if tensor.dtype in (torch.float16, torch.bfloat16):
        tensor = tensor.float()
    return tensor.cpu().numpy()
