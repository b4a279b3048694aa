"""The chat page at `/`, driven in a real headless Chromium against a real `ctcspec serve` subprocess.

Skipped only where selenium, chromium or chromedriver is not installed (CI installs Debian's chromium and
chromium-driver in .ci/run, so it runs there). The page's answer must be the server's own greedy answer for the
same messages, as the OpenAI client gets it.
"""

from __future__ import annotations

import os
import shutil

import pytest
from server_helpers import API_KEY, running_server

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


def _binary(*candidates: str) -> str | None:
    for name in candidates:
        path = name if os.path.isabs(name) else shutil.which(name)
        if path and os.access(path, os.X_OK):
            return path
    return None


CHROMIUM = _binary("/usr/bin/chromium", "chromium", "chromium-browser")
CHROMEDRIVER = _binary("/usr/bin/chromedriver", "chromedriver")
pytestmark = pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                                reason="no chromium/chromedriver binary (Debian: apt-get install chromium "
                                       "chromium-driver)")

PROMPT = "w5 w6 w7 w5 w6"
FOLLOW_UP = "w8 w9 w8"
MAX_TOKENS = 24  # short answers (the page's "Max tokens" field): a fast test; two turns fit the tiny model's context


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    """A `ctcspec serve` subprocess on a free loopback port; yields its base URL."""
    with running_server(tiny_model_dir, tmp_path_factory.mktemp("web-page") / "server.log") as server:
        yield server.url


@pytest.fixture
def driver(tmp_path):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                "--no-first-run", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-proxy-server", f"--user-data-dir={tmp_path / 'chrome-profile'}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit driver path: Selenium Manager never downloads anything.
    drv = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield drv
    finally:
        drv.quit()


def _severe(drv) -> list[dict] | None:
    """The browser console's SEVERE entries since the last call, or None where the driver cannot read them."""
    try:
        return [e for e in drv.get_log("browser") if e.get("level") == "SEVERE"]
    except Exception:  # the log endpoint is a Chromium extension; not every driver has it
        return None


def _open(drv, base: str, key: str):
    drv.get(base + "/")
    wait = WebDriverWait(drv, 10)
    # The page probes /v1/models on load. Before a key is typed it is refused (401), and Chromium logs that request.
    wait.until(lambda d: d.find_element(By.ID, "model").text not in ("", "model: …"))
    for entry in _severe(drv) or []:
        assert "/v1/models" in entry["message"] and "401" in entry["message"], entry
    key_field = drv.find_element(By.ID, "api-key")
    key_field.clear()
    key_field.send_keys(key)
    assert drv.find_element(By.ID, "temperature").get_attribute("value") == "0"
    drv.find_element(By.ID, "max-tokens").send_keys(str(MAX_TOKENS))
    for name in ("send", "stop", "reset", "messages"):
        drv.find_element(By.ID, name)


def _answer_done(drv, index: int):
    """Waits for the index-th answer's `.stats` line (written when its stream has ended); returns the answer."""
    def done(d):
        answers = d.find_elements(By.CSS_SELECTOR, "#messages .message.assistant")
        if len(answers) <= index:
            return False
        answer = answers[index]
        errors = answer.find_elements(By.CSS_SELECTOR, ".error")
        assert not errors, errors[0].get_attribute("textContent")
        stats = answer.find_element(By.CSS_SELECTOR, ".stats").get_attribute("textContent").strip()
        return answer if stats else False
    return WebDriverWait(drv, 60).until(done)


def _spans(drv, answer) -> list[dict]:
    return drv.execute_script(
        "return Array.from(arguments[0].querySelectorAll('.content span')).map(s => ({text: s.textContent,"
        " step: s.dataset.step, tokens: s.dataset.stepTokens, bg: getComputedStyle(s).backgroundColor}));",
        answer)


def test_chat_page_streams_the_servers_greedy_answer(server, driver):
    import openai

    _open(driver, server, API_KEY)
    prompt = driver.find_element(By.ID, "prompt")
    prompt.send_keys(PROMPT)
    driver.find_element(By.ID, "send").click()
    answer = _answer_done(driver, 0)

    client = openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY)
    model = client.models.list().data[0].id
    messages = [{"role": "user", "content": PROMPT}]
    reference = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=MAX_TOKENS)
    expected = reference.choices[0].message.content
    assert expected, "the server gave an empty answer; the comparison would prove nothing"

    spans = _spans(driver, answer)
    assert "".join(s["text"] for s in spans) == expected
    assert answer.find_element(By.CSS_SELECTOR, ".content").get_attribute("textContent") == expected
    assert any(s["step"] for s in spans), spans
    steps = [int(s["step"]) for s in spans]
    assert steps == sorted(steps) and steps[0] >= 1, steps
    for s in spans:
        tokens = int(s["tokens"])
        assert tokens >= 1, s
        shaded = s["bg"] not in ("rgba(0, 0, 0, 0)", "transparent")
        assert shaded == (tokens > 1), s  # only tokens from accepted drafts are shaded
    stats = answer.find_element(By.CSS_SELECTOR, ".stats").get_attribute("textContent")
    assert "β" in stats and "tok/s" in stats, stats
    assert f"{reference.usage.completion_tokens} tokens" in stats, stats

    # A second turn sends the whole conversation: the page's answer is the server's for the same history.
    prompt.send_keys(FOLLOW_UP, Keys.ENTER)
    second = _answer_done(driver, 1)
    messages += [{"role": "assistant", "content": expected}, {"role": "user", "content": FOLLOW_UP}]
    expected_2 = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=MAX_TOKENS)
    assert second.find_element(By.CSS_SELECTOR, ".content").get_attribute("textContent") == \
        expected_2.choices[0].message.content

    # "New chat" clears the conversation.
    driver.find_element(By.ID, "reset").click()
    assert driver.find_elements(By.CSS_SELECTOR, "#messages .message") == []

    severe = _severe(driver)
    if severe is not None:
        assert severe == [], severe


def test_wrong_api_key_shows_the_servers_error(server, driver):
    _open(driver, server, "wrong-key")
    prompt = driver.find_element(By.ID, "prompt")
    prompt.send_keys(PROMPT, Keys.ENTER)  # Enter sends
    error = WebDriverWait(driver, 30).until(
        lambda d: d.find_element(By.CSS_SELECTOR, "#messages .message.assistant .error"))
    text = error.get_attribute("textContent")
    assert "key" in text.lower(), text
    assert "401" in text, text
    answer = driver.find_element(By.CSS_SELECTOR, "#messages .message.assistant")
    assert answer.find_element(By.CSS_SELECTOR, ".stats").get_attribute("textContent") == ""
    assert prompt.get_attribute("value") == PROMPT  # the text is given back for a retry
