"""Model bundle writer: ONNX files + manifest.json, parity measured at export, written atomically.

Layout (read by `hexfast.bundle.load_bundle`, which needs no torch):

    BUNDLE/manifest.json
    BUNDLE/hex.onnx, hex.fp16.onnx
    BUNDLE/codex_encoder.onnx, codex_encoder.fp16.onnx     (optional)
    BUNDLE/mica.onnx, mica.fp16.onnx                       (optional)
    BUNDLE/he_features.onnx                                (with MICA on CLAM's resnet50_trunc features)
    BUNDLE/hex.pt2, hex.fp16.pt2, hex.bf16.pt2, codex_encoder.pt2, mica.pt2, he_features.pt2
                                                           (torch.export programs, torch_export.py)

TensorRT plans are built later, on the target, outside the bundle (see hexfast.engines.build).
ONNX files are written whole, never with external data (the runtime refuses it).

Every export runs each ONNX file with ONNX Runtime (CPU), and each torch
program, against the torch model it came from, and refuses to write a bundle
whose figures exceed max|Δ|/max|ref| 1e-4 (fp32), 1e-2 (fp16) or 5e-2 (bf16)
for any output ("parity" for the ONNX files, "parity_program" for the
programs; the fp32 program is also compared with the fp32 ONNX file,
"parity_program_vs_onnx"). HEX is checked
on real H&E tiles (the CMU-1-Small-Region crops shipped in data/, plus any
`parity_tiles` given), the CODEX encoder on seeded synthetic grids of several
sizes (sparse, values like HEX predictions), MICA's chunk step on seeded
Gaussian bags of 1, 37 and 1000 tiles from the empty and from a mid-slide
state, and MICA streamed in chunks of 300 tiles (hexfast.score.mica_stream) against
torch's whole-bag forward ("parity_streamed").
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from hexfast import __version__
from hexfast.bundle import SCHEMA, sha256_file
from hexfast.errors import HexfastError
from hexfast.markers import MARKERS
from hexfast.score.mica_stream import INITIAL_LSE

from .hex_model import HexModel
from .mica import Mica
from .onnx_export import (
    CODEX_OUTPUT_NAMES, HE_FEATURE_OUTPUT_NAMES, MICA_OUTPUT_NAMES, OPSET, OUTPUT_NAMES, CodexGraph, HexGraph,
    MicaGraph, compare, convert_fp16, export_codex_onnx, export_he_features_onnx, export_hex_onnx, export_mica_onnx,
    mica_parity, onnx_session, worst,
)
from .resnet_trunc import TARGET_PATCH_SIZE, HeFeatureGraph
from .torch_export import (
    export_codex_program, export_he_features_program, export_hex_program, export_mica_program, load_program,
    program_name, run_program,
)

TILE = {"um": 56.0, "px_at_40x": 224}
INPUT_NORMALISATION = "in graph: PIL-exact bilinear resize to 384, x/255, (x-0.5)/0.5"
CODEX_NORMALISATION = ("in graph: float16 rounding, clip to [0,1], x255, round half to even (uint8 values), "
                       "repeat to 3 channels, PIL-exact bicubic resize to 224, x/255, ImageNet mean/std")
CODEX_TRUNCATE_NORMALISATION = ("in graph: float16 rounding, truncation to uint8 values (the official script's "
                                "first commit's astype('uint8')), repeat to 3 channels, PIL-exact bicubic resize to 224, x/255, "
                                "ImageNet mean/std")
MICA_FEATURES = ("resnet50-trunc", "hex-embedding")
HE_FEATURES_NORMALISATION = "in graph: PIL-exact bilinear resize to 224, x/255, ImageNet mean/std"
CLAM_PATCH = 256  # create_patches_fp.py --patch_size / --step_size defaults, level-0 px at patch level 0
TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 5e-2}
PARITY_DIR = Path(__file__).parent / "data" / "parity_tiles"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
DTYPES = {1: "float32", 2: "uint8", 6: "int32", 7: "int64", 10: "float16", 11: "float64"}


class ExportError(HexfastError):
    """An export that cannot be completed; one line naming the file or model and the problem."""


# --------------------------------------------------------------------------- parity inputs


def read_tiles(paths: Iterable[Path]) -> list[np.ndarray]:
    from PIL import Image

    tiles = []
    for p in paths:
        try:
            with Image.open(p) as im:
                tiles.append(np.asarray(im.convert("RGB")))
        except Exception as exc:  # noqa: BLE001
            raise ExportError(f"{p}: cannot be read as an image ({type(exc).__name__}: {exc})") from None
    return tiles


def tile_files(directory: str | os.PathLike) -> list[Path]:
    d = Path(directory)
    if not d.is_dir():
        raise ExportError(f"{d}: not a directory of tile images")
    files = sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ExportError(f"{d}: holds no tile images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def default_parity_tiles() -> list[np.ndarray]:
    return read_tiles(tile_files(PARITY_DIR))


def clam_parity_tiles(tiles: list[np.ndarray]) -> list[np.ndarray]:
    """CLAM-sized (256 px) real H&E tiles: the centre crops of the parity tiles large enough for one."""
    crops = []
    for t in tiles:
        h, w = t.shape[:2]
        if h >= CLAM_PATCH and w >= CLAM_PATCH:
            y, x = (h - CLAM_PATCH) // 2, (w - CLAM_PATCH) // 2
            crops.append(np.ascontiguousarray(t[y:y + CLAM_PATCH, x:x + CLAM_PATCH]))
    return crops


def _by_size(tiles: list[np.ndarray]) -> list[np.ndarray]:
    groups: dict[tuple, list[np.ndarray]] = {}
    for t in tiles:
        groups.setdefault(t.shape, []).append(t)
    return [np.stack(g) for _, g in sorted(groups.items())]


def codex_parity_grids(seed: int = 0) -> list[np.ndarray]:
    """Sparse grids like a virtual CODEX image (values of HEX predictions, ~30% empty cells): upscaled
    (30x30, 57x41) and downscaled (300x260) by the resize to 224."""
    rng = np.random.default_rng(seed)
    grids = []
    for gh, gw in ((30, 30), (57, 41), (300, 260)):
        g = rng.gamma(2.0, 0.03, (40, gh, gw)).astype(np.float32)
        g[:, rng.random((gh, gw)) < 0.3] = 0.0
        grids.append(g)
    return grids


def mica_parity_bags(path_dim: int, codex_dim: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((n, path_dim)).astype(np.float32), rng.standard_normal((40, codex_dim)).astype(np.float32))
            for n in (1, 37, 1000)]


def mica_step_cases(bags, dim: int, seed: int = 1) -> list[dict[str, np.ndarray]]:
    """MICA chunk-step inputs: each bag from the empty state and from a mid-slide one."""
    rng = np.random.default_rng(seed)
    cases = []
    for hp, hc in bags:
        channels = hc.shape[0]
        empty = (np.full(channels, INITIAL_LSE, np.float32), np.zeros((channels, dim), np.float32))
        mid = (rng.normal(3.0, 1.0, channels).astype(np.float32), rng.standard_normal((channels, dim)).astype(np.float32))
        for lse, mean in (empty, mid):
            cases.append({"h_path": hp, "h_codex": hc, "coattn_lse_in": lse, "coattn_mean_in": mean})
    return cases


# --------------------------------------------------------------------------- export


def _signature(path: Path) -> tuple[dict, dict]:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)

    def describe(values):
        out = {}
        for v in values:
            t = v.type.tensor_type
            out[v.name] = {"dtype": DTYPES.get(t.elem_type, str(t.elem_type)),
                           "shape": [d.dim_param or d.dim_value for d in t.shape.dim]}
        return out

    return describe(proto.graph.input), describe(proto.graph.output)


def _check(name: str, precision: str, figures: dict[str, float], what: str = "ONNX Runtime") -> None:
    bad = {k: v for k, v in figures.items() if not (v <= TOLERANCE[precision])}
    if bad:
        shown = ", ".join(f"{k} {v:.2e}" for k, v in bad.items())
        raise ExportError(f"{name} ({precision}): {what} differs from torch beyond "
                          f"{TOLERANCE[precision]:g} (max|Δ|/max|ref|: {shown}); not writing the bundle")


def _rounded(figures: dict[str, float]) -> dict[str, float]:
    return {k: float(f"{v:.3g}") for k, v in figures.items()}


def _export_model(name: str, work: Path, fp16: bool, export: Callable[[Path], None], graph: nn.Module,
                  outputs: tuple[str, ...], cases: list[dict[str, np.ndarray]], log: Callable[[str], None],
                  program: Callable[[Path, str], Path], program_precisions: tuple[str, ...] = ("fp32",)) -> dict:
    """Export one model (ONNX fp32, fp16; torch programs at `program_precisions`), then run every
    parity case through torch once and through each file."""
    files = {"fp32": f"{name}.onnx"}
    log(f"{name}: exporting to ONNX{' (fp32, fp16)' if fp16 else ''} and checking parity on {len(cases)} case(s)")
    export(work / files["fp32"])
    if fp16:
        files["fp16"] = f"{name}.fp16.onnx"
        convert_fp16(work / files["fp32"], work / files["fp16"])
    entry: dict = {"files": files}
    entry["inputs"], entry["outputs"] = _signature(work / files["fp32"])
    graph = graph.eval()
    with torch.no_grad():
        refs = [[r.numpy() for r in _as_tuple(graph(*(torch.from_numpy(v) for v in case.values())))]
                for case in cases]
    entry["parity"] = {}
    onnx_fp32 = None
    for precision, file in files.items():
        session = onnx_session(work / file)
        got = [session.run(list(outputs), case) for case in cases]
        del session
        if precision == "fp32":
            onnx_fp32 = got
        figures = worst(*(compare(outputs, ref, g) for ref, g in zip(refs, got)))
        log(f"{name} {precision}: ONNX Runtime vs torch fp32, max|Δ|/max|ref| "
            + ", ".join(f"{k} {v:.2e}" for k, v in figures.items()))
        _check(name, precision, figures)
        entry["parity"][precision] = _rounded(figures)
    entry["programs"], entry["parity_program"] = {}, {}
    for precision in program_precisions:
        file = program_name(name, precision)
        loaded = load_program(program(work / file, precision))
        got = [run_program(loaded, case) for case in cases]
        del loaded
        figures = worst(*(compare(outputs, ref, g) for ref, g in zip(refs, got)))
        log(f"{name} {precision}: torch.export program vs torch fp32, max|Δ|/max|ref| "
            + ", ".join(f"{k} {v:.2e}" for k, v in figures.items()))
        _check(f"{name} program", precision, figures, "the torch.export program")
        entry["programs"][precision] = file
        entry["parity_program"][precision] = _rounded(figures)
        if precision == "fp32":
            vs_onnx = worst(*(compare(outputs, [np.asarray(a) for a in o], g) for o, g in zip(onnx_fp32, got)))
            log(f"{name} fp32: torch.export program vs the ONNX file, max|Δ|/max|ref| "
                + ", ".join(f"{k} {v:.2e}" for k, v in vs_onnx.items()))
            _check(f"{name} program vs ONNX", "fp32", vs_onnx, "the torch.export program")
            entry["parity_program_vs_onnx"] = {"fp32": _rounded(vs_onnx)}
    return entry


def _cpu_variants(work: Path, models: dict, tiles: list[np.ndarray], names: tuple[str, ...],
                  log: Callable[[str], None]) -> dict:
    """hex.int8.onnx and the bf16 program, measured against the fp32 ONNX graph (cpu_variants.py)."""
    from . import cpu_variants as cv

    unknown = set(names) - set(cv.RUNTIMES)
    if unknown:
        raise ExportError(f"unknown CPU variant(s) {', '.join(sorted(unknown))}; hexfast makes {', '.join(cv.RUNTIMES)}")
    shown = cv.fidelity_tiles(tiles)

    def runner(session):
        return lambda t: dict(zip(OUTPUT_NAMES, session.run(list(OUTPUT_NAMES), {"tiles": t})))

    ref = cv.run_tiles(runner(onnx_session(work / models["hex"]["files"]["fp32"])), shown)
    ref_risk = cv.sample_bag_risk(ref["markers"], ref["embedding"], shown, work, models)
    variants = {}
    if "int8" in names:
        file = "hex.int8.onnx"
        nodes = cv.quantize_int8(work / models["hex"]["files"]["fp32"], work / file)
        record = cv.measure("int8", runner(onnx_session(work / file)), shown, ref, ref_risk, work, models, log)
        variants["int8"] = {"file": file, "quantized_matmuls": len(nodes), **record}
    if "bf16" in names:
        from hexfast.engines.torch_backend import load_program as on_device

        file = models["hex"]["programs"]["bf16"]
        module = on_device(load_program(work / file), "cpu")

        def run_bf16(t: np.ndarray) -> dict[str, np.ndarray]:
            with torch.no_grad():
                return {k: o.float().numpy() for k, o in zip(OUTPUT_NAMES, module(torch.from_numpy(t)))}

        record = cv.measure("bf16", run_bf16, shown, ref, ref_risk, work, models, log)
        variants["bf16"] = {"program": file, **record}
    return variants


def _streamed_parity(mica: Mica, work: Path, files: dict[str, str], bags, log: Callable[[str], None]) -> dict:
    figures_by_precision = {}
    for precision, file in files.items():
        session = onnx_session(work / file)
        figures = worst(*(mica_parity(mica, session, hp, hc, chunk=300) for hp, hc in bags))
        del session
        log(f"mica {precision} streamed in chunks vs torch whole-bag forward, max|Δ|/max|ref| "
            + ", ".join(f"{k} {v:.2e}" for k, v in figures.items()))
        _check("mica (streamed)", precision, figures)
        figures_by_precision[precision] = _rounded(figures)
    return figures_by_precision


def _as_tuple(out) -> tuple:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def write_bundle(out: str | os.PathLike, *, hex_model: HexModel, codex_encoder: nn.Module | None = None,
                 mica: Mica | None = None, mica_features: str | None = None, he_features: nn.Module | None = None,
                 clam_patching: dict | None = None, sources: dict[str, str | os.PathLike] | None = None,
                 demo: bool = False, fp16: bool = True, bf16: bool = False, parity_tiles: list[np.ndarray] | None = None,
                 codex_quantisation: str = "scale", codex_resize_order: str = "pillow12",
                 cpu_variants: tuple[str, ...] = ("int8", "bf16"), extra: dict | None = None, created: str | None = None,
                 log: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> dict:
    """Export the models to ONNX (fp32, and fp16 when `fp16`) and torch.export programs (fp32; HEX also
    fp16 / bf16 when asked), check parity, write the bundle to `out` atomically (built in a temporary
    directory beside it, then renamed). Returns the manifest.

    With `mica`, `mica_features` must say what its bag is: "resnet50-trunc" (then `he_features`, the
    encoder, and `clam_patching`, CLAM's patching parameters, default its defaults) or "hex-embedding".

    `cpu_variants`: HEX at reduced precision for CPUs ("int8": hex.int8.onnx; "bf16": the bf16 program), each
    with its fidelity against the fp32 graph in models.hex.cpu_variants (cpu_variants.py)."""
    out = Path(out)
    _check_mica_features(mica, mica_features, he_features)
    _check_target(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir()
    try:
        tiles = default_parity_tiles() + list(parity_tiles or [])
        batches = _by_size(tiles)
        models: dict[str, dict] = {}
        hex_precisions = ("fp32",) + ("fp16",) * fp16 + ("bf16",) * (bf16 or "bf16" in cpu_variants)
        models["hex"] = _export_model(
            "hex", work, fp16, lambda p: export_hex_onnx(hex_model, p), HexGraph(hex_model), OUTPUT_NAMES,
            [{"tiles": b} for b in batches], log, lambda p, precision: export_hex_program(hex_model, p, precision),
            hex_precisions)
        models["hex"]["parity_data"] = (f"{len(tiles)} real H&E tiles ({', '.join(sorted({f'{t.shape[0]} px' for t in tiles}))})")
        if codex_encoder is not None:
            grids = codex_parity_grids()
            models["codex_encoder"] = _export_model(
                "codex_encoder", work, fp16,
                lambda p: export_codex_onnx(codex_encoder, p, quantisation=codex_quantisation,
                                            resize_order=codex_resize_order),
                CodexGraph(codex_encoder, codex_quantisation, codex_resize_order), CODEX_OUTPUT_NAMES,
                [{"codex": g} for g in grids], log,
                lambda p, _: export_codex_program(codex_encoder, p, codex_quantisation, codex_resize_order))
            models["codex_encoder"]["parity_data"] = "seeded synthetic sparse grids 30x30, 57x41, 300x260"
            models["codex_encoder"]["input_normalisation"] = (
                CODEX_NORMALISATION if codex_quantisation == "scale" else CODEX_TRUNCATE_NORMALISATION)
            models["codex_encoder"]["quantisation"] = codex_quantisation
            models["codex_encoder"]["resize_order"] = RESIZE_ORDERS[codex_resize_order]
            models["codex_encoder"]["max_grid_side"] = 4095
        if mica is not None:
            bags = mica_parity_bags(mica.cfg.path_dim, mica.cfg.codex_dim)
            models["mica"] = _export_model(
                "mica", work, fp16, lambda p: export_mica_onnx(mica, p), MicaGraph(mica), MICA_OUTPUT_NAMES,
                mica_step_cases(bags, mica.cfg.dim), log, lambda p, _: export_mica_program(mica, p))
            models["mica"]["parity_data"] = ("chunk step: seeded Gaussian bags of 1, 37 and 1000 tiles from the empty "
                                             "and a mid-slide state; streamed: the 37- and 1000-tile bags in chunks "
                                             "of 300 vs the whole-bag forward")
            models["mica"]["parity_streamed"] = _streamed_parity(mica, work, models["mica"]["files"], bags[1:], log)
            models["mica"]["config"] = {"fusion": mica.cfg.fusion, "pooling": mica.cfg.pooling,
                                        "transformer_mode": mica.cfg.transformer_mode}
        if he_features is not None:
            crops = clam_parity_tiles(tiles)
            models["he_features"] = _export_model(
                "he_features", work, False, lambda p: export_he_features_onnx(he_features, p),
                HeFeatureGraph(he_features), HE_FEATURE_OUTPUT_NAMES, [{"tiles": b} for b in _by_size(tiles + crops)],
                log, lambda p, _: export_he_features_program(he_features, p))
            models["he_features"]["parity_data"] = (
                f"{len(tiles) + len(crops)} real H&E tiles ({len(crops)} of them cropped to 256 px, CLAM's patch)")
            models["he_features"]["tile"] = {"px": CLAM_PATCH, "level": 0, "target_px": TARGET_PATCH_SIZE}
            models["he_features"]["input_normalisation"] = HE_FEATURES_NORMALISATION
        if cpu_variants:
            log(f"hex: CPU variants {', '.join(cpu_variants)}, fidelity against fp32 on the parity tiles")
            models["hex"]["cpu_variants"] = _cpu_variants(work, models, tiles, cpu_variants, log)
        log("hashing the files and writing the manifest")
        manifest = {
            "schema": SCHEMA,
            "demo": bool(demo),
            "exporter": f"hexfast_export {__version__}",
            "created": created or _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat().replace(
                "+00:00", "Z"),
            "markers": list(MARKERS),
            "tile": dict(TILE),
            "input_normalisation": INPUT_NORMALISATION,
            "models": models,
        }
        if mica is not None:
            manifest["mica_features"] = _mica_features_entry(mica_features, clam_patching)
        manifest["sources"] = {role: {"path": os.fspath(Path(p).resolve()), "sha256": sha256_file(p)}
                               for role, p in (sources or {}).items()}
        manifest["environment"] = _environment()
        if extra:
            manifest.update(extra)
        manifest["files"] = {p.relative_to(work).as_posix(): sha256_file(p)
                             for p in sorted(work.rglob("*")) if p.is_file()}
        (work / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        _replace(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return manifest


RESIZE_ORDERS = {
    "pillow12": "horizontal pass first (Pillow <= 12, the reference's environment)",
    "pillow13": "vertical pass first for tall grids (Pillow 13: gh > 224, gw != 224, gh + 224 > 2 gw)",
}


def _check_mica_features(mica: Mica | None, kind: str | None, he_features: nn.Module | None) -> None:
    if mica is None:
        if kind is not None or he_features is not None:
            raise ExportError("MICA tile features were given without a MICA model")
        return
    if kind not in MICA_FEATURES:
        raise ExportError(f"MICA's tile features must be declared: {' or '.join(MICA_FEATURES)} (the bag its "
                          f"checkpoint was trained on), not {kind!r}")
    if (kind == "resnet50-trunc") != (he_features is not None):
        raise ExportError("resnet50-trunc MICA features need the ResNet50 encoder (and only they do)")
    if he_features is not None:
        with torch.no_grad():
            width = int(HeFeatureGraph(he_features).eval()(torch.zeros(1, 64, 64, 3, dtype=torch.uint8)).shape[1])
        if width != mica.cfg.path_dim:
            raise ExportError(f"the H&E feature model gives {width}-d features; the MICA model takes "
                              f"{mica.cfg.path_dim}")


def _mica_features_entry(kind: str, clam_patching: dict | None) -> dict:
    """The manifest's declaration of MICA's bag: which features, on which grid."""
    if kind == "hex-embedding":
        return {"kind": kind, "model": "hex", "output": "embedding",
                "grid": "hexfast's HEX tile grid (the h5 `features`)"}
    from hexfast.slide.clam_patches import ClamParams

    params = ClamParams(**(clam_patching or {}))
    return {"kind": kind, "model": "he_features", "output": "features",
            "grid": "CLAM create_patches_fp.py patches (patching)", "patching": params.as_manifest()}


def _environment() -> dict:
    import onnx
    import onnxruntime

    return {"torch": torch.__version__.split("+")[0], "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "opset": OPSET}


def _check_target(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / "manifest.json").is_file():
        raise ExportError(f"{out}: exists, is not empty and is not a model bundle; refusing to overwrite it")


def _replace(work: Path, out: Path) -> None:
    """Move the finished bundle into place; an existing bundle (or empty directory) there is replaced."""
    _check_target(out)
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(work, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
