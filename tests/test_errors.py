"""hexfast's errors: one line each, and they cross process boundaries intact (a Ray worker returns
the error a slide raised; the driver reports it as if raised locally)."""

from __future__ import annotations

import pickle

import pytest

from hexfast.bundle import ChecksumError, ManifestInvalidError
from hexfast.engines import BackendUnavailable, ModelFileError
from hexfast.engines.build import EngineBuildError
from hexfast.errors import HexfastError, OutputError, SlideError
from hexfast.score.cluster import WorkerError

ERRORS = [
    SlideError("slides/a.svs", "cannot read pixels at level 0"),
    OutputError("out/a/a.h5", "cannot write: No space left on device"),
    ChecksumError("bundle/hex.onnx", "sha256 ab… does not match"),
    ManifestInvalidError("bundle/manifest.json", "is not valid JSON"),
    BackendUnavailable("trt", "needs TensorRT 10"),
    ModelFileError("bundle/hex.onnx", "not a usable ONNX model"),
    EngineBuildError("build-engines needs a GPU"),
    WorkerError("slides/a.svs", "Ray worker died 3 times"),
    HexfastError("plain"),
]


@pytest.mark.parametrize("error", ERRORS, ids=lambda e: type(e).__name__)
def test_errors_survive_pickling_with_their_attributes(error):
    error.remote_traceback = "Traceback (most recent call last): ..."
    back = pickle.loads(pickle.dumps(error))
    assert type(back) is type(error) and str(back) == str(error) and "\n" not in str(back)
    assert back.__dict__ == error.__dict__
    assert isinstance(back, HexfastError)
