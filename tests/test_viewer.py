"""`hexfast view` in a real headless browser (Debian's chromium + chromedriver, driven by selenium): the page
loads with no console error, the marker overlay is drawn over scored tissue and not over glass, and the
values shown under the pointer are the h5's. Plus the server's routes on their own."""

from __future__ import annotations

import json
import shutil
import threading
import time
import urllib.request

import h5py
import numpy as np
import pytest

from hexfast.view import ViewerData, ViewerServer, ViewError

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture
def server(cmu_scored):
    out, slide = cmu_scored
    srv = ViewerServer(ViewerData(out), "127.0.0.1", 0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(5)


def get(srv, path):
    with urllib.request.urlopen(srv.url.rstrip("/") + path, timeout=30) as r:
        return r.status, r.headers["Content-Type"], r.read()


def test_routes(server, cmu_scored):
    out, _ = cmu_scored
    status, kind, body = get(server, "/")
    assert status == 200 and kind.startswith("text/html") and b"viewer.js" in body
    info = json.loads(get(server, "/api/info")[2])
    assert info["demo"] is True and info["tiles"] == 200 and info["cell"] == 112 and len(info["markers"]) == 40
    assert info["deepzoom"]["dimensions"][-1] == [2220, 2967] and info["mica"]["count"] == 50
    status, kind, png = get(server, "/overlay/2.png?cmap=viridis")
    assert kind == "image/png"
    from PIL import Image
    import io

    overlay = np.asarray(Image.open(io.BytesIO(png)))
    assert overlay.shape == (*info["grid"], 4)
    with h5py.File(out / f"{out.name}.h5") as f:
        coords = f["coords"][:]
    cells = coords // 112
    assert (overlay[cells[:, 1], cells[:, 0], 3] == 255).all()  # every scored cell coloured
    assert (overlay[..., 3] == 255).sum() == len({tuple(c) for c in cells.tolist()})  # and nothing else
    top = info["deepzoom"]["levels"] - 1
    status, kind, jpeg = get(server, f"/dz/{top}/0_0.jpg")
    assert kind == "image/jpeg" and Image.open(io.BytesIO(jpeg)).size == (256, 256)
    for bad in ("/dz/99/0_0.jpg", "/dz/0/9_9.jpg", "/overlay/40.png", "/static/../report.json", "/nothing"):
        with pytest.raises(urllib.error.HTTPError) as e:
            get(server, bad)
        assert e.value.code == 404, bad
    with pytest.raises(urllib.error.HTTPError) as e:
        get(server, "/api/tile?x=oops&y=1")
    assert e.value.code == 400


def test_tile_under_a_point_is_the_h5s(cmu_scored):
    out, _ = cmu_scored
    data = ViewerData(out)
    try:
        with h5py.File(out / f"{out.name}.h5") as f:
            coords, markers = f["coords"][:], f["codex_prediction"][:]
        for t in (0, 57, len(coords) - 1):
            x, y = coords[t]
            got = data.tile_at(x + 111.5, y + 0.2)  # inside the tile's square, near its edges
            assert (got["x"], got["y"]) == (x, y)
            np.testing.assert_array_equal(np.float32(list(got["values"].values())), markers[t])
        assert data.tile_at(1.0, 1.0) is None and data.tile_at(-5, 10) is None and data.tile_at(1e6, 1e6) is None
    finally:
        data.close()


def test_view_refuses_what_it_cannot_show(tmp_path, cmu_scored):
    with pytest.raises(ViewError, match="no report.json"):
        ViewerData(tmp_path)
    out, _ = cmu_scored
    copy = tmp_path / out.name
    shutil.copytree(out, copy)
    report = json.loads((copy / "report.json").read_text())
    report["slide"]["path"] = str(tmp_path / "moved.svs")
    (copy / "report.json").write_text(json.dumps(report))
    with pytest.raises(ViewError, match="pass its path"):
        ViewerData(copy)


@pytest.mark.skipif(CHROMIUM is None or DRIVER is None,
                    reason="needs Debian's chromium and chromium-driver (.ci/run installs them: apt-get install "
                           "chromium chromium-driver)")
def test_in_a_headless_browser(server, cmu_scored, tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium drives the browser (the [test] extra)")
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.action_chains import ActionChains

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,900",
                "--disable-dev-shm-usage", "--force-device-scale-factor=1"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    try:
        driver.get(server.url)

        def settle():
            deadline = time.time() + 30
            while time.time() < deadline:
                if driver.execute_script("return !!(window.hexfast && window.hexfast.ready)"):
                    return
                time.sleep(0.1)
            raise AssertionError("the viewer never finished drawing")

        settle()
        logs = [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]
        assert logs == [], logs
        assert "DEMO MODEL" in driver.find_element("id", "banner").text

        out, _ = cmu_scored
        with h5py.File(out / f"{out.name}.h5") as f:
            coords, markers = f["coords"][:], f["codex_prediction"][:]
        info = driver.execute_script("return window.hexfast.info")
        cell = info["cell"]
        scored_cells = {tuple(c) for c in (coords // cell).tolist()}
        glass = next((j, i) for i in range(info["grid"][0]) for j in range(info["grid"][1])
                     if (j, i) not in scored_cells and j * cell + cell <= info["width"])
        t = 57  # a tile in the tissue; the whole slide is on screen (the viewer opens fitted)
        points = {"tissue": coords[t] + cell / 2, "glass": (np.array(glass) + 0.5) * cell}

        driver.execute_script("window.hexfast.setColormap('viridis')")  # opaque at every value

        def pixels(opacity):
            driver.execute_script("window.hexfast.setOpacity(arguments[0])", opacity)
            settle()
            out = {}
            for name, (x, y) in points.items():
                sx, sy = driver.execute_script("return window.hexfast.toScreen(arguments[0], arguments[1])",
                                               float(x), float(y))
                out[name] = driver.execute_script("return window.hexfast.pixel(arguments[0], arguments[1])", sx, sy)
            return out

        bare, covered = pixels(0.0), pixels(1.0)
        assert bare["tissue"] != covered["tissue"], (bare, covered)  # the marker's colour is drawn over the tissue
        assert bare["glass"] == covered["glass"], (bare, covered)  # and nothing over glass
        driver.execute_script("window.hexfast.view(arguments[0], arguments[1], 1.0)", *map(float, coords[t] + 56))
        settle()

        # hover the tile's centre: the panel shows that tile, with the h5's values
        canvas = driver.find_element("id", "view")
        sx, sy = driver.execute_script("return window.hexfast.toScreen(arguments[0], arguments[1])",
                                       *map(float, coords[t] + 56))
        rect = canvas.rect
        ActionChains(driver).move_to_element_with_offset(canvas, int(sx - rect["width"] / 2),
                                                         int(sy - rect["height"] / 2)).perform()
        deadline = time.time() + 10
        tile = None
        while time.time() < deadline:
            raw = driver.find_element("id", "hover").get_attribute("data-tile")
            tile = json.loads(raw) if raw else None
            if tile and (tile["x"], tile["y"]) == tuple(coords[t]):
                break
            time.sleep(0.1)
        assert tile is not None and (tile["x"], tile["y"]) == tuple(coords[t]), (tile, coords[t])
        np.testing.assert_array_equal(np.float32(list(tile["values"].values())), markers[t])
        text = driver.find_element("id", "hover").text
        assert f"({coords[t][0]}, {coords[t][1]})" in text and "+ 28 more" in text
        lines = text.splitlines()
        first = next(i for i, line in enumerate(lines) if line.startswith("marker ")) + 1
        shown = [line[:16].strip() for line in lines[first:first + 12]]  # the top 12, highest within range first
        info_markers = {m["name"]: m for m in info["markers"]}
        units = [(tile["values"][n] - info_markers[n]["lo"]) / (info_markers[n]["hi"] - info_markers[n]["lo"])
                 for n in shown]
        assert units == sorted(units, reverse=True) and len(shown) == 12
        # the hovered tile is outlined in black and white: its left edge is grey, where tissue and colours are not
        settle()
        edge = driver.execute_script("return window.hexfast.toScreen(arguments[0], arguments[1])",
                                     float(coords[t][0]), float(coords[t][1] + 56))
        rgb = driver.execute_script("return window.hexfast.pixel(arguments[0], arguments[1])", *edge)[:3]
        assert max(rgb) - min(rgb) < 25, rgb
        driver.find_element("css selector", "#hover .more").click()
        assert "Pan-Cytokeratin" in driver.find_element("id", "hover").text  # all 40 once asked, the tile kept
        driver.execute_script("window.hexfast.setLayer(-1)")  # MICA's attention layer draws too
        settle()
        # ... within the slide: CLAM's padded patches past the bottom edge are cut at it
        with h5py.File(out / f"{out.name}.h5") as f:
            bag = f["mica_coords"][:]
        height = info["height"]
        edge_patches = bag[bag[:, 1] + 256 > height]
        assert len(edge_patches), "CMU-1-Small-Region's bag reaches past its bottom edge"
        x = float(edge_patches[0][0] + 128)
        driver.execute_script("window.hexfast.setOpacity(1.0)")
        driver.execute_script("window.hexfast.view(arguments[0], arguments[1], 1.0)", x, float(height))
        settle()
        inside = driver.execute_script("return window.hexfast.toScreen(arguments[0], arguments[1])", x, height - 4.0)
        below = driver.execute_script("return window.hexfast.toScreen(arguments[0], arguments[1])", x, height + 4.0)
        pixel = "return window.hexfast.pixel(arguments[0], arguments[1])"
        assert driver.execute_script(pixel, *below)[:3] == [255, 255, 255]
        assert driver.execute_script(pixel, *inside)[:3] != [255, 255, 255]
        driver.save_screenshot(str(tmp_path / "viewer.png"))
        assert [e for e in driver.get_log("browser") if e["level"] == "SEVERE"] == []
    finally:
        driver.quit()


def test_view_command_starts_and_prints_its_url(cmu_scored):
    import subprocess
    import sys

    out, _ = cmu_scored
    proc = subprocess.Popen([sys.executable, "-m", "hexfast", "view", str(out), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = ""
        deadline = time.time() + 60
        while "http://127.0.0.1:" not in line and time.time() < deadline:
            line = proc.stderr.readline() or proc.stdout.readline()
        url = line[line.index("http://"):].split()[0]
        with urllib.request.urlopen(url + "api/info", timeout=30) as r:
            assert json.loads(r.read())["slide"] == out.name
    finally:
        proc.terminate()
        proc.wait(10)
