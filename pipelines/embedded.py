"""The embedded STAC API: ``rustac serve`` over local collection and item files, started and stopped by a command.

It holds the items in memory and has no filter extension (``catalogs.search`` then filters client-side), which is
right for the demo and for small local archives; a real archive sits behind a real STAC API.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path


class EmbeddedServerError(RuntimeError):
    """``rustac serve`` is missing or did not start."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rustac() -> str:
    beside = Path(sys.executable).parent / "rustac"
    found = str(beside) if beside.exists() else shutil.which("rustac")
    if not found:
        raise EmbeddedServerError("the `rustac` executable was not found (pip install rustac)")
    return found


def stop_process(proc: subprocess.Popen) -> None:
    """Terminate a server subprocess, killing it if it does not exit within 10 s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


@contextlib.contextmanager
def serve_stac(collections: Sequence[str | Path], items: str | Path, timeout: float = 30.0) -> Iterator[str]:
    """Serve local STAC files with ``rustac serve`` on a free loopback port for the duration of a ``with`` block.

    Args:
        collections: Collection JSON files.
        items: An NDJSON file of items.
        timeout: Seconds to wait for the server to answer.

    Yields:
        The API root URL.

    Raises:
        EmbeddedServerError: If ``rustac`` is missing, exits, or does not answer in time.
    """
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [_rustac(), "serve", *map(str, collections), str(items), "--addr", f"127.0.0.1:{port}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                out = proc.stdout.read().decode(errors="replace")[-2000:] if proc.stdout else ""
                raise EmbeddedServerError(f"rustac serve exited with code {proc.returncode}:\n{out}")
            try:
                with urllib.request.urlopen(url + "/", timeout=2):
                    break
            except urllib.error.HTTPError:
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise EmbeddedServerError(f"rustac serve did not answer {url} within {timeout:.0f} s") from None
                time.sleep(0.05)
        yield url
    finally:
        stop_process(proc)
