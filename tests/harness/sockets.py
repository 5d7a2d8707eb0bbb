"""Which addresses a process tree listens on: the check that everything the project starts stays on loopback."""

from __future__ import annotations

import psutil


def listening(pids: set[int]) -> list[tuple[str, int, str]]:
    """``(address, port, process name)`` of every listening TCP socket of ``pids``."""
    out = []
    for conn in psutil.net_connections("inet"):
        if conn.status == psutil.CONN_LISTEN and conn.pid in pids:
            out.append((conn.laddr.ip, conn.laddr.port, psutil.Process(conn.pid).name()))
    return out


def is_loopback(ip: str) -> bool:
    """Whether ``ip`` (v4, v6 or v4-mapped v6) is a loopback address."""
    return ip.startswith("127.") or ip in ("::1", "::ffff:127.0.0.1") or ip.startswith("::ffff:127.")


def tree(pid: int) -> set[int]:
    """``pid`` and all its descendants."""
    proc = psutil.Process(pid)
    return {pid} | {p.pid for p in proc.children(recursive=True)}


def sockets_of_processes_naming(marker: str) -> list[tuple[str, int, str]]:
    """Listening sockets of every process (and its descendants) whose command line contains ``marker``."""
    pids: set[int] = set()
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(marker in arg for arg in proc.info["cmdline"] or []):
                pids |= tree(proc.pid)
        except psutil.Error:
            continue
    return listening(pids)
