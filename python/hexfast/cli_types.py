"""argparse value types shared by the `hexfast` subcommands: each turns a bad
value into argparse's one-line usage error."""

from __future__ import annotations

import argparse
import math


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"'{text}' must be positive")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"'{text}' must be a positive number")
    return value


def positive_int_list(text: str) -> list[int]:
    """'1,8,32' -> [1, 8, 32]."""
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list of whole numbers") from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"'{text}' must list positive whole numbers")
    return values
