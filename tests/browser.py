"""Headless Chromium for tests: Debian's chromium and chromedriver (the Makefile installs them),
driven by selenium, in a profile of its own that talks to nothing but the page's server."""

from __future__ import annotations

import io
import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
WINDOW = (1280, 900)
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
)

RECORD_REFUSED = """
window.refusedByPolicy = [];
document.addEventListener(
  "securitypolicyviolation", (e) => window.refusedByPolicy.push(e.blockedURI)
);
"""


@contextmanager
def chromium(profile_dir: Path):
    """A selenium driver for a fresh headless Chromium with `profile_dir` as its profile."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.fail(f"{CHROMIUM} and {CHROMEDRIVER} are needed: `make test` installs them")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile_dir}")
    options.add_argument(f"--window-size={WINDOW[0]},{WINDOW[1]}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # for wait_for's failures
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    # Every page records what its Content-Security-Policy refused (see `foreign_requests`).
    driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": RECORD_REFUSED})
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile_dir, ignore_errors=True)


def wait_for(driver, script: str, timeout_s: float, what: str):
    """The value of the JS expression `script` once it is truthy; fails naming `what`, with
    the page's status line, after `timeout_s`."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout_s, poll_frequency=0.2).until(
            lambda d: d.execute_script(f"return {script}")
        )
    except TimeoutException:
        status = driver.execute_script(
            "const s = document.getElementById('status'); return s ? s.textContent : null"
        )
        console = "\n".join(entry["message"] for entry in driver.get_log("browser"))
        pytest.fail(f"{what}: not within {timeout_s} s (status: {status!r})\nconsole:\n{console}")


def wait_for_status(driver, timeout_s: float, states=("done",)) -> str:
    """The playground's status line once its data-state is one of `states` or `error`."""
    accepted = " || ".join(f"s.dataset.state === {state!r}" for state in (*states, "error"))
    wait_for(
        driver,
        f"(s => {accepted})(document.getElementById('status'))",
        timeout_s,
        f"status {states}",
    )
    status = driver.find_element("id", "status")
    assert status.get_attribute("data-state") in states, status.text
    return status.text


def decoded_size(driver, element_id: str) -> tuple[int, int]:
    """(naturalWidth, naturalHeight) of an <img>: 0 until the browser has decoded it."""
    return tuple(
        driver.execute_script(
            "const i = document.getElementById(arguments[0]);"
            "return [i.complete ? i.naturalWidth : 0, i.complete ? i.naturalHeight : 0]",
            element_id,
        )
    )


def screenshot(driver, path: Path) -> np.ndarray:
    """Save the window's screenshot to `path` and return its pixels (RGB)."""
    png = driver.get_screenshot_as_png()
    path.write_bytes(png)
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def element_pixels(driver, shot: np.ndarray, element_id: str) -> np.ndarray:
    """The part of a screenshot an element covers (screenshots are in device pixels)."""
    box = driver.execute_script(
        "const r = document.getElementById(arguments[0]).getBoundingClientRect();"
        "return [r.left, r.top, r.right, r.bottom, window.devicePixelRatio]",
        element_id,
    )
    left, top, right, bottom, scale = box
    return shot[int(top * scale) : int(bottom * scale), int(left * scale) : int(right * scale)]


def not_blank(pixels: np.ndarray) -> bool:
    """More than a flat fill: several distinct colours and some spread."""
    flat = pixels.reshape(-1, 3)
    return len(np.unique(flat, axis=0)) > 16 and float(flat.std()) > 5.0


def foreign_requests(driver, base_url: str) -> list[str]:
    """Every resource the page asked for from anywhere but `base_url` (a CDN, a font host)
    that its Content-Security-Policy did not refuse: what would leave the machine."""
    names = driver.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name)"
    )
    refused = set(driver.execute_script("return window.refusedByPolicy"))
    local = (base_url, "blob:", "data:")
    return [name for name in names if not name.startswith(local) and name not in refused]
