"""The embedded STAC API: ``rustac serve`` over local collection and item files, started and stopped by a command.

It holds the items in memory and has no filter extension (``catalogs.search`` then filters client-side), which is
right for the demo and for small local archives; a real archive sits behind a real STAC API.

The server binds to 127.0.0.1 only and never outlives the process that started it: on Linux the kernel sends it
SIGTERM when its parent dies (``PR_SET_PDEATHSIG``), so even a driver killed with SIGKILL leaves no server behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import shutil
import signal
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


_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent() -> None:
    """In a child process (a ``preexec_fn``): ask the kernel for SIGTERM when the parent process dies.

    Without it a server started by a driver that is killed with SIGKILL (an OOM kill, a preempted node, a ``kill -9``)
    keeps running, orphaned, holding its port. A no-op where ``prctl`` does not exist (not Linux).
    """
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def popen_child_server(cmd: Sequence[str], **kwargs: object) -> subprocess.Popen:
    """Start a server subprocess that dies with this process (see :func:`die_with_parent`).

    Args:
        cmd: The command line.
        **kwargs: Passed to :class:`subprocess.Popen`.

    Returns:
        The process.
    """
    # PR_SET_PDEATHSIG fires when the *thread* that forked the child exits: a server started from a short-lived
    # thread would die with that thread, so start servers from long-lived threads only (the job starts it from the
    # driver's main thread)
    return subprocess.Popen(list(cmd), preexec_fn=die_with_parent, **kwargs)  # type: ignore[call-overload]


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
    proc = popen_child_server(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
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
