"""HEX at reduced precision for CPUs without a GPU: made at export, measured against the fp32 graph, recorded.

    int8  hex.int8.onnx: ONNX Runtime dynamic quantization of the encoder's weight matmuls (q/k/v/out
          projections, FFN): int8 weights per output channel, activations quantized per batch at run
          time (MatMulInteger, which MLAS runs on VNNI / AMX-INT8). The in-graph resize, the patch
          embedding, the attention products and the heads stay fp32.
    bf16  hex.bf16.pt2: the torch.export program with bf16 weights, run by torch on the CPU (oneDNN's
          AVX512-BF16 / AMX kernels). ONNX Runtime has no bf16 matmul on x86.

Each variant's fidelity is measured on the fidelity tiles (the parity tiles and their rotations by 90,
180 and 270 degrees: still real H&E, more rows for a correlation) against the fp32 ONNX graph:

    markers_pearson_min     the smallest, over the markers, Pearson r across tiles
    markers_pearson         r per marker (HEX order)
    markers_max_abs_of_range  max |Δ| over tiles and markers, as a fraction of each marker's range over tiles
    embedding_cosine_min    the smallest cosine between the two embeddings of a tile
    mica_risk_delta         |Δ risk| of MICA on a sample bag (the tiles laid out as a slide), when the bundle has MICA

A variant is "fit" when every marker's r >= FLOOR["markers_pearson_min"]; the runtime never picks an unfit one on its
own. On random (demo) weights these figures only check the mechanism: trained transformers have activation outliers
that random ones lack, and int8 is sensitive to them. The figure that counts is the one a lab's export records
for its own weights.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np

FLOOR = {"markers_pearson_min": 0.999}
QUANTIZED_OPS = ("MatMul", "Gemm")
RUNTIMES = {
    "int8": "onnxruntime: dynamic int8 (MatMulInteger; int8 weights per output channel, uint8 activations)",
    "bf16": "torch (oneDNN): the bf16 torch.export program on the CPU",
}


def fidelity_tiles(tiles: list[np.ndarray]) -> list[np.ndarray]:
    """The parity tiles and their rotations by 90, 180 and 270 degrees."""
    return [np.rot90(t, k).copy() for t in tiles for k in range(4)]


def quantize_int8(fp32: Path, out: Path) -> list[str]:
    """hex.int8.onnx from hex.onnx; returns the quantized nodes (the encoder's weight matmuls)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    graph = onnx.load(str(fp32), load_external_data=False).graph
    weights = {i.name for i in graph.initializer}
    nodes = [n.name for n in graph.node if n.op_type in QUANTIZED_OPS and "/encoder/" in n.name
             and len(n.input) > 1 and n.input[1] in weights]
    root = logging.getLogger()  # quantize_dynamic logs a pre-processing tip on the root logger
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        quantize_dynamic(str(fp32), str(out), weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=list(QUANTIZED_OPS), nodes_to_quantize=nodes)
    finally:
        root.setLevel(level)
    return nodes


def fidelity(ref: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> dict:
    """The variant's outputs `got` against the fp32 graph's `ref` over the same tiles (markers [N, C], embedding [N, D])."""
    r, g = np.asarray(ref["markers"], np.float64), np.asarray(got["markers"], np.float64)
    pearson = [_pearson(r[:, c], g[:, c]) for c in range(r.shape[1])]
    span = np.maximum(r.max(axis=0) - r.min(axis=0), 1e-12)
    e, f = np.asarray(ref["embedding"], np.float64), np.asarray(got["embedding"], np.float64)
    cosine = (e * f).sum(1) / np.maximum(np.linalg.norm(e, axis=1) * np.linalg.norm(f, axis=1), 1e-30)
    return {"tiles": len(r),
            "markers_pearson_min": round(float(min(pearson)), 6),
            "markers_pearson": [round(float(p), 6) for p in pearson],
            "markers_max_abs_of_range": float(f"{float((np.abs(g - r) / span).max()):.3g}"),
            "embedding_cosine_min": round(float(cosine.min()), 6)}


def is_fit(figures: dict) -> bool:
    return figures["markers_pearson_min"] >= FLOOR["markers_pearson_min"]


def sample_bag_risk(markers: np.ndarray, embedding: np.ndarray, tiles: list[np.ndarray], work: Path,
                    models: dict) -> float | None:
    """MICA's risk for the tiles laid out as a small slide (a square grid of 224 px tiles), from HEX's
    `markers` (and `embedding`, for a hex-embedding bundle; else the he_features model's features of the
    same tiles): the figure a variant moves through the CODEX encoder and MICA."""
    if "mica" not in models or "codex_encoder" not in models:
        return None
    from hexfast.score.codex_grid import codex_encoder_input
    from hexfast.score.mica_stream import stream_mica

    from .onnx_export import onnx_session

    n = len(markers)
    side = int(np.ceil(np.sqrt(n)))
    coords = np.array([[224 * (i % side), 224 * (i // side)] for i in range(n)], np.int64)
    level0 = (224 * side, 224 * side)
    codex = codex_encoder_input(coords, np.asarray(markers, np.float32), 224, level0)
    codex_features = onnx_session(work / models["codex_encoder"]["files"]["fp32"]).run(
        None, {"codex": np.ascontiguousarray(codex, np.float32)})[0]
    if "he_features" in models:
        he = onnx_session(work / models["he_features"]["files"]["fp32"])
        path_features = np.concatenate([he.run(None, {"tiles": t[None]})[0] for t in tiles])
    else:
        path_features = np.asarray(embedding, np.float32)
    mica = onnx_session(work / models["mica"]["files"]["fp32"])
    names = list(models["mica"]["outputs"])
    width = models["mica"]["inputs"]["coattn_mean_in"]["shape"][1]

    def run(feeds):
        return dict(zip(names, mica.run(names, feeds)))

    out = stream_mica(run, codex_features, lambda: iter([path_features]), state_width=width)
    return float(np.asarray(out.risk).ravel()[0])


def measure(name: str, run: Callable[[np.ndarray], dict[str, np.ndarray]], tiles: list[np.ndarray],
            ref: dict[str, np.ndarray], ref_risk: float | None, work: Path, models: dict,
            log: Callable[[str], None]) -> dict:
    """One variant's fidelity record (the manifest's models.hex.cpu_variants[name])."""
    got = run_tiles(run, tiles)
    figures = fidelity(ref, got)
    if ref_risk is not None:
        risk = sample_bag_risk(got["markers"], got["embedding"], tiles, work, models)
        figures["mica_risk"] = {"fp32": float(f"{ref_risk:.6g}"), name: float(f"{risk:.6g}"),
                                "delta": float(f"{abs(risk - ref_risk):.3g}")}
    fit = is_fit(figures)
    log(f"hex {name} (CPU) vs fp32 on {len(tiles)} tiles: markers Pearson r min {figures['markers_pearson_min']:.5f}, "
        f"max|Δ| {figures['markers_max_abs_of_range']:.2e} of a marker's range, embedding cosine min "
        f"{figures['embedding_cosine_min']:.5f}" + (f", MICA risk Δ {figures['mica_risk']['delta']:.2e}"
                                                     if "mica_risk" in figures else "")
        + ("" if fit else f"; UNFIT (r below {FLOOR['markers_pearson_min']}): never picked by --precision auto"))
    return {"runtime": RUNTIMES[name], "fidelity": figures, "fit": fit, "floor": dict(FLOOR)}


def run_tiles(run: Callable[[np.ndarray], dict[str, np.ndarray]], tiles: list[np.ndarray]) -> dict[str, np.ndarray]:
    """markers and embedding of every tile, one at a time (the tiles come in several sizes)."""
    outs = [run(t[None]) for t in tiles]
    return {k: np.concatenate([o[k] for o in outs]) for k in ("markers", "embedding")}


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    denominator = float(np.sqrt((a * a).sum() * (b * b).sum()))
    if denominator == 0.0:  # a marker constant over the tiles: agreement is equality
        return 1.0 if np.allclose(a, b) else 0.0
    return float((a * b).sum() / denominator)
