"""A new user's first hour (issue 25): defaults that work, progress everywhere, one time and one speed per
slide, outputs that say what they are, and the watcher's and viewer's small gaps."""

from __future__ import annotations

import json
import os
import shutil
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile

from conftest import hexfast, one_line_error
from hexfast.slide.synthetic import write_demo_slide

OME_NS = {"ome": "http://www.openmicroscopy.org/Schemas/OME/2016-06"}
STEM = "CMU-1-Small-Region"


@pytest.fixture(scope="module")
def small_slide(tmp_path_factory) -> Path:
    """A synthetic 20x slide of under a hundred tiles: scored in a few seconds."""
    return write_demo_slide(tmp_path_factory.mktemp("slide") / "small.tif", width=1800, height=1200)


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


# ---------------------------------------------------------------- export


@pytest.mark.filterwarnings("ignore")
def test_export_demo_needs_no_extra_flags(tmp_path):
    """`hexfast export --demo -o B`, the first thing one tries: the official bag by default, said, and every
    step timed."""
    pytest.importorskip("torch")
    r = hexfast("export", "--demo", "-o", tmp_path / "b", "--cpu-variants", "none")
    assert r.returncode == 0, r.stderr
    assert "--mica-features resnet50-trunc" in r.stderr and "official pipeline" in r.stderr
    steps = [line for line in r.stdout.splitlines() if line.startswith("[")]
    assert any("loading torch" in s for s in steps) and any("hex: exporting to ONNX" in s for s in steps)
    assert any("he_features: exporting" in s for s in steps) and any("manifest" in s for s in steps)
    seconds = [float(s[1:s.index(" s]")]) for s in steps]
    assert seconds == sorted(seconds)  # elapsed time since the start, never backwards
    assert r.stdout.splitlines()[-1].startswith(f"wrote {tmp_path / 'b'}") and " in " in r.stdout.splitlines()[-1]
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["demo"] is True and manifest["mica_features"]["kind"] == "resnet50-trunc"
    assert "tiny (default" in hexfast("export", "--help").stdout.replace("\n", " ").replace("  ", " ")


# ---------------------------------------------------------------- progress, --json, --quiet, figures


def test_progress_lines_without_a_terminal_and_one_set_of_figures(small_slide, tmp_path):
    """stderr is a pipe here (a log file, systemd): progress comes as lines, and the slide's time and speed
    are the same in the terminal line, the JSON line, the summary table and report.json."""
    r = hexfast("score", small_slide, "-o", tmp_path, "--json", "--progress-every", "0.01", "--batch-size", "16")
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "small" / "report.json").read_text())
    n = report["tile_count"]
    progress = [line for line in r.stderr.splitlines() if line.startswith("hexfast: progress: small.tif: HEX ")]
    assert len(progress) >= 2, r.stderr
    assert any("/s, ETA " in line for line in progress) and all(f"/{n} (" in line for line in progress)
    assert "\r" not in r.stderr  # no bar redraws in a log
    (record,) = json_lines(r.stdout)  # stdout holds only the JSON line; the table went to stderr
    assert record["status"] == "ok" and record["tiles"] == n > 50
    assert record["out"] == str(tmp_path / "small") and record["demo"] is True
    assert record["mica_risk"] == pytest.approx(report["mica"]["risk"])
    assert record["seconds"] == pytest.approx(report["seconds"]["total"], abs=0.006)
    assert report["wall_seconds"] == report["seconds"]["total"]
    assert record["tiles_per_s"] == pytest.approx(report["tiles_per_s"], rel=1e-3)
    assert report["tiles_per_s"] == pytest.approx(n / report["seconds"]["total"], rel=1e-3)
    assert report["hex_tiles_per_s"] == pytest.approx(n / report["seconds"]["stream+hex"], rel=1e-2)
    line = next(x for x in r.stderr.splitlines() if x.startswith(f"small.tif: {n} tiles in "))
    assert f"in {report['seconds']['total']:.1f} s ({report['tiles_per_s']:.1f} tiles/s;" in line
    row = next(x for x in r.stderr.splitlines() if x.startswith("small.tif ") and " ok " in x)
    assert row.split()[2:5] == [str(n), f"{report['tiles_per_s']:.1f}", f"{report['seconds']['total']:.1f}"]


def test_quiet_prints_only_problems_and_json_reports_failures(small_slide, tmp_path):
    r = hexfast("score", small_slide, tmp_path / "missing.svs", "-o", tmp_path / "out", "--quiet", "--json")
    assert r.returncode == 2
    records = json_lines(r.stdout)
    assert [x["status"] for x in records] == ["failed", "ok"]
    assert records[0]["slide"].endswith("missing.svs") and records[0]["error"] == "no such file"
    lines = r.stderr.splitlines()
    assert all(x.startswith("hexfast: error:") or "WARNING" in x or set(x) == {"!"} for x in lines), lines
    r = hexfast("score", small_slide, "-o", tmp_path / "out", "--quiet")
    assert r.returncode == 0 and r.stdout == ""
    assert "progress" not in r.stderr and "replacing" not in r.stderr and "small.tif:" not in r.stderr


# ---------------------------------------------------------------- score's options


def test_outputs_no_mica_and_resume_follow_the_choice(small_slide, tmp_path):
    r = hexfast("score", small_slide, "-o", tmp_path, "--outputs", "overview", "--no-mica")
    assert r.returncode == 0, r.stderr
    d = tmp_path / "small"
    assert sorted(p.name for p in d.iterdir()) == ["overview.png", "report.json", "small.h5"]
    report = json.loads((d / "report.json").read_text())
    assert report["outputs"] == {"h5": "small.h5", "overview": "overview.png"}
    assert report["mica"] is None and report["settings"]["mica"] is False
    assert report["settings"]["outputs"] == ["h5", "overview"]
    with h5py.File(d / "small.h5") as f:
        assert "mica_coords" not in f and "mica_attention" not in f
    again = hexfast("score", small_slide, "-o", tmp_path, "--outputs", "overview", "--no-mica", "--resume")
    assert again.returncode == 0 and "done before" in again.stdout
    more = hexfast("score", small_slide, "-o", tmp_path, "--resume")  # all outputs and MICA: not done yet
    assert more.returncode == 0 and "done before" not in more.stdout
    assert sorted(p.name for p in d.iterdir()) == ["overview.png", "report.json", "small.geojson.gz", "small.h5",
                                                   "virtual_codex.ome.tif"]
    assert json.loads((d / "report.json").read_text())["mica"]["risk"] is not None
    one_line_error(hexfast("score", small_slide, "-o", tmp_path, "--outputs", "h5,png"),
                   "--outputs", "png", "h5, geojson, ome-tiff, overview")


def test_tissue_options_change_the_grid_and_are_recorded(cmu_small, tmp_path):
    plain = hexfast("score", cmu_small, "-o", tmp_path / "a", "--no-mica", "--outputs", "h5")
    strict = hexfast("score", cmu_small, "-o", tmp_path / "b", "--no-mica", "--outputs", "h5",
                     "--min-tissue", "0.9", "--saturation-threshold", "30")
    assert plain.returncode == 0 and strict.returncode == 0, strict.stderr
    a = json.loads((tmp_path / "a" / STEM / "report.json").read_text())
    b = json.loads((tmp_path / "b" / STEM / "report.json").read_text())
    assert b["tile_count"] < a["tile_count"]
    assert b["settings"]["min_tissue"] == 0.9 and b["settings"]["tissue"]["threshold"] == 30
    assert b["slide"]["saturation_threshold"] == 30
    assert a["settings"]["stride"] == 112 and a["settings"]["mpp"] == pytest.approx(0.499)  # the values used


def test_a_rerun_says_what_it_replaces(small_slide, tmp_path):
    first = hexfast("score", small_slide, "-o", tmp_path, "--outputs", "h5", "--no-mica")
    assert first.returncode == 0 and "replacing" not in first.stderr
    finished = json.loads((tmp_path / "small" / "report.json").read_text())["finished_at"]
    second = hexfast("score", small_slide, "-o", tmp_path, "--outputs", "h5", "--no-mica")
    assert second.returncode == 0
    assert (f"hexfast: replacing {tmp_path / 'small'} (scored {finished[:16].replace('T', ' ')} UTC); "
            "--resume skips complete outputs") in second.stderr


def test_help_texts(tmp_path):
    score = hexfast("score", "--help").stdout
    for text in ("--batch-size N", "tiles per HEX engine call (default 64", "tile-reading threads (default 2)",
                 "--mpp UM", "SLIDE|DIR|GLOB", "slide files (any format", "--min-tissue", "--saturation-threshold",
                 "--outputs LIST", "--no-mica", "--quiet", "--json", "--progress-every"):
        assert text in score, text
    demo = hexfast("demo", "--help").stdout
    for absent in ("--roi", "--mica-bag", "--model", "--region", "--resume"):
        assert absent not in demo, absent
    watch = hexfast("watch", "--help").stdout
    assert "--mpp UM" in watch and "--once" in watch and "--dry-run" in watch
    import subprocess
    import sys

    text = subprocess.run([sys.executable, Path(__file__).resolve().parents[1] / "benchmarks" / "make_slide.py",
                           "--help"], capture_output=True, text=True).stdout
    assert "(default 100000)" in text and "(default 80000)" in text and "default 0.25: 40x" in text


def test_demo_writes_into_a_user_folder_and_says_where(tmp_path):
    env = dict(os.environ, HEXFAST_DEMO_DIR=str(tmp_path / "demo"))
    r = hexfast("demo", "--outputs", "h5", "--no-mica", env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]  # nothing in the current directory
    assert f"demo outputs in {tmp_path / 'demo' / 'demo-slide'}/" in r.stderr
    assert (tmp_path / "demo" / "demo-slide" / "report.json").is_file()
    ignored = (Path(__file__).resolve().parents[1] / ".gitignore").read_text().split()
    assert "hexfast-demo/" in ignored and "hexfast-out/" in ignored


# ---------------------------------------------------------------- outputs


def test_every_output_marks_the_demo_and_explains_itself(cmu_scored):
    d, _ = cmu_scored
    with tifffile.TiffFile(d / "virtual_codex.ome.tif") as tif:
        root = ET.fromstring(tif.ome_metadata)
    image = root.find("ome:Image", OME_NS)
    assert "[DEMO: untrained]" in image.get("Name")
    assert image.find("ome:Description", OME_NS).text.startswith("DEMO MODEL")
    channels = image.findall("ome:Pixels/ome:Channel", OME_NS)
    assert len(channels) == 40 and all("DEMO" in c.get("Fluor") for c in channels)
    assert channels[0].get("Name") == "DAPI"  # names stay the markers': tools match on them
    pairs = {m.get("K"): m.text for m in root.iter(f"{{{OME_NS['ome']}}}M")}
    assert "untrained" in pairs["hexfast:demo"]
    with h5py.File(d / f"{STEM}.h5") as f:
        assert f.attrs["demo"] and "untrained" in f.attrs["warning"] and "NOT A PREDICTION" in f.attrs["warning"]
        ranking = f["mica_most_attended"]
        rows = list(ranking.attrs["rows"])
        assert rows[-1] == "overall" and len(rows) == 41 and ranking["tiles"].shape == ranking["attention"].shape
        attention = f["mica_attention"][:]
        assert ranking["tiles"][-1, 0] == int(np.argmax(attention))
    text = (d / "report.json").read_text()
    report = json.loads(text)
    assert len(text) < 20_000, len(text)
    top = report["mica"]["most_attended"]
    assert len(top["overall"]) == 10 and all(len(v) == 3 for v in top["per_marker"].values())
    assert "larger means higher risk" in report["mica"]["risk_scale"] and "quartiles" in report["mica"]["time_bins"]
    area = report["slide"]["tissue_area_mm2"]
    assert area == round(area, 4) and len(repr(report["slide"]["tile_um"])) < 12
    assert report["settings"]["stride"] == report["slide"]["stride"] == 112


def test_overview_units_and_fonts():
    from PIL import ImageFont

    from hexfast.outputs.overview import _Fonts, _has_glyphs

    assert not _has_glyphs(ImageFont.load_default(size=14), "µ")  # Pillow's own font: write um
    fonts = _Fonts(320)
    assert (fonts.um, fonts.mm2) in (("µm", "mm²"), ("um", "mm2"))
    assert (fonts.um == "µm") == _has_glyphs(fonts.small, "µ²")


# ---------------------------------------------------------------- watch


def test_watch_dry_run_once_and_status(small_slide, tmp_path):
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    inbox.mkdir()
    shutil.copy(small_slide, inbox / "a.tif")
    old = time.time() - 3600
    os.utime(inbox / "a.tif", (old, old))
    shutil.copy(small_slide, inbox / "b.tif")  # just landed
    r = hexfast("watch", inbox, "-o", out, "--dry-run", "--settle", "60")
    assert r.returncode == 0, r.stderr
    assert f"{inbox / 'a.tif'}: would score" in r.stdout
    assert f"{inbox / 'b.tif'}: still landing" in r.stdout
    assert "1 would score, 1 still landing" in r.stderr and not out.exists()  # nothing written

    os.utime(inbox / "b.tif", (old, old))
    r = hexfast("watch", inbox, "-o", out, "--once", "--settle", "5", "--poll", "0.2", "--outputs", "h5",
                "--no-mica", "--mpp", "0.25", timeout=300)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["a", "b", "watch-events.jsonl"]
    report = json.loads((out / "a" / "report.json").read_text())
    assert report["slide"]["mpp"] == 0.25 and report["slide"]["mpp_source"] != "openslide.mpp-x"
    status = json.loads(hexfast("watch", "--status", out).stdout)
    assert status["watcher"] == {"running": False} and status["counts"]["done"] == 2
    r = hexfast("watch", inbox, "-o", out, "--dry-run")
    assert r.stdout.count("done before") == 2


def test_status_names_a_live_watcher_and_what_is_settling(small_slide, tmp_path):
    from hexfast.watch import Watcher, read_status

    inbox, out = tmp_path / "inbox", tmp_path / "out"
    inbox.mkdir()
    shutil.copy(small_slide, inbox / "landing.tif")
    watcher = Watcher(inbox, out, scorer=object(), settle=600)
    try:
        watcher._scan_once()
        status = read_status(out)
        assert status["watcher"]["running"] is True and status["watcher"]["pid"] == os.getpid()
        assert status["watcher"]["since"].startswith("20")
        (landing,) = status["settling"]
        assert landing["slide"] == str((inbox / "landing.tif").resolve()) and landing["complete"] is True
        assert status["queue"] == []
        live = watcher.status()  # what the HTTP endpoint serves
        assert live["settling"] == status["settling"] and live["pid"] == os.getpid()
    finally:
        watcher.close()
    assert read_status(out)["watcher"] == {"running": False} and read_status(out)["settling"] == []


# ---------------------------------------------------------------- view


def test_view_of_an_out_lists_its_slides(cmu_scored, tmp_path):
    from hexfast.view import ViewerData
    from hexfast.view.data import ViewError

    d, _ = cmu_scored
    out = tmp_path / "out"
    shutil.copytree(d, out / STEM)
    data = ViewerData(out)  # one slide: it is opened
    assert data.slide.name == STEM
    data.close()
    shutil.copytree(d, out / "second")
    r = hexfast("view", out, "--port", "0")
    line = one_line_error(r, f"{out}: holds 2 scored slides", f"hexfast view {out / STEM}", "second")
    assert "no report.json" not in line
    with pytest.raises(ViewError, match="no scored slide in it"):
        ViewerData(tmp_path)
