"""Engine errors. Each is a HexfastError whose text is one line."""

from __future__ import annotations

import os

from ..errors import HexfastError


class EngineError(HexfastError):
    """An inference engine that cannot be created or run."""


class BackendUnavailable(EngineError):
    """A backend that cannot run on this machine; the text says what is missing and how to get it."""

    def __init__(self, backend: str, problem: str):
        self.backend = backend
        self.problem = problem
        super().__init__(f"{backend} {problem}")


class ModelFileError(EngineError):
    """A model or plan file that is missing or unreadable; the text names the file."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = os.fspath(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class EngineClosedError(EngineError):
    """run() on an engine after close()."""


def one_line(exc: BaseException, limit: int = 300) -> str:
    """The first non-empty line of an exception's text, shortened: foreign errors (ONNX Runtime's,
    TensorRT's) are often many lines; ours must be one."""
    text = str(exc).strip()
    line = next((part.strip() for part in text.splitlines() if part.strip()), type(exc).__name__)
    return line if len(line) <= limit else line[: limit - 1] + "…"
