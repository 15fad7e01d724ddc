"""The playground page (`GET /`) in a real browser: Debian's headless Chromium driven by selenium.

The reference is the API itself: what the page shows for a greedy request must be what
/v1/completions answers for the same request, and Stop must free the row on the server (/metrics)."""

import json
import os
import shutil
import urllib.request
from pathlib import Path

import pytest
import torch

from conftest import data_file

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), "/usr/bin/chromedriver"
SCREENSHOT = os.environ.get("GPTKIT_PLAYGROUND_SCREENSHOT")  # e.g. docs/playground.png, to refresh the README's


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    if CHROMIUM is None or not os.path.exists(CHROMEDRIVER):
        pytest.skip("needs Debian's chromium and chromium-driver (.ci/run installs them with apt-get)")
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_AVOID_STATS"] = "true"  # selenium never reaches out
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1000,640",
              "--no-first-run", "--disable-extensions", "--disable-background-networking"):
        opts.add_argument(a)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def server():
    """A slow-stepping server (test-only delay) of a tiny random model, so a generation lasts while the test clicks."""
    data_file("gpt2.tiktoken")
    from gptkit.config import GPTConfig
    from gptkit.model import GPT
    from gptkit.quantize import quantize_for_inference
    from gptkit.serve import Server, ServeConfig
    from gptkit.tokenizer import gpt2_tokenizer

    torch.manual_seed(0)
    model = quantize_for_inference(GPT(GPTConfig(block_size=256, vocab_size=50257, n_layer=2, n_head=2, n_embd=32)),
                                   "float32")
    with Server(model, gpt2_tokenizer(), "tiny-gpt", config=ServeConfig(step_delay_s=0.02)) as s:
        yield s


def _api(server, body: dict) -> dict:
    req = urllib.request.Request(server.url + "/v1/completions", data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def _running_rows(server) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(server.url + "/metrics", timeout=30) as r:
        text = r.read().decode()
    return next(s.value for f in text_string_to_metric_families(text) for s in f.samples
                if s.name == "gptkit_num_rows_running")


def _fill(driver, id_, value) -> None:
    el = driver.find_element("id", id_)
    el.clear()
    el.send_keys(value)


def test_playground_streams_the_same_text_as_the_api_and_stop_frees_the_row(browser, server):
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 60)
    browser.get(server.url + "/")
    for id_ in ("prompt", "max_tokens", "temperature", "top_p", "seed", "generate", "stop", "output", "status"):
        assert browser.find_element("id", id_)  # INTERFACES.md's element ids
    prompt = "The playground says"
    _fill(browser, "prompt", prompt)
    _fill(browser, "max_tokens", "24")
    _fill(browser, "temperature", "0")
    browser.find_element("id", "generate").click()
    wait.until(lambda d: d.find_element("id", "status").text == "done")
    shown = browser.find_element("id", "output").text
    expected = _api(server, {"prompt": prompt, "max_tokens": 24, "temperature": 0})["choices"][0]["text"]
    # the browser's innerText of a pre-wrapped element keeps the text; compare without outer whitespace
    assert shown.strip() == expected.strip() and shown.strip()
    assert browser.execute_script("return document.getElementById('output').textContent") == expected
    if SCREENSHOT:
        Path(SCREENSHOT).parent.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(SCREENSHOT)

    # Stop: a long generation, stopped once text streams in; the server frees its row
    _fill(browser, "max_tokens", "240")
    _fill(browser, "temperature", "1")
    browser.find_element("id", "generate").click()
    wait.until(lambda d: d.find_element("id", "status").text == "generating" and d.find_element("id", "output").text)
    assert _running_rows(server) == 1
    browser.find_element("id", "stop").click()
    wait.until(lambda d: d.find_element("id", "status").text == "done")
    wait.until(lambda d: _running_rows(server) == 0)
    stats = server.scheduler.stats()
    assert stats["running_rows"] == 0 and not server.scheduler.owners
    tokens = len(server.scheduler.tokenizer.encode(browser.execute_script(
        "return document.getElementById('output').textContent")))
    assert tokens < 240  # it did stop early


def test_playground_chat_mode_shows_with_a_template_and_streams_the_chat_reply(browser, tmp_path):
    """A server whose model has a chat template: the mode selector shows, and chat mode streams what
    /v1/chat/completions answers for the same message."""
    pytest.importorskip("jinja2")
    data_file("gpt2.tiktoken")
    from selenium.webdriver.support.ui import Select, WebDriverWait

    from gptkit.chat_template import load_chat_template
    from gptkit.config import GPTConfig
    from gptkit.model import GPT
    from gptkit.serve import Server
    from gptkit.tokenizer import gpt2_tokenizer

    torch.manual_seed(1)
    tok = gpt2_tokenizer()
    (tmp_path / "chatml.jinja").write_text(
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    tok.chat_template = load_chat_template(tmp_path / "chatml.jinja", tok)
    model = GPT(GPTConfig(block_size=128, vocab_size=50257, n_layer=2, n_head=2, n_embd=32)).eval()
    with Server(model, tok, "tiny-chat") as s:
        wait = WebDriverWait(browser, 60)
        browser.get(s.url + "/")
        wait.until(lambda d: d.find_element("id", "mode_label").is_displayed())
        Select(browser.find_element("id", "mode")).select_by_value("chat")
        _fill(browser, "prompt", "Hi there")
        _fill(browser, "max_tokens", "12")
        _fill(browser, "temperature", "0")
        browser.find_element("id", "generate").click()
        wait.until(lambda d: d.find_element("id", "status").text == "done")
        req = urllib.request.Request(s.url + "/v1/chat/completions", method="POST",
                                     data=json.dumps({"messages": [{"role": "user", "content": "Hi there"}],
                                                      "max_tokens": 12, "temperature": 0}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            want = json.loads(r.read())["choices"][0]["message"]["content"]
        assert browser.execute_script("return document.getElementById('output').textContent") == want
