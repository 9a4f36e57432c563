"""Makes docs/viewer.png (`hexfast view` on CMU-1-Small-Region scored with the demo bundle, in headless chromium
at 1366x768, a laptop's screen) and docs/overview.png (that slide's overview.png).

    python docs/screenshot_viewer.py [OUT/<stem>]     (default: scores ../shared/data's CMU-1-Small-Region into a temp dir)
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains

from hexfast.view import ViewerData, ViewerServer

ROOT = Path(__file__).resolve().parents[1]
SLIDE = ROOT.parent / "shared" / "data" / "slides" / "CMU-1-Small-Region.svs"


def main() -> None:
    if len(sys.argv) > 1:
        out = Path(sys.argv[1])
    else:
        tmp = Path(tempfile.mkdtemp())
        subprocess.run([sys.executable, "-m", "hexfast", "score", str(SLIDE), "-o", str(tmp)], check=True)
        out = tmp / SLIDE.stem
    server = ViewerServer(ViewerData(out), "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1366,768",
                "--force-device-scale-factor=1"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        driver.get(server.url)

        def settle():
            for _ in range(300):
                if driver.execute_script("return !!(window.hexfast && window.hexfast.ready)"):
                    return
                time.sleep(0.1)

        settle()
        driver.execute_script("window.hexfast.view(1150, 1500, 0.33)")
        settle()
        canvas = driver.find_element("id", "view")
        sx, sy = driver.execute_script("return window.hexfast.toScreen(1230, 1400)")
        rect = canvas.rect
        ActionChains(driver).move_to_element_with_offset(canvas, int(sx - rect["width"] / 2),
                                                         int(sy - rect["height"] / 2)).perform()
        time.sleep(1.0)
        settle()
        driver.save_screenshot(str(ROOT / "docs" / "viewer.png"))
        print(ROOT / "docs" / "viewer.png")
        shutil.copy(out / "overview.png", ROOT / "docs" / "overview.png")
        print(ROOT / "docs" / "overview.png")
    finally:
        driver.quit()
        server.shutdown()
        server.server_close()


if __name__ == "__main__":
    main()
