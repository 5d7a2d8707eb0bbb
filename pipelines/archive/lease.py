"""One writer per output key: a lease object in the output store, taken by every run and by every recovery.

A run over an output root writes only under its own output key (its rows, its arrays, its state document), so two
runs of *different* models may share a root; two runs of the *same* output key may not: both would process the same
scenes and commit them twice, and one's recovery would delete the other's staged units. The lease is one small JSON
object per output key, ``_leases/<output_key>.json``, naming its holder (run id, host, pid, since when) and when it
expires. The protocol, on S3 and on a local disk:

- **take**: create the object only if it does not exist (S3 ``PutObject`` with ``If-None-Match: *``; locally a hard
  link, which fails if the name exists). If it exists and its holder released it, expired, or is a process on this
  host that no longer runs, replace it only if it is still the object that was read (S3 ``If-Match: <ETag>``;
  locally under an ``flock``): of two runs starting at once exactly one wins. The loser gets :class:`LeaseHeld`,
  whose message names the holder and how to break a stale lease;
- **heartbeat**: the driver renews the lease every third of its time to live, again with ``If-Match``; a renewal that
  finds another holder's token, or comes after the lease expired, marks the lease lost;
- **fence**: before each commit point the ledger checks, with one read, that the lease is still this run's
  (:meth:`Lease.check`), so a run that lost its lease (stalled past expiry, or broken by an operator) stops before it
  commits anything more;
- **release**: the holder marks the object released (a conditional replace), so the next run takes it at once.

A write whose response was lost (a dropped connection) is retried by the S3 client and then fails its condition
against the first attempt's own write: every conditional write that fails is followed by a read, and a lease that
holds this run's token and content counts as taken or renewed.

The store must honour conditional writes (AWS S3 does since 2024, as do MinIO, Ceph RGW and moto). Expiry compares
the holder's clock with the reader's: keep clocks within seconds (NTP) of each other, far below the time to live.
A local output root is leased with ``flock``, which holds between processes of one machine.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from typing import Any

from pipelines.archive.store import OutputStore, write_temporary

log = logging.getLogger(__name__)

LEASE_DIR = "_leases"
DEFAULT_TTL_S = 300.0


class LeaseHeld(RuntimeError):
    """Another live run holds the lease of this output key.

    Attributes:
        holder: Who holds it.
    """

    def __init__(self, holder: Holder, path: str) -> None:
        self.holder = holder
        super().__init__(
            f"output key {holder.name} is leased by {holder.describe()} ({path}). One run per output key at a time: "
            "this run writes nothing. If that run is gone (its machine lost, its process killed), the lease lapses "
            f"at {_iso(holder.expires_at)}; to take it now, rerun with --break-lease. To queue behind it instead, "
            "use --wait-lease SECONDS."
        )


class LeaseLost(RuntimeError):
    """This run's lease was taken by another run or broken, or expired before it could be renewed."""


@dataclass(frozen=True)
class Holder:
    """The content of a lease object: who holds it, since when, until when.

    Attributes:
        name: The leased name (the output key).
        token: Unique per acquisition; only its owner renews or releases the lease.
        run_id: The holding run.
        host: Its host name.
        pid: Its driver's process id.
        pid_started: The process's start time (epoch seconds), to tell a reused pid from the holder.
        purpose: What holds it (``run``).
        acquired_at: When the lease was taken (epoch seconds, the holder's clock).
        renewed_at: Last heartbeat.
        ttl_s: Time to live after the last heartbeat.
        released_at: When the holder released it, or ``None`` while held.
    """

    name: str
    token: str
    run_id: str
    host: str
    pid: int
    pid_started: float | None
    purpose: str
    acquired_at: float
    renewed_at: float
    ttl_s: float
    released_at: float | None = None

    @property
    def expires_at(self) -> float:
        """When the lease lapses without another heartbeat (epoch seconds)."""
        return self.renewed_at + self.ttl_s

    def describe(self) -> str:
        """``run R (host H, pid P, since T, last heartbeat T)``."""
        return (f"run {self.run_id} (host {self.host}, pid {self.pid}, since {_iso(self.acquired_at)}, "
                f"last heartbeat {_iso(self.renewed_at)})")

    def dead_reason(self, now: float | None = None) -> str | None:
        """Why this lease binds no one any more (released, expired, its process gone), or ``None`` if it is live."""
        now = time.time() if now is None else now
        if self.released_at is not None:
            return f"released at {_iso(self.released_at)}"
        if now >= self.expires_at:
            return f"expired at {_iso(self.expires_at)}"
        if self.host == socket.gethostname() and not _process_alive(self.pid, self.pid_started):
            return f"its process {self.pid} on this host has ended"
        return None

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Holder:
        raw = json.loads(data)
        holder = cls(**{k: raw.get(k) for k in cls.__dataclass_fields__})
        if not (isinstance(holder.token, str) and isinstance(holder.renewed_at, (int, float))
                and isinstance(holder.ttl_s, (int, float)) and isinstance(holder.acquired_at, (int, float))):
            raise ValueError("not a lease object: token, acquired_at, renewed_at, ttl_s missing")
        return holder


def _parse(data: bytes) -> Holder:
    """A lease object's holder; an unreadable object (written by hand) names no one and binds no one."""
    try:
        return Holder.from_bytes(data)
    except (ValueError, TypeError) as exc:
        log.warning("unreadable lease object (%s): treated as released", exc)
        return Holder(name="?", token="", run_id="?", host="?", pid=0, pid_started=None, purpose="?",
                      acquired_at=0.0, renewed_at=0.0, ttl_s=0.0, released_at=0.0)


def _iso(t: float | None) -> str:
    if t is None:
        return "-"
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _process_started(pid: int) -> float | None:
    try:
        import psutil

        return float(psutil.Process(pid).create_time())
    except Exception:
        return None


def _process_alive(pid: int, started: float | None) -> bool:
    """Whether ``pid`` still runs on this host and is the process that started at ``started``."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process: alive
    if started is None:
        return True
    now_started = _process_started(pid)
    return now_started is None or abs(now_started - started) < 2.0  # a reused pid started later


# ----------------------------------------------------------------------------------------------- conditional writes


class _Backend:
    """Read, create-if-absent and replace-if-unchanged of one small object. ``version`` is opaque (an ETag)."""

    def read(self, path: str) -> tuple[bytes, Any] | None:
        raise NotImplementedError

    def create(self, path: str, data: bytes) -> Any | None:
        """Write ``data`` if nothing is at ``path``; its version, or ``None`` if something was there."""
        raise NotImplementedError

    def replace(self, path: str, data: bytes, version: Any) -> Any | None:
        """Write ``data`` if ``path`` is still at ``version``; the new version, or ``None`` if it changed."""
        raise NotImplementedError

    @contextlib.contextmanager
    def exclusive(self, path: str) -> Iterator[None]:
        """Hold off other processes of this backend between a read and the write it decides (local disks)."""
        yield


def _precondition_failed(exc: BaseException) -> bool:
    if isinstance(exc, FileExistsError):
        return True
    cause = exc.__cause__ or exc.__context__
    response = getattr(cause, "response", None) or getattr(exc, "response", None) or {}
    code = str((response.get("Error") or {}).get("Code", ""))
    # 409 ConditionalRequestConflict: another conditional write to the key was in flight (AWS); reread and decide
    return code in {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"} or "Precondition" in str(exc)


class _S3Backend(_Backend):
    def __init__(self, fs: Any) -> None:
        self.fs = fs

    def read(self, path: str) -> tuple[bytes, Any] | None:
        # the ETag first, then the bytes: a write in between makes a later If-Match on this ETag fail, never pass
        try:
            etag = self.fs.info(path, refresh=True)["ETag"]
            data = bytes(self.fs.cat_file(path))
        except FileNotFoundError:
            return None
        return data, etag

    def create(self, path: str, data: bytes) -> Any | None:
        try:
            out = self.fs.pipe_file(path, data, mode="create")
        except OSError as exc:
            if _precondition_failed(exc):
                return None
            raise
        return (out or {}).get("ETag")

    def replace(self, path: str, data: bytes, version: Any) -> Any | None:
        try:
            out = self.fs.pipe_file(path, data, IfMatch=version)
        except OSError as exc:
            if _precondition_failed(exc) or isinstance(exc, FileNotFoundError):
                return None
            raise
        return (out or {}).get("ETag")


class _LocalBackend(_Backend):
    def read(self, path: str) -> tuple[bytes, Any] | None:
        try:
            with open(path, "rb") as fh:
                data = fh.read()
        except FileNotFoundError:
            return None
        return data, data

    def create(self, path: str, data: bytes) -> Any | None:
        tmp = write_temporary(path, data)
        try:
            os.link(tmp, path)  # atomic, and fails if the name exists: a readable file or nothing
        except FileExistsError:
            return None
        finally:
            os.unlink(tmp)
        return data

    def replace(self, path: str, data: bytes, version: Any) -> Any | None:
        current = self.read(path)
        if current is None or current[1] != version:
            return None
        os.replace(write_temporary(path, data), path)
        return data

    @contextlib.contextmanager
    def exclusive(self, path: str) -> Iterator[None]:
        import fcntl

        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(f"{path}.lock", "a+b") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


class _GenericBackend(_Backend):
    """Any other fsspec filesystem: create-if-absent where it offers it, then read back (create-then-verify)."""

    def __init__(self, fs: Any) -> None:
        self.fs = fs

    def read(self, path: str) -> tuple[bytes, Any] | None:
        try:
            data = bytes(self.fs.cat_file(path))
        except FileNotFoundError:
            return None
        return data, data

    def create(self, path: str, data: bytes) -> Any | None:
        try:
            self.fs.pipe_file(path, data, mode="create")
        except FileExistsError:
            return None
        got = self.read(path)
        return data if got is not None and got[0] == data else None

    def replace(self, path: str, data: bytes, version: Any) -> Any | None:
        got = self.read(path)
        if got is None or got[1] != version:
            return None
        self.fs.pipe_file(path, data)
        got = self.read(path)
        return data if got is not None and got[0] == data else None


def _backend(store: OutputStore) -> _Backend:
    if store.local:
        return _LocalBackend()
    if store.protocol in {"s3", "s3a"}:
        return _S3Backend(store.fs)
    return _GenericBackend(store.fs)


# ------------------------------------------------------------------------------------------------------ the lease


def lease_path(name: str) -> str:
    """The lease object of an output key, relative to the output root."""
    return f"{LEASE_DIR}/{name}.json"


def read_holder(store: OutputStore, name: str) -> Holder | None:
    """The current content of an output key's lease object (held, released or expired), or ``None``."""
    got = _backend(store).read(store.full(lease_path(name)))
    return None if got is None else _parse(got[0])


def live_holders(store: OutputStore) -> list[Holder]:
    """Every lease under the output root whose holder is live (not released, not expired, not a dead local pid)."""
    backend = _backend(store)
    now = time.time()
    out = []
    for rel in store.glob(f"{LEASE_DIR}/*.json"):
        got = backend.read(store.full(rel))
        if got is None:
            continue
        holder = _parse(got[0])
        if holder.dead_reason(now) is None:
            out.append(holder)
    return out


class Lease:
    """The lease of one output key under one output root, for one run.

    Args:
        store: The output root.
        name: The leased name (the run's output key).
        run_id: The run taking it.
        ttl_s: Seconds the lease lives after each heartbeat (heartbeats come every third of it).
        purpose: What takes it (shown to whoever finds it held).
    """

    def __init__(self, store: OutputStore, name: str, *, run_id: str, ttl_s: float = DEFAULT_TTL_S,
                 purpose: str = "run") -> None:
        if ttl_s <= 0:
            raise ValueError(f"ttl_s: must be positive, got {ttl_s}")
        self.store = store
        self.name = name
        self.run_id = run_id
        self.ttl_s = float(ttl_s)
        self.purpose = purpose
        self.path = lease_path(name)
        self._full = store.full(self.path)
        self._backend = _backend(store)
        self._holder: Holder | None = None
        self._version: Any = None
        self._lock = threading.Lock()
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ----------------------------------------------------------------------------------------------- state

    @property
    def held(self) -> bool:
        """Whether this run holds the lease (taken, not lost, not released)."""
        return self._holder is not None and self._lost is None

    @property
    def holder(self) -> Holder | None:
        """This run's lease content while held."""
        return self._holder

    # --------------------------------------------------------------------------------------------- acquire

    def acquire(self, *, wait_s: float = 0.0, force: bool = False, poll_s: float | None = None,
                say: Callable[[str], None] | None = None) -> Holder | None:
        """Take the lease.

        Args:
            wait_s: Wait up to this long for a live holder to release it (0: fail at once).
            force: Take it even from a live holder (``--break-lease``: only for a holder known to be gone).
            poll_s: Seconds between tries while waiting (default: a tenth of the time to live, 1-15 s).
            say: Where to report waiting.

        Returns:
            The previous holder this run took over from (released, expired, dead or broken), or ``None``.

        Raises:
            LeaseHeld: A live run holds it (after ``wait_s``).
        """
        deadline = time.monotonic() + max(0.0, wait_s)
        poll = poll_s if poll_s is not None else min(15.0, max(1.0, self.ttl_s / 10))
        told = False
        while True:
            try:
                return self._try_acquire(force)
            except LeaseHeld as held:
                if time.monotonic() >= deadline:
                    raise
                if say is not None and not told:
                    say(f"waiting up to {wait_s:.0f} s for the lease of output key {self.name}: held by "
                        f"{held.holder.describe()}")
                    told = True
                time.sleep(min(poll, max(0.0, deadline - time.monotonic())))

    def _new_holder(self) -> Holder:
        now = time.time()
        pid = os.getpid()
        return Holder(name=self.name, token=uuid.uuid4().hex, run_id=self.run_id, host=socket.gethostname(),
                      pid=pid, pid_started=_process_started(pid), purpose=self.purpose, acquired_at=now,
                      renewed_at=now, ttl_s=self.ttl_s)

    def _try_acquire(self, force: bool) -> Holder | None:
        mine = self._new_holder()
        data = mine.to_bytes()
        with self._backend.exclusive(self._full):
            current = None
            while current is None:  # (a lease object deleted by hand between our create and our read: again)
                version = self._backend.create(self._full, data)
                if version is not None:
                    self._took(mine, version)
                    return None
                current = self._backend.read(self._full)
            previous = _parse(current[0])
            if previous.token == mine.token:  # our create went through; the retry after a lost response did not
                self._took(mine, current[1])
                return None
            if not force and previous.dead_reason() is None:
                raise LeaseHeld(previous, self.store.url(self.path))
            version = self._backend.replace(self._full, data, current[1])
            if version is None:
                after = self._backend.read(self._full)
                if after is not None and _parse(after[0]).token == mine.token:
                    version = after[1]  # our replace went through, its response was lost
                else:  # another run took it between our read and our write
                    winner = _parse(after[0]) if after is not None else previous
                    raise LeaseHeld(winner, self.store.url(self.path))
            self._took(mine, version)
            return previous

    def _took(self, holder: Holder, version: Any) -> None:
        self._holder, self._version, self._lost = holder, version, None

    # ---------------------------------------------------------------------------------------- renew, check

    def renew(self) -> None:
        """Extend the lease by its time to live (a conditional replace).

        Raises:
            LeaseLost: It expired before this renewal, or another run holds it now.
        """
        with self._lock:
            holder = self._require()
            now = time.time()
            if now >= holder.expires_at:
                self._lost = (f"the lease of output key {self.name} expired at {_iso(holder.expires_at)} before it "
                              "was renewed; another run may have recovered this run's staged units")
                raise LeaseLost(self._lost)
            fresh = replace(holder, renewed_at=now)
            data = fresh.to_bytes()
            with self._backend.exclusive(self._full):
                version = self._backend.replace(self._full, data, self._version)
                if version is None:
                    current = self._backend.read(self._full)
                    if current is not None and current[0] == data:
                        version = current[1]  # our write landed; the retry after a lost response did not
                    else:
                        other = _parse(current[0]).describe() if current is not None else "nobody"
                        self._lost = f"the lease of output key {self.name} is now held by {other}"
                        raise LeaseLost(self._lost)
            self._holder, self._version = fresh, version

    def check(self) -> None:
        """Fence a commit: confirm, with one read of the store, that this run still holds the lease.

        Raises:
            LeaseLost: It was lost, broken, taken or has expired.
        """
        with self._lock:
            holder = self._require()
            if time.time() >= holder.expires_at:
                self._lost = f"the lease of output key {self.name} expired at {_iso(holder.expires_at)}"
                raise LeaseLost(self._lost)
            current = self._backend.read(self._full)
            if current is None or _parse(current[0]).token != holder.token:
                other = _parse(current[0]).describe() if current is not None else "nobody (deleted)"
                self._lost = f"the lease of output key {self.name} is now held by {other}"
                raise LeaseLost(self._lost)

    def _require(self) -> Holder:
        if self._lost is not None:
            raise LeaseLost(self._lost)
        if self._holder is None:
            raise LeaseLost(f"the lease of output key {self.name} is not held by this run")
        return self._holder

    # ------------------------------------------------------------------------------------------- heartbeat

    def start_heartbeat(self, interval_s: float | None = None) -> None:
        """Renew the lease from a daemon thread every ``interval_s`` (default: a third of the time to live).

        A renewal that fails on the network is retried sooner; one that finds the lease lost stops the thread, and
        the next :meth:`check` raises.
        """
        interval = interval_s if interval_s is not None else self.ttl_s / 3

        def beat() -> None:
            wait = interval
            while not self._stop.wait(wait):
                try:
                    self.renew()
                    wait = interval
                except LeaseLost as exc:
                    log.error("%s", exc)
                    return
                except Exception as exc:  # the store did not answer: try again soon, before the lease lapses
                    log.warning("lease heartbeat for output key %s failed (%s: %s); retrying", self.name,
                                type(exc).__name__, exc)
                    wait = max(0.5, interval / 5)

        self._stop.clear()
        self._thread = threading.Thread(target=beat, name=f"lease-{self.name}", daemon=True)
        self._thread.start()

    def stop_heartbeat(self) -> None:
        """Stop the heartbeat thread (idempotent)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    # --------------------------------------------------------------------------------------------- release

    def release(self) -> None:
        """Stop the heartbeat and mark the lease released, if this run still holds it (never raises for a lease
        that was lost: there is nothing of ours to release then)."""
        self.stop_heartbeat()
        with self._lock:
            holder = self._holder
            if holder is None or self._lost is not None:
                self._holder = None
                return
            done = replace(holder, released_at=time.time())
            data = done.to_bytes()
            with self._backend.exclusive(self._full):
                version = self._backend.replace(self._full, data, self._version)
                if version is None:
                    current = self._backend.read(self._full)
                    if current is None or current[0] != data:
                        log.warning("lease of output key %s was no longer this run's at release", self.name)
            self._holder = None

    def __enter__(self) -> Lease:
        self.acquire()
        self.start_heartbeat()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
