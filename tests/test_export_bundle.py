"""`hexfast export`: demo bundles (tiny, and the full-size architectures under CI), the real-weights path with
the official heads checkpoint, determinism of the shipped demo bundle, and bad input."""

import copy
import json
import os
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="hexfast export needs torch (pip install '.[export]')")
ort = pytest.importorskip("onnxruntime", reason="hexfast export needs onnxruntime")
pytest.importorskip("onnx", reason="hexfast export needs onnx")

from conftest import hexfast, one_line_error, shared_file  # noqa: E402
from export_helpers import musk_file_state, save  # noqa: E402
from hexfast.bundle import DEFAULT_BUNDLE, load_bundle  # noqa: E402
from hexfast.score.mica_stream import INITIAL_LSE  # noqa: E402
from hexfast_export import MuskConfig  # noqa: E402

SHALLOW = MuskConfig(depth=2, dim=1024, heads=16, ffn_dim=512)  # full 384 input, dim 1024 for the official heads
SHALLOW_FLAG = "depth=2,ffn_dim=512"
VOLATILE = ("created", "files", "environment")  # differ between runs / machines by nature
# Measured at export, each max|Δ|/max|ref| against torch fp32 on this CPU: their size is the precision's
# rounding, their exact value the CPU's kernels' (AVX2, AVX-512 and AMX order the sums differently).
PARITY_FIGURES = ("parity", "parity_streamed", "parity_program", "parity_program_vs_onnx")
SAME_ORDER = 4.0  # a regenerated figure within this factor of the shipped one: the same arithmetic
FP32_FLOOR = 16 * float(np.finfo(np.float32).eps)  # fp32 figures: a few ulps of the outputs' largest value


def stable(manifest: dict) -> dict:
    """Manifest content that must not change when the same export is run again (the parity figures are
    compared separately)."""
    out = {k: copy.deepcopy(v) for k, v in manifest.items() if k not in VOLATILE}
    out["models"] = {name: {k: v for k, v in entry.items() if k not in PARITY_FIGURES}
                     for name, entry in out["models"].items()}
    for variant in out["models"]["hex"].get("cpu_variants", {}).values():
        for volatile in ("fidelity", "fit"):  # measured on this CPU (int8 and bf16 kernels differ): compared apart
            variant.pop(volatile)
    return out


def assert_same_fidelity(fresh: dict, shipped: dict, where) -> None:
    """A CPU variant's fidelity measured again on another CPU: the same quantization, so the same order."""
    assert abs(fresh["markers_pearson_min"] - shipped["markers_pearson_min"]) <= 0.01, where
    assert abs(fresh["embedding_cosine_min"] - shipped["embedding_cosine_min"]) <= 0.001, where
    assert shipped["markers_max_abs_of_range"] / SAME_ORDER <= fresh["markers_max_abs_of_range"] \
        <= SAME_ORDER * shipped["markers_max_abs_of_range"], where


def assert_same_order(fresh: float, shipped: float, precision: str, where) -> None:
    """A parity figure regenerated on another CPU: no worse than the arithmetic explains (within SAME_ORDER
    of the shipped one, or a few fp32 ulps), and for fp16 / bf16 not vanishing either (a cast that did
    not happen gives ~0, as if fp32)."""
    assert fresh <= max(SAME_ORDER * shipped, FP32_FLOOR), (where, fresh, shipped)
    if precision != "fp32":
        assert fresh >= shipped / SAME_ORDER, (where, fresh, shipped)


def test_parity_figures_are_compared_with_a_tolerance_that_can_fail():
    assert_same_order(0.00204, 0.00164, "fp16", "the issue's AVX-512 host")  # 1.24x: the same arithmetic
    assert_same_order(0.0, 0.0, "fp32", "identical kernels")
    assert_same_order(1.1e-6, 9.52e-7, "fp32", "an fp32 ulp or two")
    for fresh, shipped, precision in ((0.01, 0.00164, "fp16"), (0.0, 0.00164, "fp16"), (1e-4, 9.52e-7, "fp32")):
        with pytest.raises(AssertionError):
            assert_same_order(fresh, shipped, precision, "a real change")


def run_all(bundle):
    rng = np.random.default_rng(0)
    hex_s = ort.InferenceSession(str(bundle.model_path("hex")), providers=["CPUExecutionProvider"])
    markers, embedding = hex_s.run(None, {"tiles": rng.integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)})
    assert markers.shape == (2, 40) and embedding.shape == (2, 1024)
    if bundle.has("codex_encoder"):
        codex_s = ort.InferenceSession(str(bundle.model_path("codex_encoder")), providers=["CPUExecutionProvider"])
        (features,) = codex_s.run(None, {"codex": rng.random((40, 20, 31), dtype=np.float32) * 0.1})
        assert features.shape == (40, 384)
    if bundle.has("mica"):
        mica_s = ort.InferenceSession(str(bundle.model_path("mica")), providers=["CPUExecutionProvider"])
        width = bundle.model("mica")["inputs"]["coattn_mean_in"]["shape"][1]
        outs = mica_s.run(None, {"h_path": embedding, "h_codex": features,
                                 "coattn_lse_in": np.full(40, INITIAL_LSE, np.float32),
                                 "coattn_mean_in": np.zeros((40, width), np.float32)})
        assert [o.shape for o in outs] == [(1, 4), (1, 4), (1,), (40, 2), (40,), (40, width)]
    if bundle.has("he_features"):
        he_s = ort.InferenceSession(str(bundle.model_path("he_features")), providers=["CPUExecutionProvider"])
        (features,) = he_s.run(None, {"tiles": rng.integers(0, 256, (3, 256, 256, 3), dtype=np.uint8)})
        assert features.shape == (3, 1024) and np.isfinite(features).all()


def test_demo_tiny_round_trip(tmp_path):
    out = tmp_path / "demo"
    r = hexfast("export", "--demo", "--size", "tiny", "--mica-features", "hex-embedding", "-o", out)
    assert r.returncode == 0, r.stderr
    assert "hex fp32: ONNX Runtime vs torch fp32" in r.stdout and "DEMO" in r.stdout
    b = load_bundle(out)
    assert b.demo and b.models == ["hex", "codex_encoder", "mica"] and b.mica_features["kind"] == "hex-embedding"
    assert not b.has("hex", "fp16") and b.manifest["sources"] == {}
    assert b.manifest["demo_models"]["size"] == "tiny"
    run_all(b)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]  # no temporary directory left behind


def test_shipped_demo_bundle_regenerates_identically(tmp_path):
    """The committed python/hexfast/models/demo is `hexfast export --demo --size tiny --mica-features resnet50-trunc
    --fp16`: regenerating it
    gives the same manifest (apart from the creation time and environment) and, with the torch/onnx versions
    that wrote it, byte-identical ONNX files."""
    out = tmp_path / "demo"
    r = hexfast("export", "--demo", "--size", "tiny", "--mica-features", "resnet50-trunc", "--fp16", "-o", out)
    assert r.returncode == 0, r.stderr
    shipped = json.loads((DEFAULT_BUNDLE / "manifest.json").read_text())
    fresh = json.loads((out / "manifest.json").read_text())
    assert stable(fresh) == stable(shipped)
    assert set(fresh["files"]) == set(shipped["files"])
    for name, entry in fresh["models"].items():
        assert {k for k in entry if k in PARITY_FIGURES} == {k for k in shipped["models"][name] if k in PARITY_FIGURES}
        for kind in (k for k in PARITY_FIGURES if k in entry):
            for precision, figures in entry[kind].items():
                for output, value in figures.items():
                    assert_same_order(value, shipped["models"][name][kind][precision][output], precision,
                                      (name, kind, precision, output))
    for name, variant in fresh["models"]["hex"]["cpu_variants"].items():
        assert_same_fidelity(variant["fidelity"], shipped["models"]["hex"]["cpu_variants"][name]["fidelity"], name)
    import onnx

    same_tools = (shipped["environment"]["torch"] == torch.__version__.split("+")[0]
                  and shipped["environment"]["onnx"] == onnx.__version__)
    if same_tools:
        assert fresh["files"] == shipped["files"], "the demo export is not deterministic"
    else:
        print(f"demo bundle written with torch {shipped['environment']['torch']} / onnx "
              f"{shipped['environment']['onnx']}; file hashes not compared")


def test_real_path_musk_plus_official_heads(tmp_path):
    """--musk (random MUSK-layout weights in a safetensors file, 2 layers) + the official heads checkpoint,
    parity on the built-in CMU tiles plus the hex-official he_patches."""
    heads = shared_file("hex-official/hex_heads_demo_checkpoint.pth")
    patches = shared_file("hex-official/he_patches")
    musk = save(musk_file_state(SHALLOW), tmp_path / "model.safetensors")
    out = tmp_path / "bundle"
    r = hexfast("export", "--musk", musk, "--hex-heads", heads, "--musk-config", SHALLOW_FLAG, "--parity-tiles",
                patches, "--fp16", "-o", out)
    assert r.returncode == 0, r.stderr
    print(r.stdout)
    b = load_bundle(out)
    m = b.manifest
    assert m["demo"] is False and b.models == ["hex"] and "mica_features" not in m
    assert set(m["sources"]) == {"musk", "hex_heads"}
    assert m["sources"]["hex_heads"]["path"] == str(heads.resolve())
    import hashlib

    assert m["sources"]["hex_heads"]["sha256"] == hashlib.sha256(heads.read_bytes()).hexdigest()
    assert m["sources"]["musk"]["sha256"] == hashlib.sha256(musk.read_bytes()).hexdigest()
    parity = m["models"]["hex"]["parity"]
    assert max(parity["fp32"].values()) <= 1e-4 and max(parity["fp16"].values()) <= 1e-2
    assert "8 real H&E tiles" in m["models"]["hex"]["parity_data"]
    assert m["hex_encoder"]["depth"] == 2 and m["hex_encoder"]["embed_dim"] == 1024
    assert "known-unused ignored" in r.stderr  # the MUSK file's text/B-expert weights, reported
    run_all(b)


def test_mica_and_dinov2_from_files(tmp_path):
    """--dinov2 and --mica from files laid out like the published checkpoints (random weights)."""
    from hexfast_export import Dinov2Encoder, Mica, MicaConfig
    from hexfast_export.hex_model import HexModel

    hex_model = HexModel(SHALLOW)
    torch.save({"model": hex_model.state_dict()}, tmp_path / "hex.pth")
    dino = Dinov2Encoder()
    sd = {k: v for k, v in dino.state_dict().items() if k != "pos_embed"}
    sd["pos_embed"] = torch.randn(1, 1 + 37 * 37, 384)  # the 518-px table of the hub checkpoint
    sd["mask_token"] = torch.zeros(1, 384)
    torch.save(sd, tmp_path / "dinov2_vits14_reg4_pretrain.pth")
    torch.save(Mica(MicaConfig(pooling="gap")).state_dict(), tmp_path / "s_0_checkpoint.pt")
    out = tmp_path / "bundle"
    r = hexfast("export", "--hex", tmp_path / "hex.pth", "--musk-config", SHALLOW_FLAG, "--dinov2",
                tmp_path / "dinov2_vits14_reg4_pretrain.pth", "--mica", tmp_path / "s_0_checkpoint.pt",
                "--mica-pooling", "gap", "--mica-features", "hex-embedding", "-o", out)
    assert r.returncode == 0, r.stderr
    b = load_bundle(out)
    assert b.models == ["hex", "codex_encoder", "mica"] and b.mica_features["kind"] == "hex-embedding"
    assert set(b.manifest["sources"]) == {"hex", "dinov2", "mica"}
    assert b.manifest["models"]["mica"]["config"]["pooling"] == "gap"
    assert b.manifest["models"]["codex_encoder"]["quantisation"] == "scale"
    run_all(b)


def test_bad_input_is_one_line(tmp_path):
    heads = shared_file("hex-official/hex_heads_demo_checkpoint.pth")
    out = tmp_path / "b"
    one_line_error(hexfast("export", "--musk", tmp_path / "missing.safetensors", "--hex-heads", heads, "-o", out),
                   "missing.safetensors", "no such file")
    # a MUSK file with a layer's weights missing: refused, naming the file and the weights
    sd = musk_file_state(SHALLOW)
    broken = {k: v for k, v in sd.items() if ".layers.1.ffn." not in k}
    musk = save(broken, tmp_path / "truncated.safetensors")
    line = one_line_error(hexfast("export", "--musk", musk, "--hex-heads", heads, "--musk-config", SHALLOW_FLAG,
                                  "-o", out), "truncated.safetensors", "missing")
    assert "layers.1.ffn" in line
    # a MUSK file given for the full-size model (24 layers) is incomplete too
    one_line_error(hexfast("export", "--musk", musk, "--hex-heads", heads, "-o", out), "truncated.safetensors")
    one_line_error(hexfast("export", "--hex-heads", heads, "-o", out), "--musk W --hex-heads C, or --hex H")
    one_line_error(hexfast("export", "--demo", "--mica-features", "hex-embedding", "--musk", musk, "-o", out), "drop --musk")
    one_line_error(hexfast("export", "--hex", heads, "--mica", heads, "-o", out), "--mica needs --dinov2")
    one_line_error(hexfast("export", "--demo", "--mica-features", "hex-embedding", "--parity-tiles", tmp_path / "none",
                           "-o", out), "not a directory")
    (tmp_path / "notabundle").mkdir()
    (tmp_path / "notabundle" / "keep.txt").write_text("x")
    one_line_error(hexfast("export", "--demo", "--mica-features", "hex-embedding", "-o", tmp_path / "notabundle"), "not a model bundle", "refusing")
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_export_without_torch_says_so(tmp_path):
    fake = tmp_path / "fake"
    (fake / "torch").mkdir(parents=True)
    (fake / "torch" / "__init__.py").write_text("raise ImportError('No module named torch (test stand-in)')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(fake)] + sys.path))
    one_line_error(hexfast("export", "--demo", "--mica-features", "hex-embedding", "-o", tmp_path / "b", env=env), "needs torch", "hexfast[export]")


def test_existing_bundle_is_replaced(tmp_path):
    out = tmp_path / "demo"
    assert hexfast("export", "--demo", "--mica-features", "hex-embedding", "-o", out).returncode == 0
    first = load_bundle(out).manifest["created"]
    r = hexfast("export", "--demo", "--mica-features", "hex-embedding", "--seed", "1", "-o", out)
    assert r.returncode == 0, r.stderr
    b = load_bundle(out)
    assert b.manifest["demo_models"]["seed"] == 1 and b.manifest["created"] >= first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]


@pytest.mark.skipif(os.environ.get("CI") != "true" and os.environ.get("HEXFAST_FULL_REFERENCE") != "1",
                    reason="full-size export (MUSK large, ~2 min, ~5.5 GB) runs under CI=true or "
                           "HEXFAST_FULL_REFERENCE=1")
def test_demo_full_size_export(tmp_path):
    out = tmp_path / "full"
    r = hexfast("export", "--demo", "--size", "full", "--mica-features", "resnet50-trunc", "--fp16", "-o", out,
                timeout=1800)
    assert r.returncode == 0, r.stderr
    print(r.stdout)
    b = load_bundle(out)
    assert b.demo and b.manifest["hex_encoder"] == {"img_size": 384, "patch_size": 16, "dim": 1024, "depth": 24,
                                                    "heads": 16, "ffn_dim": 4096, "embed_dim": 1024}
    for name, entry in b.manifest["models"].items():
        assert max(entry["parity"]["fp32"].values()) <= 1e-4, (name, entry["parity"])
        if name != "he_features":  # CLAM's encoder runs fp32 only: no fp16 file
            assert max(entry["parity"]["fp16"].values()) <= 1e-2, (name, entry["parity"])
    assert b.model_path("hex").stat().st_size > 1.1e9  # 303M fp32 weights
    assert b.model_path("he_features").stat().st_size > 3.3e7  # ResNet50 up to layer3: 8.5M fp32 weights
    run_all(b)
