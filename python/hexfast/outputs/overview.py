"""overview.png: the slide and its virtual CODEX markers, for a person to read.

A 2x2-cell H&E panel (tissue outlined) and one panel per marker, all showing
the same crop (the tiled tissue plus a margin) at the same scale, so a spot
can be compared across markers. Each marker is drawn over a grey copy of the
slide, coloured (viridis) only where a tile was scored, and scaled between its
own 1st and 99th percentile over the slide's tiles; the colour bar gives the
values at both ends, in HEX's own units. Demo bundles get a red banner and frame.

Text is drawn in DejaVu Sans, Arial or Helvetica when the system has one (for µ and ²), else in
Pillow's own font, which has neither: units are then written um and mm2.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..files import writing_file
from ..markers import MARKERS
from ..slide import Slide, TileGrid
from .colormap import VIRIDIS, colorize
from .tiles import tissue_outline

# A dozen markers a pathologist looks at first: epithelium, T/B cells,
# macrophages, proliferation, stroma, vessels, checkpoint, Tregs, leukocytes.
DEFAULT_MARKERS = (
    "Pan-Cytokeratin", "CD3e", "CD8", "CD20", "CD68", "CD163",
    "Ki67", "aSMA", "CD31", "PD-L1", "FOXP3", "CD45",
)
# ASCII only: PIL's built-in font has no em dash.
DEMO_BANNER = "DEMO MODEL - UNTRAINED WEIGHTS - NOT A PREDICTION"
SCALE_NOTE = ("Colour: each marker from its own 1st to 99th percentile over the tiles; values are HEX's output, a.u. "
              "(not calibrated amounts)")
FONT_FILES = ("DejaVuSans.ttf", "Arial.ttf", "arial.ttf", "Helvetica.ttc", "LiberationSans-Regular.ttf")
MICA_NOTE = "MICA risk {risk:.2f} on [-4, 0], larger = higher risk (-sum of survival over 4 time bins)"
BANNER_RED = (200, 0, 0)
OUTLINE_GREEN = (40, 230, 80)
OVERLAY_ALPHA = 0.85  # the rest is the grey slide, so tissue texture shows through
PERCENTILES = (1.0, 99.0)


def marker_range(values: np.ndarray) -> tuple[float, float]:
    """The 1st and 99th percentile of one marker over the tiles (a tiny range is widened)."""
    if values.size == 0:
        return 0.0, 1.0
    lo, hi = (float(v) for v in np.percentile(values, PERCENTILES))
    if not hi - lo > 1e-12:
        hi = lo + max(1e-6, abs(lo) * 1e-6)
    return lo, hi


def render_overview(
    slide: Slide,
    grid: TileGrid,
    codex_prediction: np.ndarray,
    codex: np.ndarray,
    *,
    demo: bool,
    coords: np.ndarray | None = None,
    marker_names: Sequence[str] = MARKERS,
    show: Sequence[str] | str = DEFAULT_MARKERS,
    notes: Sequence[str] = (),
    mica: dict | None = None,
    panel_px: int = 320,
) -> Image.Image:
    """The overview as an RGB image. codex_prediction (N, 40) for `coords` (default: the grid's;
    pass the scored tiles when some were skipped); codex: the same tiles laid out one cell per
    stride, [gh, gw, 40] (score.codex_grid.virtual_codex with step = grid.stride). show: marker
    names, or "all"; notes: extra title items; mica: MICA's summary (its risk is shown, explained)."""
    names = list(marker_names) if show == "all" else list(show)
    unknown = [m for m in names if m not in marker_names]
    if unknown:
        raise ValueError(f"unknown marker(s) {unknown}; known: {list(marker_names)}")
    coords = np.asarray(grid.coords if coords is None else coords, np.int64).reshape(-1, 2)
    values = np.asarray(codex_prediction, np.float32).reshape(len(coords), len(marker_names))

    crop = _crop_box(slide, coords, grid.tile_size)
    layout = _Layout(crop, len(names), panel_px)
    base, base_ds = _background(slide, grid, (crop[2] - crop[0]) / max(layout.he_size[0], 1))
    if mica and mica.get("risk") is not None:
        notes = [*notes, MICA_NOTE.format(risk=mica["risk"])]
    legend = [SCALE_NOTE, f"Outline: detected tissue; tiles at least {grid.min_tissue:.0%} tissue are scored"]
    below = _wrap_words(legend, layout.fonts.small, layout.he_size[0])
    if len(below) * (layout.fonts.small.size + 2) + 6 > layout.under_he:
        below = []  # no room under the H&E: the legend goes in the header
    out, top = _page(slide, grid, len(coords), notes, layout, demo, legend=[] if below else legend)
    draw = ImageDraw.Draw(out)
    m = layout.margin
    draw.text((m, top), "H&E, tissue outlined", fill=(0, 0, 0), font=layout.fonts.label)
    he = _he_panel(grid, base, base_ds, crop, layout)
    out.paste(he, (m, top + layout.label_h))
    if below:
        y = top + layout.label_h + he.height + 6
        for text in below:
            draw.text((m, y), text, fill=(60, 60, 60), font=layout.fonts.small)
            y += layout.fonts.small.size + 2
    # The scale bar sits in the label row, right-aligned over the H&E: it never covers tissue.
    _scale_bar(draw, m + he.width, top + layout.label_h - 4, he.width, he.width / (crop[2] - crop[0]) / slide.mpp,
               layout.fonts)

    grey = np.asarray(_crop_resize(base, base_ds, crop, layout.panel).convert("L"), np.float32)
    grey = 140.0 + grey * (115.0 / 255.0)  # light grey: the heatmap colours carry the contrast
    cells = _Cells(codex, coords, grid)
    pw, ph = layout.panel
    for name, (r, c) in zip(names, layout.cells):
        i = list(marker_names).index(name)
        lo, hi = marker_range(values[:, i])
        x0, y0 = m + c * layout.cell_w, top + r * layout.cell_h
        draw.text((x0, y0), name, fill=(0, 0, 0), font=layout.fonts.label)
        out.paste(cells.heatmap(i, lo, hi, crop, layout.panel, grey), (x0, y0 + layout.label_h))
        _colour_bar(draw, x0, y0 + layout.label_h + ph + 6, pw, lo, hi, layout.fonts.small, out)

    if demo:  # a frame too, so a crop of the picture still says it
        draw.rectangle((0, 0, out.width - 1, out.height - 1), outline=BANNER_RED, width=max(4, panel_px // 60))
    return out


def write_overview_png(path: Path, slide: Slide, grid: TileGrid, codex_prediction: np.ndarray, codex: np.ndarray,
                       **kwargs) -> None:
    """render_overview, written atomically as PNG."""
    img = render_overview(slide, grid, codex_prediction, codex, **kwargs)
    with writing_file(path) as tmp:
        img.save(tmp, format="PNG", optimize=False)


class _Layout:
    """Where everything goes: one cell per marker (label, pw x ph panel, colour bar) in rows of
    `cols`, the H&E over the top-left 2x2 cells, the crop's aspect kept everywhere."""

    margin, gap = 12, 8

    def __init__(self, crop, markers: int, panel_px: int):
        aspect = (crop[2] - crop[0]) / (crop[3] - crop[1])
        if aspect >= 1:
            self.panel = (panel_px, max(1, round(panel_px / aspect)))
        else:
            self.panel = (max(1, round(panel_px * aspect)), panel_px)
        self.fonts = _Fonts(panel_px)
        self.label_h = self.fonts.label.size + 8
        bar_h = 12 + self.fonts.small.size + 8
        self.cell_w, self.cell_h = self.panel[0] + 16, self.label_h + self.panel[1] + bar_h + 8
        self.cols = 6 if markers > 12 else 3 if markers <= 1 else 4
        # The H&E fills up to 2 x 2 cells, keeping the crop's aspect; the markers take the cells it leaves
        # free (a wide crop: one row of two; a tall one: two rows of one), so no blank gap is left beside it.
        box_w, box_h = 2 * self.cell_w - 16, 2 * self.cell_h - self.label_h - 8
        he_w = min(box_w, round(box_h * aspect))
        self.he_size = (he_w, min(box_h, round(he_w / aspect)))
        he_rows = 1 if self.he_size[1] + self.label_h + 8 <= self.cell_h else 2
        he_cols = 1 if self.he_size[0] + 16 <= self.cell_w else 2
        self.cells = _cell_positions(markers, self.cols, he_rows, he_cols)
        self.rows = max([r for r, _ in self.cells] + [he_rows - 1]) + 1
        # Room left under the H&E in its block: the legend goes there rather than in the header.
        self.under_he = he_rows * self.cell_h - self.label_h - self.he_size[1] - 8
        self.width = max(self.cols * self.cell_w, 2 * self.cell_w) + 2 * self.margin


def _page(slide: Slide, grid: TileGrid, n: int, notes, layout: _Layout, demo: bool,
          legend: Sequence[str] = ()) -> tuple[Image.Image, int]:
    """The white page with the demo banner (if any) and the header drawn: (image, top of the panels)."""
    fonts = layout.fonts
    header = _header_lines(slide, grid, n, notes, fonts, layout.width - 2 * layout.margin)
    header += [(t, fonts.small) for t in _wrap_words(legend, fonts.small, layout.width - 2 * layout.margin)]
    banner_h = fonts.banner.size * 2 + 10 if demo else 0
    top = banner_h + sum(f.size + 6 for _, f in header) + layout.gap
    out = Image.new("RGB", (layout.width, top + layout.rows * layout.cell_h + layout.margin), (255, 255, 255))
    draw = ImageDraw.Draw(out)
    y = 0
    if demo:
        draw.rectangle((0, 0, layout.width, banner_h), fill=BANNER_RED)
        banner = fonts.banner
        while draw.textlength(DEMO_BANNER, font=banner) > layout.width - 2 * layout.margin and banner.size > 10:
            banner = _font(banner.size - 2)  # a narrow page: the banner still fits
        _centred(draw, DEMO_BANNER, layout.width // 2, banner_h // 2, banner, (255, 255, 255))
        y = banner_h
    y += 4
    for text, font in header:
        draw.text((layout.margin, y), text, fill=(0, 0, 0), font=font)
        y += font.size + 6
    return out, top


def _he_panel(grid: TileGrid, base: Image.Image, base_ds: float, crop, layout: _Layout) -> Image.Image:
    """The crop of the slide with the tissue outlined: a dark line with a bright green core, which shows on
    pink tissue and white glass alike."""
    size = layout.he_size
    mask = np.asarray(_crop_resize(Image.fromarray(grid.tissue.mask * 255), grid.tissue.downsample, crop, size,
                                   Image.Resampling.NEAREST)) > 127
    rgb = np.array(_crop_resize(base, base_ds, crop, size))
    width = max(2, size[0] // 160)
    rgb[tissue_outline(mask, thickness=width + 2)] = (0, 60, 20)
    rgb[tissue_outline(mask, thickness=width)] = OUTLINE_GREEN
    return Image.fromarray(rgb)


class _Cells:
    """The virtual CODEX grid ready to be drawn: padded, with the cells that hold a tile (a value
    of 0 is not 'empty'), and the level-0 offset of its first cell.

    Each tile's value is shown over the tile's central stride x stride square (the whole tile
    when tiles do not overlap), so the grid is shifted by half the overlap. Empty cells all round
    -- one, plus enough to cover that shift (several cells when tiles overlap by more than two
    strides) -- so the resampling box never starts before the grid or reads past it."""

    def __init__(self, codex: np.ndarray, coords: np.ndarray, grid: TileGrid):
        self.step = step = grid.stride
        gh, gw = codex.shape[:2]
        cells = coords // step
        inside = (cells[:, 0] < gw) & (cells[:, 1] < gh)
        occupied = np.zeros((gh, gw), np.float32)
        occupied[cells[inside, 1], cells[inside, 0]] = 1.0
        shift = (grid.tile_size - grid.stride) / 2
        pad = 1 + max(0, math.ceil(shift / step))
        self.codex = np.pad(codex, ((pad, pad), (pad, pad), (0, 0)))
        self.occupied = np.pad(occupied, pad)
        self.offset = shift - pad * step

    def heatmap(self, channel: int, lo: float, hi: float, crop, size, grey: np.ndarray) -> Image.Image:
        """One marker over the grey slide: premultiplied colour and coverage, resampled
        together so sub-pixel tiles blend instead of aliasing."""
        pw, _ = size
        colour = colorize((self.codex[..., channel] - lo) / (hi - lo)).astype(np.float32) * self.occupied[..., None]
        box = x0, _, x1, _ = tuple((v - self.offset) / self.step for v in crop)
        cell_px = pw / max(x1 - x0, 1e-9)  # display px per grid cell
        resample = Image.Resampling.NEAREST if cell_px >= 2 else Image.Resampling.BOX
        rgb = np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(colour[..., k])).resize(size, resample, box=box))
                        for k in range(3)], axis=-1)
        a = np.asarray(Image.fromarray(self.occupied).resize(size, resample, box=box))[..., None] * OVERLAY_ALPHA
        out = grey[..., None] * (1.0 - a) + rgb * OVERLAY_ALPHA
        return Image.fromarray(np.clip(out, 0, 255).round().astype(np.uint8))


class _Fonts:
    def __init__(self, panel_px: int):
        s = max(11, panel_px // 22)
        self.small, self.label, self.title, self.banner = (_font(round(s * k)) for k in (1, 1.25, 1.45, 2.2))
        self.um, self.mm2 = ("µm", "mm²") if _has_glyphs(self.small, "µ²") else ("um", "mm2")


def _font(size: int):
    for name in FONT_FILES:  # Pillow looks in the system's font folders
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    return ImageFont.load_default(size=size)


def _has_glyphs(font, chars: str) -> bool:
    """Whether `font` draws each of `chars` as itself, not as its missing-glyph box."""
    missing = np.asarray(font.getmask("\uffff"))
    return all(not np.array_equal(np.asarray(font.getmask(c)), missing) for c in chars)


def _header_lines(slide: Slide, grid: TileGrid, n: int, notes, fonts: _Fonts, width: int) -> list:
    um = grid.tile_size * slide.mpp
    w, h = slide.dimensions
    facts = [
        f"{n} tiles of {grid.tile_size} px ({um:.0f} {fonts.um}), stride {grid.stride} px",
        f"{slide.mpp:.3f} {fonts.um}/px ({slide.tile.magnification:g}x)",
        f"{w} x {h} px, tissue {grid.tissue.area_mm2:.2f} {fonts.mm2}",
        *notes,
    ]
    lines = [(f"{slide.path.name}: HEX virtual CODEX", fonts.title)]
    lines += [(t, fonts.small) for t in _wrap(facts, fonts.small, width)]
    return lines


def _wrap_words(paragraphs: Sequence[str], font, width: int) -> list[str]:
    """Each paragraph broken into lines no wider than `width`."""
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines = []
    for text in paragraphs:
        line = ""
        for word in text.split():
            trial = f"{line} {word}".strip()
            if line and measure.textlength(trial, font=font) > width:
                lines.append(line)
                line = word
            else:
                line = trial
        lines.append(line)
    return lines


def _wrap(parts: Sequence[str], font, width: int) -> list[str]:
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines = [parts[0]]
    for part in parts[1:]:
        joined = f"{lines[-1]}  |  {part}"
        if measure.textlength(joined, font=font) <= width:
            lines[-1] = joined
        else:
            lines.append(part)
    return lines


def _cell_positions(n: int, cols: int, he_rows: int = 2, he_cols: int = 2) -> list[tuple[int, int]]:
    """Row-major cells for n markers, skipping the H&E block (he_rows x he_cols) at the top left."""
    out, k = [], 0
    while len(out) < n:
        r, c = divmod(k, cols)
        if not (r < he_rows and c < he_cols):
            out.append((r, c))
        k += 1
    return out


def _crop_box(slide: Slide, c: np.ndarray, t: int) -> tuple[float, float, float, float]:
    """Level-0 box around the tiles plus a tile's margin, clipped to the slide (whole slide when no tiles)."""
    w, h = slide.dimensions
    if len(c) == 0:
        return 0.0, 0.0, float(w), float(h)
    x0, y0 = c.min(axis=0) - t
    x1, y1 = c.max(axis=0) + 2 * t
    return float(max(0, x0)), float(max(0, y0)), float(min(w, x1)), float(min(h, y1))


def _background(slide: Slide, grid: TileGrid, ds_needed: float) -> tuple[Image.Image, float]:
    """The slide at <= ds_needed level-0 px per pixel: the segmentation thumbnail when
    that is fine enough (no extra reads), else a reduced read of the slide."""
    if grid.tissue.downsample <= ds_needed * 1.5:
        return Image.fromarray(grid.tissue.thumbnail), grid.tissue.downsample
    ds = max(1.0, ds_needed)
    return Image.fromarray(slide.read_reduced(ds)), ds


def _crop_resize(img: Image.Image, ds: float, crop, size, resample=Image.Resampling.BILINEAR) -> Image.Image:
    """The level-0 box `crop` of an image whose pixel i covers level-0 [i*ds, (i+1)*ds)."""
    box = tuple(v / ds for v in crop)
    return img.resize(size, resample, box=box)


def _colour_bar(draw: ImageDraw.ImageDraw, x: int, y: int, w: int, lo: float, hi: float, font, out: Image.Image) -> None:
    bar = np.repeat(VIRIDIS[np.linspace(0, 255, w).round().astype(int)][None], 10, axis=0)
    out.paste(Image.fromarray(bar), (x, y))
    draw.rectangle((x - 1, y - 1, x + w, y + 10), outline=(90, 90, 90))
    ty = y + 12
    draw.text((x, ty), _fmt(lo), fill=(0, 0, 0), font=font)
    hi_text = _fmt(hi)
    draw.text((x + w - draw.textlength(hi_text, font=font), ty), hi_text, fill=(0, 0, 0), font=font)
    room = w - draw.textlength(_fmt(lo), font=font) - draw.textlength(hi_text, font=font) - 16
    mid = "a.u."  # HEX's units; the legend says what the ends are
    if draw.textlength(mid, font=font) <= room:
        draw.text((x + (w - draw.textlength(mid, font=font)) / 2, ty), mid, fill=(110, 110, 110), font=font)


def _scale_bar(draw: ImageDraw.ImageDraw, right: int, bottom: int, width: int, px_per_um: float,
               fonts: _Fonts) -> None:
    """A 1-2-5 length of about a quarter of the H&E's `width`, its label left of it, ending at (right, bottom)."""
    target_um = (width / 4) / px_per_um
    um = min((m * 10**e for e in range(0, 6) for m in (1, 2, 5)), key=lambda v: abs(math.log(v / target_um)))
    length = max(1, round(um * px_per_um))
    label = f"{um / 1000:g} mm" if um >= 1000 else f"{um:g} {fonts.um}"
    x1 = right
    draw.rectangle((x1 - length, bottom - 5, x1, bottom), fill=(0, 0, 0))
    tw = draw.textlength(label, font=fonts.small)
    draw.text((x1 - length - tw - 6, bottom - fonts.small.size), label, fill=(0, 0, 0), font=fonts.small)


def _fmt(v: float) -> str:
    return f"{v:.3g}" if v == 0 or 1e-3 <= abs(v) < 1e4 else f"{v:.2e}"


def _centred(draw, text, cx, cy, font, fill) -> None:
    draw.text((cx, cy), text, fill=fill, font=font, anchor="mm")

