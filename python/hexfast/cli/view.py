"""`hexfast view OUT/<stem> [SLIDE]`: the local web viewer of one scored slide."""

from __future__ import annotations

import argparse
import webbrowser
from pathlib import Path

from ..errors import HexfastError
from . import console
from .types import non_negative_int


def add_view_command(sub, common: argparse.ArgumentParser) -> None:
    view = sub.add_parser("view", parents=[common], help="look at a scored slide in the browser (local, offline)",
                          description="Serve one slide's outputs as a deep-zoom viewer: the H&E, any marker or MICA's "
                                      "attention as a colour overlay, the values of the tile under the pointer.")
    view.add_argument("out", type=Path, metavar="OUT/STEM", help="a slide's output folder, as hexfast score writes it")
    view.add_argument("slide", type=Path, nargs="?", metavar="SLIDE",
                      help="the slide (default: the path report.json recorded)")
    view.add_argument("--host", default="127.0.0.1",
                      help="address to listen on (default 127.0.0.1: this machine only; the data is a patient's)")
    view.add_argument("--port", type=non_negative_int, default=8000, help="port (default 8000; 0: any free one)")
    view.add_argument("--open", action="store_true", help="open the page in the default browser")
    view.set_defaults(run=cmd_view)


def cmd_view(args) -> int:
    from ..view import ViewerData, ViewerServer

    data = ViewerData(args.out, args.slide)
    try:
        server = ViewerServer(data, args.host, args.port)
    except OSError as e:
        data.close()
        raise HexfastError(f"{args.host}:{args.port}: cannot listen ({e.strerror}); try another --port") \
            from None
    console.line(f"hexfast view: {data.slide.name}, {len(data.coords)} tiles; open {server.url} (Ctrl-C to stop)")
    if args.open:
        webbrowser.open(server.url)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0
