"""Exception types. Every user-facing failure is a HexfastError whose text is
one line naming the file and the problem; the CLI prints it without a traceback."""

from __future__ import annotations

import os


class HexfastError(Exception):
    """Base class for errors hexfast reports to the user.

    Pickles with its attributes, whatever its subclass's __init__ takes, so an error raised on a
    Ray worker reaches the driver as itself."""

    def __reduce__(self):
        return _restore, (type(self), self.args, self.__dict__)


def _restore(cls, args, state):
    error = cls.__new__(cls)
    error.args = args
    error.__dict__.update(state)
    return error


class SlideError(HexfastError):
    """A slide that cannot be opened, read or used, with the reason."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = os.fspath(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class OutputError(HexfastError):
    """An output that cannot be written."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = os.fspath(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")
