"""The web dashboard in a real headless browser (issue 16, section 4): Debian's chromium driven by
Selenium through chromium-driver, against a live cluster (a real coordinator, etcd and agents with
simulated GPUs). The page loads with no console error; an allocation made with gpuctl appears in
the grid and the table without a reload and goes on release; a killed agent's node turns down.
A screenshot is saved in the test's tmp dir and to docs/dashboard.png (the README shows it)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gpulease.dev.cluster import LocalCluster
from tests.support import gpuctl as cli
from tests.support import harness

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
DOCS_SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "dashboard.png"
LIVE_S = 5.0  # the page follows the stream within about a second; slack for a loaded machine


@pytest.fixture
def browser() -> Iterator[Any]:
    found = all(os.path.exists(p) for p in (CHROMIUM, CHROMEDRIVER))
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        found = False
    if not found:
        why = "Debian's chromium and chromium-driver and the selenium package (dev extras; .ci/run installs them)"
        if os.environ.get("GPULEASE_REQUIRE_DOCKER") == "1":
            pytest.fail(f"the browser test needs {why}")
        pytest.skip(f"no headless browser here: needs {why}")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,900", "--disable-extensions"):  # fmt: skip
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=opts, service=Service(executable_path=CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


def _until(what: str, check: Callable[[], object], timeout: float = LIVE_S) -> None:
    harness.wait_until(check, timeout, what, interval=0.05)


def test_dashboard_follows_the_cluster_live(
    local_cluster: LocalCluster, start_coordinator: Callable[..., harness.Coordinator], browser: Any, tmp_path: Path
) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    coordinator = start_coordinator(node_ttl=3, heartbeat=1)
    url = local_cluster.coordinator(coordinator.address).http_url
    local_cluster.add_agent("node-a", 4)
    local_cluster.add_agent("node-b", 2)
    harness.wait_nodes_up(coordinator.stub, {"node-a", "node-b"})

    def cells(**attrs: str) -> list[Any]:
        sel = ".gpu" + "".join(f'[data-{k}="{v}"]' for k, v in attrs.items())
        return list(browser.find_elements(By.CSS_SELECTOR, sel))

    browser.get(url + "/")
    _until("the grid to show 6 GPUs", lambda: len(cells()) == 6, 15)
    _until("the stream to connect", lambda: browser.find_element(By.ID, "live").text == "live", 15)
    assert len(cells(node="node-a")) == 4 and len(cells(node="node-b")) == 2
    browser.execute_script("window.__noReload = 1")  # gone if the page reloaded

    # 3 GPUs: only node-a has that many.
    made = cli.run(["--coordinator", coordinator.address, "allocate", "--gpus", "3", "--cpus", "1", "--memory", "1G",
                    "--owner", "dashboard-test", "--ttl", "5m", "--json"])  # fmt: skip
    assert made.rc == 0, str(made)
    alloc_id = made.json()["id"]
    _until("the allocation in the grid", lambda: len(cells(node="node-a", state="allocated", allocation=alloc_id)) == 3)
    row = f'#allocs tr[data-allocation="{alloc_id}"]'
    _until("the allocation in the table", lambda: browser.find_elements(By.CSS_SELECTOR, row))
    assert "dashboard-test" in browser.find_element(By.CSS_SELECTOR, row).text
    _until("the allocated event", lambda: browser.find_elements(By.CSS_SELECTOR, '#events tr[data-type="allocated"]'))

    # Hovering a held GPU tells whose it is.
    ActionChains(browser).move_to_element(cells(allocation=alloc_id)[0]).perform()
    tip = browser.find_element(By.ID, "tip")
    _until("the tooltip", lambda: tip.is_displayed() and alloc_id in tip.text)
    assert "dashboard-test" in tip.text and "age" in tip.text and "TTL" in tip.text
    ActionChains(browser).move_to_element(browser.find_element(By.ID, "totals")).perform()

    # The table filters by owner.
    browser.find_element(By.ID, "f-owner").send_keys("somebody-else")
    _until("the owner filter", lambda: not browser.find_elements(By.CSS_SELECTOR, row))
    browser.find_element(By.ID, "f-owner").clear()
    browser.execute_script("document.getElementById('f-owner').dispatchEvent(new Event('input'))")
    _until("the filter cleared", lambda: browser.find_elements(By.CSS_SELECTOR, row))

    # A killed agent's node turns down once its liveness lease (node TTL 3 s) lapses.
    local_cluster.agents["node-b"].process.kill()
    _until("node-b down", lambda: len(cells(node="node-b", state="down")) == 2, 3 + 10)
    assert "down" in browser.find_element(By.ID, "node-node-b").text

    shot = tmp_path / "dashboard.png"
    assert browser.save_screenshot(str(shot)), "the screenshot"
    shutil.copyfile(shot, DOCS_SCREENSHOT)

    released = cli.run(["--coordinator", coordinator.address, "release", alloc_id])
    assert released.rc == 0, str(released)
    _until("the allocation to leave the grid", lambda: not cells(allocation=alloc_id))
    _until("the allocation to leave the table", lambda: not browser.find_elements(By.CSS_SELECTOR, row))
    assert len(cells(node="node-a", state="allocated")) == 0

    assert browser.execute_script("return window.__noReload") == 1, "the page reloaded"
    errors = [e for e in browser.get_log("browser") if e.get("level") == "SEVERE"]
    assert not errors, errors


def test_dashboard_on_a_coordinator_with_tls_asks_for_a_token(secure_cluster: LocalCluster, browser: Any) -> None:
    from selenium.webdriver.common.by import By

    from tests.support.secure import make_token, token_caller

    admin, ch = token_caller(secure_cluster, "admin", secure_cluster.admin_token())
    try:
        viewer = make_token(admin, "vic", "viewer", "ml")
    finally:
        ch.close()
    url = secure_cluster.coordinator(secure_cluster.coordinator_address).http_url
    browser.get(url + "/")
    form = browser.find_element(By.ID, "login")
    _until("the login form", form.is_displayed)
    assert not browser.find_element(By.ID, "app").is_displayed()

    browser.find_element(By.ID, "token").send_keys("gpl_not-a-token")
    browser.find_element(By.CSS_SELECTOR, "#login button").click()
    _until("the refusal", lambda: "refused" in browser.find_element(By.ID, "login-error").text)

    browser.find_element(By.ID, "token").clear()
    browser.find_element(By.ID, "token").send_keys(viewer)
    browser.find_element(By.CSS_SELECTOR, "#login button").click()
    _until("the page", lambda: browser.find_element(By.ID, "app").is_displayed())
    assert "user:vic (viewer)" in browser.find_element(By.ID, "who").text
    # The stream is read with fetch(), the token in its Authorization header.
    _until("the stream to connect", lambda: browser.find_element(By.ID, "live").text == "live")
    assert browser.execute_script("return sessionStorage.getItem('gpulease-token')") == viewer
    browser.refresh()  # kept for the session: no second login
    _until("the page again", lambda: browser.find_element(By.ID, "app").is_displayed())
    errors = [e for e in browser.get_log("browser") if e.get("level") == "SEVERE" and "401" not in e.get("message", "")]
    assert not errors, errors
