"""`hexfast score --ray`: a cohort on a Ray cluster (hexfast.score.cluster), on a
2-CPU local cluster this module starts, with the bundled demo model on ort-cpu.

Checks: the outputs equal a local run's bit for bit; a worker killed mid-slide
(test hook HEXFAST_RAY_TEST_DIE_AFTER_BATCHES) costs a retry, not the slide, and
leaves no temp files; a corrupt slide fails alone; --resume redoes only what
is not complete. Ray is optional (`pip install 'hexfast[cluster]'`): without
it, as under the README's CI test command, this module skips.
"""

from __future__ import annotations

import os
import re

import h5py
import numpy as np
import pytest

import hexfast
from conftest import shared_file
from test_score import CMU, CMU_STEM, corrupt_level0_tile, slide_files, he_slide, mtimes, run, small_slide, temp_files

try:
    import ray
except ImportError:
    if os.environ.get("CI") == "true":  # the README's test command installs [cluster]
        raise
    pytest.skip("Ray is not installed (optional: pip install 'hexfast[cluster]')", allow_module_level=True)

from hexfast.outputs import outputs_complete  # noqa: E402
from hexfast.score.cluster import DIE_AFTER_ENV  # noqa: E402

DATASETS = ("coords", "codex_prediction", "features")


@pytest.fixture(scope="module", autouse=True)
def cluster():
    """A local Ray cluster of 2 CPUs for the module; `--ray` finds it already initialised and uses it."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def cmu():
    return shared_file(CMU)


@pytest.fixture(scope="module")
def cmu_local(cmu, tmp_path_factory):
    """CMU-1-Small-Region scored locally (no Ray): OUT/<stem>."""
    out = tmp_path_factory.mktemp("local")
    assert hexfast.cli.main(["score", "--backend", "ort-cpu", "--batch-size", "16", str(cmu), "-o", str(out)]) == 0
    return out / CMU_STEM


def assert_same_h5(a, b):
    with h5py.File(a) as fa, h5py.File(b) as fb:
        for name in DATASETS:
            assert fa[name].dtype == fb[name].dtype and fa[name].shape == fb[name].shape, name
            assert np.array_equal(fa[name][:], fb[name][:]), f"{name} differs"


def test_ray_equals_local_bit_for_bit(cmu, cmu_local, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, err = run(capsys, "score", "--ray", "--ray-workers", "2", "--backend", "ort-cpu",
                            "--batch-size", "16", cmu, "-o", out)
    assert code == 0, err
    assert "Ray worker" in err and "ort-cpu" in err
    assert re.search(rf"^{CMU_STEM}\.svs\s+ok\s+\d+ ", stdout, re.M) and "1 of 1 slides ok" in stdout
    assert sorted(p.name for p in (out / CMU_STEM).iterdir()) == slide_files(CMU_STEM)
    assert outputs_complete(out, CMU_STEM) and temp_files(out) == []
    assert_same_h5(cmu_local / f"{CMU_STEM}.h5", out / CMU_STEM / f"{CMU_STEM}.h5")


def test_worker_killed_mid_slide_is_retried(cmu, cmu_local, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(DIE_AFTER_ENV, "2")  # every slide's first attempt: os._exit after 2 batches of 16
    slides = tmp_path / "slides"
    slides.mkdir()
    for name in ("x.svs", "y.svs"):
        (slides / name).symlink_to(cmu)
    out = tmp_path / "out"
    code, stdout, err = run(capsys, "score", slides, "--ray", "--backend", "ort-cpu", "--batch-size", "16",
                            "--ray-workers", "2", "-o", out)
    assert code == 0, err
    assert err.count("Ray worker died") == 2 and "retrying on another (attempt 2 of 3)" in err
    assert "2 of 2 slides ok" in stdout
    for stem in ("x", "y"):
        assert outputs_complete(out, stem)
        assert sorted(p.name for p in (out / stem).iterdir()) == slide_files(stem)
        assert_same_h5(cmu_local / f"{CMU_STEM}.h5", out / stem / f"{stem}.h5")
    assert temp_files(out) == []  # the killed attempts' half-written h5s are gone


def test_corrupt_slide_fails_alone(tmp_path, capsys):
    good = small_slide(tmp_path / "good.tiff")
    broken = he_slide(tmp_path / "broken.tiff", 1120, 896, [(0, 0, 1120, 896)], pyramid=True)
    with hexfast.open_slide(broken) as slide:
        coords = hexfast.tile_slide(slide).coords
    x, y = coords[len(coords) // 2]
    corrupt_level0_tile(broken, int(x), int(y))  # opens and tiles fine, fails mid-stream
    garbage = tmp_path / "garbage.svs"
    garbage.write_bytes(b"not a slide")
    out = tmp_path / "out"
    code, stdout, err = run(capsys, "score", "--ray", "--backend", "ort-cpu", "--batch-size", "8",
                            good, broken, garbage, "-o", out)
    assert code == 2
    assert f"hexfast: error: {broken}: tile " in err and f"hexfast: error: {garbage}: " in err
    assert "Traceback" not in err
    for name, status in (("good.tiff", "ok"), ("broken.tiff", "FAILED"), ("garbage.svs", "FAILED")):
        assert re.search(rf"^{re.escape(name)}\s+{status}\s", stdout, re.M), stdout
    assert "1 of 3 slides ok, 2 FAILED" in stdout
    assert outputs_complete(out, "good") and sorted(p.name for p in out.iterdir()) == ["good"]
    assert temp_files(out) == []


def test_resume_does_not_redo_complete_slides(tmp_path, capsys):
    a, b = small_slide(tmp_path / "a.tiff", 1), small_slide(tmp_path / "b.tiff", 2)
    out = tmp_path / "out"
    assert run(capsys, "score", "--ray", "--backend", "ort-cpu", a, b, "-o", out)[0] == 0
    ma, mb = mtimes(out / "a"), mtimes(out / "b")
    # A driver interrupted while `a` was in flight: no report.json, a worker's half-written temp file.
    (out / "a" / "report.json").unlink()
    (out / "a" / ".a.h5.12345.tmp").write_bytes(b"partial")

    code, stdout, err = run(capsys, "score", "--ray", "--resume", "--backend", "ort-cpu", a, b, "-o", out)
    assert code == 0, err
    assert "1 of 2 slides already complete" in err
    assert re.search(r"^a\.tiff\s+ok", stdout, re.M) and re.search(r"^b\.tiff\s+done before", stdout, re.M)
    assert outputs_complete(out, "a") and mtimes(out / "b") == mb
    assert all(mtimes(out / "a")[k] > ma[k] for k in ma if k != "report.json")
    assert temp_files(out) == []

    # Everything complete: nothing is dispatched (no workers even start).
    code, stdout, err = run(capsys, "score", "--ray", "--resume", "--backend", "ort-cpu", a, b, "-o", out)
    assert code == 0 and "2 of 2 slides already complete" in err and "Ray worker" not in err
