"""Write a large pyramidal Aperio-style SVS for benchmarks.

Tiled JPEG (240-px tiles, like Aperio; `--encoding aperio` for Aperio's RGB 4:4:4
JPEGs, default YCbCr 4:2:0), an Aperio ImageDescription with MPP and AppMag, levels at downsample 1, 4, 16, 64. Tissue islands on white glass so
tissue detection matters; the tissue texture is cut from a real H&E slide.

    python benchmarks/make_slide.py --texture ../shared/data/slides/CMU-1-Small-Region.svs \
        --width 100000 --height 80000 -o /tmp/big.svs

Level 0 is written from a bank of pre-encoded JPEG tiles, so a 100k x 80k
slide takes about a minute; upper levels are exact box-downsamples of level 0
(before JPEG), so every level shows the same slide.

Every level's tiles are JPEG-encoded here with Pillow and written as they are, so only tifffile and
Pillow are needed (no imagecodecs: the script runs on the GPU machine's image as it comes)."""

from __future__ import annotations

import argparse
import io
import math
import time
from pathlib import Path

import numpy as np
import openslide
import tifffile
from PIL import Image

TILE = 240
BACKGROUND = 242


# How level-0 tiles are JPEG-encoded. "jfif": Pillow's default (YCbCr, 4:2:0 chroma subsampling, a JFIF
# marker). "aperio": what Aperio scanners write (CMU-1 checked): the RGB components themselves, no
# subsampling (4:4:4), no colour transform; about twice the coefficients to decode per tile.
ENCODINGS = {"jfif": {}, "aperio": {"subsampling": 0, "keep_rgb": True}}


def jpeg(tile: np.ndarray, quality: int, encoding: str = "jfif") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(tile).save(buf, format="JPEG", quality=quality, **ENCODINGS[encoding])
    return buf.getvalue()


def texture_bank(source: Path, max_tiles: int = 256) -> list[np.ndarray]:
    """240-px tissue patches from a real slide, with their 8 flips/rotations."""
    slide = openslide.OpenSlide(str(source))
    w, h = slide.dimensions
    rgb = np.asarray(slide.read_region((0, 0), 0, (w, h)).convert("RGB"))
    slide.close()
    hsv = np.asarray(Image.fromarray(rgb).convert("HSV"))
    tissue = hsv[..., 1] > 25
    patches = []
    for y in range(0, h - TILE, TILE // 2):
        for x in range(0, w - TILE, TILE // 2):
            if tissue[y : y + TILE, x : x + TILE].mean() > 0.8:
                patches.append(rgb[y : y + TILE, x : x + TILE])
    if not patches:
        raise SystemExit(f"{source}: no tissue patches found for the texture")
    bank = [np.ascontiguousarray(np.rot90(p, k)[:, :: (1 if f else -1)]) for p in patches for k in range(4) for f in (0, 1)]
    rng = np.random.default_rng(0)
    rng.shuffle(bank)
    return bank[:max_tiles]


def island_map(tiles_x: int, tiles_y: int, tissue: float, seed: int) -> np.ndarray:
    """Which level-0 tiles are tissue: smooth random islands covering ~`tissue` of the glass."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((max(2, tiles_y // 40), max(2, tiles_x // 40))).astype(np.float32)
    field = np.asarray(Image.fromarray(coarse).resize((tiles_x, tiles_y), Image.Resampling.BICUBIC))
    yy, xx = np.mgrid[0:tiles_y, 0:tiles_x]
    # Fade towards the border: real sections sit on glass with a white margin.
    edge = np.minimum.reduce([xx, yy, tiles_x - 1 - xx, tiles_y - 1 - yy]) / max(1, min(tiles_x, tiles_y) / 8)
    field = field * np.clip(edge, 0, 1)
    return field > np.quantile(field, 1 - tissue)


def tile_index(tx: np.ndarray | int, ty: np.ndarray | int, n: int):
    return (np.asarray(tx) * 7919 + np.asarray(ty) * 104729) % n


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--texture", type=Path, required=True, help="a real H&E slide to take tissue texture from")
    ap.add_argument("-o", "--out", type=Path, required=True, help="the slide to write (.tif or .svs)")
    ap.add_argument("--width", type=int, default=100_000, help="level-0 width in px (default 100000)")
    ap.add_argument("--height", type=int, default=80_000, help="level-0 height in px (default 80000)")
    ap.add_argument("--mpp", type=float, default=0.25, help="µm per level-0 px (default 0.25: 40x; 0.5: 20x)")
    ap.add_argument("--tissue", type=float, default=0.3, help="fraction of the glass covered by tissue (default 0.3)")
    ap.add_argument("--quality", type=int, default=80, help="JPEG quality (default 80)")
    ap.add_argument("--encoding", choices=sorted(ENCODINGS), default="jfif",
                    help="level-0 JPEG tiles: jfif = YCbCr 4:2:0 (Pillow's default), aperio = RGB 4:4:4 as Aperio "
                         "scanners write (heavier to decode); default jfif")
    ap.add_argument("--seed", type=int, default=0, help="random seed of the tissue layout (default 0)")
    args = ap.parse_args(argv)

    start = time.perf_counter()
    bank = texture_bank(args.texture)
    tx_n, ty_n = math.ceil(args.width / TILE), math.ceil(args.height / TILE)
    islands = island_map(tx_n, ty_n, args.tissue, args.seed)
    rng = np.random.default_rng(args.seed)
    glass = (BACKGROUND + rng.integers(-2, 3, (TILE, TILE, 3))).astype(np.uint8)
    bank_jpeg = [jpeg(t, args.quality, args.encoding) for t in bank]
    glass_jpeg = jpeg(glass, args.quality, args.encoding)

    def level0_tiles():
        for ty in range(ty_n):
            for tx in range(tx_n):
                yield bank_jpeg[tile_index(tx, ty, len(bank))] if islands[ty, tx] else glass_jpeg

    # Level 2 (downsample 16) in memory: every level-0 tile becomes a 15-px block.
    small = {d: [np.asarray(Image.fromarray(t).reduce(d)) for t in bank + [glass]] for d in (4, 16)}

    def reduced_level(d: int) -> np.ndarray:
        s = TILE // d
        idx = np.where(islands, tile_index(*np.meshgrid(np.arange(tx_n), np.arange(ty_n)), len(bank)), len(bank))
        blocks = np.stack(small[d])[idx]  # (ty, tx, s, s, 3)
        img = blocks.transpose(0, 2, 1, 3, 4).reshape(ty_n * s, tx_n * s, 3)
        return img[: math.ceil(args.height / d), : math.ceil(args.width / d)]

    def level1_tiles():  # downsample 4, assembled tile by tile from 60-px blocks
        s = TILE // 4
        for ly in range(math.ceil(ty_n / 4)):
            for lx in range(math.ceil(tx_n / 4)):
                out = np.full((TILE, TILE, 3), BACKGROUND, np.uint8)
                for j in range(4):
                    for i in range(4):
                        tx, ty = lx * 4 + i, ly * 4 + j
                        if tx < tx_n and ty < ty_n:
                            k = tile_index(tx, ty, len(bank)) if islands[ty, tx] else len(bank)
                            out[j * s : (j + 1) * s, i * s : (i + 1) * s] = small[4][k]
                yield jpeg(out, args.quality)

    def encoded(img: np.ndarray):
        """An in-memory level as JPEG tiles, the edge ones padded with glass."""
        for y in range(0, img.shape[0], TILE):
            for x in range(0, img.shape[1], TILE):
                tile = np.full((TILE, TILE, 3), BACKGROUND, np.uint8)
                part = img[y : y + TILE, x : x + TILE]
                tile[: part.shape[0], : part.shape[1]] = part
                yield jpeg(tile, args.quality)

    level2 = reduced_level(16)
    level3 = np.asarray(Image.fromarray(level2).reduce(4))
    w, h = args.width, args.height
    desc = (
        f"Aperio Image Library v12.0.0 \r\n{w}x{h} [0,0 {w}x{h}] ({TILE}x{TILE}) "
        f"JPEG/{'RGB' if args.encoding == 'aperio' else 'YCC'} Q={args.quality}"
        f"|AppMag = {round(10 / args.mpp)}|MPP = {args.mpp:.4f}|Filename = {args.out.stem}|hexfast synthetic slide"
    )
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    # The tiles are JPEG already: written as they are, then tagged JPEG (tifffile would want imagecodecs
    # to tag them so), YCbCr as Pillow encodes them, level 0 RGB for the Aperio encoding, as Aperio's.
    common = dict(tile=(TILE, TILE), compression=None, photometric="rgb", metadata=None, dtype=np.uint8)
    with tifffile.TiffWriter(tmp, bigtiff=w * h > 2**31) as tw:
        tw.write(level0_tiles(), shape=(h, w, 3), description=desc, **common)
        tw.write(level1_tiles(), shape=(math.ceil(h / 4), math.ceil(w / 4), 3), description=desc, **common)
        tw.write(encoded(level2), shape=level2.shape, description=desc, **common)
        tw.write(encoded(level3), shape=level3.shape, description=desc, **common)
    with tifffile.TiffFile(tmp, mode="r+") as tif:
        for i, page in enumerate(tif.pages):
            page.tags["Compression"].overwrite(7)  # JPEG
            page.tags["PhotometricInterpretation"].overwrite(2 if i == 0 and args.encoding == "aperio" else 6)
    tmp.replace(args.out)
    size = args.out.stat().st_size
    print(
        f"{args.out}: {w} x {h} px at {args.mpp} µm/px, {islands.mean():.0%} tissue, "
        f"{size / 2**20:.0f} MiB, {time.perf_counter() - start:.0f} s"
    )


if __name__ == "__main__":
    main()
