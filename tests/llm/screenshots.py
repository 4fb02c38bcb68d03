"""The screenshots of `ragseek serve --store`'s page in docs/img/ (README, docs/serve.md): starts `ragseek serve` on a
free loopback port, asks one question in headless Chromium, waits for the streamed answer, then opens its first
citation; a wide window, then a narrow one.

    .venv/bin/ragseek ingest docs --store runs/demo-store
    .venv/bin/python tests/llm/screenshots.py --store runs/demo-store --llm local

writes docs/img/page_answer.png, page_citation.png and page_narrow.png.
"""

import argparse
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from chromium import missing, start_chromium

ROOT = Path(__file__).resolve().parents[2]
# the shipped reader answers it right from docs/ ("SQLite [n]"); `make demo`'s question it does not (docs/reader.md)
QUESTION = "What does the store use as its database?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--store", default="runs/demo-store")
    ap.add_argument("--llm", default="local")
    ap.add_argument("--question", default=QUESTION)
    ap.add_argument("--out", default=str(ROOT / "docs" / "img"))
    ap.add_argument(
        "--serve-flag", action="append", default=[], help="one more `ragseek serve` flag (repeatable)"
    )
    args = ap.parse_args()
    if reason := missing():
        sys.exit(reason)
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "ragseek", "serve", "--llm", args.llm, "--store", args.store]
    cmd += ["--port", str(port), *args.serve_flag]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    server = subprocess.Popen(cmd, env=env)
    driver = None
    try:
        url = f"http://127.0.0.1:{port}/"
        for _ in range(600):
            try:
                urllib.request.urlopen(url, timeout=1).close()
                break
            except OSError:
                assert server.poll() is None, "ragseek serve exited"
                time.sleep(0.2)
        driver = start_chromium(1280, 1000)
        wait = WebDriverWait(driver, 300)
        driver.get(url)
        wait.until(lambda d: "documents" in d.find_element(By.ID, "about").text)
        driver.find_element(By.ID, "question").send_keys(args.question, Keys.ENTER)
        wait.until(lambda d: not d.find_element(By.ID, "ask").get_attribute("disabled"))
        out = Path(args.out)
        driver.save_screenshot(str(out / "page_answer.png"))
        cite = driver.find_element(By.CSS_SELECTOR, "#answer button.cite, #sources button")
        cite.click()
        wait.until(lambda d: d.find_elements(By.ID, "highlight"))
        time.sleep(0.5)
        driver.save_screenshot(str(out / "page_citation.png"))
        # on a phone's width, the same citation opened again (the page scrolls to it)
        driver.set_window_size(390, 844)
        cite.click()
        time.sleep(0.5)
        driver.save_screenshot(str(out / "page_narrow.png"))
        print(f"wrote {out}/page_answer.png, page_citation.png, page_narrow.png")
    finally:
        if driver is not None:
            driver.quit()
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
