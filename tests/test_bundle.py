"""hexfast.bundle: the runtime's model-bundle reader (numpy/json only), on the shipped demo bundle and
damaged copies of it; the TensorRT builder's key/paths logic and its message without TensorRT."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import hexfast, one_line_error
from hexfast.bundle import (
    DEFAULT_BUNDLE, Bundle, BundleError, BundleFileMissingError, ChecksumError, ManifestInvalidError,
    ManifestMissingError, MissingModelError, load_bundle,
)
from hexfast.errors import HexfastError
from hexfast.markers import MARKERS
from hexfast.score.mica_stream import stream_mica




@pytest.fixture
def demo_copy(tmp_path) -> Path:
    target = tmp_path / "demo"
    shutil.copytree(DEFAULT_BUNDLE, target, ignore=shutil.ignore_patterns("engines"))
    return target


def edit_manifest(bundle: Path, change) -> None:
    path = bundle / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def test_default_bundle_is_the_shipped_demo():
    b = load_bundle()
    assert isinstance(b, Bundle) and b.path == DEFAULT_BUNDLE
    assert b.demo is True and b.manifest["demo"] is True
    assert b.markers == list(MARKERS)
    assert b.tile_um == 56.0 and b.manifest["tile"] == {"um": 56.0, "px_at_40x": 224}
    assert len(b.hash) == 64 and b.hash == __import__("hashlib").sha256((b.path / "manifest.json").read_bytes()).hexdigest()
    for name in ("hex", "codex_encoder", "mica"):
        assert b.has(name)
        for precision in ("fp32", "fp16"):
            assert b.model_path(name, precision).is_file()
    assert b.mica_features["kind"] == "resnet50-trunc" and b.has("he_features")
    assert b.mica_features["patching"]["patch_size"] == 256 and b.mica_features["patching"]["a_t"] == 1.0
    assert b.manifest["schema"] == 2 and b.manifest["exporter"].startswith("hexfast_export ")
    assert not b.has("nope")
    for name in ("hex", "codex_encoder", "mica"):  # torch.export programs, for the torch backend
        assert b.program_file(name) is not None and b.program_file(name).path.is_file()
    assert b.program_file("hex", "fp16") is not None and b.program_file("mica", "fp16") is None
    size = sum(p.stat().st_size for p in b.path.iterdir())
    assert size < 18e6, size  # ~17 MB inside the wheel: ONNX fp32 + fp16, programs fp32 (+ HEX fp16), and
    # HEX's CPU variants (hex.int8.onnx, hex.bf16.pt2)
    assert b.listed(b.model("hex")["cpu_variants"]["int8"]["file"]).path.is_file()
    assert b.program_file("hex", "bf16") is not None


def test_manifest_records_parity_within_tolerance():
    m = load_bundle().manifest
    for name, entry in m["models"].items():
        # CLAM's encoder runs fp32 only (MICA's bag as CLAM computes it): no fp16 file
        assert set(entry["parity"]) == ({"fp32"} if name == "he_features" else {"fp32", "fp16"})
        assert set(entry["parity"]["fp32"]) == set(entry["outputs"])
        assert max(entry["parity"]["fp32"].values()) <= 1e-4, (name, entry["parity"])
        if name != "he_features":
            assert max(entry["parity"]["fp16"].values()) <= 1e-2, (name, entry["parity"])
        assert max(entry["parity_program"]["fp32"].values()) <= 1e-4, (name, entry["parity_program"])
        assert max(entry["parity_program_vs_onnx"]["fp32"].values()) <= 1e-4, name


def test_runtime_modules_never_import_torch():
    code = ("import sys, hexfast, hexfast.bundle, hexfast.cli, hexfast.cli.models, hexfast.engines.build;"
            "hexfast.bundle.load_bundle(); hexfast.cli.build_parser();"
            "print(sorted(m for m in ('torch', 'hexfast_export', 'onnx', 'tensorrt') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_demo_bundle_runs_with_onnxruntime():
    ort = pytest.importorskip("onnxruntime", reason="running the ONNX files needs onnxruntime")
    b = load_bundle()
    rng = np.random.default_rng(0)
    for precision in ("fp32", "fp16"):
        hex_s = ort.InferenceSession(str(b.model_path("hex", precision)), providers=["CPUExecutionProvider"])
        for size, batch in ((224, 3), (112, 1), (384, 2), (448, 1)):
            markers, embedding = hex_s.run(["markers", "embedding"],
                                           {"tiles": rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)})
            assert markers.shape == (batch, 40) and embedding.shape == (batch, 1024)
            assert markers.dtype == np.float32 and np.isfinite(markers).all() and np.isfinite(embedding).all()
        codex_s = ort.InferenceSession(str(b.model_path("codex_encoder", precision)), providers=["CPUExecutionProvider"])
        for gh, gw in ((1, 1), (30, 30), (57, 300)):
            (features,) = codex_s.run(["features"], {"codex": rng.random((40, gh, gw), dtype=np.float32) * 0.1})
            assert features.shape == (40, 384) and features.dtype == np.float32
        mica_s = ort.InferenceSession(str(b.model_path("mica", precision)), providers=["CPUExecutionProvider"])
        names = [o.name for o in mica_s.get_outputs()]
        def run(feeds, session=mica_s, names=names):
            return dict(zip(names, session.run(names, feeds)))

        width = b.model("mica")["inputs"]["coattn_mean_in"]["shape"][1]
        for n in (1, 250):
            h_path = rng.standard_normal((n, 1024), dtype=np.float32)
            out = stream_mica(run, features, lambda h=h_path, n=n: (h[i:i + 100] for i in range(0, n, 100)),
                              state_width=width, keep_attention=True)
            hazards, survival, risk = out.hazards, out.survival, out.risk
            assert hazards.shape == (1, 4) and survival.shape == (1, 4) and risk.shape == (1,)
            assert out.attention.shape == (40, n)
            np.testing.assert_allclose(out.attention.sum(axis=1), 1.0, rtol=2e-3)
            assert ((0 < hazards) & (hazards < 1)).all()
            assert np.all(np.diff(survival[0]) <= 0) and risk[0] == pytest.approx(-survival.sum(), rel=2e-3)


def test_signatures_in_manifest():
    models = load_bundle().manifest["models"]
    assert models["hex"]["inputs"] == {"tiles": {"dtype": "uint8", "shape": ["batch", "height", "width", 3]}}
    assert models["hex"]["outputs"] == {"markers": {"dtype": "float32", "shape": ["batch", 40]},
                                        "embedding": {"dtype": "float32", "shape": ["batch", 1024]}}
    assert models["codex_encoder"]["inputs"]["codex"]["shape"] == [40, "grid_height", "grid_width"]
    assert models["codex_encoder"]["outputs"]["features"]["shape"] == [40, 384]
    assert models["mica"]["inputs"] == {"h_path": {"dtype": "float32", "shape": ["tiles", 1024]},
                                        "h_codex": {"dtype": "float32", "shape": [40, 384]},
                                        "coattn_lse_in": {"dtype": "float32", "shape": [40]},
                                        "coattn_mean_in": {"dtype": "float32", "shape": [40, 32]}}
    assert models["mica"]["outputs"]["coattn_scores"]["shape"] == [40, "tiles"]
    assert models["mica"]["outputs"]["risk"]["shape"] == [1]


def test_sha_mismatch_is_detected(demo_copy):
    data = bytearray((demo_copy / "mica.onnx").read_bytes())
    data[-10] ^= 0xFF
    (demo_copy / "mica.onnx").write_bytes(bytes(data))
    with pytest.raises(ChecksumError) as err:
        load_bundle(demo_copy)
    message = str(err.value)
    assert "mica.onnx" in message and "sha256" in message and "\n" not in message
    assert isinstance(err.value, HexfastError)
    load_bundle(demo_copy, verify=False)  # opt-out for a quick look


def test_missing_file_is_refused(demo_copy):
    (demo_copy / "hex.fp16.onnx").unlink()
    with pytest.raises(BundleFileMissingError, match=r"hex\.fp16\.onnx: missing from the bundle"):
        load_bundle(demo_copy)


def test_missing_and_bad_manifest(demo_copy, tmp_path):
    with pytest.raises(ManifestMissingError, match="no such model bundle"):
        load_bundle(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ManifestMissingError, match=r"manifest\.json: missing"):
        load_bundle(empty)
    (demo_copy / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestInvalidError, match="not valid JSON"):
        load_bundle(demo_copy)


@pytest.mark.parametrize("change,error,fragment", [
    (lambda m: m.update(schema=3), ManifestInvalidError, "newer than this hexfast"),
    (lambda m: m.update(schema=1), ManifestInvalidError, "export the bundle again"),
    (lambda m: m.update(schema="one"), ManifestInvalidError, "unsupported schema"),
    (lambda m: m.pop("markers"), ManifestInvalidError, "lacks required key(s) markers"),
    (lambda m: m["models"].pop("hex"), MissingModelError, "no 'hex' model"),
    (lambda m: m["mica_features"].update(kind="clam-uni"), ManifestInvalidError, "will not pair MICA"),
    # an export before --mica-features wrote a guess; it is not trusted
    (lambda m: m.update(mica_features="hex-embedding"), ManifestInvalidError, "export it again with --mica-features"),
    (lambda m: m.pop("mica_features"), ManifestInvalidError, "does not declare which tile features"),
    (lambda m: m["models"].pop("he_features"), MissingModelError, "need the 'he_features' model"),
    (lambda m: m["mica_features"].pop("patching"), ManifestInvalidError, "patching"),
    (lambda m: m["markers"].pop(), ManifestInvalidError, "gives 40 markers but the manifest names 39"),
    (lambda m: m["files"].update({"../outside.onnx": "0" * 64}), ManifestInvalidError, "outside the bundle"),
    (lambda m: m["files"].pop("codex_encoder.onnx"), ManifestInvalidError, "not among the listed files"),
])
def test_manifest_checks(demo_copy, change, error, fragment):
    edit_manifest(demo_copy, change)
    with pytest.raises(error) as err:
        load_bundle(demo_copy)
    assert fragment in str(err.value) and "manifest.json" in str(err.value)


def test_model_path_and_engine_dir(demo_copy, monkeypatch):
    edit_manifest(demo_copy, lambda m: (m["models"].pop("mica"), m.pop("mica_features"),
                                        m["models"]["codex_encoder"]["files"].pop("fp16")))
    b = load_bundle(demo_copy)
    assert b.model_path("hex") == demo_copy.resolve() / "hex.onnx"
    with pytest.raises(MissingModelError, match="no 'mica' model"):
        b.model_path("mica")
    with pytest.raises(MissingModelError, match="no fp16 file"):
        b.model_path("codex_encoder", "fp16")
    assert not b.has("codex_encoder", "fp16") and b.has("codex_encoder", "fp32")
    monkeypatch.delenv("HEXFAST_ENGINE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(demo_copy.parent / "xdg"))
    # Outside the bundle (a plan is code; it never comes with a bundle), keyed by the bundle's hash.
    assert b.engine_cache_dir("NVIDIA_H100-trt10.3.0") == \
        demo_copy.parent / "xdg" / "hexfast" / "engines" / b.hash[:16] / "NVIDIA_H100-trt10.3.0"
    assert not (demo_copy / "engines").exists()  # a path, not created
    monkeypatch.setenv("HEXFAST_ENGINE_CACHE", str(demo_copy / "cache"))
    assert b.engine_cache_dir("k") == demo_copy / "cache" / b.hash[:16] / "k"
    with pytest.raises(ValueError):
        b.engine_cache_dir("../escape")


def test_errors_are_bundle_errors():
    for cls in (ManifestMissingError, ManifestInvalidError, BundleFileMissingError, ChecksumError, MissingModelError):
        assert issubclass(cls, BundleError) and issubclass(cls, HexfastError)


# --------------------------------------------------------------------------- build-engines without TensorRT


def test_engine_key_and_plan_specs():
    from hexfast.engines.build import engine_key, plan_specs

    assert engine_key("NVIDIA H100 80GB HBM3", "10.3.0") == "NVIDIA_H100_80GB_HBM3-trt10.3.0"
    assert engine_key("  Tesla T4 / (PCIe) ", "10.0.1.6") == "Tesla_T4_PCIe-trt10.0.1.6"
    b = load_bundle()
    specs = plan_specs(b, precision="fp16", max_batch=32, tile_sizes=[224, 384], models=["hex", "codex_encoder", "mica"])
    hex_spec = specs[0]
    assert hex_spec["onnx"] == "hex.fp16.onnx" and hex_spec["strongly_typed"] and hex_spec["plan"] == "hex.fp16.plan"
    assert [p["tile_size"] for p in hex_spec["profiles"]] == [224, 384]
    assert hex_spec["profiles"][1]["shapes"]["tiles"] == {"min": [1, 384, 384, 3], "opt": [32, 384, 384, 3],
                                                          "max": [32, 384, 384, 3]}
    assert specs[1]["profiles"][0]["shapes"]["codex"]["max"] == [40, 4095, 4095]
    assert specs[2]["profiles"][0]["shapes"]["h_path"]["min"] == [1, 1024]
    bf16 = plan_specs(b, precision="bf16", max_batch=8, tile_sizes=[224], models=["hex"])[0]
    assert bf16["onnx"] == "hex.onnx" and not bf16["strongly_typed"]
    with pytest.raises(MissingModelError):
        plan_specs(b, precision="fp32", max_batch=8, tile_sizes=[224], models=["nope"])


def test_build_engines_without_tensorrt_says_so(tmp_path):
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("tensorrt is importable here; the missing-TensorRT message cannot be shown")
    r = hexfast("build-engines", DEFAULT_BUNDLE, "--fp16")
    one_line_error(r, "build-engines needs TensorRT 10's Python package")
    r = hexfast("build-engines", tmp_path / "nowhere")
    one_line_error(r, "nowhere", "no such model bundle")
    r = hexfast("build-engines", DEFAULT_BUNDLE, "--fp16", "--bf16")
    assert r.returncode == 2 and "not allowed with argument" in r.stderr


def test_build_engines_with_tensorrt(tmp_path):
    pytest.importorskip("tensorrt", reason="TensorRT is not installed (needs an NVIDIA GPU machine)")
    from hexfast.engines.build import gpu_name

    if gpu_name() is None:
        r = hexfast("build-engines", DEFAULT_BUNDLE)
        one_line_error(r, "no CUDA GPU")
        pytest.skip("tensorrt imports but no CUDA GPU is visible")
    bundle = tmp_path / "demo"
    shutil.copytree(DEFAULT_BUNDLE, bundle)
    r = hexfast("build-engines", bundle, "--fp16", "--max-batch", "8", "--models", "hex,mica")
    assert r.returncode == 0, r.stderr
    b = load_bundle(bundle)
    plans = list((bundle / "engines").glob("*/hex.fp16.plan"))
    assert len(plans) == 1 and (plans[0].parent / "timing.cache").is_file()
    info = json.loads((plans[0].parent / "hex.fp16.json").read_text())
    assert info["bundle_hash"] == b.hash and [p["tile_size"] for p in info["profiles"]] == [224, 384]
    assert (plans[0].parent / "mica.fp16.plan").is_file()
