"""ONNX export of HEX, the CODEX encoder and MICA (preprocessing inside the graphs), fp16 variants,
and parity checks against torch with ONNX Runtime.

HEX graph: `tiles` uint8 [batch, height, width, 3] RGB (any size; the reference's
112 / 224 / 448 px tiles, or 384 px tiles already resized by the TileStream)
→ PIL-exact bilinear resize to 384 (see preprocess.py) → (x/255 - 0.5)/0.5 →
MUSK encoder → `markers` float32 [batch, 40] and `embedding` float32
[batch, 1024] (CLS after the final LayerNorm). Batch, height and width are
dynamic. Exported with the TorchScript-based exporter (`dynamo=False`), opset 17.

CODEX encoder graph: `codex` float32 [40, gh, gw] (the virtual CODEX grid,
channel-first, any gh/gw up to 4095) → float16 rounding, 8-bit quantisation,
Pillow-exact bicubic resize to 224 (codex_preprocess.py), ImageNet mean/std
→ DINOv2 ViT-S/14-reg4 → `features` float32 [40, 384] (CLS after the final norm).

H&E feature graph for MICA's bag (`he_features`, with `--mica-features resnet50-trunc`):
`tiles` uint8 [batch, height, width, 3] (CLAM's 256-px level-0 patches) → Pillow-exact bilinear
resize to 224, /255, ImageNet mean/std → ResNet50 up to layer3, average-pooled → `features`
float32 [batch, 1024] (resnet_trunc.py). Batch, height and width are dynamic.

MICA graph, one chunk of a slide's tiles at a time (Mica.forward_chunk):
`h_path` float32 [n, 1024] (dynamic n), `h_codex` float32 [40, 384],
`coattn_lse_in` [40], `coattn_mean_in` [40, 256] (the online softmax's state;
hexfast.score.mica_stream.INITIAL_LSE and zeros before the first chunk) → `hazards` [1, 4],
`survival` [1, 4], `risk` [1], `coattn_scores` [40, n], `coattn_lse` [40],
`coattn_mean` [40, 256]. The runtime feeds each chunk the previous chunk's
state; the last chunk's hazards/survival/risk are the slide's, and
exp(coattn_scores - coattn_lse) the co-attention weights (hexfast.score.mica_stream).

fp16 variants (`convert_fp16`): every float tensor except the graph inputs and
outputs, the `/preprocess/` block and MICA's `/accumulate/` (online softmax) becomes float16 (ONNX Runtime's float16
converter, keep_io_types), so a runtime feeds the same arrays to either file;
the preprocessing stays float32 because the exact resize needs integer sums
up to 2^24, the online softmax because its sums grow with the chunk size.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .codex_preprocess import CodexPreprocess
from .hex_model import HexModel
from .mica import Mica
from .preprocess import HexPreprocess
from .resnet_trunc import HeFeatureGraph

OPSET = 17
INPUT_NAME = "tiles"
OUTPUT_NAMES = ("markers", "embedding")
CODEX_INPUT_NAME = "codex"
CODEX_OUTPUT_NAMES = ("features",)
HE_FEATURE_OUTPUT_NAMES = ("features",)
MICA_INPUT_NAMES = ("h_path", "h_codex", "coattn_lse_in", "coattn_mean_in")
MICA_OUTPUT_NAMES = ("hazards", "survival", "risk", "coattn_scores", "coattn_lse", "coattn_mean")
# node-name prefixes kept float32 in fp16 files: the in-graph preprocessing, MICA's online softmax
FP32_BLOCK_PREFIX = ("/preprocess/", "/accumulate/")


class HexGraph(nn.Module):
    """uint8 NHWC tiles → (markers, embedding) float32: what the ONNX file (and the torch program,
    torch_export) computes. A model whose weights were cast to bf16/fp16 runs in that dtype after
    the float32 preprocessing (the exact resize needs it)."""

    def __init__(self, model: HexModel):
        super().__init__()
        self.preprocess = HexPreprocess(model.cfg.img_size)
        self.model = model

    def forward(self, tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.preprocess(tiles)
        dtype = self.model.regression_head1[0].weight.dtype
        if dtype != torch.float32:  # decided when traced: float32 graphs have no casts
            x = x.to(dtype)
        embedding = self.model.encode(x)
        markers, _ = self.model.forward_head(embedding)
        if dtype != torch.float32:
            return markers.float(), embedding.float()
        return markers, embedding


class CodexGraph(nn.Module):
    """codex float32 [40, gh, gw] → features [40, 384]: what the CODEX encoder ONNX file computes.

    `encoder`: DINOv2 ViT-S/14-reg4 (Dinov2Encoder) or any module mapping ImageNet-normalised
    [B, 3, 224, 224] to [B, D]; `encoder.cfg.img_size` is the resize target."""

    def __init__(self, encoder: nn.Module, quantisation: str = "scale", resize_order: str = "pillow12"):
        super().__init__()
        self.preprocess = CodexPreprocess(encoder.cfg.img_size, quantisation, resize_order)
        self.encoder = encoder

    def forward(self, codex: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.preprocess(codex))


class MicaGraph(nn.Module):
    """One chunk: (h_path [n,1024], h_codex [40,384], coattn_lse_in [40], coattn_mean_in [40,256])
    → (hazards [1,4], survival [1,4], risk [1], coattn_scores [40,n], coattn_lse [40], coattn_mean [40,256])."""

    def __init__(self, mica: Mica):
        super().__init__()
        self.mica = mica

    def forward(self, h_path: torch.Tensor, h_codex: torch.Tensor, coattn_lse_in: torch.Tensor,
                coattn_mean_in: torch.Tensor):  # the ONNX file's input names, which the torch program keeps
        return self.mica.forward_chunk(h_path, h_codex, coattn_lse_in, coattn_mean_in)


def _export(graph: nn.Module, example: tuple, path: Path, inputs, outputs, axes: dict, opset: int) -> None:
    with torch.no_grad(), warnings.catch_warnings():
        # The TorchScript-based exporter is deprecated in favour of dynamo=True (which needs onnxscript);
        # it is the one used here, deliberately.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.onnx.export(graph, example, str(path), dynamo=False, opset_version=opset,
                          input_names=list(inputs), output_names=list(outputs), dynamic_axes=axes,
                          do_constant_folding=True)


def export_hex_onnx(model: HexModel, path: str | os.PathLike, *, example_size: int = 224, opset: int = OPSET) -> Path:
    """Write `model` (eval mode, fp32) with in-graph preprocessing to `path`; returns the path."""
    path = Path(path)
    graph = HexGraph(model).eval().float()
    example = torch.zeros(2, example_size, example_size, 3, dtype=torch.uint8)
    axes = {INPUT_NAME: {0: "batch", 1: "height", 2: "width"}}
    axes.update({name: {0: "batch"} for name in OUTPUT_NAMES})
    _export(graph, (example,), path, [INPUT_NAME], OUTPUT_NAMES, axes, opset)
    _set_dims(path, {"markers": {1: model.regression_head1[0].out_features}, "embedding": {1: model.embed_dim}})
    return path


def export_codex_onnx(encoder: nn.Module, path: str | os.PathLike, *, quantisation: str = "scale",
                      resize_order: str = "pillow12", channels: int = 40, opset: int = OPSET) -> Path:
    """Write the CODEX encoder graph (dynamic gh, gw; `channels` fixed) to `path`; returns the path."""
    path = Path(path)
    graph = CodexGraph(encoder, quantisation, resize_order).eval().float()
    example = torch.rand(channels, 30, 23, generator=torch.Generator().manual_seed(0)) * 0.1
    axes = {CODEX_INPUT_NAME: {1: "grid_height", 2: "grid_width"}}
    _export(graph, (example,), path, [CODEX_INPUT_NAME], CODEX_OUTPUT_NAMES, axes, opset)
    with torch.no_grad():
        width = int(graph(example[:, :2, :2]).shape[1])
    _set_dims(path, {CODEX_OUTPUT_NAMES[0]: {0: channels, 1: width}})
    return path


def export_he_features_onnx(encoder: nn.Module, path: str | os.PathLike, *, example_size: int = 256,
                            opset: int = OPSET) -> Path:
    """Write the H&E feature graph (uint8 tiles → [batch, D]) to `path`; returns the path."""
    path = Path(path)
    graph = HeFeatureGraph(encoder).eval().float()
    example = torch.zeros(2, example_size, example_size, 3, dtype=torch.uint8)
    axes = {INPUT_NAME: {0: "batch", 1: "height", 2: "width"}, HE_FEATURE_OUTPUT_NAMES[0]: {0: "batch"}}
    _export(graph, (example,), path, [INPUT_NAME], HE_FEATURE_OUTPUT_NAMES, axes, opset)
    with torch.no_grad():
        width = int(graph(example[:1, :32, :32]).shape[1])
    _set_dims(path, {HE_FEATURE_OUTPUT_NAMES[0]: {1: width}})
    return path


def export_mica_onnx(mica: Mica, path: str | os.PathLike, *, channels: int = 40, opset: int = OPSET) -> Path:
    """Write MICA's chunk step (dynamic number of tiles n) to `path`; returns the path."""
    path = Path(path)
    graph = MicaGraph(mica).eval().float()
    cfg = mica.cfg
    gen = torch.Generator().manual_seed(0)
    example = (torch.randn(7, cfg.path_dim, generator=gen), torch.randn(channels, cfg.codex_dim, generator=gen),
               torch.randn(channels, generator=gen), torch.randn(channels, cfg.dim, generator=gen))
    axes = {"h_path": {0: "tiles"}, "coattn_scores": {1: "tiles"}}
    _export(graph, example, path, MICA_INPUT_NAMES, MICA_OUTPUT_NAMES, axes, opset)
    _set_dims(path, {"hazards": {0: 1, 1: cfg.n_classes}, "survival": {0: 1, 1: cfg.n_classes}, "risk": {0: 1},
                     "coattn_scores": {0: channels}, "coattn_lse": {0: channels},
                     "coattn_mean": {0: channels, 1: cfg.dim}})
    return path


def _set_dims(path: Path, dims: dict[str, dict[int, int]]) -> None:
    """Write fixed output sizes into the graph signature (the tracer leaves some symbolic)."""
    import onnx

    proto = onnx.load(str(path))
    for output in proto.graph.output:
        for axis, size in dims.get(output.name, {}).items():
            dim = output.type.tensor_type.shape.dim[axis]
            dim.Clear()
            dim.dim_value = size
    onnx.save(proto, str(path))


def convert_fp16(src: str | os.PathLike, dst: str | os.PathLike, *,
                 keep_fp32_prefix: str | tuple[str, ...] = FP32_BLOCK_PREFIX) -> Path:
    """fp16 copy of an fp32 ONNX file: inputs/outputs keep their types (cast in-graph), nodes whose name
    starts with `keep_fp32_prefix` (the preprocessing, the online softmax) stay float32 (see fp16.py)."""
    from .fp16 import convert_fp16_regions

    return convert_fp16_regions(src, dst, keep_prefix=keep_fp32_prefix)


def onnx_session(path: str | os.PathLike, threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only (fp16 graphs log constant-folding notes)
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def compare(names, ref, got) -> dict[str, dict[str, float]]:
    """max |Δ| and max |Δ| / max |ref| per output."""
    figures = {}
    for name, r, g in zip(names, ref, got):
        r = r.numpy() if isinstance(r, torch.Tensor) else np.asarray(r)
        diff = float(np.abs(np.asarray(g, np.float64) - r).max()) if r.size else 0.0
        figures[name] = {"max_abs": diff, "max_rel": diff / max(float(np.abs(r).max()) if r.size else 0.0, 1e-30)}
    return figures


def hex_parity(model: HexModel, session, tiles: np.ndarray) -> dict[str, dict[str, float]]:
    """ONNX Runtime vs torch on uint8 NHWC `tiles`: max |Δ| and max |Δ| / max |ref| per output."""
    with torch.no_grad():
        ref = HexGraph(model).eval()(torch.from_numpy(np.ascontiguousarray(tiles)))
    got = session.run(list(OUTPUT_NAMES), {INPUT_NAME: np.ascontiguousarray(tiles)})
    return compare(OUTPUT_NAMES, ref, got)


def codex_parity(encoder: nn.Module, session, codex: np.ndarray, quantisation: str = "scale"
                 ) -> dict[str, dict[str, float]]:
    """ONNX Runtime vs torch on one float32 grid [40, gh, gw]."""
    codex = np.ascontiguousarray(codex, dtype=np.float32)
    with torch.no_grad():
        ref = CodexGraph(encoder, quantisation).eval()(torch.from_numpy(codex))
    got = session.run(list(CODEX_OUTPUT_NAMES), {CODEX_INPUT_NAME: codex})
    return compare(CODEX_OUTPUT_NAMES, [ref], got)


def mica_parity(mica: Mica, session, h_path: np.ndarray, h_codex: np.ndarray, chunk: int = 300
                ) -> dict[str, dict[str, float]]:
    """The ONNX chunk graph streamed over one slide's bag (hexfast.score.mica_stream) vs torch's
    whole-bag Mica.forward: hazards, survival, risk and the co-attention weights [40, N]."""
    from hexfast.score.mica_stream import stream_mica

    h_path = np.ascontiguousarray(h_path, dtype=np.float32)
    h_codex = np.ascontiguousarray(h_codex, dtype=np.float32)
    with torch.no_grad():
        ref = mica(torch.from_numpy(h_path), torch.from_numpy(h_codex))
    names = list(MICA_OUTPUT_NAMES)

    def run(feeds):
        return dict(zip(names, session.run(names, feeds)))

    chunks = lambda: (h_path[i:i + chunk] for i in range(0, len(h_path), chunk))  # noqa: E731
    got = stream_mica(run, h_codex, chunks, state_width=mica.cfg.dim, keep_attention=True)
    return compare(("hazards", "survival", "risk", "coattn"), (ref.hazards, ref.survival, ref.risk, ref.coattn),
                   (got.hazards, got.survival, got.risk, got.attention))


def worst(*figures: dict[str, dict[str, float]]) -> dict[str, float]:
    """Per output, the largest max_rel over several parity runs."""
    out: dict[str, float] = {}
    for fig in figures:
        for name, f in fig.items():
            out[name] = max(out.get(name, 0.0), f["max_rel"])
    return out
