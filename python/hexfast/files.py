"""Writing files so that nobody ever reads half of one (and hashing them).

Every file hexfast writes (slide outputs, the demo slide, TensorRT plans, caches) is written under
a hidden temporary name in its own directory and renamed into place: the rename is atomic on one
filesystem. Here because four layers write files (slide, engines, outputs, bench); nothing in it
knows what is being written.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import itertools
import os
import re
import socket
from pathlib import Path

from .errors import OutputError

try:
    import fcntl

    def _try_lock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
except ImportError:  # Windows
    import msvcrt

    def _try_lock(fd: int) -> None:
        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)

_TEMPS = itertools.count()
LOCK_NAME = ".hexfast.lock"


def temp_name(path: Path) -> Path:
    """Hidden name beside `path`, unique to this process and call: same filesystem, so the final
    rename is atomic, and two writers (two processes, or two threads of one) never share one."""
    return path.with_name(f".{path.name}.{os.getpid()}.{next(_TEMPS)}.tmp")


class DirectoryLock:
    """An exclusive lock on a directory, for as long as one writer writes into it: flock on
    DIR/.hexfast.lock, taken without waiting, released (and the file removed) by release().

    A second writer -- another process, or another call in this one -- fails at once with an
    OutputError naming the holder ("being written by PID N on HOST since ..."). The kernel drops
    the lock of a writer that dies, so a killed run never blocks the next."""

    def __init__(self, directory: Path):
        self.path = Path(directory) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> DirectoryLock:
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise OutputError(self.path.parent, f"cannot lock for writing: {one_line(e.strerror or e)}") from e
            try:
                _try_lock(fd)
            except OSError:
                holder = _read_holder(fd)
                os.close(fd)
                raise OutputError(self.path.parent, f"is being written by {holder}; wait for it to finish or write "
                                                    f"somewhere else (-o)") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:  # else the holder removed the file between our open and our lock: take the new one
                break
            os.close(fd)
        started = dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat()
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"PID {os.getpid()} on {socket.gethostname()} since {started}\n".encode())
        except OSError as e:  # a full disk: no lock file is left behind
            self._fd = fd
            self.release()
            raise OutputError(self.path.parent, f"cannot lock for writing: {one_line(e.strerror or e)}") from e
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()  # before unlocking: a waiter that opened it sees the inode change and retries
        os.close(self._fd)
        self._fd = None

    def moved_to(self, directory: Path) -> None:
        """The locked directory was renamed to `directory` (the lock holds: it is on the open file)."""
        self.path = Path(directory) / LOCK_NAME

    def __enter__(self) -> DirectoryLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def lock_holder(directory: Path) -> dict | None:
    """Who holds `directory`'s lock now ({"pid", "host", "since"} as its lock file says), or None when
    nobody does (no lock file, or one a killed writer left). Takes and changes nothing."""
    path = Path(directory) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return None
    try:
        try:
            _try_lock(fd)
        except OSError:
            text = _read_holder(fd)
            m = re.fullmatch(r"PID (\d+) on (.*) since (\S+)", text)
            return {"pid": int(m[1]), "host": m[2], "since": m[3]} if m else {"holder": text}
        return None  # we got it: nobody holds it (closing the file releases it)
    finally:
        os.close(fd)


def _read_holder(fd: int) -> str:
    with contextlib.suppress(OSError):
        text = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
        if text:
            return text
    return "another hexfast run"


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


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def one_line(problem) -> str:
    return " ".join(str(problem).split())
