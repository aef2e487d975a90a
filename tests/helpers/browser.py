"""A headless Chromium driven by Selenium, for the tests of the live preview page (Debian's packages only).

Usage::

    with headless_chrome() as driver:          # skips the test without chromium / chromedriver / selenium
        driver.get(f"{base_url}/#token=secret")
        n = wait_for_js(driver, "return (window.sdFrames || {})['cam1'] >= 10", timeout_s=5)

The browser is Debian's ``chromium`` with its ``chromium-driver`` (``/usr/bin/chromedriver``); Selenium Manager
never runs and nothing is downloaded (``SE_OFFLINE=true``, explicit binary and driver paths). Without the binaries
the tests are skipped, except as root with ``apt-get`` at hand, where Debian's packages are installed once.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from selenium.webdriver import Chrome

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
SKIP_REASON = "needs Debian's chromium and chromium-driver packages (apt-get install chromium chromium-driver)"
SELENIUM_SKIP_REASON = "needs the Python package selenium (pip install selenium)"

_install_tried = False


def _have_binaries() -> bool:
    return Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()


def ensure_chromium() -> None:
    """Make sure chromium, chromedriver and selenium exist (install Debian's packages once as root), else skip."""
    global _install_tried
    try:
        import selenium  # noqa: F401
    except ImportError:
        pytest.skip(SELENIUM_SKIP_REASON)
    if _have_binaries():
        return
    if not _install_tried and os.geteuid() == 0 and shutil.which("apt-get"):
        _install_tried = True
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        cmd = ["apt-get", "install", "-y", "-qq", "chromium", "chromium-driver"]
        try:
            if subprocess.run(cmd, env=env, capture_output=True, timeout=600).returncode:
                subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=600)
                subprocess.run(cmd, env=env, capture_output=True, timeout=600)
        except subprocess.TimeoutExpired:
            pass
    if not _have_binaries():
        pytest.skip(SKIP_REASON)


@contextmanager
def headless_chrome(width: int = 1280, height: int = 800) -> Iterator[Chrome]:
    """A headless ``selenium.webdriver.Chrome`` on Debian's chromium; quits it and removes its profile on exit."""
    ensure_chromium()
    os.environ["SE_OFFLINE"] = "true"  # Selenium never asks the network (no Selenium Manager downloads)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="streamdet-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        f"--window-size={width},{height}",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(arg)
    driver = None
    try:
        driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
        yield driver
    finally:
        if driver is not None:
            driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def wait_for_js(driver: Chrome, script: str, timeout_s: float, poll_s: float = 0.1) -> Any:
    """The first truthy value of ``driver.execute_script(script)`` within ``timeout_s``.

    Raises:
        AssertionError: if the script returned nothing truthy in time (names the script and the timeout).
    """
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while True:
        last = driver.execute_script(script)
        if last:
            return last
        if time.monotonic() >= deadline:
            raise AssertionError(f"{script!r} was not truthy within {timeout_s} s (last value: {last!r})")
        time.sleep(poll_s)
