"""Shared fixtures. Real test data lives in ../shared/data beside the checkout;
without it the tests that need it skip, except under CI (CI=true) where a
missing fixture is a failure."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SLIDES = SHARED / "slides"
FIXTURES = SLIDES / "openslide-fixtures"


def hexfast(*args, env=None, cwd=None, timeout=900) -> subprocess.CompletedProcess:
    """`hexfast ARGS` in a fresh interpreter, as a user runs it: (returncode, stdout, stderr)."""
    return subprocess.run([sys.executable, "-m", "hexfast", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=timeout)


def one_line_error(result: subprocess.CompletedProcess, *fragments: str, code: int = 2) -> str:
    """The run failed with `code` and said why in exactly one line holding every fragment: that line."""
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def shared_file(relpath: str) -> Path:
    return _shared(SHARED / relpath, "test data", "../shared/data")


def shared_reference(relpath: str) -> Path:
    """Unmodified official code in ../shared/reference (HEX/, CLAM/)."""
    return _shared(SHARED.parent / "reference" / relpath, "reference code", "../shared/reference")


def _shared(path: Path, what: str, where: str) -> Path:
    """`path`, or a skip saying what is missing; under CI a failure."""
    if not path.exists():
        message = f"{what} {path} is missing (expected {where} beside the checkout)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture
def cmu_small() -> Path:
    return shared_file("slides/CMU-1-Small-Region.svs")


@pytest.fixture(scope="session")
def cmu_scored(tmp_path_factory) -> tuple[Path, Path]:
    """CMU-1-Small-Region scored once with the demo bundle's defaults: (output folder, slide).
    Shared by the test modules that read outputs; copy it before changing anything in it."""
    slide = shared_file("slides/CMU-1-Small-Region.svs")
    out = tmp_path_factory.mktemp("cmu-scored")
    r = hexfast("score", slide, "-o", out)
    assert r.returncode == 0, r.stderr
    return out / slide.stem, slide


@pytest.fixture
def fixture_slide():
    return lambda name: shared_file(f"slides/openslide-fixtures/{name}")


def write_tiff(path: Path, rgb: np.ndarray, mpp: float | None) -> Path:
    """A tiled RGB TIFF OpenSlide opens as generic-tiff; MPP goes into the TIFF resolution tags."""
    import tifffile

    kwargs = {}
    if mpp is not None:
        kwargs = {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"}
    tifffile.imwrite(path, rgb, tile=(64, 64), photometric="rgb", **kwargs)
    return path


@pytest.fixture
def blank_slide(tmp_path) -> Path:
    """Clean glass: near-white with a little noise, 0.5 µm/px."""
    rng = np.random.default_rng(0)
    rgb = (245 + rng.integers(-3, 4, size=(600, 800, 3))).astype(np.uint8)
    return write_tiff(tmp_path / "blank.tiff", rgb, mpp=0.5)


@pytest.fixture
def no_mpp_slide(tmp_path) -> Path:
    rgb = np.full((256, 256, 3), 240, np.uint8)
    rgb[64:192, 64:192] = (190, 90, 170)
    return write_tiff(tmp_path / "nompp.tiff", rgb, mpp=None)
