"""MICA over one slide's tile features, a chunk at a time: memory independent of the tile count.

The bundle's MICA graph is one step of an online softmax (export: Mica.forward_chunk):
it takes a chunk of tile features and the co-attention's running state
(log-sum-exp `coattn_lse` [40], weighted mean `coattn_mean` [40, 256]) and returns
the updated state, the chunk's raw co-attention scores and the slide outputs for
the tiles seen so far. `stream_mica` makes two passes over the features:

1. carry the state through every chunk; the last chunk's hazards, survival and
   risk are the slide's (the same as the whole bag at once, up to rounding);
2. recompute each chunk's scores and turn them into co-attention weights,
   exp(score - final lse), keeping only the k most-attended tiles per marker and
   overall (the mean over markers), which the report lists.

Both passes hold one chunk of features (CHUNK_TILES x 1024 float32 = 16 MiB) and
O(k) rankings, never an (N, 1024) or (40, N) array; the second also keeps each
tile's weight averaged over the markers (N float32: 4 bytes a tile), which the
h5, the QuPath objects and the viewer show.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ..markers import MARKERS

CHUNK_TILES = 4096
INITIAL_LSE = -1e30  # log-sum-exp before any tile (also hexfast_export.mica's): finite, so no inf - inf


class AttentionRanking:
    """The k highest weights of each of C rows, and of their mean over rows ('overall'),
    fed as [C, n] column chunks in tile order; ties go to the lower tile index."""

    def __init__(self, rows: int, k: int):
        self.rows, self.k = rows, k
        self.seen = 0
        self._values = np.empty((rows + 1, 0))
        self._tiles = np.empty((rows + 1, 0), np.int64)

    def add(self, weights: np.ndarray) -> None:
        weights = np.asarray(weights, np.float64)
        if weights.ndim != 2 or weights.shape[0] != self.rows:
            raise ValueError(f"attention chunk must be ({self.rows}, n), got {weights.shape}")
        n = weights.shape[1]
        values = np.concatenate([self._values, np.vstack([weights, weights.mean(axis=0)])], axis=1)
        tiles = np.concatenate([self._tiles, np.broadcast_to(np.arange(self.seen, self.seen + n), (self.rows + 1, n))],
                               axis=1)
        order = np.lexsort((tiles, -values), axis=-1)[:, : self.k]  # by weight, then by tile index
        self._values = np.take_along_axis(values, order, axis=1)
        self._tiles = np.take_along_axis(tiles, order, axis=1)
        self.seen += n

    def row(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(tile indices, weights) of row i, best first."""
        return self._tiles[i], self._values[i]

    def overall(self) -> tuple[np.ndarray, np.ndarray]:
        return self.row(self.rows)


@dataclass
class MicaResult:
    hazards: np.ndarray  # [1, n_classes]
    survival: np.ndarray  # [1, n_classes]
    risk: np.ndarray  # [1]
    ranking: AttentionRanking
    overall: np.ndarray  # [N] float32: each tile's co-attention weight averaged over the markers
    attention: np.ndarray | None = None  # [40, N] co-attention weights, only with keep_attention (tests, parity)

    def summary(self, coords: np.ndarray, marker_names: Sequence[str] = MARKERS) -> dict:
        """What report.json says of MICA: hazards, survival, risk and the most-attended tiles."""
        return mica_summary(self.hazards, self.survival, self.risk, coords, marker_names, self.ranking)


def stream_mica(
    run: Callable[[Mapping[str, np.ndarray]], Mapping[str, np.ndarray]],
    h_codex: np.ndarray,
    chunks: Callable[[], Iterable[np.ndarray]],
    *,
    state_width: int = 256,
    top_k: int = 10,
    keep_attention: bool = False,
) -> MicaResult:
    """run: the MICA engine (feeds -> outputs by name); h_codex [40, 384] from the CODEX encoder;
    chunks(): a fresh iterator over the slide's features in tile order, [n, 1024] each (called twice);
    state_width: the graph's coattn_mean_in width (MICA's model dim)."""
    h_codex = np.ascontiguousarray(h_codex, np.float32)
    channels = h_codex.shape[0]
    lse = np.full(channels, INITIAL_LSE, np.float32)
    mean = np.zeros((channels, state_width), np.float32)
    out = None
    for features in chunks():
        out = run({"h_path": _f32(features), "h_codex": h_codex, "coattn_lse_in": lse, "coattn_mean_in": mean})
        lse, mean = _f32(out["coattn_lse"]), _f32(out["coattn_mean"])
    if out is None:
        raise ValueError("MICA needs at least one tile")
    ranking = AttentionRanking(channels, top_k)
    kept, overall = [], []
    for features in chunks():
        scores = run({"h_path": _f32(features), "h_codex": h_codex, "coattn_lse_in": lse,
                      "coattn_mean_in": mean})["coattn_scores"]
        weights = np.exp(np.asarray(scores, np.float64) - lse.astype(np.float64)[:, None])
        ranking.add(weights)
        overall.append(weights.mean(axis=0).astype(np.float32))
        if keep_attention:
            kept.append(weights)
    return MicaResult(np.asarray(out["hazards"]), np.asarray(out["survival"]), np.asarray(out["risk"]), ranking,
                      np.concatenate(overall), np.concatenate(kept, axis=1) if keep_attention else None)


def _f32(a) -> np.ndarray:
    return np.ascontiguousarray(a, np.float32)


def mica_summary(hazards, survival, risk, coords: np.ndarray | None = None, marker_names: Sequence[str] = MARKERS,
                 ranking: AttentionRanking | None = None) -> dict:
    """MICA's answer as report.json gives it: hazards, survival and risk as plain floats and, with
    a ranking (kept while streaming) and the tiles' level-0 coords, the most-attended tiles per
    marker and 'overall' (by the mean over markers)."""
    out = {
        "hazards": np.asarray(hazards, np.float64).reshape(-1).tolist(),
        "survival": np.asarray(survival, np.float64).reshape(-1).tolist(),
        "risk": float(np.asarray(risk).reshape(())),
    }
    if ranking is None:
        return out
    coords = np.asarray(coords, np.int64).reshape(-1, 2)
    if ranking.seen != len(coords):
        raise ValueError(f"the attention ranking saw {ranking.seen} tiles, not {len(coords)}")

    def listed(tiles, weights):
        return [{"tile": int(i), "x": int(coords[i, 0]), "y": int(coords[i, 1]), "attention": float(w)}
                for i, w in zip(tiles, weights)]

    out["most_attended"] = {
        "top_k": min(ranking.k, len(coords)),
        "coords": "level-0 top-left (x, y) of each tile",
        "overall": listed(*ranking.overall()),
        "per_marker": {m: listed(*ranking.row(i)) for i, m in enumerate(marker_names)},
    }
    return out
