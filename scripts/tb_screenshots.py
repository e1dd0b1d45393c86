"""Screenshots of TensorBoard's views of a sweep, for docs/tensorboard.md: Time Series, Scalars and the HParams
table and parallel coordinates, as PNGs.

    python scripts/tb_screenshots.py outputs/demo --out docs/img

Starts ``tensorboard --logdir DIR`` on a free local port and drives headless Chromium through Selenium
(``apt-get install chromium chromium-driver``, ``pip install selenium``). Run the report on DIR first
(``deeplab-dropout-report DIR``): it writes what the HParams columns and the Δ vs none scalars show.
A missing tool or DIR is one line on stderr and exit 2.
"""
from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from urllib.parse import quote

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars")
# Time Series: the runs coloured by their dropout type (the part after the placement in `cell=<placement>-<type>`;
# `none` matches no group and keeps a colour of its own), val/miou and the Δ vs none pinned on top.
# Scalars: the val/ tags only (its tag filter).
COLOUR_BY_TYPE = "regex:cell=[a-z]+-([a-z]+)"
PINNED = [{"plugin": "scalars", "tag": "val/miou"}, {"plugin": "scalars", "tag": "val/delta_miou_vs_none"}]
# Finds an element by its text through every shadow root (TensorBoard's HParams tab is Polymer) and clicks it.
CLICK_TEXT = """
const wanted = arguments[0].toLowerCase();
function find(root) {
  for (const el of root.querySelectorAll('*')) {
    if (el.children.length === 0 && el.textContent.trim().toLowerCase() === wanted) return el;
    if (el.shadowRoot) { const hit = find(el.shadowRoot); if (hit) return hit; }
  }
  return null;
}
const hit = find(document);
if (hit) hit.click();
return hit !== null;
"""


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def tools() -> tuple[str, str, str]:
    """The tensorboard, chromium and chromedriver executables (one-line error and exit 2 if one is missing)."""
    tensorboard = shutil.which("tensorboard")
    chromium = next((p for name in ("chromium", "chromium-browser", "google-chrome") if (p := shutil.which(name))),
                    None)
    driver = shutil.which("chromedriver")
    for name, path, hint in (("tensorboard", tensorboard, "pip install tensorboard"),
                             ("chromium", chromium, "apt-get install -y chromium"),
                             ("chromedriver", driver, "apt-get install -y chromium-driver")):
        if path is None:
            fail(f"{name} not found on PATH ({hint})")
    try:
        import selenium  # noqa: F401
    except ImportError:
        fail("selenium is not installed (pip install selenium)")
    return tensorboard, chromium, driver


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_runs(url: str, process: subprocess.Popen, timeout: float = 120) -> list[str]:
    """The runs TensorBoard lists, once it lists some and the list stops growing (it loads runs in the
    background)."""
    deadline, seen = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            fail(f"tensorboard exited with status {process.returncode}")
        try:
            runs = json.loads(urllib.request.urlopen(f"{url}/data/runs", timeout=5).read())
        except OSError:
            runs = []
        if runs and runs == seen:
            return runs
        seen = runs or None
        time.sleep(2)
    fail(f"tensorboard at {url} listed no runs within {timeout:.0f} s")


def browser(chromium: str, driver: str, profile: str, size: tuple[int, int]):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={size[0]},{size[1]}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver), options=options)


def settle(page, seconds: float) -> None:
    """Let TensorBoard fetch and draw (its views load asynchronously; there is no one element to wait for)."""
    page.execute_script("return document.readyState")
    time.sleep(seconds)


def click(page, text: str) -> None:
    if not page.execute_script(CLICK_TEXT, text):
        fail(f"no '{text}' to click in {page.current_url}")


def shoot(page, url: str, out: Path, clicks: tuple[str, ...] = (), wait: float = 10) -> None:
    """Open ``url``, click the elements with the texts ``clicks`` in turn (``wait`` seconds after loading and
    after each click), and save the window as ``out``."""
    page.get(url)
    settle(page, wait)
    for text in clicks:
        click(page, text)
        settle(page, wait)
    page.save_screenshot(str(out))
    print(f"{out} ({out.stat().st_size // 1024} KB)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dir", nargs="?", type=Path, default=Path("outputs/demo"),
                        help="the sweep folder TensorBoard reads (default outputs/demo)")
    parser.add_argument("--out", type=Path, default=Path("docs/img"), help="where the PNGs go (default docs/img)")
    parser.add_argument("--size", default="1400x900", help="browser window, WIDTHxHEIGHT (default 1400x900)")
    args = parser.parse_args(argv)
    if not args.dir.is_dir():
        fail(f"{args.dir} is not a folder")
    size = tuple(int(v) for v in args.size.split("x"))
    tensorboard, chromium, driver = tools()
    args.out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tempfile.TemporaryFile()
    server = subprocess.Popen([tensorboard, "--logdir", str(args.dir), "--port", str(port), "--host",
                               "127.0.0.1"], stdout=log, stderr=subprocess.STDOUT)
    try:
        print(f"tensorboard: {len(wait_for_runs(url, server))} runs at {url}")
        with tempfile.TemporaryDirectory() as profile:
            page = browser(chromium, driver, profile, size)
            try:
                query = f"?runColorGroup={quote(COLOUR_BY_TYPE)}&pinnedCards={quote(json.dumps(PINNED))}"
                shoot(page, f"{url}/{query}#timeseries", args.out / "timeseries.png", clicks=("settings",))
                shoot(page, f"{url}/{query}#scalars&tagFilter={quote('^val/')}", args.out / "scalars.png")
                shoot(page, f"{url}/#hparams", args.out / "hparams_table.png")
                shoot(page, f"{url}/#hparams", args.out / "hparams_parallel.png",
                      clicks=("parallel coordinates view",))
            finally:
                page.quit()
    finally:
        server.terminate()
        server.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
