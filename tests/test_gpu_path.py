"""The GPU path (issue 15), as far as a CPU can check it: torch.export programs in the bundle
(fused attention kept, reduced precision by cast weights, preprocessing float32), the torch engine's
submit/collect, the staged pipeline (errors and cancel still stop it cleanly), the simulated engine
of `hexfast bench e2e`, and the device script's install and dry run. The CUDA-only parts run where a GPU
is (benchmarks/device_check.sh); their logic is emulated on the host in test_torch_device.py."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

import hexfast
from conftest import hexfast as hexfast_cli
from conftest import shared_file
from hexfast.bundle import DEFAULT_BUNDLE, load_bundle
from hexfast.errors import OutputError
from hexfast.outputs import outputs_complete
from hexfast.score import Scorer, open_engine
from test_score import he_slide, small_slide, temp_files

ROOT = Path(__file__).resolve().parents[1]
torch = pytest.importorskip("torch", reason="the torch backend needs torch")
from hexfast_export.torch_export import SDPA, load_program, op_counts  # noqa: E402


def test_programs_keep_one_fused_attention_per_layer():
    bundle = load_bundle()
    depth = bundle.manifest["hex_encoder"]["depth"]
    for precision in ("fp32", "fp16"):
        ops = op_counts(load_program(bundle.program_file("hex", precision).path))
        assert ops[SDPA] == depth, ops  # one aten.scaled_dot_product_attention per MUSK layer
        assert not any("softmax" in op for op in ops), ops  # no unfused attention decomposed into the graph
    ops = op_counts(load_program(bundle.program_file("codex_encoder").path))
    assert ops[SDPA] >= 1 and not any("softmax" in op for op in ops), ops


def test_reduced_precision_programs_cast_the_weights_not_the_preprocessing():
    program = load_program(load_bundle().program_file("hex", "fp16").path)
    dtypes = {name: p.dtype for name, p in program.state_dict.items()}
    assert dtypes and all(d == torch.float16 for n, d in dtypes.items() if n.startswith("model.")), dtypes
    out = program.module()(torch.randint(0, 256, (3, 224, 224, 3), dtype=torch.uint8))
    assert all(o.dtype == torch.float32 for o in out)
    # the exact resize ran in float32: a 384-px tile passes through it unchanged, so fp16 and fp32 differ
    # only by the network's rounding
    ops = op_counts(program)
    assert any("to" in op or "_to_copy" in op for op in ops)


def test_torch_engine_submit_collect_and_precisions_agree_with_onnx(tmp_path):
    bundle = load_bundle()
    tiles = np.random.default_rng(0).integers(0, 256, (6, 224, 224, 3), dtype=np.uint8)
    with open_engine(bundle, "hex", "ort-cpu") as ort:
        ref = ort.run({"tiles": tiles})
    for precision, tolerance in (("fp32", 1e-5), ("fp16", 1e-2), ("bf16", 5e-2)):
        with open_engine(bundle, "hex", "torch", precision) as engine:
            assert engine.backend == "torch" and precision in engine.describe()
            handles = [engine.submit({"tiles": tiles[:3]}), engine.submit({"tiles": tiles[3:]})]  # two in flight
            got = [engine.collect(h) for h in handles]
            for name in ("markers", "embedding"):
                joined = np.concatenate([g[name] for g in got])
                assert joined.dtype == np.float32
                rel = np.abs(joined - ref[name]).max() / np.abs(ref[name]).max()
                assert rel <= tolerance, (precision, name, rel)
    import shutil

    from test_trust import relist

    copy = tmp_path / "no-bf16"
    shutil.copytree(bundle.path, copy)

    def edit(m):
        m["models"]["hex"]["programs"].pop("bf16")
        m["models"]["hex"].pop("cpu_variants")
        m["files"].pop("hex.bf16.pt2")

    relist(copy, edit)
    (copy / "hex.bf16.pt2").unlink()
    with pytest.raises(hexfast.HexfastError, match="bf16"):  # a bundle without a bf16 program
        open_engine(load_bundle(copy), "hex", "torch", "bf16")


def test_scoring_with_the_torch_backend_equals_onnx_runtime(tmp_path):
    # an island of 640 px: above the demo's CLAM minimum tissue area (a_t = 1 reference patch, 512² px)
    slide = he_slide(tmp_path / "s.tiff", 896, 896, [(128, 128, 768, 768)])
    results = {}
    for backend in ("ort-cpu", "torch"):
        with Scorer(backend=backend, batch_size=8) as scorer:
            results[backend] = scorer.score(slide)
    a, b = results["ort-cpu"], results["torch"]
    np.testing.assert_array_equal(a.coords, b.coords)
    assert np.abs(a.markers - b.markers).max() <= 1e-5 * np.abs(a.markers).max()
    assert len(a.mica_coords) > 0 and np.array_equal(a.mica_coords, b.mica_coords)
    assert np.abs(a.mica_features - b.mica_features).max() <= 1e-5 * np.abs(a.mica_features).max()
    assert a.mica["risk"] == pytest.approx(b.mica["risk"], rel=1e-5)


def test_bundles_without_programs_still_load_and_score(tmp_path):
    copy = tmp_path / "old"
    shutil.copytree(DEFAULT_BUNDLE, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    for entry in manifest["models"].values():
        entry.pop("programs")
    for rel in [r for r in manifest["files"] if r.endswith(".pt2")]:
        del manifest["files"][rel]
        (copy / rel).unlink()
    (copy / "manifest.json").write_text(json.dumps(manifest))
    bundle = load_bundle(copy)
    assert bundle.program_file("hex") is None and bundle.manifest["schema"] == 2
    with Scorer(bundle, "ort-cpu") as scorer:
        assert len(scorer.score(small_slide(tmp_path / "s.tiff")).coords) > 0


def test_a_writer_error_mid_slide_stops_the_pipeline_cleanly(tmp_path, monkeypatch):
    """The h5 appends run on their own thread: its error is the slide's, nothing half-written is
    left, and no thread outlives the call."""
    slide = small_slide(tmp_path / "s.tiff")
    calls = []

    def failing(self, *args):
        calls.append(1)
        if len(calls) == 2:
            raise OutputError(self.paths.h5, "cannot write: No space left on device")
        return real(self, *args)

    from hexfast.outputs import writer as writer_module

    real = writer_module.SlideWriter.append
    monkeypatch.setattr(writer_module.SlideWriter, "append", failing)
    before = threading.active_count()
    with Scorer(backend="ort-cpu", batch_size=2) as scorer:
        with pytest.raises(OutputError, match="No space left"):
            scorer.score(slide, tmp_path / "out")
    assert threading.active_count() == before
    assert not outputs_complete(tmp_path / "out", "s") and temp_files(tmp_path / "out") == []


def test_the_simulated_engine_is_for_benchmarks_only(tmp_path):
    slide = small_slide(tmp_path / "s.tiff")
    r = hexfast_cli("bench", "e2e", slide, "--simulate-engine", "2000", "--batch-size", "4", "--seconds", "0.2",
                    "--json", tmp_path / "e2e.json")
    assert r.returncode == 0, r.stderr
    result = json.loads((tmp_path / "e2e.json").read_text())
    assert result["simulated_engine_tiles_per_s"] == 2000 and result["engine_tiles_per_s"] == 2000
    assert 0 < result["pipeline_efficiency"] <= 1.05 and result["tiles"] > 0
    assert "hex wait: engine (within stream+hex)" in result["seconds"]
    r = hexfast_cli("score", slide, "--simulate-engine", "2000", "-o", tmp_path / "out")
    assert r.returncode == 2 and "unrecognized arguments: --simulate-engine" in r.stderr


@pytest.fixture(scope="module")
def host_payload(tmp_path_factory):
    """benchmarks/device_payload.sh --host: the device's wheel folder and test data, for this machine's python."""
    shared_file("slides/CMU-1-Small-Region.svs")  # its tissue texture
    shared_file("hex-official/he_patches")
    payload = tmp_path_factory.mktemp("payload") / "p"
    r = subprocess.run(["bash", "benchmarks/device_payload.sh", "--host", str(payload)], capture_output=True,
                       text=True, timeout=900, cwd=ROOT, env=python_first())
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return payload


def python_first() -> dict:
    """The environment with this interpreter's python3 first on PATH (the scripts call python3)."""
    return dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")


def device_check(out: Path, payload: Path, work: Path, limit: int | None = None) -> subprocess.CompletedProcess:
    env = dict(python_first(), HEXFAST_DEVICE_PAYLOAD=str(payload), HEXFAST_DEVICE_WORK=str(work))
    if limit is not None:
        env["HEXFAST_DEVICE_LIMIT"] = str(limit)
    return subprocess.run(["bash", "benchmarks/device_check.sh", str(out), "--cpu"], capture_output=True, text=True,
                          timeout=900, cwd=ROOT, env=env)


def test_device_check_dry_run(tmp_path, host_payload):
    """benchmarks/device_check.sh --cpu: the device's install (pip --target from the wheel folder, PYTHONPATH),
    then every step of the GPU run, tiny, on this CPU."""
    out, work = tmp_path / "out", tmp_path / "work"
    r = device_check(out, host_payload, work)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    result = json.loads((out / "device_check.json").read_text())
    steps = result["steps"]
    assert list(steps) == ["preflight", "export", "engine", "engine_sweep", "peak", "slide", "e2e", "parity",
                           "reference"]
    assert all(step["ok"] for step in steps.values()), {k: v.get("error") for k, v in steps.items()}
    # hexfast came from the wheel installed with --target, through PYTHONPATH, not from this environment
    assert Path(steps["preflight"]["hexfast_from"]).resolve() == (work / "site" / "hexfast").resolve()
    assert "bf16" in steps["preflight"]["forward"]
    assert steps["export"]["programs"] == {"fp32": "hex.pt2", "bf16": "hex.bf16.pt2"}
    assert steps["parity"]["tiles"] >= 8 and steps["parity"]["from_shared"] and steps["parity"]["reference_tf32_off"]
    assert steps["parity"]["bf16_vs_fp32"]["markers"] < 5e-2 and steps["parity"]["fp32_device_vs_cpu"]["markers"] < 1e-5
    assert steps["e2e"]["describe"].startswith("torch") and steps["e2e"]["pipeline_efficiency"] > 0
    assert {"bf16_tiles_per_s", "pipeline_efficiency", "projected_50k_seconds", "speedup_vs_reference"} \
        <= set(result["summary"])
    # only small files come back from the device: no bundle, slide or installed packages under OUT
    assert sorted(p.name for p in out.rglob("*")) == ["device_check.json", "e2e.json", "log.txt", "reference.json"]
    assert all(p.stat().st_size < 1 << 20 for p in out.iterdir())
    assert not list(work.rglob("pyvenv.cfg")) and not list(out.rglob("pyvenv.cfg"))  # no venv made
    assert "### preflight" in (out / "log.txt").read_text()
    # a rerun on the same (still warm) machine reuses the bundle it exported
    assert not steps["export"]["reused"] and device_check_module().export(work, cpu=True)["reused"]


def device_check_module():
    spec = importlib.util.spec_from_file_location("device_check", ROOT / "benchmarks" / "device_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_device_check_refuses_a_payload_built_from_other_sources(tmp_path):
    """The device runs the payload's wheel, not the checkout: a wheel older than the checkout is caught."""
    stale_files = device_check_module().stale_files
    site = tmp_path / "site"
    shutil.copytree(ROOT / "python" / "hexfast", site / "hexfast")
    shutil.copytree(ROOT / "export" / "hexfast_export", site / "hexfast_export")
    assert stale_files(site) == []
    (site / "hexfast" / "engines" / "torch_backend.py").write_text("# an older version\n")
    (site / "hexfast_export" / "demo.py").unlink()
    assert stale_files(site) == ["hexfast/engines/torch_backend.py", "hexfast_export/demo.py"]


def test_device_check_stops_at_its_time_limit(tmp_path, host_payload):
    """Past HEXFAST_DEVICE_LIMIT the step in progress is recorded as stopped, the JSON kept, exit 124."""
    out = tmp_path / "out"
    r = device_check(out, host_payload, tmp_path / "work", limit=40)
    assert r.returncode == 124, r.stdout[-3000:] + r.stderr[-3000:]
    result = json.loads((out / "device_check.json").read_text())
    assert result["stopped"] == "time limit (SIGTERM) reached"
    steps = list(result["steps"].values())
    assert steps[0]["ok"] and len(steps) < 9  # preflight ran; the limit came before the end
    # every step is complete, but for the one in progress at the signal (if it came during one, not between)
    assert all(step["ok"] for step in steps[:-1])
    assert steps[-1]["ok"] or steps[-1]["error"] == "stopped by the time limit"


def test_device_check_refuses_a_missing_payload(tmp_path):
    r = device_check(tmp_path / "out", tmp_path / "nothing", tmp_path / "work")
    assert r.returncode == 2 and "run benchmarks/device_payload.sh first" in r.stdout
