"""End-to-end browser test of the web demo: headless Debian Chromium (Playwright) against ``src/demo.py``.

Starts the demo on the bundled model (``asset/medreg-mini-model``) on a free local port, then in the page: uploads a
bundled brain MRI slice, asks Text-to-Region for the left frontal lobe, and checks that an annotated image comes back
with a box drawn in the first region colour, that the box list is filled, and that the chat bubble shows the region as
a marker in that colour with its number and name (no raw ``<ref>``/``<box>`` markup) while the raw answer opens with
one click. Then a fake PNG (text bytes) must give an error in the page while the server keeps answering, and a gallery
example (Chinese Region-to-Text with a typed box) loads: the whole page turns Chinese (task names, labels, buttons,
status) and the answer's query box is labelled with a parsed name. CI setup: ``scripts/ci_setup_browser.sh``.
"""
from __future__ import annotations

import base64
import io
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = Path(os.environ.get("MEDREGA_CHROMIUM", "/usr/bin/chromium"))
MODEL = REPO / "asset" / "medreg-mini-model"
EXAMPLE = REPO / "asset" / "examples" / "brain_mri_axial_096.jpg"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run"]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.is_file(), reason=f"Chromium not installed at {CHROMIUM} "
                                                      "(apt-get install -y chromium; see scripts/ci_setup_browser.sh)"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def demo_url(tmp_path_factory: pytest.TempPathFactory):
    """The demo served by a subprocess (bundled model, CPU); yields its URL and stops it afterwards."""
    assert MODEL.is_dir(), f"{MODEL}: bundled model missing"
    port = _free_port()
    log = tmp_path_factory.mktemp("demo") / "server.log"
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    with log.open("w") as fh:
        proc = subprocess.Popen([sys.executable, str(REPO / "src" / "demo.py"), "--port", str(port),
                                 "--max-new-tokens", "64"], cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 300
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"demo exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                pytest.fail(f"demo did not start within 300 s:\n{log.read_text()[-3000:]}")
            time.sleep(2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def _status(page) -> str:
    return page.inner_text("#status")


def test_upload_ask_text_to_region_and_get_boxes(demo_url: str, tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    from internvl.demo.drawing import PALETTE

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS)
        try:
            page = browser.new_page()
            page.goto(demo_url)
            page.wait_for_selector("#upload input[type=file]", state="attached", timeout=120_000)
            page.set_input_files("#upload input[type=file]", str(EXAMPLE))
            page.wait_for_function("document.querySelector('#status').innerText.includes('Loaded')", timeout=120_000)
            page.get_by_role("radio", name="Text-to-Region").check()
            page.fill("#objects textarea", "left frontal lobe")
            page.click("#ask")
            page.wait_for_function("document.querySelector('#status').innerText.includes('Answered') || "
                                   "document.querySelector('#status').innerText.includes('Error')", timeout=240_000)
            status = _status(page)
            assert "Answered" in status, status
            n_boxes = int(status.split(";")[1].split("box")[0])
            assert n_boxes >= 1, status
            page.wait_for_selector("#annotated img", timeout=30_000)
            src = page.get_attribute("#annotated img", "src")
            if src.startswith("data:"):
                data = base64.b64decode(src.split(",", 1)[1])
            else:
                data = page.request.get(src).body()
            assert data, f"annotated image {src[:80]!r} could not be fetched"
            annotated = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)
            # the first region's outline colour appears in the answer image (the input slice is greyscale)
            hits = (np.abs(annotated - np.array(PALETTE[0])).sum(axis=2) <= 30).sum()
            assert hits > 50, f"no box outline in the annotated image ({hits} pixels of the box colour)"
            assert "left frontal lobe" in page.inner_text("#boxes")
            _check_bubble(page, PALETTE[0])

            # bad input: a "PNG" that is text; the page reports it and the server keeps serving
            fake = tmp_path / "not_an_image.png"
            fake.write_bytes(b"definitely not a PNG file\n" * 20)
            page.set_input_files("#upload input[type=file]", str(fake))
            page.wait_for_function("document.querySelector('#status').innerText.includes('not_an_image.png')",
                                   timeout=60_000)
            assert _status(page).startswith("Error:")
            notes = tmp_path / "notes.txt"
            notes.write_text("a text file, not an image\n")
            page.set_input_files("#upload input[type=file]", str(notes))
            page.wait_for_function("document.querySelector('#status').innerText.includes('notes.txt')",
                                   timeout=60_000)
            assert "unsupported file type" in _status(page)
            page.fill("#objects textarea", "")
            page.click("#ask")  # the earlier image is still loaded: empty object list -> a message, no crash
            page.wait_for_function("document.querySelector('#status').innerText.includes('needs the name')",
                                   timeout=60_000)

            # the gallery: the second bundled example is a Chinese Region-to-Text question with a typed box
            page.locator("#gallery img").nth(1).click()
            page.wait_for_function("document.querySelector('#status').innerText.includes('Example loaded')",
                                   timeout=60_000)
            assert "脑MRI冠状面" in _status(page), _status(page)
            assert page.input_value("#box textarea") == "618, 502, 905, 773"
            _check_chinese_page(page)
            page.click("#ask")
            page.wait_for_function("document.querySelector('#status').innerText.includes('用时')", timeout=240_000)
            assert _status(page).startswith("完成："), _status(page)
            boxes = page.inner_text("#boxes")  # the query box first, labelled with a parsed name, not the raw answer
            assert "<ref>" not in boxes and "[[" not in boxes.split('"box"')[0], boxes
        finally:
            browser.close()


def _check_bubble(page, colour: tuple[int, int, int]) -> None:
    """The last answer bubble: region 1 as a marker in the box colour plus the name; raw answer behind a click."""
    bubble = page.locator("#chat [data-testid=bot]").last
    marker = bubble.locator(".region-marker").first
    assert marker.inner_text().strip() == "1"
    assert marker.evaluate("e => getComputedStyle(e).backgroundColor") == "rgb({}, {}, {})".format(*colour)
    shown = bubble.locator(".answer").inner_text()
    assert "left frontal lobe" in shown and "<ref>" not in shown and "[[" not in shown, shown
    raw = bubble.locator("details.raw-answer")
    assert not raw.locator("code").is_visible()  # collapsed until clicked
    raw.locator("summary").click()
    code = raw.locator("code")
    assert code.is_visible() and "<ref>left frontal lobe</ref><box>[[" in code.inner_text(), code.inner_text()


def _check_chinese_page(page) -> None:
    """After a Chinese example is picked the language radio is 中文 and every label, task name and button follows."""
    page.wait_for_function("document.querySelector('#ask').innerText.trim() === '提问'", timeout=30_000)
    for elem_id, label in (("task", "任务"), ("question", "问题"), ("objects", "要定位的目标"), ("options", "候选诊断"),
                           ("box", "框 x1, y1, x2, y2")):
        assert label in page.inner_text(f"#{elem_id}"), (elem_id, page.inner_text(f"#{elem_id}"))
    for name in ("视觉问答", "报告生成", "区域识别", "目标定位"):
        assert page.get_by_role("radio", name=name).count() == 1, name
    assert page.inner_text("#clear").strip() == "清空对话"
    assert "上传一张医学图像" in page.inner_text("#intro")
