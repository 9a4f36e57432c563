"""`hexfast watch`: score slides as a scanner finishes them (inbox: what is a finished slide; journal: what
became of each, restart-safe; watcher: the loop; http: a status endpoint)."""

from .journal import Journal
from .watcher import Watcher, read_status

__all__ = ["Journal", "Watcher", "read_status"]
