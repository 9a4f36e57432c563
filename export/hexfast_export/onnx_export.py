"""ONNX export of HEX with its preprocessing inside the graph, and a parity check.

Graph: `tiles` uint8 [batch, height, width, 3] RGB (any size; the reference's
112 / 224 / 448 px tiles, or 384 px tiles already resized by the TileStream)
→ PIL-exact bilinear resize to 384 (see preprocess.py) → (x/255 - 0.5)/0.5 →
MUSK encoder → `markers` float32 [batch, 40] and `embedding` float32
[batch, 1024] (CLS after the final LayerNorm). Batch, height and width are
dynamic. Exported with the TorchScript-based exporter (`dynamo=False`), opset 17.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .hex_model import HexModel
from .preprocess import HexPreprocess

OPSET = 17
INPUT_NAME = "tiles"
OUTPUT_NAMES = ("markers", "embedding")


class HexGraph(nn.Module):
    """uint8 NHWC tiles → (markers, embedding): what the ONNX file computes."""

    def __init__(self, model: HexModel):
        super().__init__()
        self.preprocess = HexPreprocess(model.cfg.img_size)
        self.model = model

    def forward(self, tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embedding = self.model.visual(self.preprocess(tiles))
        markers, _ = self.model.forward_head(embedding)
        return markers, embedding


def export_hex_onnx(model: HexModel, path: str | os.PathLike, *, example_size: int = 224, opset: int = OPSET) -> Path:
    """Write `model` (eval mode, fp32) with in-graph preprocessing to `path`; returns the path."""
    path = Path(path)
    graph = HexGraph(model).eval().float()
    example = torch.zeros(2, example_size, example_size, 3, dtype=torch.uint8)
    axes = {INPUT_NAME: {0: "batch", 1: "height", 2: "width"}}
    axes.update({name: {0: "batch"} for name in OUTPUT_NAMES})
    with torch.no_grad(), warnings.catch_warnings():
        # The TorchScript-based exporter is deprecated in favour of dynamo=True (which needs onnxscript);
        # it is the one used here, deliberately.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.onnx.export(graph, (example,), str(path), dynamo=False, opset_version=opset,
                          input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES), dynamic_axes=axes,
                          do_constant_folding=True)
    _name_output_dims(path, {"markers": model.regression_head1[0].out_features, "embedding": model.cfg.dim})
    return path


def _name_output_dims(path: Path, widths: dict[str, int]) -> None:
    """Write the fixed output widths into the graph signature (the tracer leaves them symbolic)."""
    import onnx

    proto = onnx.load(str(path))
    for output in proto.graph.output:
        if output.name in widths:
            output.type.tensor_type.shape.dim[1].dim_value = widths[output.name]
    onnx.save(proto, str(path))


def onnx_session(path: str | os.PathLike, threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def hex_parity(model: HexModel, session, tiles: np.ndarray) -> dict[str, dict[str, float]]:
    """ONNX Runtime vs torch on uint8 NHWC `tiles`: max |Δ| and max |Δ| / max |ref| per output."""
    with torch.no_grad():
        ref = HexGraph(model).eval()(torch.from_numpy(np.ascontiguousarray(tiles)))
    got = session.run(list(OUTPUT_NAMES), {INPUT_NAME: np.ascontiguousarray(tiles)})
    figures = {}
    for name, r, g in zip(OUTPUT_NAMES, ref, got):
        r = r.numpy()
        diff = float(np.abs(g - r).max())
        figures[name] = {"max_abs": diff, "max_rel": diff / max(float(np.abs(r).max()), 1e-30)}
    return figures
