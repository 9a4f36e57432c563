"""Writing files so that nobody ever reads half of one.

Every file hexfast writes (slide outputs, the demo slide, TensorRT plans, caches) is written under
a hidden temporary name in its own directory and renamed into place: the rename is atomic on one
filesystem. Here because four layers write files (slide, engines, outputs, bench); nothing in it
knows what is being written.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

from .errors import OutputError

# temp_name's format, and only it: `.NAME.PID.tmp`.
_TEMP = re.compile(r"^\..+\.\d+\.tmp$")


def temp_name(path: Path) -> Path:
    """Hidden, per-process name beside `path`: same filesystem, so the final rename is atomic."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def is_temp_name(name: str) -> bool:
    return _TEMP.match(name) is not None


def remove_stale_temps(directory: Path) -> None:
    """Removes what writers killed outright (SIGKILL, power loss) left in `directory`: files named
    as temp_name names them."""
    if not directory.is_dir():
        return
    for path in directory.iterdir():
        if is_temp_name(path.name):
            path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_output(path: Path):
    """Yields a temporary path beside `path`; renames it to `path` on success, removes it on failure."""
    path = Path(path)
    tmp = temp_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def writing_file(path: Path):
    """atomic_output, with OS errors reported as a one-line OutputError naming the file."""
    try:
        with atomic_output(path) as tmp:
            yield tmp
    except OSError as e:
        raise OutputError(path, f"cannot write: {one_line(e.strerror or e)}") from e


def write_bytes_atomic(path: Path, data: bytes) -> None:
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)


def prepare_output_dir(out: Path) -> Path:
    """`out`, created if needed; a one-line OutputError when it cannot be written to."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(out, "output path exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(out, f"cannot create output directory: {e.strerror}") from e
    if not os.access(out, os.W_OK | os.X_OK):
        raise OutputError(out, "output directory is not writable")
    return out


def one_line(problem) -> str:
    return " ".join(str(problem).split())
