"""TileStream: pixels identical to the reference read path, order, resize,
edges, errors and the lifecycle of its threads."""

from __future__ import annotations

import gc
import io
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from PIL import Image

import hexfast
from hexfast.stream import TileStream


def reference_tile(slide, xy, size, out=None):
    """What the HEX reference does: openslide-python read_region → RGB (→ PIL bilinear)."""
    img = slide._osr.read_region(tuple(int(v) for v in xy), 0, (size, size)).convert("RGB")
    return np.asarray(img if out is None else img.resize((out, out), Image.Resampling.BILINEAR))


READERS = ["direct", "openslide"]


@pytest.fixture(params=READERS)
def reader(request):
    """Both read paths must give the reference's pixels. The direct JPEG path
    needs hexfast built with libjpeg: CI requires it, elsewhere it may skip."""
    if request.param == "direct" and not hexfast._core.HAVE_JPEG:
        if os.environ.get("CI") == "true":
            pytest.fail("hexfast._core was built without libjpeg (libjpeg-turbo headers missing)")
        pytest.skip("hexfast._core was built without libjpeg: no direct JPEG reader")
    return request.param


@pytest.fixture
def cmu(cmu_small):
    with hexfast.open_slide(cmu_small) as slide:
        yield slide, hexfast.tile_slide(slide)


@pytest.mark.parametrize("batch_size, threads", [(16, 2), (7, 1), (64, 3)])
def test_tiles_equal_reference_in_grid_order(cmu, reader, batch_size, threads):
    slide, grid = cmu
    seen = []
    stream = TileStream(slide, grid.coords, batch_size=batch_size, threads=threads, reader=reader)
    assert stream.reader == reader
    for coords, tiles in stream:
        assert tiles.shape[1:] == (112, 112, 3) and tiles.dtype == np.uint8
        assert len(coords) <= batch_size
        for xy, tile in zip(coords, tiles):
            np.testing.assert_array_equal(tile, reference_tile(slide, xy, 112))
        seen.append(np.array(coords))
    np.testing.assert_array_equal(np.concatenate(seen), grid.coords)


@pytest.mark.parametrize("read_size", [112, 224, 448])
def test_resize_matches_pil_bilinear(cmu, read_size):
    slide, grid = cmu
    coords = grid.coords[:: max(1, len(grid) // 12)][:12]
    worst = 0
    for xy_batch, tiles in TileStream(slide, coords, read_size=read_size, out_size=384, batch_size=5):
        for xy, tile in zip(xy_batch, tiles):
            diff = np.abs(tile.astype(int) - reference_tile(slide, xy, read_size, out=384))
            worst = max(worst, diff.max())
    assert worst <= 1, f"max difference from PIL bilinear: {worst}"


def test_edge_tiles_are_black_beyond_the_slide_like_the_reference(cmu, reader):
    slide, _ = cmu
    w, h = slide.dimensions
    coords = np.array([[w - 50, h - 30], [-20, 10]])
    (_, tiles), = list(TileStream(slide, coords, read_size=112, reader=reader))
    for xy, tile in zip(coords, tiles):
        np.testing.assert_array_equal(tile, reference_tile(slide, xy, 112))
    assert (tiles[0, 40:, 60:] == 0).all()  # beyond both edges
    assert tiles[0, :20, :40].mean() > 100  # inside: the slide's pixels


def test_batches_are_zero_copy_views_recycled_when_dropped(cmu):
    slide, grid = cmu
    stream = TileStream(slide, grid.coords, batch_size=8, prefetch=2)
    it = iter(stream)
    kept = []
    for _ in range(2):
        coords, tiles = next(it)
        assert not tiles.flags.owndata and not coords.flags.owndata
        kept.append(tiles)  # the consumer holds both ring buffers...
    with pytest.raises(hexfast.SlideError, match="held by the consumer"):
        next(it)  # ...so the stream says so instead of deadlocking
    stream = TileStream(slide, grid.coords, batch_size=8, prefetch=2)
    copies = [np.array(tiles) for _, tiles in stream]  # copying, all batches flow
    assert sum(len(t) for t in copies) == len(grid)
    del kept
    gc.collect()


def test_empty_grid(cmu):
    slide, _ = cmu
    assert list(TileStream(slide, np.zeros((0, 2), np.int64))) == []


def test_read_error_names_tile_and_coordinates(fixture_slide, reader):
    path = fixture_slide("unreadable.svs")
    with pytest.raises(hexfast.SlideError, match=r"unreadable\.svs: tile 0 at level-0 \(4, 2\): .*Bogus marker"):
        list(TileStream(path, np.array([[4, 2]]), read_size=8, threads=1, batch_size=1, reader=reader))


def test_each_stored_tile_is_decoded_about_once(cmu_small):
    """224-px tiles straddle the 240-px stored tiles: the shared cache decodes each stored tile once."""
    if not hexfast._core.HAVE_JPEG:
        pytest.skip("hexfast._core was built without libjpeg: no direct JPEG reader")
    with hexfast.open_slide(cmu_small) as slide:
        w, h = slide.dimensions
        coords = np.array([[x, y] for y in range(0, h - 224, 224) for x in range(0, w - 224, 224)])
        touched = {(y // 240 + dy, x // 240 + dx) for x, y in coords for dy in (0, 1) for dx in (0, 1)
                   if (y + 223) // 240 >= y // 240 + dy and (x + 223) // 240 >= x // 240 + dx}
        stream = TileStream(slide, coords, read_size=224, threads=2, batch_size=8, reader="direct")
        assert sum(len(c) for c, _ in stream) == len(coords)
    assert len(touched) <= stream.decoded_tiles <= 1.05 * len(touched), (stream.decoded_tiles, len(touched))


def test_auto_reader_falls_back_to_openslide_when_tiles_are_not_jpeg(fixture_slide):
    slide = hexfast.open_slide(fixture_slide("boxes.tiff"), mpp=0.25)  # deflate-compressed tiles
    assert TileStream(slide, np.array([[0, 0]]), read_size=64, reader="auto").reader == "openslide"
    with pytest.raises(hexfast.SlideError, match=r"boxes\.tiff: .*not JPEG-compressed"):
        TileStream(slide, np.array([[0, 0]]), read_size=64, reader="direct")


def write_svs_with_corrupt_tile(path, corrupt_tile: int):
    """A 4x3-tile Aperio SVS (240-px JPEG tiles) whose tile `corrupt_tile` is garbage."""
    import tifffile

    rng = np.random.default_rng(0)
    tiles = []
    for i in range(12):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (240, 240, 3), np.uint8)).save(buf, format="JPEG")
        data = buf.getvalue()
        tiles.append(data[:200] + b"\xff\xda\x00\x02" + b"\x00" * 64 if i == corrupt_tile else data)
    desc = "Aperio Image Library v12.0.0 \r\n960x720 [0,0 960x720] (240x240) JPEG/RGB Q=75|AppMag = 40|MPP = 0.25"
    tifffile.imwrite(path, iter(tiles), shape=(720, 960, 3), dtype=np.uint8, tile=(240, 240),
                     compression="jpeg", photometric="rgb", description=desc, metadata=None)
    return path


def test_skip_errors_reports_corrupt_tiles_and_keeps_the_rest(tmp_path, reader):
    path = write_svs_with_corrupt_tile(tmp_path / "corrupt.svs", corrupt_tile=5)  # stored tile (1, 1)
    coords = np.array([[x, y] for y in range(0, 720, 240) for x in range(0, 960, 240)])
    with pytest.raises(hexfast.SlideError, match=r"tile 5 at level-0 \(240, 240\)"):
        list(TileStream(path, coords, read_size=240, threads=2, batch_size=4, reader=reader))
    stream = TileStream(path, coords, read_size=240, threads=2, batch_size=4, skip_errors=True, reader=reader)
    got = np.concatenate([np.array(c) for c, _ in stream])
    np.testing.assert_array_equal(got, np.delete(coords, 5, axis=0))
    assert [(i, x, y) for i, x, y, _ in stream.skipped] == [(5, 240, 240)]


def test_unopenable_slide_fails_at_construction(fixture_slide):
    with pytest.raises(hexfast.SlideError, match="unopenable.tiff"):
        TileStream(fixture_slide("unopenable.tiff"), np.array([[0, 0]]), read_size=8)


def run_python(code: str, timeout=60, **kwargs):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, **kwargs)


STREAM_SETUP = """
    import numpy as np, hexfast, time
    from hexfast.stream import TileStream
    slide = hexfast.open_slide({path!r})
    coords = np.array([[x, y] for y in range(0, 2800, 16) for x in range(0, 2000, 16)])  # ~22k tiles
    stream = TileStream(slide, coords, read_size=224, out_size=384, batch_size=16, threads=2, prefetch=3)
"""


def test_early_exit_and_consumer_exception_stop_threads_promptly(cmu_small):
    code = STREAM_SETUP.format(path=str(cmu_small)) + """
    import threading
    for coords, tiles in stream:
        break                                  # leave early
    t = time.perf_counter()
    try:
        for coords, tiles in TileStream(slide, coords, read_size=224, batch_size=16, threads=2):
            raise ValueError("consumer failed")
    except ValueError:
        pass
    print("stopped in", time.perf_counter() - t)
    """
    start = time.perf_counter()
    r = run_python(code)
    assert r.returncode == 0, r.stderr
    assert time.perf_counter() - start < 30  # not the ~20 s the whole stream would take
    assert "stopped in" in r.stdout


def test_ctrl_c_stops_the_stream(cmu_small):
    code = STREAM_SETUP.format(path=str(cmu_small)) + """
    print("streaming", flush=True)
    for coords, tiles in stream:
        pass
    """
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "streaming"
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    start = time.perf_counter()
    _, err = proc.communicate(timeout=30)
    assert "KeyboardInterrupt" in err
    assert time.perf_counter() - start < 10


@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_stain_normalisation_in_the_workers_applies_one_slide_estimate(cmu, reader, method):
    """The workers apply the slide-level estimate: each streamed tile equals the
    C++ normaliser (itself checked against torchstain in test_stain.py) applied
    to the plain tile, then resized; background tiles (which break per-tile
    estimates) go through without failing."""
    from hexfast import _core
    from hexfast.stream import estimate_stain

    slide, grid = cmu
    w, h = slide.dimensions
    glass = np.array([[w - 230, 0], [w - 230, 230]])  # top-right corner of CMU-1-Small-Region is blank
    coords = np.concatenate([grid.coords[::9], glass])
    source = estimate_stain(slide, grid.coords, method, read_size=224)
    apply = _core.macenko_apply if method == "macenko" else _core.reinhard_apply
    normalised = TileStream(slide, coords, read_size=224, out_size=384, stain_norm=method, stain_source=source,
                            reader=reader)
    plain = TileStream(slide, coords, read_size=224, reader=reader)
    for (_, got), (_, raw) in zip(normalised, plain):
        expected = np.stack([np.asarray(Image.fromarray(apply(t, *source)).resize((384, 384), Image.Resampling.BILINEAR))
                             for t in raw])
        assert np.abs(got.astype(int) - expected).max() <= 1
    if method == "macenko":  # Reinhard maps glass through the tissue statistics too, by design
        assert np.array(got[-2:]).mean() > 200, "glass tiles must stay bright"
    # Without a resize the stream's tiles are exactly the normaliser applied to the plain tiles, including
    # a tile over the slide's corner (black beyond it, normalised like any black pixel); the direct reader
    # normalises while it copies rows out of the decoded stored tiles.
    coords = np.concatenate([grid.coords[:40], [[w - 100, h - 100]]])
    streamed = np.concatenate([np.array(t) for _, t in TileStream(
        slide, coords, read_size=224, stain_norm=method, stain_source=source, reader=reader, batch_size=16)])
    raw = np.concatenate([np.array(t) for _, t in TileStream(slide, coords, read_size=224, reader=reader)])
    assert not raw[-1, -50:, -50:].any()
    np.testing.assert_array_equal(streamed, np.stack([apply(t, *source) for t in raw]))


def test_stain_estimate_comes_from_a_sample_of_the_grid(cmu):
    from hexfast.stream import estimate_stain
    from hexfast.stream.stain import sample_coords

    slide, grid = cmu
    picked = sample_coords(grid.coords, 32)
    assert len(picked) == 32 and picked[0].tolist() == grid.coords[0].tolist()
    assert picked[-1].tolist() == grid.coords[-1].tolist()
    stream = TileStream(slide, grid.coords, stain_norm="macenko")
    for got, want in zip(stream.stain_source, estimate_stain(slide, picked, "macenko")):
        np.testing.assert_array_equal(got, want)


def test_stain_normalisation_bad_method_and_no_tissue(cmu):
    slide, grid = cmu
    with pytest.raises(ValueError, match="macenko, reinhard"):
        TileStream(slide, grid.coords, stain_norm="vahadane")
    w, _ = slide.dimensions
    with pytest.raises(hexfast.SlideError, match="cannot estimate the macenko stain"):
        TileStream(slide, np.array([[w - 230, 0]]), read_size=224, stain_norm="macenko")


@pytest.mark.parametrize("photometric", [None, "flipped"])
@pytest.mark.parametrize("encoding", ["jfif", "aperio"])
def test_benchmark_slides_stream_like_openslide(cmu_small, tmp_path, encoding, photometric):
    """The benchmark generator's slides (YCbCr 4:2:0 JFIF tiles, or Aperio's RGB 4:4:4 tiles with no
    colour transform) are read by the direct reader exactly as openslide-python reads them; also with
    the TIFF's photometric tag contradicting the JPEG markers, where OpenSlide follows the tag."""
    import tifffile

    if not hexfast._core.HAVE_JPEG:
        pytest.skip("hexfast._core was built without libjpeg: no direct JPEG reader")
    out = tmp_path / f"{encoding}.svs"
    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "make_slide.py")
    subprocess.run([sys.executable, script, "--texture", str(cmu_small), "--width", "2400", "--height", "1700",
                    "--tissue", "0.6", "--encoding", encoding, "-o", str(out)], check=True, capture_output=True)
    with tifffile.TiffFile(out, mode="r+") as tif:
        tag = tif.pages[0].tags["PhotometricInterpretation"]
        assert tag.value == (2 if encoding == "aperio" else 6)
        if photometric == "flipped":
            tag.overwrite(8 - tag.value)  # RGB <-> YCbCr
    with hexfast.open_slide(out) as slide:
        assert slide.vendor == "aperio"
        coords = np.array([[0, 0], [230, 470], [1000, 1000], [2300, 1600]])  # the last over the corner
        stream = TileStream(slide, coords, read_size=224, reader="direct")
        assert stream.reader == "direct"
        for (xy, tiles) in stream:
            for p, tile in zip(xy, tiles):
                np.testing.assert_array_equal(tile, reference_tile(slide, p, 224))
