"""kiln serve's chat page (GET /, runtime/web/chat.html) in a real headless Chromium driven by
selenium, against the real server on SmolLM2: the streamed answer equals the server's own
non-streamed greedy answer, and the stop button aborts a long answer and frees its batch row.
Needs Debian's chromium and chromium-driver; without them the test fails, telling how to install."""
import json
import os
import re
import shutil
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import REPO

KEY = "page-key"
QUESTION = "What is the capital of France?"


def _request(url, body=None, key=None, timeout=60):
    req = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(),
                                 method="GET" if body is None else "POST")
    if body is not None:
        req.add_header("Content-Type", "application/json")
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.status, r.headers.get("content-type", ""), r.read().decode()


def _until(check, timeout, what):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = check()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture(scope="module")
def server(smollm2_artifact):
    import uvicorn

    from kiln.runtime.server import build
    artifact = smollm2_artifact
    # one batch row: a stopped answer that kept its row would block every later request
    app, service = build(artifact, max_batch=1, max_queue=4, api_key=KEY, threads=2)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    t = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    t.start()
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"

    def up():
        try:
            return _request(base + "/health")[0] == 200
        except OSError:
            return False
    _until(up, 30, "the server to start")
    yield base
    srv.should_exit = True
    t.join(10)
    service.scheduler.stop(10)
    sock.close()


@pytest.fixture(scope="module")
def browser():
    chromium = next(filter(None, map(shutil.which, ("chromium", "chromium-browser"))), None)
    driver_path = shutil.which("chromedriver")
    if chromium is None or driver_path is None:
        pytest.fail("the chat page test needs Chromium and its driver: "
                    "apt-get install -y chromium chromium-driver (as root or with sudo)", pytrace=False)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,720"):
        options.add_argument(arg)
    with pytest.MonkeyPatch.context() as mp:
        # selenium's driver manager must not look for drivers or send statistics over the network
        mp.setenv("SE_OFFLINE", "true")
        mp.setenv("SE_AVOID_STATS", "true")
        driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _screenshot_path() -> Path:
    folder = Path(os.environ.get("KILN_TEST_ARTIFACTS") or REPO / "tests" / "artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    return folder / "chat_page.png"


def _set(driver, field, value):
    el = driver.find_element("id", field)
    el.clear()
    if value != "":
        el.send_keys(str(value))


def _state(driver):
    return driver.execute_script("return document.body.dataset.state")


def _open(driver, base, settings):
    """Loads the page, gives it the API key it asks for, and fills the sampling settings."""
    driver.get(base + "/")
    _until(lambda: driver.find_element("id", "key-note").is_displayed(), 10, "the page to ask for the API key")
    _set(driver, "api_key", KEY)
    for field, value in settings.items():
        _set(driver, field, value)
    _until(lambda: driver.find_element("id", "model").text == "smollm2", 10, "the model name")


def _messages(driver):
    """Every bubble of the conversation as (class, text, note), for asserts that show the page."""
    return driver.execute_script("""
        return [...document.querySelectorAll('#log .msg')].map((m) => [m.className,
            m.querySelector('.text')?.textContent ?? '', m.querySelector('.meta')?.textContent ?? '']);""")


def _ask(driver, text):
    _set(driver, "input", text)
    driver.find_element("id", "send").click()


def test_page_is_static_and_needs_no_key(server):
    status, kind, html = _request(server + "/")
    assert status == 200 and kind.startswith("text/html")
    assert "<title>kiln chat</title>" in html
    # users run this offline: nothing may be fetched from elsewhere
    assert not re.search(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/", html, re.I)
    with pytest.raises(urllib.error.HTTPError) as e:
        _request(server + "/v1/models")
    assert e.value.code == 401                  # the API itself still wants the key


def test_streamed_answer_equals_greedy_answer(server, browser):
    settings = dict(temperature=0, top_p=1, top_k=0, max_tokens=24, seed="")
    _open(browser, server, settings)
    # count the page's updates of the answer, to see it arrive in pieces rather than at the end
    browser.execute_script("""
        window.updates = 0;
        new MutationObserver((records) => {
          for (const r of records)
            if (r.target.closest && r.target.closest('.msg.assistant .text')) window.updates++;
        }).observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true});
    """)
    _ask(browser, QUESTION)
    done = "return !!document.querySelector('#log .meta, #log .error')"
    _until(lambda: browser.execute_script(done), 120, "the answer to finish")

    msgs = _messages(browser)
    assert [m[0] for m in msgs] == ["msg user", "msg assistant"] and msgs[0][1] == QUESTION, msgs
    assert _state(browser) == "idle" and browser.find_element("id", "send").is_enabled()
    answer, meta = msgs[1][1:]
    body = {"messages": [{"role": "user", "content": QUESTION}],
            **{k: v for k, v in settings.items() if v != ""}}
    want = json.loads(_request(server + "/v1/chat/completions", body, KEY)[2])["choices"][0]["message"]["content"]
    assert answer.strip() and answer == want
    assert browser.execute_script("return window.updates") >= 3, "the answer did not stream in"
    assert re.fullmatch(r"\d+ tokens · [\d.]+ tokens/s · (stop|length)", meta), meta
    browser.save_screenshot(str(_screenshot_path()))


def test_stop_aborts_a_long_answer(server, browser):
    _open(browser, server, dict(temperature=0.8, top_p=0.95, top_k=40, max_tokens=2000, seed=3))
    _ask(browser, "Write a very long story about a dragon who learns to bake bread.")
    text = "return document.querySelector('.msg.assistant .text')?.textContent || ''"
    _until(lambda: len(browser.execute_script(text)) > 0, 60, "the first streamed text")
    browser.find_element("id", "stop").click()
    _until(lambda: _state(browser) == "idle", 5, "the page to return to idle after stop")

    msgs = _messages(browser)
    assert [m[0] for m in msgs] == ["msg user", "msg assistant"] and msgs[1][2] == "stopped", msgs
    assert msgs[1][1], msgs                         # the partial answer stays
    assert browser.find_element("id", "send").is_enabled()
    assert not browser.find_element("id", "stop").is_enabled()
    # the server noticed the disconnect and freed the only batch row: it answers the next request
    _until(lambda: json.loads(_request(server + "/health")[2])["running"] == 0, 10, "the row to be freed")
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "temperature": 0}
    status, _, raw = _request(server + "/v1/chat/completions", body, KEY, timeout=20)
    assert status == 200 and json.loads(raw)["usage"]["completion_tokens"] >= 1


def test_wrong_key_shows_the_error_and_keeps_the_question(server, browser):
    browser.get(server + "/")
    _until(lambda: browser.find_element("id", "key-note").is_displayed(), 10, "the page to ask for the API key")
    _set(browser, "api_key", "not-the-key")
    _ask(browser, "Hello")
    _until(lambda: browser.execute_script("return !!document.querySelector('#log .error')"), 10, "the error")
    assert _messages(browser) == [["msg error", "invalid or missing API key", ""]]
    assert browser.find_element("id", "input").get_attribute("value") == "Hello"
    assert browser.find_element("id", "key-note").is_displayed() and _state(browser) == "idle"


def test_the_schema_box_sends_response_format(server, browser):
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                               "sunny": {"type": "boolean"}},
              "required": ["city", "sunny"], "additionalProperties": False}
    _open(browser, server, dict(temperature=0.9, top_p=1, top_k=0, max_tokens=60, seed=1, schema=json.dumps(schema)))
    _ask(browser, "What is the weather in Paris?")
    done = "return !!document.querySelector('#log .meta, #log .error')"
    _until(lambda: browser.execute_script(done), 120, "the answer to finish")
    msgs = _messages(browser)
    assert [m[0] for m in msgs] == ["msg user", "msg assistant"], msgs
    answer = json.loads(msgs[1][1])
    assert set(answer) == {"city", "sunny"} and isinstance(answer["sunny"], bool), answer
    # a box that does not hold JSON is an error on the page; the question goes back to the box
    _set(browser, "schema", "{not json")
    _ask(browser, "Again?")
    _until(lambda: browser.execute_script("return !!document.querySelector('#log .error')"), 10, "the error")
    assert "JSON schema box" in _messages(browser)[-1][1]
    assert browser.find_element("id", "input").get_attribute("value") == "Again?"
    _set(browser, "schema", "")
