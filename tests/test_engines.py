"""hexfast.engines: backend selection, ORT CPU results against numpy, errors, the IOBinding path
(on CPU), the native TensorRT backend against a stand-in for the tensorrt / cuda-python APIs
(no GPU here), and the torch.export backend where torch is installed."""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx", reason="the engine tests build their models with onnx (pip install '.[test]')")
ort = pytest.importorskip("onnxruntime", reason="the engine tests need onnxruntime (pip install '.[test]')")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import hexfast.engines as engines  # noqa: E402
from hexfast.bench.measure import measure  # noqa: E402
from hexfast.engines import BACKENDS, BackendUnavailable, EngineClosedError, EngineError, ModelFileError  # noqa: E402
from hexfast.engines import _cuda, create_engine, devices  # noqa: E402
from hexfast.engines import trt as trt_mod  # noqa: E402
from hexfast.engines.ort import OrtEngine  # noqa: E402
from hexfast.bundle import ListedFile  # noqa: E402
from hexfast.errors import HexfastError  # noqa: E402

RNG = np.random.default_rng(7)
W_MARKERS = RNG.standard_normal((3, 40)).astype(np.float32)
W_EMBED = RNG.standard_normal((3, 8)).astype(np.float32)
HAS_GPU = devices.device_count() > 0


def reference(tiles: np.ndarray) -> dict[str, np.ndarray]:
    mean = tiles.astype(np.float32).mean(axis=(1, 2))
    return {"markers": mean @ W_MARKERS, "embedding": mean @ W_EMBED}


def make_tiles(batch: int, size: int = 32) -> np.ndarray:
    return RNG.integers(0, 256, size=(batch, size, size, 3), dtype=np.uint8)


def write_model(path: Path) -> Path:
    """uint8 NHWC "tiles" [batch, h, w, 3] → cast → mean over h, w → MatMul → "markers" [batch, 40]
    and "embedding" [batch, 8]."""
    nodes = [
        helper.make_node("Cast", ["tiles"], ["x"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["x"], ["mean"], axes=[1, 2], keepdims=0),
        helper.make_node("MatMul", ["mean", "w_markers"], ["markers"]),
        helper.make_node("MatMul", ["mean", "w_embed"], ["embedding"]),
    ]
    graph = helper.make_graph(
        nodes, "hexfast-test",
        [helper.make_tensor_value_info("tiles", TensorProto.UINT8, ["batch", "height", "width", 3])],
        [helper.make_tensor_value_info("markers", TensorProto.FLOAT, ["batch", 40]),
         helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", 8])],
        initializer=[numpy_helper.from_array(W_MARKERS, "w_markers"), numpy_helper.from_array(W_EMBED, "w_embed")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return write_model(tmp_path_factory.mktemp("model") / "hex.onnx")


def assert_close(out: dict, ref: dict) -> None:
    assert set(out) == set(ref)
    for name in ref:
        assert out[name].shape == ref[name].shape, name
        np.testing.assert_allclose(out[name], ref[name], rtol=1e-5, atol=1e-4, err_msg=name)


def assert_one_line(exc: BaseException) -> str:
    text = str(exc)
    assert isinstance(exc, HexfastError)
    assert text and "\n" not in text, text
    return text


# -- ORT CPU ------------------------------------------------------------------------------------

@pytest.mark.parametrize("batch", [1, 7, 64])
def test_ort_cpu_matches_numpy(model, batch):
    with create_engine(model, "ort-cpu") as engine:
        assert engine.backend == "ort-cpu"
        assert engine.input_names == ["tiles"]
        assert engine.output_names == ["markers", "embedding"]
        tiles = make_tiles(batch)
        assert_close(engine.run({"tiles": tiles}), reference(tiles))


def test_ort_cpu_dynamic_batch_and_size_in_one_session(model):
    with create_engine(model, "ort-cpu", threads=1) as engine:
        for batch, size in [(64, 32), (7, 32), (1, 16), (64, 24), (3, 32)]:
            tiles = make_tiles(batch, size)
            out = engine.run({"tiles": tiles})
            assert_close(out, reference(tiles))
        # engine(tiles) for a one-input model; outputs belong to the caller
        tiles = make_tiles(5)
        first = engine(tiles)
        engine(make_tiles(5))
        assert_close(first, reference(tiles))


def test_non_contiguous_input(model):
    tiles = make_tiles(8, 32)[:, ::2, ::2, :]
    with create_engine(model, "ort-cpu") as engine:
        assert_close(engine.run({"tiles": tiles}), reference(np.ascontiguousarray(tiles)))


def test_zero_batch(model):
    with create_engine(model, "ort-cpu") as engine:
        out = engine.run({"tiles": np.zeros((0, 32, 32, 3), np.uint8)})
    assert out["markers"].shape == (0, 40) and out["embedding"].shape == (0, 8)
    assert out["markers"].dtype == np.float32


def test_threads_option_is_the_session_option(model):
    with create_engine(model, "ort-cpu", threads=2) as engine:
        assert engine.session.get_session_options().intra_op_num_threads == 2
        assert engine.session.get_session_options().graph_optimization_level == \
            ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        assert "(2 threads)" in engine.describe()
    with create_engine(model, "ort-cpu") as engine:  # None: ORT's default (0 = all cores)
        assert engine.session.get_session_options().intra_op_num_threads == 0


# -- auto, availability, describe ----------------------------------------------------------------

def test_backends_tuple():
    assert BACKENDS == ("auto", "trt", "ort-trt", "ort-cuda", "ort-cpu", "torch")


def test_available_backends_here():
    available = engines.available_backends()
    assert "ort-cpu" in available
    assert available == [b for b in ("trt", "ort-trt", "ort-cuda", "torch", "ort-cpu") if b in available]
    if not HAS_GPU:
        assert available == ["ort-cpu"]


@pytest.mark.skipif(HAS_GPU, reason="on a GPU machine auto picks a GPU backend")
def test_auto_resolves_to_ort_cpu_and_logs_it(model, caplog):
    with caplog.at_level(logging.INFO, logger="hexfast.engines"):
        engine = create_engine(model)
    with engine:
        assert engine.backend == "ort-cpu"
        line = engine.describe()
        assert line.startswith("ort-cpu: onnxruntime ") and "CPUExecutionProvider" in line and "fp32" in line
        assert "\n" not in line
        tiles = make_tiles(3)
        assert_close(engine.run({"tiles": tiles}), reference(tiles))
    assert any("auto chose ort-cpu" in r.getMessage() for r in caplog.records)
    assert any(r.getMessage().startswith("engine: ort-cpu") for r in caplog.records)


@pytest.mark.parametrize("backend", ["ort-cuda", "ort-trt", "trt"])
def test_unavailable_backends_say_what_is_missing(model, backend):
    if backend in engines.available_backends():
        pytest.skip(f"{backend} is available on this machine")
    with pytest.raises(BackendUnavailable) as info:
        create_engine(model, backend, plan_dir=model.parent)
    text = assert_one_line(info.value)
    assert text.startswith(f"{backend} needs ")
    if backend.startswith("ort-") and "CUDAExecutionProvider" not in ort.get_available_providers():
        assert "pip install onnxruntime-gpu" in text and "beside onnxruntime" in text
    if backend == "trt":
        assert "pip install" in text or "GPU" in text


def test_unknown_backend_and_precision(model):
    with pytest.raises(EngineError, match="unknown backend 'cuda'"):
        create_engine(model, "cuda")
    with pytest.raises(EngineError, match="precision 'int4'"):
        create_engine(model, "ort-cpu", precision="int4")
    with pytest.raises(EngineError) as info:
        create_engine(model, "ort-cpu", precision="fp16")
    assert "ort-cpu runs fp32/int8 only" in assert_one_line(info.value)
    if not HAS_GPU:
        with pytest.raises(BackendUnavailable) as info:
            create_engine(model, precision="fp16")
        assert "no backend for fp16" in assert_one_line(info.value)


# -- errors -------------------------------------------------------------------------------------

def test_closed_engine_refuses_to_run(model):
    engine = create_engine(model, "ort-cpu")
    engine.close()
    engine.close()  # idempotent
    assert engine.closed
    with pytest.raises(EngineClosedError) as info:
        engine.run({"tiles": make_tiles(1)})
    assert "closed" in assert_one_line(info.value)
    with create_engine(model, "ort-cpu") as engine:
        pass
    with pytest.raises(EngineClosedError):
        engine(make_tiles(1))


def test_missing_model_file(tmp_path):
    path = tmp_path / "nope.onnx"
    with pytest.raises(ModelFileError) as info:
        create_engine(path, "ort-cpu")
    text = assert_one_line(info.value)
    assert str(path) in text and "no such" in text
    with pytest.raises(ModelFileError):
        create_engine(path)  # auto: the file error, not "no backend"
    with pytest.raises(ModelFileError, match="directory"):
        create_engine(tmp_path, "ort-cpu")


@pytest.mark.parametrize("content", [b"this is not an onnx model\n" * 20, b"\x08\x07\x12\x03abc\xff\xff\xff", b""])
def test_corrupt_model_file(tmp_path, content):
    path = tmp_path / "broken.onnx"
    path.write_bytes(content)
    with pytest.raises(ModelFileError) as info:
        create_engine(path, "ort-cpu")
    assert str(path) in assert_one_line(info.value)


def test_bad_inputs(model):
    with create_engine(model, "ort-cpu") as engine:
        with pytest.raises(EngineError, match="is float32 .* takes uint8"):
            engine.run({"tiles": make_tiles(2).astype(np.float32)})
        with pytest.raises(EngineError, match="missing input 'tiles'"):
            engine.run({"images": make_tiles(2)})
        with pytest.raises(EngineError, match="shape \\[2, 32, 32, 4\\]"):
            engine.run({"tiles": np.zeros((2, 32, 32, 4), np.uint8)})
        with pytest.raises(EngineError, match="shape"):
            engine.run({"tiles": np.zeros((32, 32, 3), np.uint8)})
        with pytest.raises(EngineError, match="dict"):
            engine.run(make_tiles(2))
        for exc in (pytest.raises(EngineError),):
            with exc as info:
                engine.run({"tiles": make_tiles(2).astype(np.float32)})
            assert_one_line(info.value)


# -- onnxruntime / torch not installed ------------------------------------------------------------

def test_without_onnxruntime(model, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime → ImportError
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    monkeypatch.setattr(engines._torch, "cuda_build_and_gpu", lambda: False)
    assert engines.available_backends() == []
    with pytest.raises(BackendUnavailable) as info:
        create_engine(model, "ort-cpu")
    text = assert_one_line(info.value)
    assert text.startswith("ort-cpu needs onnxruntime") and "pip install onnxruntime" in text
    with pytest.raises(BackendUnavailable) as info:
        create_engine(model)
    assert "onnxruntime" in assert_one_line(info.value)


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONWARNINGS": "ignore"})


def test_module_imports_without_onnxruntime():
    result = run_python("""
        import sys
        sys.modules["onnxruntime"] = None
        sys.modules["tensorrt"] = None
        import hexfast.engines as e
        e._torch.cuda_build_and_gpu = lambda: False
        print(e.available_backends())
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_runtime_does_not_import_torch(model):
    result = run_python(f"""
        import sys
        import numpy as np
        import hexfast.engines as e
        assert "torch" not in sys.modules, "import"
        e.available_backends()
        with e.create_engine({str(model)!r}, "ort-cpu") as engine:
            engine.run({{"tiles": np.zeros((2, 16, 16, 3), np.uint8)}})
        with e.create_engine({str(model)!r}) as engine:
            engine.run({{"tiles": np.zeros((2, 16, 16, 3), np.uint8)}})
        print("torch" in sys.modules)
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


# -- the IOBinding path (ort-cuda / ort-trt) exercised on the CPU ---------------------------------

def test_iobinding_path_on_cpu(model):
    engine = OrtEngine(model, "ort-cpu", iobinding_device="cpu")
    with engine:
        first_tiles = make_tiles(7)
        first = engine.run({"tiles": first_tiles})
        for batch, size in [(7, 32), (64, 32), (64, 32), (7, 32), (1, 16), (7, 32)]:
            tiles = make_tiles(batch, size)
            assert_close(engine.run({"tiles": tiles}), reference(tiles))
        assert_close(first, reference(first_tiles))  # outputs are copies, not views of reused buffers
        # ort-trt's padding of a short batch up to the largest one seen at that tile size
        engine.pad_batches = True
        for batch in (64, 7, 1, 64, 30):
            tiles = make_tiles(batch)
            out = engine.run({"tiles": tiles})
            assert_close(out, reference(tiles))
        assert engine._largest[(32, 32, 3)] == 64


# -- measure ------------------------------------------------------------------------------------

def test_measure(model):
    with create_engine(model, "ort-cpu") as engine:
        rows = measure(engine, lambda b: make_tiles(b, 16), [4, 1], seconds=0.05)
        assert [r["batch"] for r in rows] == [4, 1]
        for row in rows:
            assert row["runs"] >= 3 and row["tiles_per_s"] > 0 and row["latency_ms"] > 0
            assert set(row) >= {"batch", "tiles_per_s", "latency_ms"}
        rows = measure(engine, lambda b: {"tiles": make_tiles(b, 16)}, [2], seconds=0.0)
        assert rows[0]["runs"] == 3
    with pytest.raises(ValueError):
        measure(engine, make_tiles, [0], seconds=0.0)


# -- native TensorRT, against a stand-in for tensorrt + cuda-python ---------------------------------

class FakeCudart(types.SimpleNamespace):
    """The parts of cuda-python's runtime API the trt backend uses; "device" memory is host memory."""

    def __init__(self):
        super().__init__()
        self.cudaError_t = types.SimpleNamespace(cudaSuccess=0, cudaErrorMemoryAllocation=2)
        self.cudaMemcpyKind = types.SimpleNamespace(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2)
        self.live: dict[int, ctypes.Array] = {}
        self.mallocs = 0
        self.copies = []
        self.streams = set()
        self.synced = 0

    def _alloc(self, size):
        buf = ctypes.create_string_buffer(size)
        self.live[ctypes.addressof(buf)] = buf
        self.mallocs += 1
        return 0, ctypes.addressof(buf)

    def cudaMalloc(self, size):
        return self._alloc(size)

    def cudaMallocHost(self, size):
        return self._alloc(size)

    def cudaFree(self, ptr):
        del self.live[ptr]
        return (0,)

    cudaFreeHost = cudaFree

    def cudaMemcpyAsync(self, dst, src, count, kind, stream):
        assert stream in self.streams and kind in (1, 2)
        assert dst in self.live and src in self.live  # both sides are our (pinned / device) buffers
        ctypes.memmove(dst, src, count)
        self.copies.append(kind)
        return (0,)

    def cudaStreamCreate(self):
        stream = FakeStream(len(self.streams) + 100)
        self.streams.add(stream)
        return 0, stream

    def cudaStreamSynchronize(self, stream):
        self.synced += 1
        return (0,)

    def cudaStreamDestroy(self, stream):
        self.streams.discard(stream)
        return (0,)

    def cudaSetDevice(self, device):
        return (0,)

    def cudaGetErrorName(self, err):
        return 0, b"cudaErrorFake"

    def cudaGetErrorString(self, err):
        return 0, b"fake error"


class FakeStream:
    def __init__(self, handle):
        self.handle = handle

    def __int__(self):
        return self.handle


def fake_tensorrt(max_batch: int = 16, executed: list | None = None):
    """tensorrt 10's Python API as the trt backend uses it, running the test model in numpy."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.99.fake"
    trt.DataType = types.SimpleNamespace(FLOAT="float", HALF="half", INT8="int8", UINT8="uint8", INT32="int32",
                                         INT64="int64", BOOL="bool", BF16="bf16")
    trt.TensorIOMode = types.SimpleNamespace(INPUT="in", OUTPUT="out")

    class Logger:
        WARNING = 2

        def __init__(self, level):
            self.level = level

    class Engine:
        num_io_tensors = 3
        names = ["tiles", "markers", "embedding"]

        def get_tensor_name(self, i):
            return self.names[i]

        def get_tensor_mode(self, name):
            return "in" if name == "tiles" else "out"

        def get_tensor_dtype(self, name):
            return "uint8" if name == "tiles" else "float"

        def get_tensor_shape(self, name):
            return {"tiles": (-1, -1, -1, 3), "markers": (-1, 40), "embedding": (-1, 8)}[name]

        def get_tensor_profile_shape(self, name, profile):
            assert name == "tiles" and profile == 0
            return [(1, 16, 16, 3), (8, 32, 32, 3), (max_batch, 64, 64, 3)]

        def create_execution_context(self):
            return Context()

    class Context:
        def __init__(self):
            self.shapes = {}
            self.addresses = {}

        def set_input_shape(self, name, shape):
            low, _, high = Engine().get_tensor_profile_shape(name, 0)
            if not all(lo <= s <= hi for lo, s, hi in zip(low, shape, high)):
                return False
            self.shapes[name] = tuple(shape)
            return True

        def get_tensor_shape(self, name):
            batch = self.shapes["tiles"][0]
            return {"markers": (batch, 40), "embedding": (batch, 8)}.get(name, self.shapes.get(name))

        def set_tensor_address(self, name, address):
            self.addresses[name] = int(address)
            return True

        def execute_async_v3(self, stream_handle):
            assert isinstance(stream_handle, int)
            shape = self.shapes["tiles"]
            n = int(np.prod(shape))
            tiles = np.ctypeslib.as_array((ctypes.c_uint8 * n).from_address(self.addresses["tiles"])).reshape(shape)
            for name, value in reference(tiles).items():
                out = np.ctypeslib.as_array((ctypes.c_float * value.size).from_address(self.addresses[name]))
                out[:] = value.reshape(-1)
            if executed is not None:
                executed.append(shape[0])
            return True

    class Runtime:
        def __init__(self, logger):
            self.logger = logger

        def deserialize_cuda_engine(self, blob):
            return Engine() if blob == b"fake plan" else None

    trt.Logger, trt.Runtime = Logger, Runtime
    return trt


@pytest.fixture
def fake_trt(monkeypatch):
    executed = []
    rt = FakeCudart()
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(executed=executed))
    monkeypatch.setattr(_cuda, "cudart", lambda: rt)
    monkeypatch.setattr(devices, "device_count", lambda: 1)
    monkeypatch.setattr(devices, "device_name", lambda device_id=0: "Fake GPU")
    rt.executed = executed
    return rt


def write_plan(plans: Path, model, precision: str, blob: bytes, **record) -> None:
    """A plan and the record build-engines writes beside it (its sha256 first of all)."""
    engines.plan_path(plans, model, precision).write_bytes(blob)
    record = {"plan_sha256": hashlib.sha256(blob).hexdigest(), **record}
    engines.plan_meta_path(plans, model, precision).write_text(json.dumps(record))


def test_plan_path():
    assert trt_mod.plan_path("/b/plans", "/b/hex.onnx", "fp16") == Path("/b/plans/hex.fp16.plan")
    assert engines.plan_meta_path("/b/plans", "/b/hex.onnx", "fp16") == Path("/b/plans/hex.fp16.json")


def test_trt_backend_with_stand_in(model, tmp_path, fake_trt):
    plans = tmp_path / "plans"
    plans.mkdir()
    write_plan(plans, model, "fp16", b"fake plan", tensorrt="10.99.fake", gpu="Fake GPU", inputs=[{"name": "tiles"}],
               outputs=[{"name": "markers"}, {"name": "embedding"}])
    engine = create_engine(model, "trt", precision="fp16", plan_dir=plans)
    assert engine.backend == "trt"
    assert engine.input_names == ["tiles"] and engine.output_names == ["markers", "embedding"]
    line = engine.describe()
    assert line.startswith("trt: TensorRT 10.99.fake") and "fp16" in line and "Fake GPU" in line

    tiles = make_tiles(4)
    assert_close(engine.run({"tiles": tiles}), reference(tiles))
    after_first = fake_trt.mallocs
    assert after_first == 6  # pinned + device for one input and two outputs
    tiles = make_tiles(8)
    first = engine.run({"tiles": tiles})
    grown = fake_trt.mallocs
    assert grown > after_first  # a larger batch: reallocated (buffers under 256 bytes may not need to)
    for batch in (2, 8, 5):  # smaller or equal: the same buffers
        other = make_tiles(batch)
        assert_close(engine.run({"tiles": other}), reference(other))
    assert fake_trt.mallocs == grown
    assert_close(first, reference(tiles))  # results are copies, not views of the pinned buffers

    big = make_tiles(40)  # above the profile's max batch (16): chunks of 16, 16, 8
    del fake_trt.executed[:]
    assert_close(engine.run({"tiles": big}), reference(big))
    assert fake_trt.executed == [16, 16, 8]

    with pytest.raises(EngineError) as info:  # 128 px is outside the profile's 16..64
        engine.run({"tiles": make_tiles(2, 128)})
    assert "outside the plan's profile" in assert_one_line(info.value)
    assert engine.run({"tiles": np.zeros((0, 32, 32, 3), np.uint8)})["markers"].shape == (0, 40)

    engine.close()
    engine.close()
    assert fake_trt.live == {} and fake_trt.streams == set()  # everything freed
    with pytest.raises(EngineClosedError):
        engine.run({"tiles": tiles})


def test_trt_plan_errors_and_auto(model, tmp_path, fake_trt, caplog):
    plans = tmp_path / "plans"
    plans.mkdir()
    with pytest.raises(BackendUnavailable) as info:  # no plan
        create_engine(model, "trt", plan_dir=plans)
    text = assert_one_line(info.value)
    assert str(engines.plan_path(plans, model, "fp32")) in text and "hexfast build-engines" in text
    with pytest.raises(BackendUnavailable, match="needs plan_dir"):
        create_engine(model, "trt")

    with caplog.at_level(logging.INFO, logger="hexfast.engines"):
        with create_engine(model, plan_dir=plans) as engine:  # auto without a plan: skips trt
            assert engine.backend == "ort-cpu"
    assert any("auto chose ort-cpu" in r.getMessage() and "trt needs a TensorRT plan" in r.getMessage()
               for r in caplog.records)

    write_plan(plans, model, "fp32", b"stale plan", tensorrt="10.0.1", gpu="Other GPU")
    with pytest.raises(ModelFileError) as info:
        create_engine(model, "trt", plan_dir=plans)
    text = assert_one_line(info.value)
    assert "cannot load this plan (built with TensorRT 10.0.1 on Other GPU)" in text

    write_plan(plans, model, "fp32", b"fake plan", inputs=["images"])
    with pytest.raises(ModelFileError, match="differ from its JSON"):
        create_engine(model, "trt", plan_dir=plans)
    write_plan(plans, model, "fp32", b"fake plan")
    with create_engine(model, plan_dir=plans) as engine:  # auto with a plan: trt
        assert engine.backend == "trt"
        tiles = make_tiles(3)
        assert_close(engine.run({"tiles": tiles}), reference(tiles))


def test_trt_loads_only_the_plan_its_record_hashed(model, tmp_path, fake_trt):
    """A plan is code the GPU runs: without build-engines' record, with other bytes than the record
    hashed, or built for another model's ONNX, it is refused before TensorRT sees it."""
    plans = tmp_path / "plans"
    plans.mkdir()
    seen = []
    runtime = sys.modules["tensorrt"].Runtime
    real = runtime.deserialize_cuda_engine
    runtime.deserialize_cuda_engine = lambda self, blob: seen.append(blob) or real(self, blob)
    engines.plan_path(plans, model, "fp32").write_bytes(b"fake plan")
    with pytest.raises(ModelFileError) as info:  # no record
        create_engine(model, "trt", plan_dir=plans)
    assert "record build-engines writes" in assert_one_line(info.value)
    engines.plan_meta_path(plans, model, "fp32").write_text(json.dumps({"gpu": "Fake GPU"}))
    with pytest.raises(ModelFileError, match="no recorded sha256"):
        create_engine(model, "trt", plan_dir=plans)
    write_plan(plans, model, "fp32", b"fake plan")
    engines.plan_path(plans, model, "fp32").write_bytes(b"evil plan")  # swapped after the build
    with pytest.raises(HexfastError) as info:
        create_engine(model, "trt", plan_dir=plans)
    assert "does not match build-engines' record's" in assert_one_line(info.value)
    listed = ListedFile(Path(model), hashlib.sha256(Path(model).read_bytes()).hexdigest())
    write_plan(plans, model, "fp32", b"fake plan", model_sha256="0" * 64)
    with pytest.raises(ModelFileError, match="was built for another model"):
        create_engine(listed, "trt", plan_dir=plans)
    assert seen == []  # TensorRT never saw a byte of any of them
    write_plan(plans, model, "fp32", b"fake plan", model_sha256=listed.sha256)
    with create_engine(listed, "trt", plan_dir=plans) as engine:
        assert engine.backend == "trt" and seen == [b"fake plan"]


def test_trt_needs_tensorrt_10(model, tmp_path, monkeypatch):
    old = types.ModuleType("tensorrt")
    old.__version__ = "8.6.1"
    monkeypatch.setitem(sys.modules, "tensorrt", old)
    with pytest.raises(BackendUnavailable) as info:
        create_engine(model, "trt", plan_dir=tmp_path)
    assert "needs TensorRT 10 or newer (found 8.6.1" in assert_one_line(info.value)


def test_bf16_conversion():
    values = np.array([1.0, -2.5, 3.140625, 1e-3, 65504.0], np.float32)
    back = trt_mod._from_bf16(trt_mod._to_bf16(values))
    np.testing.assert_allclose(back, values, rtol=2 ** -8)
    assert back.dtype == np.float32


# -- torch.export backend --------------------------------------------------------------------------

def test_torch_backend_needs_a_program(model):
    """Never one found beside the ONNX file: a .pt2 unpickles, so only the one given is loaded."""
    model.with_suffix(".pt2").write_bytes(b"planted")
    if not engines._torch.installed():
        with pytest.raises(BackendUnavailable, match="torch needs torch"):
            create_engine(model, "torch")
        return
    with pytest.raises(BackendUnavailable) as info:
        create_engine(model, "torch")
    text = assert_one_line(info.value)
    assert text.startswith("torch needs a torch.export program (.pt2) the bundle's manifest lists")


def test_torch_backend_runs_an_exported_program(model, tmp_path):
    torch = pytest.importorskip("torch", reason="the torch backend needs torch")

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("w_markers", torch.from_numpy(W_MARKERS))
            self.register_buffer("w_embed", torch.from_numpy(W_EMBED))

        def forward(self, tiles):
            mean = tiles.float().mean(dim=(1, 2))
            return mean @ self.w_markers, mean @ self.w_embed

    onnx_path = tmp_path / "hex.onnx"
    onnx_path.write_bytes(model.read_bytes())
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(Tiny(), (torch.zeros(2, 32, 32, 3, dtype=torch.uint8),),
                                  dynamic_shapes={"tiles": {0: batch}})
    pt2 = onnx_path.with_suffix(".pt2")
    torch.export.save(program, str(pt2))
    with create_engine(pt2, "torch", threads=1) as engine:  # your own file, by path
        assert engine.backend == "torch" and engine.output_names == ["output0", "output1"]
    listed = ListedFile(pt2, hashlib.sha256(pt2.read_bytes()).hexdigest())
    with create_engine(onnx_path, "torch", threads=1, program=listed, output_names=["markers", "embedding"]) as engine:
        assert engine.backend == "torch"
        assert engine.input_names == ["tiles"] and engine.output_names == ["markers", "embedding"]
        assert engine.describe().startswith("torch: torch ")
        for b in (1, 7, 64):
            tiles = make_tiles(b)
            assert_close(engine.run({"tiles": tiles}), reference(tiles))
    if not HAS_GPU:  # auto never picks torch on the CPU
        with create_engine(onnx_path, program=listed) as engine:
            assert engine.backend == "ort-cpu"
    with pytest.raises(HexfastError, match="does not match the manifest's"):  # changed after it was listed
        create_engine(onnx_path, "torch", program=ListedFile(pt2, "0" * 64))
    broken = tmp_path / "broken.pt2"
    broken.write_bytes(b"not a zip")
    with pytest.raises(ModelFileError) as info:
        create_engine(broken, "torch")
    assert str(broken) in assert_one_line(info.value)


# -- real GPU backends (skipped where they cannot run) -----------------------------------------------

def skip_unless_available(backend: str) -> None:
    problem = engines._machine_problem(backend)
    if problem is not None:
        pytest.skip(f"{backend} is not available here: {problem}")


@pytest.mark.parametrize("batch", [1, 7, 64])
def test_ort_cuda_matches_numpy(model, batch):
    skip_unless_available("ort-cuda")
    with create_engine(model, "ort-cuda") as engine:
        assert engine.session.get_providers()[0] == "CUDAExecutionProvider"
        assert "CUDAExecutionProvider" in engine.describe()
        for b in (batch, batch, 3):  # the same shape twice: inputs refilled in place
            tiles = make_tiles(b)
            assert_close(engine.run({"tiles": tiles}), reference(tiles))


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_ort_trt_matches_numpy(model, tmp_path, precision):
    skip_unless_available("ort-trt")
    with create_engine(model, "ort-trt", precision=precision, plan_dir=tmp_path) as engine:
        assert engine.session.get_providers()[0] == "TensorrtExecutionProvider"
        for b in (8, 3, 8):
            tiles = make_tiles(b)
            out = engine.run({"tiles": tiles})
            ref = reference(tiles)
            tol = 1e-4 if precision == "fp32" else 2e-2
            for name in ref:
                np.testing.assert_allclose(out[name], ref[name], rtol=tol, atol=tol * np.abs(ref[name]).max())
    assert any(tmp_path.iterdir()), "the TensorRT EP wrote no engine cache into plan_dir"


def build_plan(onnx_path: Path, plan: Path, precision: str, max_batch: int = 16) -> None:
    """A plan for the test model with TensorRT 10's builder (what `hexfast build-engines` does for real)."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    assert parser.parse(onnx_path.read_bytes()), [parser.get_error(i) for i in range(parser.num_errors)]
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    profile.set_shape("tiles", (1, 16, 16, 3), (8, 32, 32, 3), (max_batch, 64, 64, 3))
    config.add_optimization_profile(profile)
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    blob = builder.build_serialized_network(network, config)
    assert blob is not None
    plan.write_bytes(bytes(blob))


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_trt_native_matches_numpy(model, tmp_path, precision):
    skip_unless_available("trt")
    build_plan(model, engines.plan_path(tmp_path, model, precision), precision)
    with create_engine(model, "trt", precision=precision, plan_dir=tmp_path) as engine:
        assert engine.backend == "trt"
        for b in (4, 16, 2, 40):  # grow, reuse, chunk past the profile's 16
            tiles = make_tiles(b)
            out = engine.run({"tiles": tiles})
            ref = reference(tiles)
            tol = 1e-4 if precision == "fp32" else 2e-2
            for name in ref:
                np.testing.assert_allclose(out[name], ref[name], rtol=tol, atol=tol * np.abs(ref[name]).max())
