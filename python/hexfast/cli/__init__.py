"""The `hexfast` command: one module per group of subcommands (slides, score, models, bench), the
parser and exit codes in app, and everything a person reads printed through console."""

from .app import build_parser, main

__all__ = ["build_parser", "main"]
