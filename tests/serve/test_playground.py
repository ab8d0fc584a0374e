"""The playground page (GET /) in a real browser: headless Chromium from the system's packages, driven by Selenium
through the system's chromedriver (no browser is downloaded), against a real qva-serve process with --api-key.

Chromium's fake media devices stand in for a microphone (`--use-file-for-fake-audio-capture=clip.wav`, accepted
without a prompt): the page records it, resamples it to 16 kHz and sends it as an `input_audio` WAV beside an
uploaded PNG. The server's /metrics confirm that one chat request with one image and one audio part arrived; the
streamed answer must appear in the page, and the page must log nothing at warning level or above. A screenshot is
written to the test's temp folder (and to $QVA_PLAYGROUND_SCREENSHOT when set: docs/playground.png comes from it)."""

from __future__ import annotations

import os
import shutil
import time

import pytest
from conftest import ServeProcess, http, speechlike
from serve_helpers import metric, png, wav_bytes

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="needs Debian's chromium and chromium-driver packages "
                                "(apt-get install chromium chromium-driver); no browser is downloaded")
webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (the test extra)")
KEY = "sk-page"
NAME = "tiny"


@pytest.fixture(scope="module")
def server(demo_dirs):
    qwen, whisper = demo_dirs
    srv = ServeProcess("--model", str(qwen), "--whisper", str(whisper), "--dtype", "fp32", "--api-key", KEY, "--served-model-name", NAME)
    yield srv
    srv.stop()


@pytest.fixture
def browser(tmp_path):
    from selenium.webdriver.chrome.service import Service

    clip = tmp_path / "microphone.wav"
    clip.write_bytes(wav_bytes(speechlike(2.0, 3).numpy(), subtype="PCM_16"))
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--use-fake-ui-for-media-stream",
                 "--use-fake-device-for-media-stream", f"--use-file-for-fake-audio-capture={clip}", "--window-size=1100,760"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


def wait_for(condition, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while not (value := condition()):
        assert time.monotonic() < deadline, what
        time.sleep(0.05)
    return value


def test_the_page_is_served_without_the_key(server):
    status, body = http(server.base + "/")
    page = body.decode()
    assert status == 200 and "<title>qva playground</title>" in page and f'"model": "{NAME}"' in page and '"keyRequired": true' in page
    assert "http://" not in page.split("<script>")[1] and "https://" not in page  # nothing is fetched from elsewhere
    assert http(server.base + "/v1/models")[0] == 401  # the API itself still needs the key


def test_image_and_microphone_reach_the_server_and_the_answer_streams_in(server, browser, tmp_path):
    from selenium.webdriver.common.by import By

    picture = tmp_path / "picture.png"
    picture.write_bytes(png(4, size=(160, 120)))
    before = {k: metric(server, k) for k in ('qva_media_parts_total{kind="image"}', 'qva_media_parts_total{kind="audio"}',
                                             'qva_requests_total{status="200"}', "qva_prompt_tokens_total")}
    browser.get(server.base + "/")
    find = lambda css: browser.find_element(By.CSS_SELECTOR, css)
    assert find("#model").text == NAME
    find("#key").send_keys(KEY)
    find("#image-input").send_keys(str(picture))
    wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, '.chip[data-kind="image"]'), 10, "the image was not attached")
    find("#mic").click()
    wait_for(lambda: find("#status").text.startswith("recording"), 10, "recording did not start: " + find("#status").text)
    time.sleep(1.5)
    find("#mic").click()
    chip = wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, '.chip[data-kind="audio"]'), 10, "the recording was not attached")
    assert "recording (1." in chip[0].text or "recording (2." in chip[0].text, chip[0].text
    for field, value in (("#max-tokens", "24"), ("#temperature", "0")):
        find(field).clear()
        find(field).send_keys(value)
    find("#text").send_keys("What do you see and hear?")
    find("#send").click()
    answer = wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-state]"), 120, "no answer")[0]
    assert answer.get_attribute("data-state") == "done", answer.text
    text = answer.find_element(By.CSS_SELECTOR, ".text").text
    assert len(text) >= 12, text  # 24 tokens of the demo's byte-level vocabulary, streamed into the page
    shot = tmp_path / "playground.png"
    browser.save_screenshot(str(shot))
    if os.environ.get("QVA_PLAYGROUND_SCREENSHOT"):
        shutil.copy(shot, os.environ["QVA_PLAYGROUND_SCREENSHOT"])
    after = {k: metric(server, k) for k in before}
    assert after['qva_media_parts_total{kind="image"}'] - before['qva_media_parts_total{kind="image"}'] == 1
    assert after['qva_media_parts_total{kind="audio"}'] - before['qva_media_parts_total{kind="audio"}'] == 1
    assert after['qva_requests_total{status="200"}'] - before['qva_requests_total{status="200"}'] == 1
    assert after["qva_prompt_tokens_total"] - before["qva_prompt_tokens_total"] > 50  # over a second of audio at 50 tokens/s
    problems = [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]
    assert not problems, problems
    assert shot.stat().st_size > 10_000
