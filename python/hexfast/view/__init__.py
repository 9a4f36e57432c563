"""`hexfast view`: one scored slide in the browser, the H&E with its markers and MICA's attention over it
(data: what is shown, read from OUT/<stem>/; server: the local HTTP server; static/: the page)."""

from .data import ViewError, ViewerData
from .server import ViewerServer

__all__ = ["ViewError", "ViewerData", "ViewerServer"]
