"""HDF5 files written so that a failed write (a full disk) never takes the process down with it.

HDF5 does not survive its own writes failing: after a failed flush its cache is left half-closed,
the close fails too, and at interpreter exit the library closes the file again and crashes (a
segfault in H5D_close from H5_term_library), printing "Exception ignored" tracebacks on the way.
So HDF5 never writes to the disk itself here: it writes through h5py's file-object driver into a
`CatchingFile`, which remembers the first OS error instead of raising it, and drops what comes
after. HDF5 always sees its writes succeed and closes normally; the writer then raises the
remembered error as one line ("No space left on device") and deletes the file, which was never
going to be whole.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import h5py

from ..errors import OutputError
from ..files import atomic_output


class CatchingFile:
    """A binary file for HDF5 (h5py's fileobj driver) whose write errors are kept in `error`,
    not raised: once one happens, later writes are dropped and the file's content is garbage."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.error: OSError | None = None
        self._f = open(path, "w+b", buffering=0)

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        if self.error is None:
            try:
                done = 0
                while done < len(view):
                    done += self._f.write(view[done:])
            except OSError as e:
                self.error = e
        return len(view)

    def readinto(self, buffer) -> int:
        return self._f.readinto(buffer)

    def read(self, size: int = -1) -> bytes:
        return self._f.read(size)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()

    def truncate(self, size: int | None = None) -> int:
        if self.error is None:
            try:
                return self._f.truncate(size)
            except OSError as e:
                self.error = e
        return size if size is not None else self.tell()

    def flush(self) -> None:
        pass  # unbuffered: every write went to the OS as it came

    def check(self) -> None:
        """Raises the first write error, as OutputError-ready text in write_error()."""
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        self._f.close()


class SafeH5:
    """An h5py.File over a CatchingFile: `file` to write to, then close() (raises the first write
    error, if any) or discard()."""

    def __init__(self, path: Path):
        self.raw = CatchingFile(path)
        try:
            self.file = h5py.File(self.raw, "w")
        except BaseException:
            self.raw.close()
            raise

    def flush(self) -> None:
        self.file.flush()
        self.raw.check()

    def close(self) -> None:
        """Closes the file and raises the first write error, if there was one."""
        try:
            self.file.close()
        finally:
            self.raw.close()
        self.raw.check()

    def discard(self) -> None:
        """Closes a file being thrown away (HDF5 closes normally: its writes never failed)."""
        with contextlib.suppress(Exception):
            if self.file.id.valid:
                self.file.close()
        with contextlib.suppress(OSError):
            self.raw.close()


def write_error(e: BaseException) -> str | None:
    """One line for an OS error from writing (the OS's words: "No space left on device"), or None
    if `e` is not one."""
    if isinstance(e, OSError):
        return os.strerror(e.errno) if e.errno else " ".join(str(e).split())
    return None


@contextlib.contextmanager
def writing_h5(path: Path):
    """An h5py.File on a temporary name beside `path`, renamed to `path` when the block succeeds;
    on any failure discarded and removed, OS errors reported as one OutputError naming `path`."""
    try:
        with atomic_output(path) as tmp:
            h5 = SafeH5(tmp)
            try:
                yield h5.file
                h5.close()
            except BaseException:
                h5.discard()
                raise
    except OSError as e:
        raise OutputError(path, f"cannot write: {write_error(e)}") from e
