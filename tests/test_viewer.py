"""The tracing viewer: one self-contained HTML page, checked in headless Chromium.

The page is loaded from a file with every host name unresolvable and every request logged; a
synthetic pointer event at a known point must put the marker where
:meth:`~plasticine.core.Deformation.points_to_target` (or ``points_to_source``) says, a click on a
region must highlight exactly the voxels of the traced label map, and a screenshot is written.
The browser tests skip with the reason when selenium, Chromium or chromedriver is missing
(``.ci/run`` installs Debian's ``chromium`` and ``chromium-driver`` and pip's ``selenium``).
"""

from __future__ import annotations

import base64
import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch

from plasticine.cli import main
from plasticine.core import Deformation, resize
from plasticine.data import brainweb_slices
from plasticine.data.synthetic import random_deformation
from plasticine.io import png_bytes, write_deformation, write_image, write_trace
from plasticine.viewer import write_viewer

SHAPE_2D = (72, 60)
SHAPE_3D = (10, 36, 30)


def _t1(shape: tuple[int, ...]) -> torch.Tensor:
    """The shipped real T1 slice resized to ``shape`` (a 3D shape stacks it with a smooth depth profile), in [0, 1]."""
    t1 = torch.from_numpy(brainweb_slices()["t1"]).double()[None, None] / 255.0
    img = resize(t1, shape[-2:])[0].clamp(0, 1)
    if len(shape) == 2:
        return img
    depth = torch.linspace(0.6, 1.0, shape[0], dtype=torch.float64).view(1, -1, 1, 1)
    return img[:, None] * depth


def _case(shape: tuple[int, ...], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, Deformation, torch.Tensor]:
    """Source, translation (source o phi, inverted as a contrast change), phi and a 3-class label map."""
    x = _t1(shape)
    d = random_deformation(shape, 4.0, control_points=4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    y = 1.0 - d.to_target(x[None])[0]
    labels = (x > 0.35).long() + (x > 0.6).long()
    return x, y, d, labels


def _embedded(page: Path) -> dict:
    text = page.read_text(encoding="utf-8")
    m = re.search(r'<script id="viewer-data" type="application/json">(.*?)</script>', text, re.DOTALL)
    assert m is not None
    return json.loads(m.group(1))


def _decode(b64: str, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    return np.frombuffer(base64.b64decode(b64), dtype=dtype).reshape(shape)


# -- the file, without a browser ----------------------------------------------------------------


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[tuple[str, str, str]] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.urls += [(tag, k, v or "") for k, v in attrs if k in ("src", "href", "action", "data", "poster", "srcset")]


def test_page_is_self_contained_and_embeds_the_exact_fields(tmp_path):
    x, y, d, labels = _case(SHAPE_2D)
    page = write_viewer(tmp_path / "sub" / "page.html", x.float(), y.float(), d, source_labels=labels, title="a <b> & c")
    text = page.read_text(encoding="utf-8")
    links = _Links()
    links.feed(text)
    assert "link" not in links.tags and "iframe" not in links.tags
    assert all(not v.lower().lstrip().startswith(("http:", "https:", "//", "ftp:")) for _, _, v in links.urls), links.urls
    assert re.search(r"https?://", text) is None
    assert "default-src 'none'" in text and "img-src data:" in text  # the browser refuses any other fetch
    assert "<title>a &lt;b&gt; &amp; c</title>" in text
    data = _embedded(page)
    assert data["shape"] == list(SHAPE_2D)
    np.testing.assert_array_equal(_decode(data["forward"], "<f4", (2, *SHAPE_2D)), d.forward[0].float().numpy())
    np.testing.assert_array_equal(_decode(data["inverse"], "<f4", (2, *SHAPE_2D)), d.inverse[0].float().numpy())
    traced = d.labels_to_target(labels[None], 3)[0, 0].numpy()
    np.testing.assert_array_equal(_decode(data["labels"]["translation"], "<i4", SHAPE_2D), traced)
    np.testing.assert_array_equal(_decode(data["labels"]["source"], "<i4", SHAPE_2D), labels[0].numpy())
    assert data["labels"]["values"] == [0, 1, 2]
    png = base64.b64decode(data["images"]["source"][0].split(",", 1)[1])
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[16:24] == np.array([SHAPE_2D[1], SHAPE_2D[0]], ">u4").tobytes()  # IHDR width, height
    assert not list(tmp_path.glob("sub/*.tmp*"))


def test_labels_with_any_integer_values_are_indexed(tmp_path):
    x, y, d, labels = _case(SHAPE_2D)
    data = _embedded(write_viewer(tmp_path / "p.html", x, y, d, source_labels=labels * 7 - 3))
    assert data["labels"]["values"] == [-3, 4, 11]


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(source=torch.zeros(2, *SHAPE_2D)), "source: expected 1 .grey. or 3 .RGB. channels, got 2"),
        (dict(translation=torch.zeros(1, 70, 60)), "translation: expected shape"),
        (dict(source=torch.full((1, *SHAPE_2D), float("nan"))), "source: expected finite values"),
        (dict(deformation=Deformation(torch.zeros(1, 2, 8, 8), torch.zeros(1, 2, 8, 8))), r"deformation: expected fields of shape \(1, 2, 72, 60\)"),
        (dict(source_labels=torch.zeros(1, *SHAPE_2D)), "source_labels: expected an integer tensor, got torch.float32"),
        (dict(source_labels=torch.zeros(1, 8, 8, dtype=torch.long)), "source_labels: expected shape"),
        (dict(grid_spacing=1), "grid_spacing"),
        (dict(title=3), "title: expected a string"),
    ],
)
def test_bad_arguments_raise_one_clear_error(tmp_path, change, match):
    x, y, d, labels = _case(SHAPE_2D)
    kwargs = dict(source=x.float(), translation=y.float(), deformation=d, source_labels=labels)
    kwargs.update(change)
    with pytest.raises(ValueError, match=match):
        write_viewer(tmp_path / "p.html", **kwargs)
    assert not (tmp_path / "p.html").exists()


# -- the page in headless Chromium ------------------------------------------------------------------


def _browser_paths() -> tuple[str, str]:
    pytest.importorskip("selenium", reason="the viewer tests drive Chromium through selenium (pip install selenium)")
    browser = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    driver = shutil.which("chromedriver") or ("/usr/bin/chromedriver" if Path("/usr/bin/chromedriver").exists() else None)
    if browser is None or driver is None:
        pytest.skip(f"the viewer tests need Chromium and chromedriver (apt-get install chromium chromium-driver); found browser={browser}, driver={driver}")
    return browser, driver


@pytest.fixture(scope="module")
def browser():
    binary, driver_path = _browser_paths()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1100,700", "--host-resolver-rules=MAP * ~NOTFOUND"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    try:
        drv = webdriver.Chrome(service=Service(driver_path), options=options)
    except Exception as err:  # a browser that cannot start here (no display libraries, sandbox)
        pytest.skip(f"Chromium did not start: {type(err).__name__}: {' '.join(str(err).split())[:200]}")
    yield drv
    drv.quit()


def _open(browser, page: Path) -> None:
    browser.get_log("browser")  # drop earlier entries
    browser.get_log("performance")
    browser.get(page.resolve().as_uri())
    browser.execute_script("return document.readyState")
    assert browser.execute_script("return typeof window.plasticineViewer") == "object"


def _stage(browser, view: str) -> dict:
    return browser.execute_script(f"const r = document.querySelector('#view-{view} .stage').getBoundingClientRect(); return {{left: r.left, top: r.top, width: r.width, height: r.height}};")


def _fire(browser, view: str, kind: str, client: tuple[int, int]) -> None:
    browser.execute_script(
        f"document.querySelector('#view-{view} .stage').dispatchEvent(new MouseEvent('{kind}', {{clientX: arguments[0], clientY: arguments[1], bubbles: true}}));",
        client[0],
        client[1],
    )


def _client_of(browser, view: str, yx: tuple[float, float]) -> tuple[tuple[int, int], np.ndarray]:
    """Whole client pixels nearest a voxel point, and the voxel point they stand for (pixel centre convention)."""
    r, scale = _stage(browser, view), browser.execute_script("return window.plasticineViewer.state.scale")
    cx, cy = round(r["left"] + (yx[1] + 0.5) * scale), round(r["top"] + (yx[0] + 0.5) * scale)
    return (cx, cy), np.array([(cy - r["top"]) / scale - 0.5, (cx - r["left"]) / scale - 0.5])


def _marker(browser, view: str) -> tuple[np.ndarray, bool]:
    """The marker's centre in a view, in voxels (row, column), and whether it is shown."""
    m = browser.execute_script(
        f"const m = document.querySelector('#view-{view} .marker'); const r = m.getBoundingClientRect(); return {{x: r.left + r.width / 2, y: r.top + r.height / 2, shown: getComputedStyle(m).display !== 'none'}};"
    )
    r, scale = _stage(browser, view), browser.execute_script("return window.plasticineViewer.state.scale")
    return np.array([(m["y"] - r["top"]) / scale - 0.5, (m["x"] - r["left"]) / scale - 0.5]), m["shown"]


def test_page_loads_without_errors_or_requests(browser, tmp_path):
    x, y, d, labels = _case(SHAPE_2D)
    page = write_viewer(tmp_path / "page.html", x, y, d, source_labels=labels)
    _open(browser, page)
    for box in ("toggle-grid", "toggle-jacobian", "toggle-labels"):
        browser.find_element("id", box).click()
    _fire(browser, "source", "mousemove", _client_of(browser, "source", (30.0, 20.0))[0])
    _fire(browser, "source", "click", _client_of(browser, "source", (36.0, 30.0))[0])
    console = browser.get_log("browser")
    requests = []
    for entry in browser.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] in ("Network.requestWillBeSent", "Network.loadingFailed"):
            requests.append((message["method"], message["params"].get("request", {}).get("url", message["params"].get("errorText"))))
    page_url = page.resolve().as_uri()
    assert ("Network.requestWillBeSent", page_url) in requests  # the log sees requests: the page's own is the one made
    assert [r for r in requests if not (r[0] == "Network.requestWillBeSent" and (r[1] == page_url or r[1].startswith("data:")))] == []
    assert [e for e in console if e["level"] in ("SEVERE", "WARNING")] == []
    assert browser.execute_script("return window.plasticineViewer.state.grid && window.plasticineViewer.state.jacobian")


@pytest.mark.parametrize("view", ["source", "translation"])
def test_pointer_move_puts_the_marker_at_the_traced_point(browser, tmp_path, view):
    x, y, d, _ = _case(SHAPE_2D, seed=1)
    _open(browser, write_viewer(tmp_path / "page.html", x, y, d))
    other = "translation" if view == "source" else "source"
    scale = browser.execute_script("return window.plasticineViewer.state.scale")
    for yx in [(35.3, 29.6), (10.0, 50.2), (60.7, 8.4), (0.0, 0.0), (71.0, 59.0)]:
        client, p = _client_of(browser, view, yx)
        _fire(browser, view, "mousemove", client)
        pt = torch.tensor(p, dtype=torch.float64)[None, None]
        expected = (d.points_to_target(pt) if view == "source" else d.points_to_source(pt))[0, 0].numpy()
        state = browser.execute_script("return window.plasticineViewer.state.marker")
        assert state["from"] == view and state["to"] == other
        np.testing.assert_allclose(state["point"], p, atol=1e-9)
        np.testing.assert_allclose(state["mapped"], expected, atol=1e-4)  # float32 fields
        at, shown = _marker(browser, other)
        assert shown == bool(np.all((expected >= -0.5) & (expected <= np.array(SHAPE_2D) - 0.5)))
        assert np.abs(at - expected).max() * scale <= 1.0, (yx, at, expected)  # within one screen pixel


def test_a_real_pointer_move_tracks_too(browser, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains

    x, y, d, _ = _case(SHAPE_2D, seed=2)
    _open(browser, write_viewer(tmp_path / "page.html", x, y, d))
    stage = browser.find_element("css selector", "#view-source .stage")
    r, scale = _stage(browser, "source"), browser.execute_script("return window.plasticineViewer.state.scale")
    ActionChains(browser).move_to_element_with_offset(stage, 17, -23).perform()  # offset from the element's centre
    state = browser.execute_script("return window.plasticineViewer.state.marker")
    p = np.array(state["point"])
    centre = np.array([r["height"], r["width"]]) / 2 / scale - 0.5
    assert np.abs(p - (centre + np.array([-23, 17]) / scale)).max() <= 1.0 / scale  # the pointer landed where asked
    expected = d.points_to_target(torch.tensor(p)[None, None])[0, 0].numpy()
    at, shown = _marker(browser, "translation")
    assert shown and np.abs(at - expected).max() * scale <= 1.0


def test_region_click_highlights_the_traced_region(browser, tmp_path):
    x, y, d, labels = _case(SHAPE_2D, seed=3)
    _open(browser, write_viewer(tmp_path / "page.html", x, y, d, source_labels=labels))
    traced = d.labels_to_target(labels[None], 3)[0, 0]
    yellow = "const c = document.querySelector('#view-' + arguments[0] + ' canvas.overlay'); const a = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; let n = 0; for (let i = 0; i < a.length; i += 4) if (a[i] === 255 && a[i + 1] === 255 && a[i + 2] === 0 && a[i + 3] > 0) n++; return n;"
    clicks = [("source", tuple(v.item() for v in torch.nonzero(labels[0] == 2)[0])), ("translation", tuple(v.item() for v in torch.nonzero(traced == 1)[-1]))]
    for view, voxel in clicks:
        _fire(browser, view, "click", _client_of(browser, view, voxel)[0])
        label = int((labels[0] if view == "source" else traced)[voxel])
        h = browser.execute_script("return window.plasticineViewer.state.highlight")
        assert h["label"] == label and h["from"] == view
        assert h["translation"] == int((traced == label).sum()) and h["source"] == int((labels == label).sum())
        assert browser.execute_script(yellow, "translation") == int((traced == label).sum())  # drawn, voxel for voxel
        assert browser.execute_script(yellow, "source") == int((labels == label).sum())


def test_volume_slices_follow_the_pointer(browser, tmp_path):
    x, y, d, labels = _case(SHAPE_3D, seed=4)
    _open(browser, write_viewer(tmp_path / "page.html", x, y, d, source_labels=labels))
    browser.execute_script("window.plasticineViewer.setSlice('source', 6)")
    assert browser.execute_script("return document.querySelector('#view-source .slice input').max") == str(SHAPE_3D[0] - 1)
    client, yx = _client_of(browser, "source", (17.2, 14.7))
    _fire(browser, "source", "mousemove", client)
    expected = d.points_to_target(torch.tensor([6.0, *yx], dtype=torch.float64)[None, None])[0, 0].numpy()
    state = browser.execute_script("return window.plasticineViewer.state")
    np.testing.assert_allclose(state["marker"]["mapped"], expected, atol=1e-4)
    assert state["slice"]["translation"] == int(np.clip(np.round(expected[0]), 0, SHAPE_3D[0] - 1))
    at, shown = _marker(browser, "translation")
    assert shown and np.abs(at - expected[1:]).max() * state["scale"] <= 1.0
    _fire(browser, "source", "click", client)
    label = int(labels[0][6, round(yx[0]), round(yx[1])])
    traced = d.labels_to_target(labels[None], 3)[0, 0]
    assert browser.execute_script("return window.plasticineViewer.state.highlight.translation") == int((traced == label).sum())


def test_slice_sliders_show_their_slice(browser, tmp_path):
    x, y, d, labels = _case(SHAPE_3D, seed=6)
    page = write_viewer(tmp_path / "page.html", x, y, d, source_labels=labels)
    data = _embedded(page)
    _open(browser, page)
    for view, z in (("source", 3), ("translation", 8)):
        browser.execute_script(
            f"const s = document.querySelector('#view-{view} .slice input'); s.value = arguments[0]; s.dispatchEvent(new Event('input'));", z
        )
        state = browser.execute_script("return window.plasticineViewer.state.slice")
        assert state[view] == z
        assert browser.execute_script(f"return document.querySelector('#view-{view} img.base').src") == data["images"][view][z]
    png = base64.b64decode(data["images"]["source"][3].split(",", 1)[1])
    a = x[0, 3].numpy()
    lo, hi = float(x.min()), float(x.max())  # the volume is scaled as a whole, not per slice
    assert png == png_bytes(np.round((a - lo) / (hi - lo) * 255.0).astype(np.uint8))


def test_view_help_lists_its_options(capsys):
    with pytest.raises(SystemExit) as info:
        main(["view", "--help"])
    assert info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "--output" in out and "--labels" in out and "--source" in out and "--threads" in out


def test_screenshot_is_written(browser, tmp_path):
    x, y, d, labels = _case(SHAPE_2D)
    _open(browser, write_viewer(tmp_path / "page.html", x, y, d, source_labels=labels))
    browser.find_element("id", "toggle-grid").click()
    _fire(browser, "source", "mousemove", _client_of(browser, "source", (30.0, 30.0))[0])
    shot = tmp_path / "viewer.png"
    assert browser.save_screenshot(str(shot))
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    Image = pytest.importorskip("PIL.Image")
    with Image.open(shot) as im:
        grey = np.asarray(im.convert("L"), dtype=np.float64)
    assert grey.std() > 10.0  # images drawn, not a blank page


# -- the command -------------------------------------------------------------------------------------


def test_view_command_reads_a_translate_result(tmp_path, capsys):
    x, y, d, labels = _case(SHAPE_2D, seed=5)
    write_image(tmp_path / "in" / "case.png", x.float())
    out = tmp_path / "out"
    write_image(out / "case_translated.png", y.float())
    write_deformation(out / "case_deformation.npz", d.to(torch.float32))
    write_image(tmp_path / "labels.png", labels.float() / 255.0)
    trace = write_trace(out / "case_trace.json", torch.empty(0, 2), torch.empty(0, 2), input=str(tmp_path / "in" / "case.png"), slice=None, axis=None, translated="case_translated.png", deformation="case_deformation.npz", normalization="minmax")
    page = tmp_path / "page.html"
    assert main(["view", str(trace), "--output", str(page), "--labels", str(tmp_path / "labels.png")]) == 0
    data = _embedded(page)
    np.testing.assert_array_equal(_decode(data["inverse"], "<f4", (2, *SHAPE_2D)), d.inverse[0].float().numpy())
    traced = d.to(torch.float32).labels_to_target(labels[None], 3)[0, 0].numpy()
    np.testing.assert_array_equal(_decode(data["labels"]["translation"], "<i4", SHAPE_2D), traced)
    assert main(["view", str(trace), "--output", str(tmp_path / "p.txt")]) == 1
    assert "--output" in capsys.readouterr().err
    assert main(["view", str(out / "case_translated.png"), "--output", str(page)]) == 1
    assert "cannot read the trace file" in capsys.readouterr().err


def test_view_reads_what_translate_wrote(tmp_path, capsys):
    """Train two steps, translate, view: the page holds the written deformation and the input as translate read it."""
    from plasticine.io import ImageFolder, read_deformation, read_image

    g = torch.Generator().manual_seed(0)
    for i in range(2):
        x = torch.rand(1, 16, 12, generator=g)
        write_image(tmp_path / "src" / f"a{i}.png", x)
        write_image(tmp_path / "tgt" / f"b{i}.png", 1.0 - x)
    model, out = tmp_path / "model.pt", tmp_path / "out"
    common = ["--threads", "1"]
    assert main([*common, "train", "--source", str(tmp_path / "src"), "--target", str(tmp_path / "tgt"), "--output", str(model), "--diffusion-steps", "1", "--registration-steps", "1", "--batch-size", "2", "--sampler-steps", "2", "--quiet"]) == 0
    assert main([*common, "translate", "--model", str(model), "--input", str(tmp_path / "src" / "a1.png"), "--output", str(out), "--start-step", "20"]) == 0
    page = tmp_path / "view.html"
    assert main([*common, "view", str(out / "a1_trace.json"), "--output", str(page)]) == 0
    assert f"-> {page}" in capsys.readouterr().out
    data = _embedded(page)
    d = read_deformation(out / "a1_deformation.npz")
    np.testing.assert_array_equal(_decode(data["forward"], "<f4", (2, 16, 12)), d.forward[0].numpy())
    source = ImageFolder(tmp_path / "src" / "a1.png")[0]  # percentile, translate's default
    source_png = base64.b64decode(data["images"]["source"][0].split(",", 1)[1])
    a = source[0].double().numpy()
    expected = np.round((a - a.min()) / (a.max() - a.min()) * 255.0).astype(np.uint8)
    assert source_png == png_bytes(expected)
    assert read_image(out / "a1_translated.png", normalization="none").shape == (1, 16, 12)
