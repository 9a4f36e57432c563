"""HEX on a CPU at int8 and bf16 (issue 24): the export writes the variants with their fidelity against fp32;
the runtime runs the one asked for, refuses what the CPU would emulate, picks on its own only what is fast
here and fit; the outputs say which precision ran, and its markers agree with fp32 as the export measured."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import hexfast, one_line_error
from hexfast.bundle import DEFAULT_BUNDLE, MissingModelError, load_bundle
from hexfast.engines import EngineError
from hexfast.engines import devices
from hexfast.score import precision as hex_precision

AVX2 = "fpu sse4_2 avx avx2 fma"
VNNI = AVX2 + " avx512f avx512_vnni"
AMX = VNNI + " avx512_bf16 amx_bf16 amx_int8 amx_tile"


@pytest.fixture
def cpu(monkeypatch):
    """Pretend to be a CPU with the given flags (and no GPU)."""

    def pretend(flags: str) -> None:
        monkeypatch.setenv(devices.CPU_FLAGS_ENV, flags)
        devices.cpu_flags.cache_clear()

    monkeypatch.setattr(hex_precision, "gpu_name", lambda: None)
    yield pretend
    devices.cpu_flags.cache_clear()


def fit_copy(tmp_path: Path, *fit: str) -> Path:
    """The demo bundle with the named variants marked fit (as a trained model's export would mark them)."""
    from test_trust import relist

    bundle = tmp_path / "bundle"
    shutil.copytree(DEFAULT_BUNDLE, bundle)

    def edit(m):
        for name in fit:
            m["models"]["hex"]["cpu_variants"][name]["fit"] = True

    relist(bundle, edit)
    return bundle


def test_the_demo_bundle_records_both_variants():
    variants = load_bundle().model("hex")["cpu_variants"]
    assert set(variants) == {"int8", "bf16"}
    for v in variants.values():
        f = v["fidelity"]
        assert f["tiles"] == 20 and len(f["markers_pearson"]) == 40 and min(f["markers_pearson"]) == f["markers_pearson_min"]
        assert 0.9 < f["markers_pearson_min"] < 1 and 0 < f["markers_max_abs_of_range"] < 0.5
        assert f["embedding_cosine_min"] > 0.99 and f["mica_risk"]["delta"] < 0.05
        assert v["fit"] == (f["markers_pearson_min"] >= v["floor"]["markers_pearson_min"])
    assert variants["int8"]["file"] == "hex.int8.onnx" and variants["int8"]["quantized_matmuls"] == 12
    assert variants["bf16"]["program"] == "hex.bf16.pt2"


def test_what_each_cpu_may_run(cpu):
    bundle = load_bundle()
    cpu(AVX2)
    with pytest.raises(EngineError, match="bf16 on this CPU .* would be emulated: it has neither AVX512-BF16 nor AMX"):
        hex_precision.choose(bundle, "auto", "bf16")
    slow = hex_precision.choose(bundle, "auto", "int8")
    assert (slow.precision, slow.backend) == ("int8", "ort-cpu") and "slow here" in slow.why
    auto = hex_precision.choose(bundle, "auto", "auto")
    assert auto.precision == "fp32" and "no AVX512-VNNI" in auto.why and "no AVX512-BF16" in auto.why
    cpu("fpu sse4_2")
    with pytest.raises(EngineError, match="int8 needs at least AVX2"):
        hex_precision.choose(bundle, "auto", "int8")
    cpu("")  # a system that lists no CPU features (not Linux): what is asked for runs, auto stays fp32
    assert "not checked" in hex_precision.choose(bundle, "auto", "int8").why
    assert hex_precision.choose(bundle, "auto", "auto").precision == "fp32"
    cpu(AMX)
    assert hex_precision.choose(bundle, "auto", "bf16").backend == "torch"
    with pytest.raises(EngineError, match="fp16 runs on a GPU"):
        hex_precision.choose(bundle, "auto", "fp16")
    with pytest.raises(EngineError, match="bf16 CPU variant is a torch program"):
        hex_precision.choose(bundle, "ort-cpu", "bf16")
    with pytest.raises(EngineError, match="int8 CPU variant is an ONNX graph"):
        hex_precision.choose(bundle, "torch", "int8")


def test_auto_never_picks_an_unfit_variant(cpu, tmp_path):
    cpu(AMX)
    demo = hex_precision.choose(load_bundle(), "auto", "auto")  # random weights: both unfit
    assert demo.precision == "fp32" and "bf16: marked unfit" in demo.why and "int8: marked unfit" in demo.why
    only_int8 = load_bundle(fit_copy(tmp_path / "a", "int8"))
    assert hex_precision.choose(only_int8, "auto", "auto").precision == "int8"
    both = load_bundle(fit_copy(tmp_path / "b", "int8", "bf16"))
    assert hex_precision.choose(both, "auto", "auto").precision == "bf16"
    assert hex_precision.choose(both, "ort-cpu", "auto").precision == "int8"  # bf16 runs on torch
    cpu(VNNI)
    assert hex_precision.choose(both, "auto", "auto").precision == "int8"
    cpu(AVX2)
    assert hex_precision.choose(both, "auto", "auto").precision == "fp32"  # int8 runs here, but not fast


def test_on_a_gpu_int8_is_refused_and_auto_is_fp32(monkeypatch):
    monkeypatch.setattr(hex_precision, "gpu_name", lambda: "Fake GPU")
    bundle = load_bundle()
    assert hex_precision.choose(bundle, "auto", "auto").precision == "fp32"
    assert hex_precision.choose(bundle, "auto", "bf16").variant is None  # the GPU's bf16, not the CPU variant
    with pytest.raises(EngineError, match="int8 is HEX's CPU variant"):
        hex_precision.choose(bundle, "auto", "int8")


def test_a_bundle_without_variants_says_so(cpu, tmp_path):
    from test_trust import relist

    bundle = tmp_path / "old"
    shutil.copytree(DEFAULT_BUNDLE, bundle)
    relist(bundle, lambda m: m["models"]["hex"].pop("cpu_variants"))
    cpu(AMX)
    with pytest.raises(MissingModelError, match="no int8 CPU variant of HEX; export it again"):
        hex_precision.choose(load_bundle(bundle), "auto", "int8")
    assert hex_precision.choose(load_bundle(bundle), "auto", "auto").precision == "fp32"


def scored(out: Path, stem: str) -> tuple[np.ndarray, np.ndarray, dict, dict]:
    with h5py.File(out / stem / f"{stem}.h5", "r") as f:
        coords, markers, attrs = f["coords"][:], f["codex_prediction"][:], dict(f.attrs)
    return coords, markers, attrs, json.loads((out / stem / "report.json").read_text())


@pytest.mark.parametrize("precision", ["int8", "bf16"])
def test_score_at_reduced_precision_agrees_with_fp32_as_recorded(precision, cmu_scored, tmp_path):
    """The slide's markers against the fp32 run: no worse than the export measured on its fidelity tiles (a
    margin for the slide's other tiles), and not identical (the variant ran). bf16 where this CPU has no
    AVX512-BF16 runs with the flags of one that has (emulated: the same numbers, slower)."""
    import os

    fp32_out, slide = cmu_scored
    env = dict(os.environ)
    flags = devices.cpu_flags()
    if precision == "bf16" and not flags & {"avx512_bf16", "amx_bf16"}:
        env[devices.CPU_FLAGS_ENV] = AMX
    r = hexfast("score", slide, "-o", tmp_path, "--precision", precision, env=env)
    assert r.returncode == 0, r.stderr
    assert "marked unfit by its export" in r.stderr  # demo weights: said, and run as asked
    coords, ref, _, _ = scored(fp32_out.parent, slide.stem)
    got_coords, got, attrs, report = scored(tmp_path, slide.stem)
    np.testing.assert_array_equal(coords, got_coords)
    recorded = load_bundle().model("hex")["cpu_variants"][precision]["fidelity"]
    pearson = min(np.corrcoef(ref[:, c], got[:, c])[0, 1] for c in range(ref.shape[1]))
    of_range = float((np.abs(got - ref) / (ref.max(0) - ref.min(0))).max())
    assert pearson >= recorded["markers_pearson_min"] - 0.005, (pearson, recorded)
    assert 0 < of_range <= 2 * recorded["markers_max_abs_of_range"], (of_range, recorded)
    said = report["hex_precision"]
    assert said["precision"] == precision and said["fit"] is False
    assert said["fidelity"]["markers_pearson_min"] == recorded["markers_pearson_min"]
    assert json.loads(attrs["hex_precision"]) == said and report["settings"]["precision"] == precision


def test_bf16_on_a_cpu_without_it_is_one_line(cmu_small, tmp_path, monkeypatch):
    import os

    env = dict(os.environ, **{devices.CPU_FLAGS_ENV: VNNI})
    r = hexfast("score", cmu_small, "-o", tmp_path, "--precision", "bf16", env=env)
    one_line_error(r, "bf16 on this CPU", "would be emulated", "--precision int8")
    assert not (tmp_path / cmu_small.stem).exists()


def test_auto_on_the_cli_says_what_it_chose(cmu_small, tmp_path):
    import os

    env = dict(os.environ, **{devices.CPU_FLAGS_ENV: AMX})
    bundle = fit_copy(tmp_path, "int8")
    r = hexfast("score", cmu_small, "--model", bundle, "-o", tmp_path / "out", "--precision", "auto",
                "--backend", "ort-cpu", env=env)
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "out" / cmu_small.stem / "report.json").read_text())
    assert report["hex_precision"]["precision"] == "int8" and report["hex_precision"]["chosen"].startswith("auto")
    assert report["settings"]["precision"] == "int8"


def test_the_recorded_int8_fidelity_is_what_the_variant_does_here():
    """Recomputed with the runtime's own engines and numpy's corrcoef: the manifest's figures are the
    variant's (within what another CPU's int8 kernels move)."""
    pytest.importorskip("torch")
    from hexfast.score import open_engine
    from hexfast_export.bundle_writer import default_parity_tiles
    from hexfast_export.cpu_variants import fidelity_tiles

    bundle = load_bundle()
    recorded = bundle.model("hex")["cpu_variants"]["int8"]["fidelity"]
    tiles = fidelity_tiles(default_parity_tiles())
    outs = {}
    for precision in ("fp32", "int8"):
        with open_engine(bundle, "hex", "ort-cpu", precision) as engine:
            outs[precision] = np.concatenate([engine.run({"tiles": t[None]})["markers"] for t in tiles])
    ref, got = outs["fp32"], outs["int8"]
    pearson = [np.corrcoef(ref[:, c], got[:, c])[0, 1] for c in range(ref.shape[1])]
    np.testing.assert_allclose(pearson, recorded["markers_pearson"], atol=3e-3)
    of_range = float((np.abs(got - ref) / (ref.max(0) - ref.min(0))).max())
    assert recorded["markers_max_abs_of_range"] / 2 <= of_range <= 2 * recorded["markers_max_abs_of_range"]


def test_fidelity_figures_against_numpy():
    from hexfast_export.cpu_variants import fidelity, is_fit

    rng = np.random.default_rng(3)
    ref = {"markers": rng.normal(size=(30, 40)), "embedding": rng.normal(size=(30, 64))}
    noisy = {k: v + rng.normal(scale=0.05, size=v.shape) for k, v in ref.items()}
    f = fidelity(ref, noisy)
    expected = [np.corrcoef(ref["markers"][:, c], noisy["markers"][:, c])[0, 1] for c in range(40)]
    np.testing.assert_allclose(f["markers_pearson"], expected, atol=1e-6)
    e, g = ref["embedding"], noisy["embedding"]
    cos = (e * g).sum(1) / np.linalg.norm(e, axis=1) / np.linalg.norm(g, axis=1)
    assert f["embedding_cosine_min"] == pytest.approx(cos.min(), abs=1e-6)
    span = ref["markers"].max(0) - ref["markers"].min(0)
    assert f["markers_max_abs_of_range"] == pytest.approx((np.abs(noisy["markers"] - ref["markers"]) / span).max(),
                                                          rel=1e-2)
    assert not is_fit(f) and is_fit(fidelity(ref, ref))


def test_export_without_cpu_variants_and_a_bad_name(tmp_path):
    pytest.importorskip("torch")
    r = hexfast("export", "--demo", "--size", "tiny", "--mica-features", "hex-embedding", "--cpu-variants", "none",
                "-o", tmp_path / "b")
    assert r.returncode == 0, r.stderr
    b = load_bundle(tmp_path / "b")
    assert "cpu_variants" not in b.model("hex") and not (tmp_path / "b" / "hex.int8.onnx").exists()
    r = hexfast("export", "--demo", "--size", "tiny", "--cpu-variants", "int4", "-o", tmp_path / "c")
    assert r.returncode == 2 and "unknown CPU variant 'int4'" in r.stderr


def test_resume_with_auto_knows_what_auto_chose(cmu_small, tmp_path):
    import os

    env = dict(os.environ, **{devices.CPU_FLAGS_ENV: AMX})
    bundle = fit_copy(tmp_path, "int8")
    args = ["score", cmu_small, "--model", bundle, "-o", tmp_path / "out", "--backend", "ort-cpu", "--precision", "auto"]
    assert hexfast(*args, env=env).returncode == 0
    again = hexfast(*args, "--resume", env=env)
    assert again.returncode == 0 and "1 of 1 slides already complete" in again.stderr, again.stderr
    other = hexfast(*args[:-2], "--precision", "fp32", "--resume", env=env)
    assert other.returncode == 0 and "already complete" not in other.stderr  # fp32 is another setting
