"""Trust and failure: hexfast tried as a hostile or unlucky user would (issue 14).

A bundle never runs code it did not hash (planted programs, external data, files swapped after
loading, edited manifests); a full disk, a second run into the same folder, a cancel before the
start, a typo'd stride, changed settings on --resume and control characters in file names all
end in one clear line with nothing half-written. Disk-full runs use a small tmpfs in a private
mount namespace (`unshare -Urm`); where the machine forbids that, they skip and say so.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import hexfast
from conftest import hexfast as hexfast_cli
from conftest import one_line_error, shared_file
from hexfast.bundle import DEFAULT_BUNDLE, BundleError, ChecksumError, load_bundle
from hexfast.engines import BackendUnavailable, ModelFileError
from hexfast.errors import OutputError, SlideError
from hexfast.files import LOCK_NAME, temp_name
from hexfast.outputs import outputs_complete
from hexfast.outputs.writer import partial_dir
from hexfast.score import Cancelled, Scorer, open_engine
from test_score import CMU, CMU_STEM, small_slide, temp_files


@pytest.fixture
def bundle_copy(tmp_path) -> Path:
    copy = tmp_path / "bundle"
    shutil.copytree(DEFAULT_BUNDLE, copy)
    return copy


def error_line(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """The run's one `hexfast: error:` line (a scoring run also prints its model line first), exit 2."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    errors = [line for line in result.stderr.splitlines() if line.startswith("hexfast: error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def relist(bundle: Path, edit=lambda manifest: None) -> None:
    """Rewrites manifest.json with every listed file's current sha256 (what someone repackaging a
    bundle would do), after `edit(manifest)`."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    edit(manifest)
    manifest["files"] = {rel: hashlib.sha256((bundle / rel).read_bytes()).hexdigest() for rel in manifest["files"]}
    (bundle / "manifest.json").write_text(json.dumps(manifest, indent=1))


@pytest.fixture
def cmu():
    return shared_file(CMU)


# ---------------------------------------------------------------------------- 1. programs beside the ONNX


@pytest.fixture
def export_loads(monkeypatch):
    """Every torch.export.load call, with what it was given."""
    torch = pytest.importorskip("torch", reason="the torch backend needs torch")
    calls = []
    real = torch.export.load
    monkeypatch.setattr(torch.export, "load", lambda f, *a, **k: calls.append(f) or real(f, *a, **k))
    return calls


def without_programs(bundle: Path) -> None:
    """The bundle as hexfast wrote them before they carried torch programs."""
    def drop(m):
        for entry in m["models"].values():
            entry.pop("programs", None)
        for rel in [r for r in m["files"] if r.endswith(".pt2")]:
            del m["files"][rel]
            (bundle / rel).unlink()

    relist(bundle, drop)


def test_unlisted_program_beside_the_onnx_is_never_loaded(bundle_copy, export_loads, cmu, tmp_path):
    without_programs(bundle_copy)
    (bundle_copy / "hex.pt2").write_bytes(b"PK\x03\x04 a planted archive whose pickles run a shell command")
    with pytest.raises(BackendUnavailable, match="manifest lists"):
        Scorer(bundle_copy, "torch")
    assert export_loads == []
    r = hexfast_cli("score", cmu, "--model", bundle_copy, "--backend", "torch", "-o", tmp_path / "out")
    one_line_error(r, "torch needs a torch.export program (.pt2) the bundle's manifest lists")


def tiny_program(path: Path) -> None:
    """A torch.export program with HEX's inputs and outputs (markers [B, 40], embedding [B, 1024])."""
    import torch

    class Tiny(torch.nn.Module):
        def forward(self, tiles):
            mean = tiles.float().mean(dim=(1, 2, 3), keepdim=False)[:, None]
            return mean.repeat(1, 40), mean.repeat(1, 1024)

    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(Tiny(), (torch.zeros(2, 32, 32, 3, dtype=torch.uint8),),
                                  dynamic_shapes={"tiles": {0: batch}})
    torch.export.save(program, str(path))


def test_listed_program_is_loaded_from_its_checked_bytes(bundle_copy, export_loads):
    without_programs(bundle_copy)
    tiny_program(bundle_copy / "hex.pt2")

    def list_program(m):
        m["files"]["hex.pt2"] = ""
        m["models"]["hex"]["programs"] = {"fp32": "hex.pt2"}

    relist(bundle_copy, list_program)
    bundle = load_bundle(bundle_copy)
    with open_engine(bundle, "hex", "torch") as engine:
        out = engine.run({"tiles": np.full((3, 32, 32, 3), 7, np.uint8)})
        assert out["markers"].shape == (3, 40) and np.allclose(out["markers"], 7)
    assert len(export_loads) == 1 and not isinstance(export_loads[0], (str, os.PathLike))  # bytes, not a path
    with open(bundle_copy / "hex.pt2", "ab") as f:  # changed after the bundle was loaded
        f.write(b"\0")
    with pytest.raises(ChecksumError, match="does not match the manifest's"):
        open_engine(bundle, "hex", "torch")
    assert len(export_loads) == 1


# ---------------------------------------------------------------------------- 2. external data, swapped files


def test_onnx_external_data_is_refused(bundle_copy, tmp_path, monkeypatch, cmu):
    """An ONNX file that keeps its weights in weights.bin: ONNX Runtime would read that by path (beside
    the file, or from the working directory), unhashed. Refused, even when weights.bin is listed."""
    onnx = pytest.importorskip("onnx", reason="writing external data needs onnx")
    model = onnx.load(str(bundle_copy / "hex.onnx"))
    onnx.save(model, str(bundle_copy / "hex.onnx"), save_as_external_data=True, location="weights.bin",
              size_threshold=1024)
    relist(bundle_copy, lambda m: m["files"].update({"weights.bin": ""}))
    monkeypatch.chdir(bundle_copy)  # weights.bin in the working directory too
    with pytest.raises(ModelFileError) as info:
        Scorer(bundle_copy, "ort-cpu")
    text = str(info.value)
    assert "hex.onnx" in text and "external data" in text and "\n" not in text
    r = hexfast_cli("score", cmu, "--model", bundle_copy, "--backend", "ort-cpu", "-o", tmp_path / "out")
    one_line_error(r, "hex.onnx", "external data")


def test_external_tensors_agree_with_onnx(tmp_path):
    """The runtime's protobuf walk against the onnx package, on graphs with external data in
    initializers, node attributes (Constant) and a subgraph."""
    onnx = pytest.importorskip("onnx", reason="the oracle is the onnx package")
    from onnx import TensorProto, helper, numpy_helper
    from onnx.external_data_helper import _get_all_tensors, convert_model_to_external_data, uses_external_data

    from hexfast.engines.onnx_external import NotOnnx, external_tensors

    big = numpy_helper.from_array(np.ones((64, 64), np.float32), "w")
    const = helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.ones((64, 64), np.float32), "cv"))
    then = helper.make_graph([helper.make_node("Identity", ["w2"], ["t"])], "then", [],
                             [helper.make_tensor_value_info("t", TensorProto.FLOAT, [64, 64])],
                             [numpy_helper.from_array(np.full((64, 64), 2, np.float32), "w2")])
    other = helper.make_graph([helper.make_node("Identity", ["c"], ["e"])], "else", [],
                              [helper.make_tensor_value_info("e", TensorProto.FLOAT, [64, 64])])
    nodes = [const, helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=other),
             helper.make_node("Add", ["y", "w"], ["z"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, [64, 64])], [big])
    model = helper.make_model(graph)
    assert external_tensors(model.SerializeToString()) == []
    for attributes in (False, True):
        converted = onnx.ModelProto()
        converted.CopyFrom(model)
        convert_model_to_external_data(converted, location="weights.bin", size_threshold=0,
                                       convert_attribute=attributes)
        want = sorted(t.name for t in _get_all_tensors(converted) if uses_external_data(t))
        assert want and sorted(external_tensors(converted.SerializeToString())) == want
    with pytest.raises(NotOnnx):
        external_tensors(b"\x0a\xff\xff\xff\xff\x0f not protobuf")


def test_a_file_changed_after_the_bundle_loaded_is_not_loaded(bundle_copy):
    bundle = load_bundle(bundle_copy)
    data = (bundle_copy / "mica.onnx").read_bytes()
    (bundle_copy / "mica.onnx").write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(ChecksumError) as info:
        open_engine(bundle, "mica", "ort-cpu")
    assert "mica.onnx" in str(info.value) and "not loading it" in str(info.value)


def test_plans_live_outside_the_bundle(bundle_copy, tmp_path, monkeypatch):
    monkeypatch.setenv("HEXFAST_ENGINE_CACHE", str(tmp_path / "cache"))
    bundle = load_bundle(bundle_copy)
    where = bundle.engine_cache_dir("GPU-trt10.9")
    assert bundle_copy.resolve() not in where.parents and where == tmp_path / "cache" / bundle.hash[:16] / "GPU-trt10.9"


def test_ort_trt_caches_are_per_model(tmp_path):
    """ONNX Runtime's TensorRT EP names cached engines by the graph's structure: two bundles of one
    architecture with other weights must not share one."""
    from hexfast.engines.ort import trt_cache_dir

    assert trt_cache_dir("a" * 64) != trt_cache_dir("b" * 64)


# ---------------------------------------------------------------------------- 10. an edited manifest


def test_manifest_edited_to_another_marker_count_is_refused_at_load(bundle_copy, cmu, tmp_path):
    def drop_a_marker(m):
        m["markers"] = m["markers"][:39]
        m["models"]["hex"]["outputs"]["markers"]["shape"][-1] = 39

    relist(bundle_copy, drop_a_marker)
    with pytest.raises(BundleError) as info:
        Scorer(bundle_copy, "ort-cpu")
    assert "manifest.json" in str(info.value) and "'markers'" in str(info.value) and "40" in str(info.value)
    r = hexfast_cli("score", cmu, "--model", bundle_copy, "--backend", "ort-cpu", "-o", tmp_path / "out")
    one_line_error(r, "manifest.json", "but the manifest says")
    assert not (tmp_path / "out" / CMU_STEM).exists()


# ---------------------------------------------------------------------------- 3. a full disk


def on_tmpfs(size: str, out: Path, *args) -> subprocess.CompletedProcess:
    """`hexfast ARGS` with OUT a `size` tmpfs of its own (a private mount namespace)."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare (util-linux) to mount a small tmpfs")
    probe = subprocess.run(["unshare", "-Urm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {out}"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        message = f"this machine does not allow a private tmpfs mount ({probe.stderr.strip()})"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    command = " ".join(["exec", sys.executable, "-m", "hexfast", *map(str, args)])
    script = f"mount -t tmpfs -o size={size} tmpfs {out} && {command}; rc=$?; ls -A {out} >&2; exit $rc"
    return subprocess.run(["unshare", "-Urm", "sh", "-c", script], capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("size", ["200k", "700k"])
def test_disk_full_while_scoring_is_one_line_and_exit_2(cmu, tmp_path, size):
    out = tmp_path / "out"
    out.mkdir()
    r = on_tmpfs(size, out, "score", cmu, "-o", out, "--backend", "ort-cpu")
    error_line(r, "cannot write: No space left on device")
    assert "Exception ignored" not in r.stderr and "Segmentation fault" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("hexfast: error:")  # `ls -A OUT` listed nothing


def test_disk_full_during_hexfast_tiles(cmu, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    r = on_tmpfs("4k", out, "tiles", cmu, "-o", out)
    error_line(r, "CMU-1-Small-Region.h5: cannot write: No space left on device")
    assert "Exception ignored" not in r.stderr and "Segmentation fault" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("hexfast: error:")  # nothing left in OUT


# ---------------------------------------------------------------------------- 4. two writers, one folder


def test_temp_names_are_unique_per_call(tmp_path):
    names = {temp_name(tmp_path / "a.h5") for _ in range(3)}
    assert len(names) == 3 and all(n.name.startswith(".a.h5.") and n.name.endswith(".tmp") for n in names)


def test_a_second_run_into_the_same_folder_fails_fast_and_spares_the_first(cmu, tmp_path):
    out = tmp_path / "out"
    first = subprocess.Popen([sys.executable, "-m", "hexfast", "score", str(cmu), "-o", str(out), "--backend",
                              "ort-cpu", "--stride", "28", "--batch-size", "8"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lock = partial_dir(out, CMU_STEM) / LOCK_NAME
        deadline = time.monotonic() + 120
        while not lock.exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert lock.exists(), "the first run never started writing"
        second = hexfast_cli("score", cmu, "-o", out, "--backend", "ort-cpu")
        line = error_line(second, str(out / CMU_STEM), "is being written by PID", "-o")
        assert f"PID {first.pid} " in line
        stdout, stderr = first.communicate(timeout=600)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, stderr
    assert outputs_complete(out, CMU_STEM) and temp_files(out) == []


def test_two_score_calls_on_one_slide_in_one_process(tmp_path):
    slide = small_slide(tmp_path / "s.tiff")
    out = tmp_path / "out"
    inside, release = threading.Event(), threading.Event()
    errors = []

    def slow(stage, done, total):
        inside.set()
        release.wait(30)

    with Scorer(backend="ort-cpu", batch_size=4) as scorer:
        first = threading.Thread(target=lambda: scorer.score(slide, out, progress=slow))
        first.start()
        assert inside.wait(60)
        try:
            scorer.score(slide, out)
        except OutputError as e:
            errors.append(str(e))
        release.set()
        first.join(60)
    assert len(errors) == 1 and f"being written by PID {os.getpid()} " in errors[0]
    assert outputs_complete(out, "s") and temp_files(out) == []


# ---------------------------------------------------------------------------- 5. cancel before score


def test_cancel_before_score_cancels_that_score_and_only_it(tmp_path):
    slide = small_slide(tmp_path / "s.tiff")
    with Scorer(backend="ort-cpu") as scorer:
        scorer.cancel()  # a Cancel clicked while the job is still being handed to its thread
        with pytest.raises(Cancelled, match="cancelled before it started"):
            scorer.score(slide, tmp_path / "out")
        assert not (tmp_path / "out").exists()
        result = scorer.score(slide, tmp_path / "out")  # the next job runs
        assert len(result.coords) > 0 and outputs_complete(tmp_path / "out", "s")
        scorer.cancel()
        with pytest.raises(Cancelled):
            next(scorer.score_many([slide], tmp_path / "out2"))


# ---------------------------------------------------------------------------- 8. tile counts


def test_absurd_tile_counts_are_refused_before_the_grid_is_built(cmu, tmp_path):
    r = hexfast_cli("score", cmu, "--stride", "1", "-o", tmp_path / "out", "--backend", "ort-cpu")
    line = error_line(r, "CMU-1-Small-Region.svs", "tiles at stride 1 px", "--max-tiles")
    assert "about 2," in line  # ~2.6 million
    r = hexfast_cli("tiles", cmu, "--stride", "1", "-o", tmp_path / "tiles")
    one_line_error(r, "more than the limit of 2,000,000")
    with hexfast.open_slide(cmu) as slide:
        with pytest.raises(SlideError, match="limit of 100"):
            hexfast.tile_slide(slide, max_tiles=100)
        assert len(hexfast.tile_slide(slide, max_tiles=300)) == 200


# ---------------------------------------------------------------------------- 9. --resume and settings


def test_resume_redoes_slides_made_with_other_settings_or_broken_files(tmp_path):
    slide = small_slide(tmp_path / "s.tiff")
    out = tmp_path / "out"
    assert hexfast_cli("score", slide, "-o", out, "--backend", "ort-cpu").returncode == 0

    def resumed(*extra) -> bool:
        r = hexfast_cli("score", slide, "-o", out, "--backend", "ort-cpu", "--resume", *extra)
        assert r.returncode == 0, r.stderr
        return "done before" in r.stdout

    assert resumed()
    assert not resumed("--stride", "56")  # other settings: scored again, and recorded
    assert resumed("--stride", "56") and not resumed()
    assert not resumed("--stain-norm", "reinhard")
    assert not resumed("--mpp", "0.5")
    assert resumed("--mpp", "0.5")
    report = json.loads((out / "s" / "report.json").read_text())
    assert report["settings"]["mpp"] == 0.5 and report["settings"]["stride"] == 112  # the values used
    for name, garbage in (("overview.png", b"\x89PNG\r\n\x1a\n garbage"), ("virtual_codex.ome.tif", b"II*\0 junk")):
        path = out / "s" / name
        kept = path.read_bytes()
        path.write_bytes(garbage)
        assert not outputs_complete(out, "s")
        path.write_bytes(kept)
        assert outputs_complete(out, "s")


# ---------------------------------------------------------------------------- 11. control characters


def test_control_characters_in_names_never_reach_the_terminal(tmp_path, cmu):
    evil = tmp_path / "line\nbreak\x1b[31mred.svs"
    r = hexfast_cli("score", evil, "-o", tmp_path / "out")
    line = one_line_error(r, "line\\nbreak\\x1b[31mred.svs", "no file matches")
    assert "\x1b" not in r.stderr + r.stdout
    assert "\x1b" not in r.stdout and "line\\nbreak" in r.stdout  # the summary table too
    named = tmp_path / "scan\x07\u202e.svs"
    named.symlink_to(cmu)
    r = hexfast_cli("info", named)
    assert r.returncode == 0 and "scan\\x07\\u202e.svs" in r.stdout and "\x07" not in r.stdout
    assert line.count("hexfast: error:") == 1


# ---------------------------------------------------------------------------- 6. fluorescence


@pytest.fixture
def fluorescence_slide(tmp_path) -> Path:
    """As a fluorescence scanner writes one: black glass with sensor noise, a few bright nuclei
    (DAPI blue) in three clusters; 2400 x 1800 px at 0.5 µm/px."""
    from conftest import write_tiff

    rng = np.random.default_rng(4)
    rgb = rng.integers(0, 14, size=(1800, 2400, 3)).astype(np.uint8)
    yy, xx = np.mgrid[0:1800, 0:2400]
    for cx, cy in ((600, 500), (1700, 1200), (900, 1400)):
        for _ in range(150):
            x, y = cx + rng.normal(0, 120), cy + rng.normal(0, 120)
            nucleus = (xx - x) ** 2 + (yy - y) ** 2 < 49
            rgb[nucleus] = (20, 60, 230)
    return write_tiff(tmp_path / "fluo.tiff", rgb, mpp=0.5)


def test_a_fluorescence_slide_is_refused_and_black_glass_is_not_tissue(fluorescence_slide, tmp_path):
    with hexfast.open_slide(fluorescence_slide) as slide:
        with pytest.raises(SlideError, match="not look like a brightfield H&E scan.*--allow-non-brightfield"):
            hexfast.tile_slide(slide)
        grid = hexfast.tile_slide(slide, allow_non_brightfield=True)
        area_mm2 = slide.dimensions[0] * slide.dimensions[1] * slide.mpp ** 2 / 1e6
        assert grid.tissue.brightness < 20 and not grid.tissue.brightfield
        assert grid.tissue.area_mm2 < 0.5 * area_mm2  # the black glass is not tissue
    r = hexfast_cli("score", fluorescence_slide, "-o", tmp_path / "out", "--backend", "ort-cpu")
    error_line(r, "fluo.tiff", "median brightness", "--allow-non-brightfield")
    r = hexfast_cli("tiles", fluorescence_slide, "-o", tmp_path / "tiles")
    one_line_error(r, "fluo.tiff", "not look like a brightfield")
    r = hexfast_cli("tiles", fluorescence_slide, "-o", tmp_path / "tiles", "--allow-non-brightfield")
    assert r.returncode == 0, r.stderr


def test_brightfield_slides_pass(cmu):
    with hexfast.open_slide(cmu) as slide:
        tissue = hexfast.detect_tissue(slide)
    assert tissue.brightfield and tissue.brightness > 150


# ---------------------------------------------------------------------------- 7. DICOM WSI


@pytest.fixture
def dicom_cohort(tmp_path) -> Path:
    """cohort/ with one DICOM WSI series (slideA/: one .dcm per pyramid level, as wsidicomizer writes
    them) and one TIFF slide."""
    try:
        import wsidicomizer.sources
        from wsidicomizer import WsiDicomizer
    except ImportError as e:
        if os.environ.get("CI") == "true":  # the [test] extra installs it
            raise
        pytest.skip(f"making a DICOM WSI needs wsidicomizer ({e})")
    from test_score import he_slide

    cohort = tmp_path / "cohort"
    cohort.mkdir()
    source = he_slide(tmp_path / "source.tiff", 1120, 896, [(112, 112, 1000, 780)], pyramid=True)
    WsiDicomizer.convert(str(source), str(cohort / "slideA"), tile_size=256, include_label=False,
                         include_overview=False, preferred_source=wsidicomizer.sources.TiffSlideSource)
    small_slide(cohort / "b.tiff")
    return cohort


def test_a_dicom_series_is_one_slide_named_after_its_folder(dicom_cohort, tmp_path):
    series = dicom_cohort / "slideA"
    assert len(list(series.glob("*.dcm"))) >= 2
    out = tmp_path / "out"
    r = hexfast_cli("score", dicom_cohort, "-o", out, "--backend", "ort-cpu")
    assert r.returncode == 0, r.stderr
    assert "2 of 2 slides ok" in r.stdout and sorted(p.name for p in out.iterdir()) == ["b", "slideA"]
    assert outputs_complete(out, "slideA") and (out / "slideA" / "slideA.h5").is_file()
    r = hexfast_cli("score", *sorted(series.glob("*.dcm")), "-o", out, "--backend", "ort-cpu", "--resume")
    assert r.returncode == 0 and r.stdout.count("done before") == 1 and "1 of 1 slides ok" in r.stdout, r.stdout
    r = hexfast_cli("info", series)
    assert r.returncode == 0 and "vendor          dicom" in r.stdout
    r = hexfast_cli("tiles", *sorted(series.glob("*.dcm")), "-o", tmp_path / "tiles")
    assert r.returncode == 0 and r.stdout.count("slideA:") == 1 and (tmp_path / "tiles" / "slideA.h5").is_file()
    with hexfast.open_slide(next(series.glob("*.dcm"))) as slide:  # any file of the series: the series
        assert slide.name == "slideA" and slide.path == series and slide.vendor == "dicom"
