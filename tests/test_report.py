"""nucflow.report: ``qc/report.html`` of a 3D and a 2D run, opened in a real headless browser
(Debian's chromium and chromium-driver, driven by selenium): it loads, every picture renders,
a scale bar is drawn, the screenshot is not blank, and no request leaves the file.

Run as a script, it writes the README's screenshot of a report:
``python tests/test_report.py RUN_DIR docs/report.png``.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from nucflow import report
from nucflow.cli import main

DRIVER = "chromedriver"  # Debian's chromium-driver; .ci/run installs it when root


def _browser():
    """A headless chromium that logs every network request (the performance log)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
        options.add_argument(argument)
    options.add_argument("--window-size=1280,1600")
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    chromium = shutil.which("chromium")
    if chromium:
        options.binary_location = chromium
    return webdriver.Chrome(service=Service(shutil.which(DRIVER)), options=options)


@pytest.fixture(scope="module")
def browser():
    """Skip only when no browser is installed and this is not root (root: CI installs it)."""
    pytest.importorskip("selenium")
    if shutil.which(DRIVER) is None:
        if os.geteuid() == 0:
            pytest.fail("chromium-driver is not installed: .ci/run installs it (apt) when root")
        pytest.skip("no chromium-driver (apt install chromium chromium-driver)")
    driver = _browser()
    yield driver
    driver.quit()


def _run(source: Path, out: Path, chunks: tuple[int, ...]) -> Path:
    argv = ["run", "--input", str(source), "--output", str(out), "--diameter", "8"]
    assert main([*argv, "--chunks", *map(str, chunks)]) == 0
    return out / "qc" / report.NAME


@pytest.fixture(scope="module")
def pages(stack3d, stack2d, tmp_path_factory) -> dict[str, Path]:
    """The report of a 3D run on 2 x 2 x 2 blocks and of a 2D run on 2 x 2 blocks."""
    base = tmp_path_factory.mktemp("report")
    return {
        "3d": _run(stack3d[0], base / "run3d", (20, 64, 64)),
        "2d": _run(stack2d[0], base / "run2d", (128, 128)),
    }


def _requests(driver) -> list[str]:
    """URLs of every request the browser sent since the log was last read."""
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


_SPREAD = """
const img = arguments[0];
const canvas = document.createElement("canvas");
canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
const context = canvas.getContext("2d");
context.drawImage(img, 0, 0);
const data = context.getImageData(0, 0, canvas.width, canvas.height).data;
let sum = 0, squares = 0, n = 0;
for (let k = 0; k < data.length; k += 4 * 7) {  // every 7th pixel's green
  const v = data[k + 1]; sum += v; squares += v * v; n++;
}
return Math.sqrt(squares / n - (sum / n) ** 2);
"""

_PIXELS = """
const [img, box] = arguments;
const canvas = document.createElement("canvas");
canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
const context = canvas.getContext("2d");
context.drawImage(img, 0, 0);
const [x0, y0, x1, y1] = box;
const inside = context.getImageData(x0, y0, x1 - x0 + 1, y1 - y0 + 1).data;
const below = context.getImageData(x0, y1 + 4, x1 - x0 + 1, 1).data;
return [Array.from(inside), Array.from(below)];
"""


def _open(driver, page: Path) -> None:
    _requests(driver)  # forget what came before
    driver.get(page.as_uri())
    assert driver.execute_script("return document.readyState") == "complete"


@pytest.mark.parametrize("kind", ["3d", "2d"])
def test_report_renders_in_a_browser_and_requests_nothing(browser, pages, kind):
    page = pages[kind]
    _open(browser, page)
    assert browser.title.startswith("nucflow QC report")
    sent = _requests(browser)
    assert sent and all(u == page.as_uri() or u.startswith("data:") for u in sent), sent
    resources = browser.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name)"
    )
    assert all(name.startswith("data:") for name in resources), resources

    images = browser.find_elements("tag name", "img")
    sizes = [browser.execute_script("return [arguments[0].complete, arguments[0].naturalWidth, "
                                    "arguments[0].naturalHeight]", i) for i in images]  # fmt: skip
    assert sizes and all(done and w > 0 and h > 0 for done, w, h in sizes), sizes
    spreads = [browser.execute_script(_SPREAD, i) for i in images]  # as the browser decoded it
    assert min(spreads) > 20, spreads  # every picture shows something, none is blank
    # outlines at a size that shows nuclei: >= 1000 px on the long side of the image itself
    pictured = "figure[data-scale-bar]:not([data-scale-bar=''])"  # those with outlines
    outlined = browser.find_elements("css selector", pictured)
    expected = 3 + 3 if kind == "3d" else 1  # projections + planes; 2D: the image once
    assert len(outlined) == expected
    for figure in outlined:
        box = [int(v) for v in figure.get_attribute("data-scale-bar").split()]
        image = figure.find_element("tag name", "img")
        assert max(sizes[images.index(image)][1:]) - sum(report._MARGIN[::2]) >= 1000
        inside, below = browser.execute_script(_PIXELS, image, box)
        inside = np.asarray(inside).reshape(-1, 4)
        assert (inside[:, :3] == 255).all()  # the bar: white...
        assert (np.asarray(below).reshape(-1, 4)[:, :3] == 0).all()  # ...on its black box
        assert box[2] - box[0] >= 20
    caption = outlined[0].text
    assert ("maximum projection" in caption.lower()) == (kind == "3d")

    from PIL import Image

    shot = np.asarray(Image.open(io.BytesIO(browser.get_screenshot_as_png())).convert("L"))
    assert shot.std() > 20  # text, tables and a picture: not a blank page


def test_the_request_check_can_fail(browser, pages, tmp_path):
    """The same page with a picture from elsewhere and no CSP: the log sees the request."""
    text = pages["2d"].read_text()
    assert "Content-Security-Policy" in text
    assert not re.findall(r'(?:src|href)="(?!data:)', text)
    leaky = tmp_path / "leaky.html"
    leaky.write_text(
        re.sub(r"<meta http-equiv=\"Content-Security-Policy\"[^>]*>", "", text).replace(
            "</body>", '<img src="http://127.0.0.1:9/x.png"></body>'
        )
    )
    _open(browser, leaky)
    assert "http://127.0.0.1:9/x.png" in _requests(browser)


def test_report_counts_every_nucleus_by_block(pages):
    """The heat map's counts (read back from the table in batches) add up to the table."""
    out = pages["3d"].parents[1]
    record = json.loads((out / "run.json").read_text())
    spatial = report._Spatial.of(record, tuple(record["shape"]), (0, 0, 0))
    rows, sample, per_block = report._read_table(out / "nuclei.parquet", spatial)
    table = pd.read_parquet(out / "nuclei.parquet")
    assert rows == len(table) == per_block.sum() == len(sample)
    assert per_block.shape == (2, 2, 2)
    z = np.floor(table["centroid_z"].to_numpy()) // 20
    assert per_block[0].sum() == (z == 0).sum()
    assert record["qc_report"] == "qc/report.html"


def _screenshot(run: Path, png: Path) -> None:
    """The top of ``RUN/qc/report.html`` as the README shows it."""
    from PIL import Image

    driver = _browser()
    try:
        driver.set_window_size(1200, 2000)
        driver.get((run / "qc" / report.NAME).resolve().as_uri())
        shot = Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")
        shot.quantize(64).save(png, optimize=True)  # 64 colours: a tenth of the bytes
    finally:
        driver.quit()


if __name__ == "__main__":
    _screenshot(Path(sys.argv[1]), Path(sys.argv[2]))
    print(f"wrote {sys.argv[2]}")


def test_large_projections_are_cell_maxima_and_labels_every_nth_voxel():
    """Above 2048 voxels a side the projection is reduced: intensities by cell maxima (scikit-
    image's block_reduce), labels by stride; read block by block from an unevenly chunked
    dask array, never as one piece."""
    import dask.array as da
    from skimage.measure import block_reduce

    rng = np.random.default_rng(0)
    stack = rng.integers(0, 1000, (6, 130, 4500)).astype(np.uint16)
    data = da.from_array(stack, chunks=(4, 50, 1000))
    reduce = -(-4500 // report._MAX_SIDE)
    assert reduce == 3
    flat = report._project(data, (2, 6), reduce)
    assert max(flat.chunksize) < 4500  # still in blocks
    expected = block_reduce(stack[2:6].max(axis=0), (3, 3), np.max)[: 130 // 3]
    np.testing.assert_array_equal(flat.compute(), expected)
    strided = report._project(data, (2, 6), reduce, stride=True).compute()
    np.testing.assert_array_equal(strided, stack[2:6, ::3, ::3].max(axis=0))
    assert report._thirds(6) == [(0, 2), (2, 4), (4, 6)] and report._thirds(2) == [(0, 2)]


def test_warnings_say_what_the_run_said(pages):
    """Truncation with the radius to use (as the run's own warning), and a pixel-sized input."""
    record = json.loads((pages["3d"].parents[1] / "run.json").read_text())
    record["counts"]["truncated"] = 3
    spatial = report._Spatial.of(record, tuple(record["shape"]), (0, 0, 0))
    (said,) = report._warnings(record, 70, pd.DataFrame(), spatial)
    assert re.sub("<[^>]+>", "", said) == (
        "3 nuclei reached segment.max_radius = 8; they may be cut: rerun with --set "
        "segment.max_radius=12 (or a larger --diameter)."
    )
    record["unit"] = "pixel"
    spatial = report._Spatial.of(record, tuple(record["shape"]), (0, 0, 0))
    truncated, pixels = report._warnings(record, 70, pd.DataFrame(), spatial)
    assert "pass --voxel-size (anisotropic voxels" in re.sub("<[^>]+>", "", truncated)
    assert re.sub("<[^>]+>", "", pixels).startswith("The input has no voxel size")
    record["counts"]["truncated"] = 0
    assert report._warnings(record, 0, pd.DataFrame(), spatial)[-1].endswith(
        "No nuclei were found: check <code>--diameter</code> and the projections.</p>"
    )


def test_heat_map_sums_deep_layers_and_shades_the_fullest_block_darkest():
    """20 layers of z blocks in 8 panels (4 a row); the one block with nuclei, in the last
    layer's lower right corner, is the darkest cell of the last panel."""
    from PIL import Image

    per_block = np.zeros((20, 3, 5), np.int64)
    per_block[19, 2, 4], per_block[0, 0, 0] = 7, 2
    picture = report._heat_map(per_block)
    pixels = np.asarray(Image.open(io.BytesIO(picture.png)).convert("RGB"))
    darkest = np.argwhere((pixels == (40, 40, 255)).all(axis=-1))
    assert len(darkest)
    (y0, x0), (y1, x1) = darkest.min(0), darkest.max(0)
    assert x0 > pixels.shape[1] * 3 / 4 and y0 > pixels.shape[0] / 2  # lower right panel
    lighter = np.argwhere((pixels == (193, 193, 255)).all(axis=-1))  # int(255 - 215 * 2 / 7)
    assert lighter.max(0)[1] < pixels.shape[1] / 4 and lighter.max(0)[0] < pixels.shape[0] / 2
    assert (y1 - y0) == (x1 - x0)  # a square cell
