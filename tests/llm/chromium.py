"""Headless Chromium driven by selenium, for the page's browser test and for `tests/llm/screenshots.py`: Debian's
`chromium` + `chromium-driver` (`make browser` installs them), with a fresh profile and nothing fetched from the
network by the browser itself."""

import shutil
import tempfile

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


def missing() -> str | None:
    """Why a browser test cannot run here, or None."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed: pip install -e '.[dev]'"
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        return "Chromium is absent: `make browser` (apt-get install chromium chromium-driver) installs it"
    return None


def start_chromium(width: int = 1280, height: int = 900):
    """A headless Chromium WebDriver with a window of width x height CSS pixels; quit() it when done."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for flag in (*FLAGS, f"--user-data-dir={tempfile.mkdtemp(prefix='ragseek-chromium-')}"):
        options.add_argument(flag)
    options.add_argument(f"--window-size={width},{height}")
    options.binary_location = shutil.which("chromium")
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
