"""The web chat: the page, multipart uploads, size limits, loopback binding, and an end-to-end
run in headless Chromium (upload a real easy-VQA image, ask, read the answer, screenshot)."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mllm_missing.chat import ChatLimits, ChatSession, ClassifierAnswerer
from mllm_missing.chat.web import make_server, parse_multipart

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


def multipart(fields: dict[str, str | tuple[str, bytes]]) -> tuple[str, bytes]:
    boundary = "xXchatboundaryXx"
    body = b""
    for name, value in fields.items():
        if isinstance(value, tuple):
            head = f'name="{name}"; filename="{value[0]}"\r\nContent-Type: application/octet-stream'
            data = value[1]
        else:
            head, data = f'name="{name}"', value.encode()
        body += f"--{boundary}\r\nContent-Disposition: form-data; {head}\r\n\r\n".encode()
        body += data + b"\r\n"
    return f"multipart/form-data; boundary={boundary}", body + f"--{boundary}--\r\n".encode()


@pytest.fixture
def server(session: ChatSession) -> Iterator[str]:
    """The chat served on a free loopback port in a thread; yields its URL."""
    httpd = make_server(session, port=0)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    host, port = httpd.server_address[:2]
    yield f"http://{host!s}:{port}"
    httpd.shutdown()
    httpd.server_close()


def post(url: str, fields: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    content_type, body = multipart(fields)
    request = urllib.request.Request(
        url + "/ask", data=body, headers={"Content-Type": content_type}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_parse_multipart_keeps_files_as_bytes_and_drops_empty_ones() -> None:
    content_type, body = multipart(
        {"text": "what shape?", "image": ("a.png", b"\x89PNG\r\n--x"), "audio": ("", b"")}
    )
    fields = parse_multipart(content_type, body)
    assert fields == {"text": "what shape?", "image": b"\x89PNG\r\n--x"}
    with pytest.raises(ValueError, match="multipart/form-data"):
        parse_multipart("application/json", b"{}")


def test_page_and_ask_over_http(server: str, files: dict[str, Path]) -> None:
    with urllib.request.urlopen(server + "/", timeout=30) as response:
        page = response.read().decode()
    assert 'type="file" id="image"' in page and "Files up to 10 MB" in page
    status, turn = post(
        server, {"text": "what shape", "image": ("s.png", files["png"].read_bytes())}
    )
    assert status == 200 and turn["used"] == ["image", "text"] and turn["missing"] == []
    assert turn["modules"] == "zero+concat" and turn["scheduler"] == "fixed" and turn["answer"]
    status, turn = post(server, {"text": "what shape", "image": ("", b"")})
    assert turn["missing"] == ["image"] and turn["status"].startswith("used: text; missing: image")
    # bad inputs come back as a turn with an error, and the server goes on
    status, turn = post(server, {"text": "", "image": ("", b"")})
    assert status == 200 and turn["error"].startswith("nothing to answer")
    _, turn = post(server, {"text": "q", "image": ("x.png", b"not a picture")})
    assert turn["error"] == "the uploaded image: not an image (no image format Pillow reads)"
    _, turn = post(server, {"text": "q", "audio": ("x.wav", files["txt"].read_bytes())})
    assert turn["error"].startswith("the uploaded audio: not a readable audio file")
    _, turn = post(server, {"text": "what shape"})
    assert turn["answer"]


def test_huge_upload_is_refused_before_it_is_read(tiny_model: Any) -> None:
    session = ChatSession(ClassifierAnswerer(tiny_model), limits=ChatLimits(max_file_bytes=1000))
    httpd = make_server(session, port=0)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    host, port = httpd.server_address[:2]
    try:
        url = f"http://{host!s}:{port}"
        status, body = post(url, {"image": ("big.png", bytes(3 * 1024 * 1024))})
        assert status == 413 and "the upload is too large (3.0 MB" in body["error"]
        _, turn = post(url, {"text": "q", "image": ("big.png", bytes(1500))})
        assert (
            turn["error"]
            == "the uploaded image is too large (1,500 bytes; the limit is 1,000 bytes)"
        )
        status, _ = post(url, {"text": "what"})
        assert status == 200
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_binds_to_loopback_by_default(session: ChatSession) -> None:
    httpd = make_server(session, port=0)
    try:
        assert httpd.server_address[0] == "127.0.0.1"
    finally:
        httpd.server_close()


def easy_vqa_image() -> Path:
    easy_vqa = pytest.importorskip("easy_vqa")
    return Path(easy_vqa.get_test_image_paths()[6])  # a circle (test question 61)


def test_end_to_end_in_headless_chromium(server: str, tmp_path: Path) -> None:
    if not CHROMIUM.exists():
        pytest.skip("Debian chromium is not installed (scripts/install.sh dev installs it)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    image = easy_vqa_image()
    shot = tmp_path / "chat.png"
    with sync_api.sync_playwright() as playwright:
        # a fresh profile; playwright takes it as user_data_dir, not as --user-data-dir
        browser = playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"),
            executable_path=str(CHROMIUM),
            args=CHROMIUM_ARGS,
            headless=True,
            viewport={"width": 900, "height": 700},
        )
        try:
            page = browser.new_page()
            page.goto(server + "/")
            page.set_input_files("#image", str(image))
            page.fill("#text", "What shape is in the image?")
            page.click("#send")
            page.wait_for_selector(".turn[data-done='1'] .answer", timeout=60_000)
            answer = page.inner_text(".turn .answer")
            status = page.inner_text(".turn")
            # the same question with no image
            page.set_input_files("#image", [])
            page.click("#send")
            page.wait_for_function("document.querySelectorAll('.turn').length == 2")
            latest = page.inner_text(".turn")
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert answer.split(" (")[0] in ("circle", "square", "triangle")
    assert "used: image, text" in status and "missing: \u2014" in status
    assert "modules: zero+concat (scheduler: fixed)" in status
    assert "used: text" in latest and "missing: image" in latest
    assert shot.stat().st_size > 10_000
    from PIL import Image

    with Image.open(shot) as picture:
        assert picture.size[0] == 900 and picture.size[1] >= 700
