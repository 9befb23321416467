"""The interactive editing page (`varedit_jax.demo`) over the session's trained run, driven in a real headless
Chromium (Debian's chromium + chromium-driver; tests/run.sh installs them) that can reach 127.0.0.1 only: upload,
edit, multi-turn history and stepping back, bad input as messages, nothing fetched from outside; and Gradio's queue
batching two concurrent requests into one `Editor.edit` call."""
import json
import shutil
import socket
import time

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("gradio", reason="the demo needs the demo extra")
webdriver = pytest.importorskip("selenium.webdriver", reason="browser tests need selenium (test extra)")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from varedit_jax import demo, editor  # noqa: E402

SIZE = (40, 56)  # (H, W) of the uploaded image: the edit comes back at this size (official preprocessing)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _toy_image(path, color=(200, 30, 30)):
    img = np.full(SIZE + (3,), 255, np.uint8)
    img[10:30, 15:40] = color
    Image.fromarray(img).save(path)
    return path


@pytest.fixture(scope="module")
def server(trained_run):
    """(url, calls): the page over the trained run on a free loopback port; calls lists the batch size of every
    `Editor.edit` call (the first one waits 3 s, so that requests sent meanwhile queue up)."""
    ed = editor.Editor.from_checkpoint(trained_run[0])
    calls, edit = [], ed.edit

    def spy(inputs, instructions, *args, **kwargs):
        calls.append(len(instructions))
        if len(calls) == 1:
            time.sleep(3)
        return edit(inputs, instructions, *args, **kwargs)
    ed.edit = spy
    port = _free_port()
    page = demo.serve(ed, "127.0.0.1", port, block=False)
    yield f"http://127.0.0.1:{port}", calls
    page.close()


def test_concurrent_requests_are_batched_into_one_sampler_call(server, tmp_path):
    from gradio_client import Client, handle_file
    url, calls = server
    client = Client(url, verbose=False)
    image = handle_file(str(_toy_image(tmp_path / "in.png")))
    args = lambda text, seed: (image, text, 256, 4.0, 0.5, seed)  # noqa: E731
    first = client.submit(*args("make the square blue", 0), api_name="/edit_batch")
    time.sleep(1.0)  # the first request is being edited (its call waits 3 s) ...
    jobs = [client.submit(*args(text, seed), api_name="/edit_batch")  # ... while these two queue up
            for text, seed in (("make the square green", 1), ("make the square blue", 2))]
    results = [job.result(timeout=240) for job in [first] + jobs]
    assert calls[:2] == [1, 2]  # the two concurrent requests: one call with both
    for path, message in results:
        assert "Edited in" in message and np.asarray(Image.open(path)).shape == SIZE + (3,)
    bad = client.predict(image, "   ", 256, 4.0, 0.5, 0, api_name="/edit_batch")
    assert bad[0] is None and bad[1] == demo.NO_INSTRUCTION and calls[2:] == []  # refused before the sampler


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("Debian's chromium / chromium-driver are not installed (tests/run.sh installs them)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1280,1600",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium')}",
                 "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    chrome = webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver), options=options)
    chrome.set_page_load_timeout(60)
    yield chrome
    chrome.quit()


def _text(chrome, elem_id: str) -> str:
    return chrome.find_element(By.ID, elem_id).text


def _wait_for(chrome, what, timeout=120):
    return WebDriverWait(chrome, timeout, poll_frequency=0.2).until(lambda c: what(c))


def _edit(chrome, instruction: str, done=None) -> str:
    """Types the instruction, presses Edit and returns the message once it changed (or once `done(chrome)`)."""
    box = chrome.find_element(By.CSS_SELECTOR, "#instruction textarea")
    box.send_keys(Keys.CONTROL, "a")  # typed, not `clear()`: the page sees every change
    box.send_keys(Keys.BACKSPACE, instruction)
    before = _text(chrome, "message")
    chrome.find_element(By.ID, "edit").click()
    _wait_for(chrome, done or (lambda c: _text(c, "message") not in ("", before)))
    return _text(chrome, "message")


def _image_size(chrome, elem_id: str):
    return chrome.execute_script(
        "const im = document.querySelector(arguments[0] + ' img');"
        "return im && im.complete && im.naturalWidth ? [im.naturalHeight, im.naturalWidth] : null;", f"#{elem_id}")


def _history_len(chrome) -> int:
    return len(chrome.find_elements(By.CSS_SELECTOR, "#history .caption-label"))  # one caption per turn


def test_the_page_edits_in_a_browser_with_history_and_messages(server, browser, tmp_path):
    url, calls = server
    chrome = browser
    chrome.get(url)
    _wait_for(chrome, lambda c: c.find_elements(By.ID, "edit"), timeout=60)
    assert _edit(chrome, "make the square blue") == demo.NO_IMAGE  # nothing uploaded yet
    garbage = tmp_path / "broken.png"
    garbage.write_bytes(b"this is not an image")
    upload = lambda path: chrome.find_element(By.CSS_SELECTOR, "#upload input[type=file]").send_keys(str(path))  # noqa
    upload(garbage)
    assert _wait_for(chrome, lambda c: "Not an image" in _text(c, "message"))
    chrome.find_element(By.CSS_SELECTOR, "#upload button[aria-label='Clear']").click()
    upload(_toy_image(tmp_path / "square.png"))
    assert _wait_for(chrome, lambda c: _image_size(c, "current")) == list(SIZE)
    assert _edit(chrome, "") == demo.NO_INSTRUCTION
    n_calls = len(calls)
    assert _edit(chrome, "make the square blue", lambda c: _history_len(c) == 2).startswith("Edited in")
    assert _wait_for(chrome, lambda c: _image_size(c, "edited")) == list(SIZE)
    # turn 2 edits turn 1's output
    assert _edit(chrome, "make the square green", lambda c: _history_len(c) == 3).startswith("Edited in")
    assert len(calls) == n_calls + 2
    chrome.find_element(By.ID, "back").click()  # step back: turn 1 is the current image again
    assert _wait_for(chrome, lambda c: _history_len(c) == 2)
    chrome.find_elements(By.CSS_SELECTOR, "#history button.thumbnail-item")[0].click()  # back to the source
    assert _wait_for(chrome, lambda c: _history_len(c) == 1)
    # nothing but the server was asked for (fonts, scripts, analytics: all from 127.0.0.1 or nowhere)
    events = [json.loads(entry["message"])["message"] for entry in chrome.get_log("performance")]
    asked = {e["params"]["request"]["url"] for e in events if e["method"] == "Network.requestWillBeSent"}
    web = {u.split("/")[2] for u in asked if u.startswith(("http:", "https:", "ws:", "wss:"))}
    assert web == {url.split("/")[2]}  # (the browser's own chrome:// pages and data: / blob: URLs aside)


def test_cli_refuses_a_missing_checkpoint(tmp_path, capsys):
    assert demo.main(["--checkpoint", str(tmp_path / "missing")]) == 2
    assert "no transformer weights or checkpoint" in capsys.readouterr().err
