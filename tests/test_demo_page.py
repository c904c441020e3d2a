"""The demo page in a real headless Chromium (Debian's `chromium` + `chromium-driver`, installed by `make test`).

Set RAYPIPE_SCREENSHOT=<path.png> to keep the screenshot (the README's picture is made this way).
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from selenium.webdriver.remote.webdriver import WebDriver

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="Debian's chromium and chromium-driver are not installed (`make test` installs them with apt-get when "
           "it can; see `make browser`)")


@pytest.fixture
def browser() -> Iterator[WebDriver]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=900,1150"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    yield driver
    driver.quit()


def test_question_answered_step_by_step_with_a_mark(served: dict, browser: WebDriver, tmp_path: Path) -> None:
    """Type a held-out question and its answer, watch the steps arrive one by one, read the verdict."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from raypipe.grading import grade

    browser.get(f"{served['url']}/?token={served['token']}")
    # a slow link (2 kB/s), so the answer's server-sent events arrive over seconds as they would from a big model
    browser.set_network_conditions(offline=False, latency=5, download_throughput=2000, upload_throughput=100_000)
    examples = browser.find_elements(By.CSS_SELECTOR, "#examples button")
    assert examples, "a run folder's page offers held-out problems as examples"
    question = examples[0].text
    browser.find_element(By.ID, "question").send_keys(question)
    gold = next(p for p in _test_problems(served) if p.question == question).answer
    browser.find_element(By.ID, "expected").send_keys(str(gold))
    # count the step blocks every time the page re-renders, to see them arrive while the answer streams
    browser.execute_script("""
        window.blockCounts = [];
        new MutationObserver(() => window.blockCounts.push(document.querySelectorAll('#steps > div').length))
            .observe(document.getElementById('steps'), {childList: true});""")
    browser.find_element(By.ID, "ask").click()
    WebDriverWait(browser, 60).until(lambda b: b.find_element(By.ID, "mark").text)

    steps = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#steps .step")]
    answer = browser.find_element(By.ID, "answer").text
    mark = browser.find_element(By.ID, "mark").text
    counts = browser.execute_script("return window.blockCounts")
    screenshot = tmp_path / "demo.png"
    browser.save_screenshot(str(screenshot))
    if os.environ.get("RAYPIPE_SCREENSHOT"):
        shutil.copy(screenshot, os.environ["RAYPIPE_SCREENSHOT"])

    assert steps and all(re.match(r"Step \d+:", s) for s in steps), steps
    assert [int(re.match(r"Step (\d+):", s).group(1)) for s in steps] == list(range(1, len(steps) + 1))
    assert answer.startswith("The answer is")
    blocks = len(steps) + 1
    assert set(range(1, blocks + 1)) <= set(counts), counts  # each block was shown before the next one arrived
    shown = "\n".join([*steps, answer])
    assert mark.startswith("✓ right") == grade(shown, str(gold), "synthetic").correct, (shown, gold, mark)
    assert screenshot.stat().st_size > 10_000


def _test_problems(served: dict) -> list:
    from raypipe.config import load_config
    from raypipe.data.synthetic import load_splits

    return load_splits(load_config(served["run_dir"] / "config.yaml").task)["test"]
