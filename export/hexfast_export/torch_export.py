"""torch.export programs of the bundle's graphs: what hexfast's torch backend runs on a GPU.

The same graphs as the ONNX files (onnx_export.HexGraph, CodexGraph, MicaGraph: preprocessing
inside), exported with torch.export at the default (pre-dispatch) level, so the attention of MUSK
and DINOv2 stays one `aten.scaled_dot_product_attention` node: on CUDA it dispatches to a fused
flash / memory-efficient kernel, nothing unfused or CPU-specific is baked in. Shapes are dynamic
as in the ONNX files (HEX: batch, tile height and width; CODEX encoder: grid height and width;
MICA: tiles per chunk; H&E features: batch, tile height and width).

Reduced precision is a separate program with the weights cast (bf16 / fp16), not autocast: the
in-graph uint8 → PIL-exact resize → normalise stays float32 (its sums need it), the network runs
in the cast dtype, the outputs come back as float32. Only HEX gets these; the slide-level models
run once per slide and stay float32.
"""

from __future__ import annotations

import collections
import io
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .hex_model import HexModel
from .mica import Mica
from .onnx_export import CodexGraph, HexGraph, MicaGraph
from .resnet_trunc import HeFeatureGraph

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SDPA = "aten.scaled_dot_product_attention.default"
MAX_SIDE = 4096


def program_name(model: str, precision: str) -> str:
    return f"{model}.pt2" if precision == "fp32" else f"{model}.{precision}.pt2"


def export_hex_program(model: HexModel, path: str | os.PathLike, precision: str = "fp32") -> Path:
    """HEX: tiles uint8 [batch, height, width, 3] → (markers [batch, 40], embedding [batch, 1024]) float32,
    the network's weights in `precision`."""
    cast = _cast_copy(model, DTYPES[precision])
    graph = HexGraph(cast).eval()
    batch = torch.export.Dim("batch", min=1, max=MAX_SIDE)
    height = torch.export.Dim("height", min=8, max=MAX_SIDE)
    width = torch.export.Dim("width", min=8, max=MAX_SIDE)
    example = (torch.zeros(2, 32, 32, 3, dtype=torch.uint8),)  # the archive keeps it: small
    return _save(graph, example, {"tiles": {0: batch, 1: height, 2: width}}, path)


def export_codex_program(encoder: nn.Module, path: str | os.PathLike, quantisation: str = "scale",
                         resize_order: str = "pillow12", channels: int = 40) -> Path:
    """CODEX encoder: codex float32 [40, grid_height, grid_width] → features [40, 384]."""
    graph = CodexGraph(encoder, quantisation, resize_order).eval().float()
    gh = torch.export.Dim("grid_height", min=2, max=MAX_SIDE - 1)
    gw = torch.export.Dim("grid_width", min=2, max=MAX_SIDE - 1)
    example = (torch.rand(channels, 30, 23, generator=torch.Generator().manual_seed(0)) * 0.1,)
    return _save(graph, example, {"codex": {1: gh, 2: gw}}, path)


def export_he_features_program(encoder: nn.Module, path: str | os.PathLike) -> Path:
    """H&E features for MICA: tiles uint8 [batch, height, width, 3] → features [batch, 1024] float32."""
    graph = HeFeatureGraph(encoder).eval().float()
    batch = torch.export.Dim("batch", min=1, max=MAX_SIDE)
    height = torch.export.Dim("height", min=32, max=MAX_SIDE)
    width = torch.export.Dim("width", min=32, max=MAX_SIDE)
    example = (torch.zeros(2, 64, 64, 3, dtype=torch.uint8),)
    return _save(graph, example, {"tiles": {0: batch, 1: height, 2: width}}, path)


def export_mica_program(mica: Mica, path: str | os.PathLike, channels: int = 40) -> Path:
    """MICA's chunk step (h_path [tiles, 1024], h_codex, coattn_lse_in, coattn_mean_in) → its six outputs."""
    graph = MicaGraph(mica).eval().float()
    cfg = mica.cfg
    gen = torch.Generator().manual_seed(0)
    example = (torch.randn(7, cfg.path_dim, generator=gen), torch.randn(channels, cfg.codex_dim, generator=gen),
               torch.randn(channels, generator=gen), torch.randn(channels, cfg.dim, generator=gen))
    tiles = torch.export.Dim("tiles", min=1, max=1 << 20)
    return _save(graph, example, {"h_path": {0: tiles}, "h_codex": None, "coattn_lse_in": None,
                                  "coattn_mean_in": None}, path)


def load_program(path: str | os.PathLike) -> torch.export.ExportedProgram:
    return torch.export.load(io.BytesIO(Path(path).read_bytes()))


def run_program(program: torch.export.ExportedProgram, case: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The program's outputs (float32 numpy) for one case, inputs in the program's order, loaded on the
    CPU as the runtime loads it (hexfast.engines.torch_backend.load_program)."""
    from hexfast.engines.torch_backend import load_program as load_on_device

    module = load_on_device(program, "cpu")
    with torch.no_grad():
        out = module(*(torch.from_numpy(np.ascontiguousarray(v)) for v in case.values()))
    out = out if isinstance(out, (tuple, list)) else (out,)
    return [o.float().numpy() for o in out]


def op_counts(program: torch.export.ExportedProgram) -> collections.Counter:
    """How many nodes of each op the program's graph calls (aten targets by name)."""
    return collections.Counter(str(n.target) for n in program.graph.nodes if n.op == "call_function")


def _save(graph: nn.Module, example: tuple, dynamic_shapes: dict, path: str | os.PathLike) -> Path:
    path = Path(path)
    with torch.no_grad():
        program = torch.export.export(graph, example, dynamic_shapes=dynamic_shapes)
    for node in program.graph.nodes:  # source paths of this checkout and of torch: same weights, other bytes
        node.meta.pop("stack_trace", None)
    torch.export.save(program, str(path))
    return path


def _cast_copy(model: HexModel, dtype: torch.dtype) -> HexModel:
    """`model` with its weights in `dtype` (a copy; float32: the model itself)."""
    if dtype == torch.float32:
        return model
    import copy

    return copy.deepcopy(model).to(dtype)
