"""Load a page in headless Debian chromium and report what a person would see: its text, console errors, uncaught
exceptions, network requests, and a screenshot. Talks the DevTools protocol over ``--remote-debugging-pipe`` (file
descriptors 3 and 4), so no port is opened and no extra package is needed.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


def find_chromium() -> str | None:
    """Debian's ``chromium`` (installed by scripts/setup.sh), or ``None``."""
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    return None


@dataclass
class PageLoad:
    """What loading one page produced."""

    text: str = ""
    console_errors: list[str] = field(default_factory=list)
    exceptions: list[str] = field(default_factory=list)
    log_errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    images_broken: int = -1
    screenshot: bytes = b""


class _Pipe:
    def __init__(self, write_fd: int, read_fd: int) -> None:
        self.write_fd, self.read_fd = write_fd, read_fd
        self.buffer = b""
        self.next_id = 0
        self.events: list[dict[str, Any]] = []

    def send(self, method: str, params: dict[str, Any] | None = None, session: str | None = None,
             timeout: float = 60.0) -> dict[str, Any]:
        self.next_id += 1
        message: dict[str, Any] = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self.write_fd, json.dumps(message).encode() + b"\0")
        reply = self._until(lambda m: m.get("id") == self.next_id, timeout)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    def wait_event(self, method: str, timeout: float = 60.0) -> dict[str, Any]:
        for i, event in enumerate(self.events):
            if event.get("method") == method:
                return self.events.pop(i)
        return self._until(lambda m: m.get("method") == method, timeout)

    def _until(self, want: Any, timeout: float) -> dict[str, Any]:
        """The first message ``want`` accepts; events seen on the way are kept in ``events``."""
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" in self.buffer:
                raw, self.buffer = self.buffer.split(b"\0", 1)
                message = json.loads(raw)
                if want(message):
                    return message
                if "method" in message:
                    self.events.append(message)
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("chromium did not answer in time")
            ready, _, _ = select.select([self.read_fd], [], [], left)
            if ready:
                chunk = os.read(self.read_fd, 1 << 20)
                if not chunk:
                    raise RuntimeError("chromium closed the DevTools pipe")
                self.buffer += chunk


def load_page(url: str, *, width: int = 1280, timeout: float = 90.0) -> PageLoad:
    """Open ``url`` in a fresh headless chromium profile and collect what happened.

    Args:
        url: The page (``file://...``).
        width: Viewport width; the screenshot covers the whole page height.
        timeout: Seconds for the browser to start and the page to load.

    Returns:
        The page's visible text, errors, requests and a full-page PNG screenshot.
    """
    binary = find_chromium()
    if binary is None:
        raise FileNotFoundError("chromium is not installed (scripts/setup.sh installs Debian's chromium)")
    to_browser_r, to_browser_w = os.pipe()
    from_browser_r, from_browser_w = os.pipe()
    profile = tempfile.mkdtemp(prefix="chromium-profile-")

    def wire() -> None:  # the browser reads commands on fd 3 and writes replies on fd 4
        # duplicate first: a pipe may already sit on 3 or 4, and dup2 onto itself would keep it close-on-exec
        a, b = os.dup(to_browser_r), os.dup(from_browser_w)
        os.dup2(a, 3)
        os.dup2(b, 4)

    proc = subprocess.Popen(
        [binary, *FLAGS, f"--user-data-dir={profile}", "--remote-debugging-pipe", f"--window-size={width},900",
         "about:blank"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=wire,
        close_fds=False,  # close_fds would run after ``wire`` and close 3 and 4 again
    )
    os.close(to_browser_r)
    os.close(from_browser_w)
    pipe = _Pipe(to_browser_w, from_browser_r)
    result = PageLoad()
    try:
        targets = pipe.send("Target.getTargets", timeout=timeout)["targetInfos"]
        page = next(t for t in targets if t["type"] == "page")
        session = pipe.send("Target.attachToTarget", {"targetId": page["targetId"], "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            pipe.send(f"{domain}.enable", session=session)
        pipe.send("Page.navigate", {"url": url}, session=session)
        pipe.wait_event("Page.loadEventFired", timeout=timeout)
        result.text = pipe.send("Runtime.evaluate", {"expression": "document.body.innerText", "returnByValue": True},
                                session=session)["result"].get("value", "")
        broken = "Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0)).length"
        result.images_broken = int(pipe.send("Runtime.evaluate", {"expression": broken, "returnByValue": True},
                                             session=session)["result"]["value"])
        metrics = pipe.send("Page.getLayoutMetrics", session=session)
        height = int(metrics["cssContentSize"]["height"])
        pipe.send("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}, session=session)
        shot = pipe.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True}, session=session)
        result.screenshot = base64.b64decode(shot["data"])
        for event in pipe.events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                result.console_errors.append(" ".join(str(a.get("value", a.get("description"))) for a in
                                                      params.get("args", [])))
            elif method == "Runtime.exceptionThrown":
                result.exceptions.append(str(params.get("exceptionDetails", {}).get("text")))
            elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
                result.log_errors.append(str(params["entry"].get("text")))
            elif method == "Network.requestWillBeSent":
                result.requests.append(str(params.get("request", {}).get("url")))
        with contextlib.suppress(RuntimeError, TimeoutError):
            pipe.send("Browser.close", timeout=10)
    finally:
        os.close(to_browser_w)
        os.close(from_browser_r)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(profile, ignore_errors=True)
    return result


def save_screenshot(load: PageLoad, path: Path) -> Path:
    """Write the page's screenshot."""
    path.write_bytes(load.screenshot)
    return path
