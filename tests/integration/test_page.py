"""The page at / in a real browser (headless Debian Chromium through Selenium): it opens a
user's list from /?user_id=, shows titles, categories, scores, sources and reasons, and a click
on an item posts the event and replaces the list in place, the clicked item gone, within 1 s.
`make test` installs Chromium and its driver when they are missing."""

import shutil
import time
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from tests.conftest import ADMIN_KEY

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
SHOWN = "return [...document.querySelectorAll('#items li')].map(li => li.dataset.itemId)"


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    for path in (CHROMIUM, CHROMEDRIVER):
        assert Path(path).exists(), f"{path} missing: `make test` installs chromium-driver"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",  # no calls home: the machine has no internet
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1280,900",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium')}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


@pytest.mark.parametrize("stack", ["fused"], indirect=True)
def test_a_click_on_the_page_replaces_the_list_within_a_second(stack, browser, tmp_path):
    base = str(stack["client"].base_url)
    user = "u7"  # a user of the data set, with a history
    browser.get(f"{base}/?user_id={user}#key={ADMIN_KEY}")

    def shown() -> list[str]:
        return browser.execute_script(SHOWN)

    before = WebDriverWait(browser, 30, poll_frequency=0.05).until(
        lambda _: (ids := shown()) and len(ids) >= 5 and ids
    )
    assert "key=" not in browser.current_url  # the key left the address bar
    assert browser.find_element(By.ID, "user").text == user
    assert browser.find_element(By.ID, "model").text == stack["model"].version
    first = browser.find_element(By.CSS_SELECTOR, f'#items li[data-item-id="{before[0]}"]')
    WebDriverWait(browser, 10).until(  # the catalogue entry fetched: title and category shown
        lambda _: first.find_element(By.CSS_SELECTOR, ".title").text.startswith("Item ")
    )
    meta = first.find_element(By.CSS_SELECTOR, ".meta").text
    assert "score" in meta and "c" in meta

    button = first.find_element(By.CSS_SELECTOR, 'button[data-action="click"]')
    t0 = time.perf_counter()
    button.click()
    after = WebDriverWait(browser, 1.0, poll_frequency=0.02).until(
        lambda _: (ids := shown()) and before[0] not in ids and ids != before and ids
    )
    elapsed_ms = (time.perf_counter() - t0) * 1000
    assert len(after) == len(before)  # the list is refilled, not only shortened
    latency = WebDriverWait(browser, 5).until(
        lambda _: (t := browser.find_element(By.ID, "latency").text).endswith(" ms") and t
    )
    assert browser.find_element(By.ID, "trigger").text == "events"
    shot = tmp_path / "page.png"
    assert browser.save_screenshot(str(shot))
    print(
        f"\n[page] click -> new list {elapsed_ms:.0f} ms in the browser (page shows {latency}); "
        f"screenshot {shot}"
    )
