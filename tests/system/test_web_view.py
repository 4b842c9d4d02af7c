"""The live web view in a real browser: headless Chromium (Debian's chromium + chromium-driver) driven by selenium."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pymongo
import pytest

from tests.support.admin_app import admin_proxy
from tests.support.proxy import run_proxy_process
from tests.support.system import REPO_ROOT, require_tool, unavailable

pytestmark = pytest.mark.system

ARTIFACTS = REPO_ROOT / "test-artifacts"


def chromium_driver():
    """A headless Chromium session with a fresh profile; skips naming the package when a piece is missing."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        unavailable("selenium is not installed: pip install -e '.[test]'")
    browser = shutil.which("chromium") or require_tool("chromium", "chromium not found: apt-get install chromium")
    driver_path = require_tool("chromedriver", "chromedriver not found: apt-get install chromium-driver")
    profile = tempfile.mkdtemp(prefix="mongoproxy-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1500,800",
        f"--user-data-dir={profile}",
    ):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(driver_path), options=opts)
    return driver, profile


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def test_web_view_shows_the_digest_and_streams_commands(secantus, db_name):
    from selenium.webdriver.common.by import By

    driver, profile = chromium_driver()
    try:
        with run_proxy_process([], upstream=secantus.address) as p:  # the real admin endpoint serves the view
            admin_url = f"http://{p.admin_host}:{p.admin_port}"
            with p.client(appname="web-demo") as c:
                coll = c[db_name].orders
                coll.insert_many([{"sku": f"s{i}", "qty": i} for i in range(20)])
                for i in range(10):
                    coll.find_one({"sku": f"s{i}"})
                    list(coll.find({"qty": {"$gt": i}}))
                driver.get(admin_url + "/")
                # The digest table fills from GET /digest.
                wait_for(
                    lambda: any(
                        f"{db_name}.orders" in r.text
                        for r in driver.find_elements(By.CSS_SELECTOR, "#digest tbody.shape")
                    ),
                    10,
                    "a digest row of the workload",
                )
                wait_for(lambda: driver.find_element(By.ID, "status").text == "live", 10, "the stream to connect")
                # A command after the page is live shows up as a streamed row within 2 s.
                sent = time.monotonic()
                coll.find_one({"sku": "secret-value-123"})
                rows = wait_for(
                    lambda: [
                        r
                        for r in driver.find_elements(By.CSS_SELECTOR, "#stream tbody.cmd")
                        if f"{db_name}.orders" in r.text and "find" in r.text
                    ],
                    2.0,
                    "a streamed command row",
                )
                assert time.monotonic() - sent <= 2.5
                page = driver.find_element(By.TAG_NAME, "body").text
                assert "secret-value-123" not in page  # redacted: shapes only
                assert '"sku":"?"' in rows[0].text
                assert driver.find_element(By.ID, "mode").text == "redacted"
                # Pause stops new rows.
                driver.find_element(By.ID, "pause").click()
                before = len(driver.find_elements(By.CSS_SELECTOR, "#stream tbody.cmd"))
                coll.find_one({"sku": "x"})
                with urllib.request.urlopen(admin_url + "/digest", timeout=5) as resp:
                    assert json.loads(resp.read())["version"] == 1
                time.sleep(0.5)
                assert len(driver.find_elements(By.CSS_SELECTOR, "#stream tbody.cmd")) == before
                driver.find_element(By.ID, "pause").click()
                ARTIFACTS.mkdir(exist_ok=True)
                shot = ARTIFACTS / "web-view.png"
                driver.save_screenshot(str(shot))
                assert shot.stat().st_size > 1000
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def test_page_assets_are_served_from_the_package():
    from aiohttp import web  # noqa: F401 - the routes need aiohttp

    files = {f.name for f in (Path(REPO_ROOT) / "mongoproxy" / "web").iterdir()}
    assert files == {"index.html", "app.js", "style.css"}
    html = (Path(REPO_ROOT) / "mongoproxy" / "web" / "index.html").read_text()
    assert "http://" not in html and "https://" not in html  # no CDN: works offline


def test_web_view_sends_the_token_from_its_fragment(secantus, db_name):
    """The page's #token= goes with its digest and stream requests, where the page (static, no data) itself is open.

    The admin endpoint asks the token for every route but the probes today, the page included; this runs the
    routes behind a policy that leaves / and /ui/* open, which is what #token= needs.
    """
    from selenium.webdriver.common.by import By

    driver, profile = chromium_driver()
    try:
        with admin_proxy(secantus.address, token="s3cret-token") as p:
            with pymongo.MongoClient(p.uri, serverSelectionTimeoutMS=5000) as c:
                c[db_name].orders.find_one({"a": 1})
                with pytest.raises(urllib.error.HTTPError) as denied:
                    urllib.request.urlopen(p.admin_url + "/digest", timeout=5)
                assert denied.value.code == 401
                driver.get(p.admin_url + "/#token=s3cret-token")
                wait_for(lambda: driver.find_element(By.ID, "status").text == "live", 10, "the stream to connect")
                wait_for(
                    lambda: any(
                        f"{db_name}.orders" in r.text
                        for r in driver.find_elements(By.CSS_SELECTOR, "#digest tbody.shape")
                    ),
                    10,
                    "a digest row",
                )
                c[db_name].orders.find_one({"a": 2})
                wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, "#stream tbody.cmd"), 2.0, "a streamed row")
                driver.get(p.admin_url + "/")  # without the token: the page says so instead of showing data
                wait_for(lambda: "401" in driver.find_element(By.ID, "digest-note").text, 10, "the 401 note")
                assert not driver.find_elements(By.CSS_SELECTOR, "#digest tbody.shape")
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
