"""argparse value types shared by the `hexfast` subcommands: each turns a bad
value into argparse's one-line usage error."""

from __future__ import annotations

import argparse
import math

from ..engines import BACKENDS


def _parse(text: str, cast, kind: str):
    try:
        return cast(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not {kind}") from None


def positive_int(text: str) -> int:
    value = _parse(text, int, "a whole number")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"'{text}' must be positive")
    return value


def non_negative_int(text: str) -> int:
    value = _parse(text, int, "a whole number")
    if value < 0:
        raise argparse.ArgumentTypeError(f"'{text}' must not be negative")
    return value


def positive_float(text: str) -> float:
    value = _parse(text, float, "a number")
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


def fraction(text: str) -> float:
    value = _parse(text, float, "a number")
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"'{text}' must be within [0, 1]")
    return value


def saturation_threshold(text: str) -> int | str | None:
    """auto -> None (Otsu clamped), otsu -> "otsu", N -> N in 0..255."""
    if text in ("auto", "otsu"):
        return None if text == "auto" else text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is neither 'otsu' nor a whole number") from None
    if not 0 <= value <= 255:
        raise argparse.ArgumentTypeError(f"'{text}' must be within 0..255")
    return value


def sorted_sizes(text: str) -> list[int]:
    """'384,224,384' -> [224, 384]."""
    return sorted(set(positive_int_list(text)))


def key_ints(text: str) -> dict[str, int]:
    """'depth=2,dim=64' -> {"depth": 2, "dim": 64}."""
    out = {}
    for part in text.split(","):
        key, _, value = part.partition("=")
        try:
            out[key.strip()] = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{part}' is not KEY=INT") from None
    return out


def backend_list(text: str) -> list[str]:
    """'ort-cpu,trt' or 'all'."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [n for n in names if n not in (*BACKENDS, "all")]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"'{text}': choose from all, {', '.join(BACKENDS)}")
    if "all" in names and len(names) > 1:
        raise argparse.ArgumentTypeError("'all' stands alone")
    return names
