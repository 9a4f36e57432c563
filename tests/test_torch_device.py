"""The torch backend off the CPU, as far as a machine without a GPU can check it (issue 22).

* Every program of the bundle goes through `load_program` onto `meta` and, in a subprocess, onto a
  fake `cuda:0` (FakeTensorMode): torch.export fixes the tracing device in the graph, so a program
  moved with `.to()` alone fails at its first op there (checked too: these tests can fail).
* The CUDA-only logic of TorchEngine (pinned slots in flight, CUDA graphs, error messages) runs
  with `HostCuda` in place of its CUDA calls: the same code paths, on CPU tensors.
"""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from hexfast.bundle import load_bundle
from hexfast.errors import HexfastError

torch = pytest.importorskip("torch", reason="the torch backend needs torch")
from hexfast.engines import torch_backend  # noqa: E402
from hexfast.engines.torch_backend import TorchEngine, device_constants, load_program  # noqa: E402

# concrete values for the manifest's dynamic dimensions
DIMS = {"batch": 2, "height": 224, "width": 224, "grid_height": 30, "grid_width": 23, "tiles": 7}


@pytest.fixture(scope="module")
def bf16_program(tmp_path_factory):
    """The tiny demo HEX as a bf16 program (the shipped demo bundle has fp32 and fp16 only)."""
    pytest.importorskip("hexfast_export", reason="exporting a program needs hexfast_export")
    from hexfast_export.demo import demo_models
    from hexfast_export.torch_export import export_hex_program

    return export_hex_program(demo_models("tiny")[0], tmp_path_factory.mktemp("bf16") / "hex.bf16.pt2", "bf16")


def programs():
    bundle = load_bundle()
    return [(name, precision) for name in bundle.models for precision in bundle.model(name).get("programs", {})]


def program_and_inputs(name: str, precision: str, bf16_program, device: str):
    bundle = load_bundle()
    program = bf16_program if precision == "bf16" else bundle.program_file(name, precision)
    inputs = [torch.zeros([DIMS.get(d, d) for d in spec["shape"]], dtype=getattr(torch, spec["dtype"]), device=device)
              for spec in bundle.model(name)["inputs"].values()]
    return program, inputs


def outputs_of(result) -> list:
    return list(result.values()) if isinstance(result, dict) else list(result) if isinstance(result, (tuple, list)) \
        else [result]


@pytest.mark.parametrize("name,precision", programs() + [("hex", "bf16")])
def test_every_program_runs_on_meta_through_load_program(name, precision, bf16_program):
    program, inputs = program_and_inputs(name, precision, bf16_program, "meta")
    raw = program.read() if hasattr(program, "read") else program.read_bytes()
    exported = torch.export.load(io.BytesIO(raw))
    if device_constants(exported):  # exported on the CPU, with the device written into the graph
        assert device_constants(exported) == {"cpu"}
        with pytest.raises(RuntimeError, match="device"):
            exported.module().to("meta")(*inputs)  # what the engine did before load_program
    module = load_program(program, "meta")
    assert device_constants(module) <= {"meta"}
    with torch.no_grad():
        outs = outputs_of(module(*inputs))
    promised = load_bundle().model(name)["outputs"]
    assert [o.device.type for o in outs] == ["meta"] * len(promised)
    assert [list(o.shape) for o in outs] == [[DIMS.get(d, d) for d in spec["shape"]] for spec in promised.values()]
    assert all(o.dtype == torch.float32 for o in outs)  # reduced-precision programs return float32 too


def test_every_program_runs_on_a_fake_cuda_device(bf16_program):
    """In a subprocess: FakeTensorMode on a CPU build of torch aborts the process on some misuse."""
    code = textwrap.dedent(f"""
        import io, json, torch
        from torch._subclasses.fake_tensor import FakeTensorMode
        from hexfast.bundle import load_bundle
        from hexfast.engines.torch_backend import load_program
        DIMS = {DIMS!r}
        bundle = load_bundle()
        result = {{}}
        cases = [(n, p, bundle.program_file(n, p).read()) for n in bundle.models for p in bundle.model(n)["programs"]]
        cases.append(("hex", "bf16", open({str(bf16_program)!r}, "rb").read()))
        for name, precision, raw in cases:
            exported, moved = (torch.export.load(io.BytesIO(raw)) for _ in range(2))  # outside the fake mode
            specs = bundle.model(name)["inputs"].values()
            with torch.no_grad(), FakeTensorMode(allow_non_fake_inputs=True):
                inputs = [torch.zeros([DIMS.get(d, d) for d in s["shape"]], dtype=getattr(torch, s["dtype"]),
                                      device="cuda:0") for s in specs]
                try:
                    exported.module().to("cuda:0")(*inputs)
                    unmoved = "ran"
                except Exception as exc:  # AssertionError under the fake mode, RuntimeError on a GPU
                    unmoved = str(exc).splitlines()[0]
                out = load_program(moved, "cuda:0")(*inputs)
                out = out if isinstance(out, (tuple, list)) else [out]
                result[name + " " + precision] = {{"devices": sorted({{str(o.device) for o in out}}),
                                                   "unmoved": unmoved}}
        print(json.dumps(result))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(result) == {f"{n} {p}" for n, p in programs()} | {"hex bf16"}
    for case, found in result.items():
        assert found["devices"] == ["cuda:0"], (case, found)
        if not case.startswith("mica"):  # MICA's graph names no device; every other one did
            assert "device mismatch" in found["unmoved"], (case, found)


def test_a_program_left_naming_another_device_is_refused(monkeypatch):
    """If the installed torch's move_to_device_pass misses a constant, loading says so in one line."""
    import torch.export.passes as passes

    monkeypatch.setattr(passes, "move_to_device_pass", lambda ep, device: ep)  # a pass that moves nothing
    program = load_bundle().program_file("hex")
    with pytest.raises(HexfastError, match=r"hex\.pt2: the program still names cpu after moving it to meta"):
        load_program(program, "meta")


# ------------------------------------------------------------------ the engine's CUDA path, on the host


class DoneEvent:
    def synchronize(self):
        pass


class HostGraph:
    """A 'captured graph' on the host: static inputs and outputs reused by every replay, as a CUDA
    graph's are (a caller that kept a view of one replay's outputs would see the next's)."""

    def __init__(self, module, inputs):
        self.module = module
        self.batch = int(inputs[0].shape[0])
        self.static = [t.clone() for t in inputs]
        self.out = [o.clone() for o in outputs_of(module(*self.static))]

    def replay(self, inputs):
        for static, new in zip(self.static, inputs):
            static[: new.shape[0]].copy_(new)
        for kept, new in zip(self.out, outputs_of(self.module(*self.static))):
            kept.copy_(new)
        return tuple(self.out)


class HostCuda:
    """torch_backend._Cuda's calls on the CPU: plain buffers, the caller's stream, events already done."""

    def __init__(self, fail_capture: bool = False):
        self.torch, self.device, self.fail_capture = torch, torch.device("cpu"), fail_capture

    def stream(self):
        return contextlib.nullcontext()

    def pinned(self, numel, dtype):
        return torch.empty(numel, dtype=dtype)

    def record(self):
        return DoneEvent()

    def capture(self, module, inputs):
        if self.fail_capture:
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing\n"
                               "CUDA kernel errors might be asynchronously reported at some other API call")
        return HostGraph(module, inputs)

    def synchronize(self):
        pass

    def free(self):
        pass

    def name(self):
        return "HostCuda stand-in"

    def total_gib(self):
        return 1.0


def emulated(engine: TorchEngine, cuda_graphs: bool = False, **kwargs) -> TorchEngine:
    """`engine` (loaded on the CPU) running its CUDA path, with HostCuda for the CUDA calls."""
    engine._gpu = HostCuda(**kwargs)
    engine._slots = [torch_backend._Slot() for _ in range(torch_backend.IN_FLIGHT)]
    engine._graphs = torch_backend._Graphs(engine._gpu, engine._module) if cuda_graphs else None
    return engine


def hex_engine() -> TorchEngine:
    bundle = load_bundle()
    return TorchEngine(bundle.program_file("hex"), output_names=list(bundle.model("hex")["outputs"]))


def tiles(n: int, seed: int, size: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def reference():
    """What the CPU path gives for a batch: the truth the emulated CUDA path must match."""
    with hex_engine() as cpu:
        yield lambda batch: cpu.run({"tiles": batch})


def test_a_submit_never_overwrites_an_uncollected_batch(reference):
    batches = [tiles(3, seed) for seed in range(5)]
    with emulated(hex_engine()) as engine:
        handles = [engine.submit({"tiles": b}) for b in batches]  # five in flight on two slots
        for handle, batch in reversed(list(zip(handles, batches))):
            got = engine.collect(handle)
            for name, want in reference(batch).items():
                np.testing.assert_array_equal(got[name], want)
        again = engine.collect(handles[0])  # collecting twice gives the same outputs
        np.testing.assert_array_equal(again["markers"], reference(batches[0])["markers"])
        assert all(slot.owner is None for slot in engine._slots)


def test_cuda_graphs_pad_short_batches_and_stay_flat_over_slides(reference):
    with emulated(hex_engine(), cuda_graphs=True) as engine:
        graphs = engine._graphs
        # three "slides" of 8-tile batches, each ending in a partial batch of another size
        for slide, last in enumerate((5, 3, 7)):
            for i, n in enumerate((8, 8, last)):
                batch = tiles(n, seed=10 * slide + i)
                got = engine.run({"tiles": batch})
                for name, want in reference(batch).items():
                    assert got[name].shape == want.shape
                    np.testing.assert_allclose(got[name], want, rtol=1e-5, atol=1e-6)
        assert graphs.captures == 1 and len(graphs) == 1  # one graph for the batch size: no capture per slide
        engine.run({"tiles": tiles(12, seed=99)})  # a larger batch replaces the graph
        engine.run({"tiles": tiles(4, seed=98)})
        assert graphs.captures == 2 and len(graphs) == 1
        for size in (32, 48, 80, 96, 112):  # other tile sizes: one graph each, the oldest dropped
            batch = tiles(2, seed=size, size=size)
            np.testing.assert_allclose(engine.run({"tiles": batch})["markers"], reference(batch)["markers"],
                                       rtol=1e-5, atol=1e-6)
        assert len(graphs) == torch_backend.GRAPH_SHAPES


def test_only_per_tile_models_get_cuda_graphs(monkeypatch):
    """Padding would change MICA's and the CODEX encoder's answers: graphs go to hex and he_features only."""
    from hexfast.score import pipeline

    asked = {}

    def create_engine(model, backend, **kwargs):
        asked[model.path.stem] = kwargs["cuda_graphs"]
        raise HexfastError("stop here")

    monkeypatch.setattr(pipeline, "create_engine", create_engine)
    bundle = load_bundle()
    for name in bundle.models:
        with pytest.raises(HexfastError, match="stop here"):
            pipeline.open_engine(bundle, name, "torch", cuda_graphs=True)
    assert asked == {"hex": True, "codex_encoder": False, "mica": False, "he_features": True}


def one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text, text
    return text


def test_cuda_errors_are_one_line_naming_the_program_and_backend(monkeypatch):
    batch = {"tiles": tiles(2, 0)}
    with emulated(hex_engine()) as engine:  # an error in the forward pass (an illegal address, say)
        def broken(*_):
            raise RuntimeError("CUDA error: an illegal memory access was encountered\nCompile with "
                               "`TORCH_USE_CUDA_DSA` to enable device-side assertions.")

        engine._module = broken
        with pytest.raises(HexfastError) as caught:
            engine.submit(batch)
        text = one_line(caught.value)
        assert "hex.pt2: the torch backend failed on HostCuda stand-in" in text and "illegal memory access" in text

    with emulated(hex_engine(), cuda_graphs=True, fail_capture=True) as engine:  # a capture that fails
        with pytest.raises(HexfastError, match="hex.pt2: the torch backend failed .*stream is capturing") as caught:
            engine.run(batch)
        one_line(caught.value)

    with emulated(hex_engine()) as engine:  # an asynchronous error, reported when the batch is waited for
        handle = engine.submit(batch)

        class FailedEvent:
            def synchronize(self):
                raise torch.AcceleratorError("CUDA error: unspecified launch failure") \
                    if hasattr(torch, "AcceleratorError") else RuntimeError("CUDA error: unspecified launch failure")

        handle.slot.event = FailedEvent()
        with pytest.raises(HexfastError, match="hex.pt2: the torch backend failed .*unspecified launch failure"):
            engine.collect(handle)
        with pytest.raises(HexfastError, match="this batch failed"):
            engine.collect(handle)
        np.testing.assert_array_equal(engine.run(batch)["markers"], engine.run(batch)["markers"])  # usable after

    with hex_engine() as engine:  # a real device mismatch (the bug load_program fixes), on the CPU path
        program = load_bundle().program_file("hex")
        engine._module = torch.export.load(io.BytesIO(program.read())).module().to("meta")
        with pytest.raises(HexfastError, match="hex.pt2: the torch backend failed on .*cpu.*device"):
            engine.run(batch)


def test_out_of_memory_names_the_batch_that_fits():
    with emulated(hex_engine()) as engine:
        real = engine._module

        def small_memory(tiles_in):
            if tiles_in.shape[0] > 4:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")
            return real(tiles_in)

        engine._module = small_memory
        with pytest.raises(HexfastError) as caught:
            engine.run({"tiles": tiles(16, 0)})
        text = one_line(caught.value)
        assert "a batch of 16 does not fit in the memory of HostCuda stand-in (1 GiB); batch 4 does: " \
               "pass --batch-size 4" in text
        assert engine.run({"tiles": tiles(4, 0)})["markers"].shape == (4, 40)
