"""`hexfast export` and `hexfast build-engines`: model bundles from weights, TensorRT plans from bundles.

`export` needs torch and hexfast_export (`pip install torch` for the machine, then
`pip install 'hexfast[export]'`); they are imported only when it runs. The rest
of hexfast never imports torch. `build-engines` needs TensorRT 10 and a GPU.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..bundle import load_bundle
from ..engines.build import build_engines
from ..errors import HexfastError
from . import console
from .types import key_ints, positive_int, sorted_sizes

EXPORT_EPILOG = """\
examples:
  hexfast export --musk musk/model.safetensors --hex-heads hex_heads.pth -o models/hex --fp16
  hexfast export --hex hex_full.pth --dinov2 dinov2_vits14_reg4_pretrain.pth --mica s_0_checkpoint.pt -o models/hex-mica
  hexfast export --demo --size tiny -o models/demo --fp16     (random weights; manifest says demo: true)
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
    weights.add_argument("--mica-pooling", choices=("attn", "gap"), default="attn",
                         help="MICA pooling the checkpoint was trained with (default attn, the trainer's default)")
    export.add_argument("--demo", action="store_true", help="random-weight models instead of weights (demo: true)")
    export.add_argument("--size", choices=("tiny", "full"), default="tiny",
                        help="demo model size: tiny (a few MB, fast on CPU) or full (real architectures)")
    export.add_argument("--seed", type=int, default=0, help="demo weight seed (default 0)")
    export.add_argument("--fp16", action="store_true",
                        help="also write fp16 ONNX files (float32 inputs/outputs) and an fp16 HEX torch program")
    export.add_argument("--bf16", action="store_true", help="also write a bf16 HEX torch program (for the GPU)")
    export.add_argument("--parity-tiles", type=Path, metavar="DIR",
                        help="extra H&E tile images for the HEX parity check (beside the built-in CMU-1 tiles)")
    export.add_argument("--codex-uint8", choices=("scale", "truncate"), default="scale",
                        help="CODEX grid to 8 bits: scale = clip [0,1], x255, round (DESIGN.md); truncate = the "
                             "published script's astype('uint8') (for MICA checkpoints trained on such features)")
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


def cmd_export(args) -> int:
    given = {k: getattr(args, k) for k in ("musk", "hex_heads", "hex", "dinov2", "mica")}
    if args.demo:
        named = [f"--{k.replace('_', '-')}" for k, v in given.items() if v is not None]
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
    if args.parity_tiles is not None and not args.parity_tiles.is_dir():
        raise HexfastError(f"{args.parity_tiles}: not a directory of tile images")
    _check_out(args.out)
    _need_torch()

    from hexfast_export.bundle_writer import read_tiles, tile_files, write_bundle

    def log(message: str) -> None:
        console.out(message)

    tiles = read_tiles(tile_files(args.parity_tiles)) if args.parity_tiles is not None else None
    sources: dict[str, Path] = {}
    extra: dict = {}
    if args.demo:
        from hexfast_export.demo import demo_models, describe

        console.line(f"hexfast export: demo bundle, {args.size} random-weight models (seed {args.seed})")
        hex_model, encoder, mica = demo_models(args.size, args.seed)
        extra["demo_models"] = {"size": args.size, "seed": args.seed, **describe(args.size)}
    else:
        from hexfast_export import MUSK_LARGE_384, MuskConfig, build_hex, load_dinov2, load_mica

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
            mica, report = load_mica(args.mica, pooling=args.mica_pooling)
            reports.append(report)
            sources["mica"] = args.mica
        for report in reports:
            console.line(f"hexfast export: {report.summary()}")
    m = hex_model.cfg
    extra["hex_encoder"] = {"img_size": m.img_size, "patch_size": m.patch_size, "dim": m.dim, "depth": m.depth,
                            "heads": m.heads, "ffn_dim": m.ffn_dim, "embed_dim": hex_model.embed_dim}
    manifest = write_bundle(args.out, hex_model=hex_model, codex_encoder=encoder, mica=mica, sources=sources,
                            demo=args.demo, fp16=args.fp16, bf16=args.bf16, parity_tiles=tiles,
                            codex_quantisation=args.codex_uint8,
                            extra=extra, log=log)
    size = sum((args.out / f).stat().st_size for f in manifest["files"])
    console.out(f"wrote {args.out} ({', '.join(manifest['models'])}; {len(manifest['files'])} files, "
          f"{size / 1e6:.1f} MB{'; DEMO: untrained random weights' if args.demo else ''})")
    return 0


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
