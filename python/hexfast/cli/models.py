"""`hexfast export` and `hexfast build-engines`: model bundles from weights, TensorRT plans from bundles.

`export` needs torch and hexfast_export (`pip install torch` for the machine, then
`pip install 'hexfast[export]'`); they are imported only when it runs. The rest
of hexfast never imports torch. `build-engines` needs TensorRT 10 and a GPU.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from ..bundle import load_bundle
from ..engines.build import build_engines
from ..errors import HexfastError
from . import console
from .types import key_ints, positive_int, sorted_sizes

EXPORT_EPILOG = """\
examples:
  hexfast export --musk musk/model.safetensors --hex-heads hex_heads.pth -o models/hex --fp16
  hexfast export --hex hex_full.pth --dinov2 dinov2_vits14_reg4_pretrain.pth --mica s_0_checkpoint.pt
      --mica-pooling attn --mica-features resnet50-trunc --resnet50 resnet50_tv_in1k.safetensors -o models/hex-mica
  hexfast export --demo -o models/demo
      (random weights, tiny models, MICA on the official pipeline's bag; manifest says demo: true)

MICA's H&E bag is declared, never guessed: --mica-features resnet50-trunc is the official pipeline
(CLAM's create_patches_fp.py patches, 256 px at level 0, and its extract_features_fp.py resnet50_trunc
encoder, whose ImageNet ResNet50 weights --resnet50 gives: torchvision's resnet50 or timm's
resnet50.tv_in1k file); hex-embedding is the HEX backbone's embedding on hexfast's own grid (for a MICA
trained on hexfast's h5 `features`). A checkpoint cannot say whether MICA pooled with 'attn' or 'gap',
so --mica-pooling is required; fusion and transformer mode are read from it (a flag that disagrees
is an error).
"""

BUILD_EPILOG = """\
Plans go to ~/.cache/hexfast/engines/<bundle hash>/<gpu>-trt<version>/ ($HEXFAST_ENGINE_CACHE moves the root),
outside the bundle, each with its sha256 recorded for the runtime to check, one per model and
precision, with one optimisation profile per tile size for HEX (batch 1..max-batch) and a timing cache.
"""


def add_model_commands(sub, common: argparse.ArgumentParser) -> None:
    """Register `export` and `build-engines` on the top-level subparsers."""
    export = sub.add_parser("export", parents=[common], help="build a model bundle (ONNX + manifest) from weights",
                            description="Build a model bundle (ONNX files + manifest.json with parity figures) "
                                        "from local checkpoint files, or an untrained demo bundle.",
                            epilog=EXPORT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    export.add_argument("-o", "--out", type=Path, required=True, metavar="BUNDLE", help="bundle directory to write")
    weights = export.add_argument_group("weights (local files)")
    weights.add_argument("--musk", type=Path, metavar="W", help="MUSK encoder weights (model.safetensors)")
    weights.add_argument("--hex-heads", type=Path, metavar="C", help="HEX heads checkpoint (with --musk)")
    weights.add_argument("--hex", type=Path, metavar="H", help="full HEX checkpoint (encoder + heads)")
    weights.add_argument("--dinov2", type=Path, metavar="D",
                         help="DINOv2 ViT-S/14-reg4 weights for the CODEX encoder (dinov2_vits14_reg4_pretrain.pth)")
    weights.add_argument("--mica", type=Path, metavar="M", help="MICA checkpoint (s_{fold}_checkpoint.pt); needs --dinov2")
    weights.add_argument("--mica-pooling", choices=("attn", "gap"),
                         help="MICA pooling the checkpoint was trained with (required with --mica: both modes "
                              "hold the same weights, so the checkpoint cannot tell)")
    weights.add_argument("--mica-fusion", choices=("concat", "bilinear"),
                         help="MICA fusion (read from the checkpoint; given, it must agree)")
    weights.add_argument("--mica-transformer-mode", choices=("separate", "shared"),
                         help="MICA transformer mode (read from the checkpoint; given, it must agree)")
    weights.add_argument("--mica-features", choices=("resnet50-trunc", "hex-embedding"),
                         help="the tile features MICA was trained on (required with MICA): resnet50-trunc = CLAM's "
                              "patches and encoder (official pipeline; needs --resnet50), hex-embedding = hexfast's "
                              "h5 features; a --demo export takes resnet50-trunc unless told otherwise")
    weights.add_argument("--resnet50", type=Path, metavar="R",
                         help="ImageNet ResNet50 weights for CLAM's resnet50_trunc (torchvision resnet50 or timm "
                              "resnet50.tv_in1k, .pth or .safetensors)")
    weights.add_argument("--clam-preset", type=Path, metavar="CSV",
                         help="CLAM segmentation/patching preset (its presets/*.csv format) the bags were made "
                              "with; default CLAM's create_patches_fp.py defaults")
    export.add_argument("--demo", action="store_true", help="random-weight models instead of weights (demo: true)")
    export.add_argument("--size", choices=("tiny", "full"), default="tiny",
                        help="demo model size: tiny (default; a few MB, fast on CPU) or full (the real architectures, "
                             "about 2 GB and 15 minutes)")
    export.add_argument("--seed", type=int, default=0, help="demo weight seed (default 0)")
    export.add_argument("--fp16", action="store_true",
                        help="also write fp16 ONNX files (float32 inputs/outputs) and an fp16 HEX torch program")
    export.add_argument("--bf16", action="store_true", help="also write a bf16 HEX torch program (for the GPU)")
    export.add_argument("--cpu-variants", type=_variants, default=("int8", "bf16"), metavar="LIST",
                        help="HEX at reduced precision for CPUs, each measured against fp32 on the parity tiles and "
                             "recorded in the manifest: int8 (hex.int8.onnx), bf16 (the bf16 torch program); "
                             "'none' for neither (default int8,bf16)")
    export.add_argument("--parity-tiles", type=Path, metavar="DIR",
                        help="extra H&E tile images for the HEX parity check (beside the built-in CMU-1 tiles)")
    export.add_argument("--codex-uint8", choices=("scale", "truncate"), default="scale",
                        help="CODEX grid to 8 bits: scale = clip [0,1], x255, round, what the official "
                             "codex_h5_png2fea.py does (default, bit-exact); truncate = its first commit's "
                             "astype('uint8') (for MICA checkpoints trained on features made with that version)")
    export.add_argument("--codex-resize-order", choices=("pillow12", "pillow13"), default="pillow12",
                        help="the Pillow the CODEX features were made with: pillow12 = horizontal pass first "
                             "(every Pillow up to 12, the official environment; default), pillow13 = Pillow 13's "
                             "vertical pass first for tall grids")
    export.add_argument("--musk-config", type=key_ints, default=None, help=argparse.SUPPRESS)  # tests: depth=2,...
    export.set_defaults(run=cmd_export)

    build = sub.add_parser("build-engines", parents=[common], help="build TensorRT plans of a bundle for this GPU",
                           description="Build TensorRT plans for the local GPU from a model bundle's ONNX files.",
                           epilog=BUILD_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    build.add_argument("bundle", type=Path, metavar="BUNDLE")
    precision = build.add_mutually_exclusive_group()
    precision.add_argument("--fp16", dest="precision", action="store_const", const="fp16",
                           help="fp16 plans (the bundle's fp16 ONNX when present; preprocessing stays fp32)")
    precision.add_argument("--bf16", dest="precision", action="store_const", const="bf16",
                           help="bf16 plans (preprocessing stays fp32)")
    build.set_defaults(precision="fp32")
    build.add_argument("--max-batch", type=positive_int, default=64, help="largest HEX batch (default 64)")
    build.add_argument("--tile-sizes", type=sorted_sizes, default=[224, 384], metavar="PX,PX",
                       help="HEX input tile sizes, one optimisation profile each (default 224,384: 40x tiles as "
                            "read, and tiles the TileStream already resized to 384)")
    build.add_argument("--models", default="hex", help="comma-separated: hex, codex_encoder, mica (default hex)")
    build.add_argument("--workspace-gb", type=float, default=8.0, help="builder workspace limit (default 8 GiB)")
    build.set_defaults(run=cmd_build_engines)


def _need_torch() -> None:
    missing = []
    for module in ("torch", "onnx", "onnxruntime"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise HexfastError(f"hexfast export needs {', '.join(missing)}: install torch for this machine (CPU or CUDA "
                           f"build), then pip install 'hexfast[export]'")


def _file(path: Path | None) -> Path | None:
    if path is not None and not path.is_file():
        raise HexfastError(f"{path}: no such file" if not path.exists() else f"{path}: not a file")
    return path


def _check_out(out: Path) -> None:
    """Refuse, before any work, a target that is a file or a non-empty directory that is not a bundle."""
    if out.exists() and not out.is_dir():
        raise HexfastError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / "manifest.json").is_file():
        raise HexfastError(f"{out}: exists, is not empty and is not a model bundle; refusing to overwrite it")


def _check_mica_args(args) -> None:
    """MICA's configuration and features are declared, never guessed (see the epilog)."""
    mica = args.demo or args.mica is not None
    if not mica:
        named = [f for f, v in (("--mica-features", args.mica_features), ("--resnet50", args.resnet50),
                                ("--clam-preset", args.clam_preset), ("--mica-pooling", args.mica_pooling)) if v]
        if named:
            raise HexfastError(f"{', '.join(named)} describe(s) a MICA model; add --mica M (or --demo)")
        return
    if args.mica_features is None and args.demo:  # random weights have no training bag: take the official one
        args.mica_features = "resnet50-trunc"
        console.note("--demo: MICA reads the official pipeline's bag (--mica-features resnet50-trunc: CLAM's patches "
                     "and resnet50_trunc encoder); --mica-features hex-embedding for hexfast's own features")
    if args.mica_features is None:
        raise HexfastError("MICA needs --mica-features resnet50-trunc (CLAM's patches and resnet50_trunc encoder, the "
                           "official pipeline) or hex-embedding (hexfast's h5 features): the bag its checkpoint "
                           "was trained on")
    if args.mica_features == "resnet50-trunc":
        if args.resnet50 is None and not args.demo:
            raise HexfastError("--mica-features resnet50-trunc needs --resnet50 R (ImageNet ResNet50 weights: "
                               "torchvision resnet50 or timm resnet50.tv_in1k)")
        if args.resnet50 is not None and args.demo:
            raise HexfastError("--demo builds random weights; drop --resnet50")
    elif args.resnet50 is not None or args.clam_preset is not None:
        raise HexfastError("--resnet50 and --clam-preset go with --mica-features resnet50-trunc")
    if args.mica is not None and args.mica_pooling is None:
        raise HexfastError("--mica needs --mica-pooling attn|gap: both poolings hold the same weights, so the "
                           "checkpoint cannot tell which it was trained with (a wrong guess changes its risk)")
    for path in (args.resnet50, args.clam_preset):
        _file(path)


def _variants(text: str) -> tuple[str, ...]:
    names = () if text.strip() == "none" else tuple(v.strip() for v in text.split(",") if v.strip())
    unknown = [v for v in names if v not in ("int8", "bf16")]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown CPU variant {unknown[0]!r}: choose from int8, bf16, or none")
    return names


def cmd_export(args) -> int:
    given = {k: getattr(args, k) for k in ("musk", "hex_heads", "hex", "dinov2", "mica")}
    if args.demo:
        named = [f"--{k.replace('_', '-')}" for k, v in given.items() if v is not None]
        named += [f for f, v in (("--mica-pooling", args.mica_pooling), ("--mica-fusion", args.mica_fusion),
                                 ("--mica-transformer-mode", args.mica_transformer_mode)) if v]
        if named:
            raise HexfastError(f"--demo builds random weights; drop {', '.join(named)}")
    else:
        if args.hex is not None and (args.musk is not None or args.hex_heads is not None):
            raise HexfastError("give either --hex H or --musk W --hex-heads C, not both")
        if args.hex is None and (args.musk is None or args.hex_heads is None):
            raise HexfastError("HEX weights needed: --musk W --hex-heads C, or --hex H (or --demo)")
        if args.mica is not None and args.dinov2 is None:
            raise HexfastError("--mica needs --dinov2: MICA reads CODEX features from the DINOv2 encoder")
        for path in given.values():
            _file(path)
    _check_mica_args(args)
    if args.parity_tiles is not None and not args.parity_tiles.is_dir():
        raise HexfastError(f"{args.parity_tiles}: not a directory of tile images")
    _check_out(args.out)
    started = time.perf_counter()

    def log(message: str) -> None:  # every step timed from the start: a long one shows where time goes
        console.out(f"[{time.perf_counter() - started:6.1f} s] {message}")

    log("loading torch and the exporter")
    _need_torch()
    from hexfast_export.bundle_writer import read_tiles, tile_files, write_bundle

    tiles = read_tiles(tile_files(args.parity_tiles)) if args.parity_tiles is not None else None
    clam = read_clam_preset(args.clam_preset) if args.clam_preset is not None else None
    sources: dict[str, Path] = {}
    extra: dict = {}
    he_features = None
    if args.demo:
        from hexfast_export.demo import demo_he_features, demo_models, describe

        log(f"demo bundle: {args.size} random-weight models (seed {args.seed})")
        hex_model, encoder, mica = demo_models(args.size, args.seed)
        if args.mica_features == "resnet50-trunc":
            from hexfast_export.demo import DEMO_CLAM_PATCHING

            he_features = demo_he_features(args.size, args.seed)
            clam = DEMO_CLAM_PATCHING | (clam or {})
        extra["demo_models"] = {"size": args.size, "seed": args.seed, **describe(args.size)}
    else:
        from hexfast_export import MUSK_LARGE_384, MuskConfig, build_hex, load_dinov2, load_mica
        from hexfast_export.resnet_trunc import load_resnet50_trunc

        cfg = MuskConfig(**args.musk_config) if args.musk_config else MUSK_LARGE_384
        if args.hex is not None:
            hex_model, reports = build_hex(hex=args.hex, cfg=cfg)
            sources["hex"] = args.hex
        else:
            hex_model, reports = build_hex(musk=args.musk, hex_heads=args.hex_heads, cfg=cfg)
            sources["musk"], sources["hex_heads"] = args.musk, args.hex_heads
        encoder = mica = None
        if args.dinov2 is not None:
            encoder, report = load_dinov2(args.dinov2)
            reports.append(report)
            sources["dinov2"] = args.dinov2
        if args.mica is not None:
            mica, report = load_mica(args.mica, pooling=args.mica_pooling, fusion=args.mica_fusion,
                                     transformer_mode=args.mica_transformer_mode)
            reports.append(report)
            sources["mica"] = args.mica
        if args.resnet50 is not None:
            he_features, report = load_resnet50_trunc(args.resnet50)
            reports.append(report)
            sources["resnet50"] = args.resnet50
        for report in reports:
            console.line(f"hexfast export: {report.summary()}")
    if args.clam_preset is not None:
        sources["clam_preset"] = args.clam_preset
    m = hex_model.cfg
    extra["hex_encoder"] = {"img_size": m.img_size, "patch_size": m.patch_size, "dim": m.dim, "depth": m.depth,
                            "heads": m.heads, "ffn_dim": m.ffn_dim, "embed_dim": hex_model.embed_dim}
    manifest = write_bundle(args.out, hex_model=hex_model, codex_encoder=encoder, mica=mica,
                            mica_features=args.mica_features if mica is not None else None, he_features=he_features,
                            clam_patching=clam, sources=sources, demo=args.demo, fp16=args.fp16, bf16=args.bf16,
                            cpu_variants=args.cpu_variants,
                            parity_tiles=tiles, codex_quantisation=args.codex_uint8,
                            codex_resize_order=args.codex_resize_order, extra=extra, log=log)
    size = sum((args.out / f).stat().st_size for f in manifest["files"])
    console.out(f"wrote {args.out} ({', '.join(manifest['models'])}; {len(manifest['files'])} files, "
                f"{size / 1e6:.1f} MB{'; DEMO: untrained random weights' if args.demo else ''}) in "
                f"{time.perf_counter() - started:.0f} s")
    return 0


# A CLAM preset's columns (CLAM's presets/*.csv) that change the patches, by ClamParams name.
PRESET_COLUMNS = {"seg_level": int, "sthresh": int, "mthresh": int, "close": int, "use_otsu": bool, "a_t": float,
                  "a_h": float, "max_n_holes": int, "use_padding": bool, "contour_fn": str}


def read_clam_preset(path: Path) -> dict:
    """The patching settings of a CLAM preset CSV (its first row, as create_patches_fp.py --preset reads it).
    keep_ids / exclude_ids must be 'none' (per-slide contour picks have no place in a bundle)."""
    import csv

    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise HexfastError(f"{path}: cannot be read as a CLAM preset CSV ({e})") from None
    if not rows:
        raise HexfastError(f"{path}: a CLAM preset needs a header and one row of settings")
    row = {k.strip(): (v or "").strip() for k, v in rows[0].items() if k}
    for key in ("keep_ids", "exclude_ids"):
        if row.get(key, "none").lower() not in ("none", ""):
            raise HexfastError(f"{path}: {key} picks contours of one slide; a bundle's preset must say none")
    out = {}
    for key, kind in PRESET_COLUMNS.items():
        if key not in row or row[key] == "":
            continue
        value = row[key]
        try:
            if kind is bool:
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(value)
                out[key] = value.lower() in ("true", "1")
            else:
                out[key] = kind(float(value)) if kind is int else kind(value)
        except ValueError:
            raise HexfastError(f"{path}: {key} = {value!r} is not a {kind.__name__}") from None
    return out


def cmd_build_engines(args) -> int:
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    bundle = load_bundle(args.bundle)
    results = build_engines(bundle, precision=args.precision, max_batch=args.max_batch, tile_sizes=args.tile_sizes,
                            models=models, workspace_gb=args.workspace_gb,
                            log=console.line)
    for info in results:
        console.out(f"{info['model']} {info['precision']}: {os.fspath(Path(info['directory']) / info['plan'])} "
              f"({info['seconds']:.0f} s)")
    return 0
