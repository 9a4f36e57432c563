"""How close the HEX engine runs to the machine's roofline.

    hexfast bench roofline [--model BUNDLE] [--backend B] [--batch-size N] [--tile 224]

Three figures, measured or derived in one run:

1. FLOPs per tile, two ways that must agree:
   * analytic (`hex_flops`): the MUSK encoder's shape (patch embedding conv, per layer the
     Q/K/V/out projections, QKᵀ and AV over all tokens, FFN; the last layer only for the CLS
     token HEX reads, apart from its keys and values), the heads, and the in-graph
     PIL-exact resize (two float32 matmuls against 3 byte planes of PIL's coefficients).
     A multiply-add counts 2 FLOPs. LayerNorm (incl. MUSK's sub-LN), softmax, GELU, bias adds
     and the scaling are elementwise: not counted, estimated separately (~0.5 %).
   * graph (`onnx_flops`): every MatMul / Gemm / Conv of the exported ONNX file, shapes from
     ONNX Runtime's symbolic shape inference at a fixed input [batch, tile, tile, 3].
2. The device's dense matmul peak, measured now (`measure_peak`): CPU float32 GEMM through
   numpy, torch and ONNX Runtime's own MatMul (the best of them is the practical roofline);
   GPU fp16 / bf16 / tf32 torch.matmul.
3. The engine's tiles/s (engines.measure) → achieved TFLOP/s = graph FLOPs × tiles/s, and its
   share of the peak.

Needs onnx + onnxruntime for the graph count (the [test] / [cpu] extras); torch only for the
optional torch GEMM and the GPU peak.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..bundle import load_bundle, sha256_file
from ..engines.devices import cpu_name
from ..files import write_bytes_atomic
from .model import engine_rows
from .proc import cpu_seconds

# Categories shared by the analytic count and the graph count (same keys, same order).
TERMS = ("resize", "patch_embed", "projections", "attn_qk", "attn_av", "ffn", "embed_proj", "heads")
TERM_LABELS = {
    "resize": "in-graph PIL-exact resize to 384 (2 matmuls × 3 byte planes)",
    "patch_embed": "patch embedding conv",
    "projections": "Q, K, V, out projections",
    "attn_qk": "attention QKᵀ",
    "attn_av": "attention AV",
    "ffn": "FFN fc1 + fc2",
    "embed_proj": "CLS → 1024 projection (demo encoders only)",
    "heads": "regression heads (1024→256→128→40)",
    "other": "other MatMul/Gemm/Conv",
}
HEAD_HIDDEN = (256, 128)


@dataclass(frozen=True)
class HexShape:
    """The HEX graph's shape: MUSK encoder + heads. Defaults: MUSK-L/16 @ 384 (real HEX).

    Mirrors hexfast_export's MuskConfig on purpose: the runtime must not import
    torch. tests/test_bench.py checks the formula built on it against the
    exported graph's own count, so the two cannot drift apart unnoticed."""

    img_size: int = 384
    patch_size: int = 16
    in_chans: int = 3
    dim: int = 1024
    depth: int = 24
    heads: int = 16
    ffn_dim: int = 4096
    embed_dim: int = 1024
    head_hidden: tuple = HEAD_HIDDEN
    outputs: int = 40

    @property
    def patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    @property
    def tokens(self) -> int:
        return self.patches + 1  # CLS + patches

    @classmethod
    def from_manifest(cls, manifest: dict) -> HexShape:
        """The `hex_encoder` block `hexfast export` writes; MUSK-L/16@384 when a bundle has none."""
        enc = manifest.get("hex_encoder") or {}
        keys = ("img_size", "patch_size", "dim", "depth", "heads", "ffn_dim", "embed_dim")
        values = {k: int(enc[k]) for k in keys if k in enc}
        values.setdefault("embed_dim", values.get("dim", 1024))
        return cls(outputs=len(manifest.get("markers", [])) or 40, **values)


MUSK_L16_384 = HexShape()


def hex_flops(shape: HexShape = MUSK_L16_384, tile: int = 224) -> dict[str, int]:
    """FLOPs per tile by term (TERMS), multiply-add = 2, for a `tile`-px uint8 input."""
    s, n, d, f = shape.img_size, shape.tokens, shape.dim, shape.ffn_dim
    c = shape.in_chans
    out = dict.fromkeys(TERMS, 0)
    # Resize: [c, T, T] @ [T, 3S] horizontally, then [3S, T] @ [c, T, S] vertically.
    out["resize"] = 2 * c * tile * tile * 3 * s + 2 * c * 3 * s * tile * s
    out["patch_embed"] = 2 * shape.patches * d * c * shape.patch_size ** 2
    full = shape.depth - 1  # layers over all N tokens; the last one has queries for CLS alone
    out["projections"] = full * 4 * 2 * n * d * d + 2 * 2 * n * d * d + 2 * 2 * d * d  # last: K, V all; Q, out CLS
    out["attn_qk"] = full * 2 * n * n * d + 2 * n * d  # heads × N² × head_dim = N² × dim
    out["attn_av"] = full * 2 * n * n * d + 2 * n * d
    out["ffn"] = full * 2 * 2 * n * d * f + 2 * 2 * d * f
    out["embed_proj"] = 2 * d * shape.embed_dim if shape.embed_dim != d else 0
    dims = (shape.embed_dim, *shape.head_hidden, shape.outputs)
    out["heads"] = sum(2 * a * b for a, b in zip(dims, dims[1:]))
    return out


def elementwise_estimate(shape: HexShape = MUSK_L16_384) -> dict[str, int]:
    """Rough FLOPs of what hex_flops leaves out (per tile): LayerNorms (~8/element: 3 on dim + the
    sub-LN on the FFN hidden, per layer, plus the final one), softmax (~5/score), exact GELU
    (~8/element), bias adds and residuals (1/element)."""
    n, d, f, heads = shape.tokens, shape.dim, shape.ffn_dim, shape.heads
    rows = (shape.depth - 1) * n + 1  # token-layers: the last layer runs CLS alone
    return {
        "layernorm": 8 * (rows * (3 * d + f) + d),
        "softmax": 5 * heads * n * rows,
        "gelu": 8 * rows * f,
        "bias+residual": rows * (4 * d + f + d + 2 * d),
    }


# ----------------------------------------------------------------------------- ONNX graph count

def _term_of(node_name: str) -> str:
    name = node_name.lower()
    if "/preprocess/" in name or name.startswith("preprocess"):
        return "resize"
    if "vision_embed" in name:
        return "patch_embed"
    if any(p in name for p in ("q_proj", "k_proj", "v_proj", "out_proj")):
        return "projections"
    if "self_attn/matmul_1" in name:
        return "attn_av"
    if "self_attn/matmul" in name:
        return "attn_qk"
    if "/fc1/" in name or "/fc2/" in name:
        return "ffn"
    if "embed_proj" in name:
        return "embed_proj"
    if "regression_head" in name:
        return "heads"
    return "other"


def _dims(value_info) -> list:
    return [d.dim_value if d.HasField("dim_value") else None for d in value_info.type.tensor_type.shape.dim]


def _strip_weights(model, keep: int = 4096) -> None:
    """Drop the data of large initializers (their dims stay): shape inference needs only the
    dims, and a full-size model is 1.2 GB of weights."""
    from onnx import TensorProto

    for tensor in model.graph.initializer:
        if int(np.prod(tensor.dims)) > keep:
            stripped = TensorProto(name=tensor.name, dims=tensor.dims, data_type=tensor.data_type)
            tensor.CopyFrom(stripped)


def onnx_flops(path: str | os.PathLike, tile: int = 224, batch: int = 1) -> dict:
    """FLOPs of one tile through the ONNX file: every MatMul, Gemm and Conv, by TERMS category
    (from the node names), with shapes inferred for input [batch, tile, tile, 3].

    Returns {"total", "terms": {term: flops}, "nodes": count, "ops": {op: count}} per tile."""
    import onnx
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    model = onnx.load(str(path))
    _strip_weights(model)
    inp = model.graph.input[0]
    for axis, size in enumerate((batch, tile, tile, 3)):
        dim = inp.type.tensor_type.shape.dim[axis]
        dim.Clear()
        dim.dim_value = size
    inferred = SymbolicShapeInference.infer_shapes(model, auto_merge=True)
    shapes = {vi.name: _dims(vi) for vi in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)}
    shapes.update({t.name: list(t.dims) for t in inferred.graph.initializer})

    terms: dict[str, int] = dict.fromkeys((*TERMS, "other"), 0)
    ops: dict[str, int] = {}
    for node in inferred.graph.node:
        if node.op_type not in ("MatMul", "Gemm", "Conv"):
            continue
        a, b, y = shapes.get(node.input[0]), shapes.get(node.input[1]), shapes.get(node.output[0])
        if not a or not b or not y or None in (*a, *b, *y):
            raise ValueError(f"{path}: shape inference left {node.op_type} {node.name} unresolved "
                             f"({a} × {b} → {y})")
        if node.op_type == "MatMul":
            k = a[-1]
            flops = 2 * int(np.prod(y)) * k
        elif node.op_type == "Gemm":
            trans_a = next((attr.i for attr in node.attribute if attr.name == "transA"), 0)
            k = a[0] if trans_a else a[-1]
            flops = 2 * int(np.prod(y)) * k
        else:  # Conv: each output element is a dot product over (Cin / groups) × kernel
            flops = 2 * int(np.prod(y)) * int(np.prod(b[1:]))
        terms[_term_of(node.name)] += flops
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    per_tile = {k: v // batch for k, v in terms.items()}
    return {"total": sum(per_tile.values()), "terms": per_tile, "nodes": sum(ops.values()), "ops": ops}


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "hexfast" / "flops"


def onnx_flops_cached(path: str | os.PathLike, tile: int = 224, sha256: str | None = None) -> dict:
    """onnx_flops, cached under ~/.cache/hexfast/flops/<sha256>-<tile>.json (the full-size graph
    takes ~30 s and a few GB to load). `sha256`: the file's, when already known (bundle manifest)."""
    if sha256 is None:
        sha256 = sha256_file(path)
    cache = _cache_dir() / f"{sha256}-{tile}.json"
    try:
        return {**json.loads(cache.read_text()), "cached": True}
    except (OSError, ValueError):
        pass
    result = onnx_flops(path, tile)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(cache, json.dumps(result).encode())
    except OSError:
        pass
    return {**result, "cached": False}


# ----------------------------------------------------------------------------- peak

@dataclass
class PeakResult:
    device: str
    rows: list[dict] = field(default_factory=list)  # {"kernel", "dtype", "n", "tflops"}

    def peak(self, dtype: str | None = None, key: str = "tflops") -> float:
        """Best TFLOP/s (key "tflops") or TFLOP per CPU-second ("tflop_per_cpu_s", CPU rows only)."""
        rows = [r for r in self.rows if (dtype is None or r["dtype"] == dtype) and key in r]
        return max((r[key] for r in rows), default=0.0)


def _time_gemm(fn, flops: float, seconds: float) -> tuple[float, float]:
    """(TFLOP/s of the best run by wall clock, TFLOP per CPU-second of this process over all runs):
    the second barely moves when other processes share the cores."""
    fn()  # warm up (allocations, kernel selection)
    best = float("inf")
    start, c0 = time.perf_counter(), cpu_seconds()
    runs = 0
    while runs < 3 or time.perf_counter() - start < seconds:
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
        runs += 1
    used = cpu_seconds() - c0
    return flops / best / 1e12, (flops * runs / used / 1e12 if used > 0 else 0.0)


def _row(kernel: str, dtype: str, n: int, timed: tuple[float, float], cpu: bool = True) -> dict:
    row = {"kernel": kernel, "dtype": dtype, "n": n, "tflops": timed[0]}
    if cpu:
        row["tflop_per_cpu_s"] = timed[1]
    return row


def measure_peak(device: str = "cpu", n: int | None = None, seconds: float = 2.0,
                 dtypes: tuple[str, ...] = ("fp32",)) -> PeakResult:
    """Dense matmul TFLOP/s (best of several runs) on this machine, by every route available.

    cpu: float32 n×n GEMM through numpy, torch (if installed) and ONNX Runtime's MatMul (the
    kernel the ort-cpu engine uses); with "int8" in `dtypes` ONNX Runtime's MatMulInteger (the int8
    engine's kernel; a multiply-add of int8 counts as 2 operations), with "bf16" torch's bf16 matmul
    (the bf16 CPU variant's). cuda: torch.matmul in fp16, bf16, and fp32 with TF32."""
    if device == "cuda":
        return _peak_cuda(n or 8192, seconds)
    n = n or 2048
    rows = []
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    flops = 2.0 * n ** 3
    rows.append(_row(f"numpy matmul ({_numpy_blas()})", "fp32", n, _time_gemm(lambda: a @ b, flops, seconds)))
    try:
        import torch

        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        with torch.inference_mode():
            rows.append(_row(f"torch {torch.__version__} matmul", "fp32", n,
                             _time_gemm(lambda: torch.matmul(ta, tb), flops, seconds)))
    except ImportError:
        pass
    try:
        session = _ort_matmul_session()
        rows.append(_row("onnxruntime MatMul (MLAS)", "fp32", n,
                         _time_gemm(lambda: session.run(None, {"a": a, "b": b}), flops, seconds)))
        if "int8" in dtypes:  # what hex.int8.onnx runs: uint8 activations x int8 weights, int32 sums
            qa = rng.integers(0, 256, (n, n), dtype=np.uint8)
            qb = rng.integers(-128, 128, (n, n), dtype=np.int8)
            integer = _ort_matmul_session("MatMulInteger")
            rows.append(_row("onnxruntime MatMulInteger (MLAS, u8 x s8)", "int8", n,
                             _time_gemm(lambda: integer.run(None, {"a": qa, "b": qb}), flops, seconds)))
    except ImportError:
        pass
    if "bf16" in dtypes:
        try:
            import torch

            ha, hb = torch.from_numpy(a).bfloat16(), torch.from_numpy(b).bfloat16()
            with torch.inference_mode():
                rows.append(_row(f"torch {torch.__version__} matmul (oneDNN)", "bf16", n,
                                 _time_gemm(lambda: torch.matmul(ha, hb), flops, seconds)))
        except ImportError:
            pass
    return PeakResult(device=f"cpu: {cpu_name()} ({os.cpu_count()} logical CPUs)", rows=rows)


def _numpy_blas() -> str:
    try:
        config = np.show_config(mode="dicts")
        return config["Build Dependencies"]["blas"]["name"]
    except Exception:  # noqa: BLE001 - cosmetic
        return "BLAS"


def _ort_matmul_session(op: str = "MatMul"):
    import onnxruntime as ort
    from onnx import TensorProto, helper

    a, b, c = ((TensorProto.UINT8, TensorProto.INT8, TensorProto.INT32) if op == "MatMulInteger"
               else (TensorProto.FLOAT,) * 3)
    graph = helper.make_graph(
        [helper.make_node(op, ["a", "b"], ["c"])], "gemm",
        [helper.make_tensor_value_info("a", a, ["m", "k"]),
         helper.make_tensor_value_info("b", b, ["k", "n"])],
        [helper.make_tensor_value_info("c", c, ["m", "n"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = min(model.ir_version, 9)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _peak_cuda(n: int, seconds: float) -> PeakResult:
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device visible to torch")
    rows = []
    dev = torch.device("cuda")
    flops = 2.0 * n ** 3
    for dtype, name in ((torch.float16, "fp16"), (torch.bfloat16, "bf16"), (torch.float32, "tf32")):
        a = torch.randn(n, n, device=dev, dtype=dtype)
        b = torch.randn(n, n, device=dev, dtype=dtype)
        previous = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = name == "tf32"
        try:
            def run(k=8, a=a, b=b):
                for _ in range(k):
                    torch.matmul(a, b)
                torch.cuda.synchronize()
            rows.append(_row(f"torch {torch.__version__} matmul ×8", name, n, _time_gemm(run, 8 * flops, seconds),
                             cpu=False))
        finally:
            torch.backends.cuda.matmul.allow_tf32 = previous
        del a, b
    return PeakResult(device=f"cuda: {torch.cuda.get_device_name(0)}", rows=rows)


# ----------------------------------------------------------------------------- the report

def hex_params(shape: HexShape = MUSK_L16_384) -> int:
    """Weights the graph reads per batch: the matmul/conv weights (biases, LayerNorms, positions left out)."""
    d = shape.dim
    dims = (shape.embed_dim, *shape.head_hidden, shape.outputs)
    return (shape.depth * (4 * d * d + 2 * d * shape.ffn_dim) + d * shape.in_chans * shape.patch_size ** 2
            + (d * shape.embed_dim if shape.embed_dim != d else 0) + sum(a * b for a, b in zip(dims, dims[1:])))


def roofline(model=None, backend: str = "auto", precision: str = "fp32", batch_size: int = 8, tile: int = 224,
             seconds: float = 10.0, peak_seconds: float = 2.0, threads: int | None = None) -> dict:
    """Analytic and graph FLOPs per tile, the device's matmul peak and the engine's achieved share.

    On a GPU the share is by wall clock. On a CPU it is also given per CPU-second (FLOPs / process CPU
    time, for the engine and for the peak GEMM alike), which other load on the machine barely moves."""
    bundle = load_bundle(model)
    shape = HexShape.from_manifest(bundle.manifest)
    analytic = hex_flops(shape, tile)
    onnx_path = bundle.model_path("hex", "fp32")
    graph = onnx_flops_cached(onnx_path, tile, sha256=bundle.manifest["files"].get(onnx_path.name))
    total_a, total_g = sum(analytic.values()), graph["total"]

    row = engine_rows(bundle, backend, precision, [batch_size], tile, seconds, threads)[0]
    on_gpu = isinstance(row["gpu_mem_mib"], float) and row["backend"] != "ort-cpu"
    try:
        peak = measure_peak("cuda" if on_gpu else "cpu", seconds=peak_seconds)
    except (ImportError, RuntimeError) as e:  # a GPU engine without a CUDA build of torch to measure the peak
        peak = PeakResult(device=f"peak not measured ({e})")
    peak_dtype = {"fp32": "tf32", "fp16": "fp16", "bf16": "bf16"}[precision] if on_gpu else "fp32"
    peak_tflops = peak.peak(peak_dtype)
    achieved = total_g * row["tiles_per_s"] / 1e12
    out = {
        "model": str(bundle.path), "demo": bundle.demo, "shape": asdict(shape), "tile": tile,
        "analytic": analytic, "analytic_total": total_a,
        "elementwise_estimate": elementwise_estimate(shape),
        "graph": graph["terms"], "graph_total": total_g, "graph_nodes": graph["nodes"], "graph_ops": graph["ops"],
        "graph_cached": graph.get("cached", False), "agree": total_a == total_g,
        "engine": row,
        "peak": {"device": peak.device, "rows": peak.rows, "dtype": peak_dtype, "tflops": peak_tflops},
        "achieved_tflops": achieved, "percent_of_peak": 100 * achieved / peak_tflops if peak_tflops else None,
        "roofline_tiles_per_s": peak_tflops * 1e12 / total_g if total_g else None,
        "weight_bytes_fp32": 4 * hex_params(shape),
        "intensity_flop_per_weight_byte": batch_size * total_g / (4 * hex_params(shape)),
    }
    if not on_gpu:
        per_cpu = peak.peak("fp32", "tflop_per_cpu_s")
        achieved_cpu = total_g / (row["cpu_ms_per_tile"] / 1e3) / 1e12 if row["cpu_ms_per_tile"] else 0.0
        out.update({"peak_tflop_per_cpu_s": per_cpu, "achieved_tflop_per_cpu_s": achieved_cpu,
                    "percent_of_peak_cpu": 100 * achieved_cpu / per_cpu if per_cpu else None})
    return out


def format_roofline(r: dict) -> str:
    g = 1e9
    sh = r["shape"]
    lines = [f"HEX graph {r['model']} ({'demo, ' if r['demo'] else ''}encoder {sh['img_size']} px, "
             f"patch {sh['patch_size']}, dim {sh['dim']}, depth {sh['depth']}, FFN {sh['ffn_dim']}, "
             f"{sh['img_size'] // sh['patch_size']}² + 1 tokens), {r['tile']}-px uint8 input", "",
             "| term | analytic GFLOP/tile | ONNX graph GFLOP/tile | share |", "|---|---|---|---|"]
    total = r["analytic_total"] or 1
    for term in (*TERMS, "other"):
        a, gr = r["analytic"].get(term, 0), r["graph"].get(term, 0)
        if a == 0 and gr == 0:
            continue
        lines.append(f"| {TERM_LABELS[term]} | {a / g:.4f} | {gr / g:.4f} | {100 * a / total:.2f} % |")
    lines.append(f"| **total** (multiply-add = 2) | **{r['analytic_total'] / g:.4f}** | **{r['graph_total'] / g:.4f}** "
                 f"| {'equal' if r['agree'] else 'DIFFER'} |")
    ew = sum(r["elementwise_estimate"].values())
    lines += ["", f"Not counted (elementwise: LayerNorm + sub-LN, softmax, GELU, biases): ≈{ew / g:.2f} GFLOP/tile "
                  f"({100 * ew / total:.2f} %). Graph: {r['graph_nodes']} MatMul/Gemm/Conv nodes "
                  f"{r['graph_ops']}{' (cached count)' if r['graph_cached'] else ''}.", ""]
    e, p = r["engine"], r["peak"]
    lines.append(f"Peak ({p['device']}), dense matmul measured now:")
    for row in p["rows"]:
        cpu = f"  {row['tflop_per_cpu_s'] * 1e3:7.1f} GFLOP per CPU-s" if "tflop_per_cpu_s" in row else ""
        lines.append(f"  {row['kernel']:<36} {row['dtype']:<5} n={row['n']:<5} {row['tflops'] * 1e3:9.1f} GFLOP/s{cpu}")
    pct = f"{r['percent_of_peak']:.1f} %" if r["percent_of_peak"] is not None else "n/a"
    lines += ["", f"Engine {e['describe']}",
              f"  batch {e['batch']}: {e['tiles_per_s']:.3f} tiles/s, {e['latency_ms']:.1f} ms/batch, "
              f"CPU {e['cpu_ms_per_tile']:.1f} ms/tile",
              f"  achieved {r['achieved_tflops'] * 1e3:.1f} GFLOP/s = {pct} of the best {p['dtype']} matmul "
              f"({p['tflops'] * 1e3:.1f} GFLOP/s); at that peak: {r['roofline_tiles_per_s']:.3f} tiles/s"]
    if "percent_of_peak_cpu" in r and r["percent_of_peak_cpu"] is not None:
        lines.append(f"  per CPU-second (load-independent): {r['achieved_tflop_per_cpu_s'] * 1e3:.1f} GFLOP per CPU-s "
                     f"= {r['percent_of_peak_cpu']:.1f} % of the best GEMM's {r['peak_tflop_per_cpu_s'] * 1e3:.1f}")
    lines.append(f"  arithmetic intensity at batch {e['batch']}: {r['intensity_flop_per_weight_byte']:.0f} FLOP per byte "
                 f"of fp32 weights ({r['weight_bytes_fp32'] / 2**20:.0f} MiB) read once per batch")
    return "\n".join(lines)
