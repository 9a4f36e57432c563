"""hexfast: fast whole-slide inference for HEX (virtual CODEX) and MICA.

The `hexfast` command: the parser, main() and its exit codes. Errors are one line,
`hexfast: error: FILE: problem`, exit code 2; `--debug` shows the traceback instead."""

from __future__ import annotations

import argparse
import signal
import threading

from .._core import __version__
from . import console
from .bench import add_bench_commands
from .models import add_model_commands
from .score import add_score_commands
from .slides import add_slide_commands
from .view import add_view_command
from .watch import add_watch_command
from .types import positive_float


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of usage + message
        self.exit(console.EXIT_ERROR, f"{self.prog}: error: {console.printable(message)} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    # --debug works before or after the subcommand; SUPPRESS keeps the
    # subcommand's default from overwriting a value given before it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks on errors")
    mpp = argparse.ArgumentParser(add_help=False)
    mpp.add_argument("--mpp", type=positive_float, metavar="UM", help="µm per level-0 pixel; overrides the slide's metadata")

    parser = _Parser(prog="hexfast", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser.add_argument("--version", action="version", version=f"hexfast {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    add_slide_commands(sub, common, mpp)  # info, tiles (slides.py)
    add_score_commands(sub, common, mpp)  # score, demo (score.py)
    add_bench_commands(sub, common, _Parser)  # bench stream | engine | e2e | roofline (bench.py)
    add_model_commands(sub, common)  # export, build-engines (models.py)
    add_view_command(sub, common)  # view (view.py)
    add_watch_command(sub, common, mpp)  # watch (watch.py)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        # Batch schedulers stop jobs with SIGTERM, a closed terminal or ssh session sends SIGHUP:
        # clean up as for Ctrl-C (temp files go, threads stop), then exit 128 + the signal.
        for name in ("SIGTERM", "SIGHUP"):
            if hasattr(signal, name):
                signal.signal(getattr(signal, name), _terminate)
    console.set_quiet(getattr(args, "quiet", False))
    try:
        with console.log_records_shown():
            return args.run(args)
    except Terminated as e:
        console.note(f"terminated ({signal.Signals(e.signum).name})")
        return 128 + e.signum
    except KeyboardInterrupt:
        console.note("interrupted")
        return console.EXIT_INTERRUPTED
    except BrokenPipeError:  # `hexfast ... | head`: the reader has what it wanted
        import os
        import sys

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 0
    except Exception as e:
        if args.debug:
            raise
        console.error(e)
        return console.EXIT_ERROR


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised in the main thread so every `finally` runs (temp files go, threads stop)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _terminate(signum, frame) -> None:
    raise Terminated(signum)
