"""The output key's lease: one holder at a time (also when many start at once, on a local disk and on S3), a clear
message naming the holder, takeover of released, expired and dead holders, --break-lease, heartbeat, fencing."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from dataclasses import replace

import pytest

from pipelines.archive.lease import Holder, Lease, LeaseHeld, LeaseLost, live_holders, read_holder
from pipelines.archive.store import OutputStore


def _race(store: OutputStore, n: int = 6, **lease_kwargs: float) -> tuple[list[Lease], list[Exception]]:
    """``n`` runs try to take one output key's lease at the same instant."""
    leases = [Lease(store, "k", run_id=f"run{i}", **lease_kwargs) for i in range(n)]
    barrier = threading.Barrier(n)
    won: list[Lease] = []
    lost: list[Exception] = []

    def go(lease: Lease) -> None:
        barrier.wait()
        try:
            lease.acquire()
            won.append(lease)
        except LeaseHeld as exc:
            lost.append(exc)

    threads = [threading.Thread(target=go, args=(lease,)) for lease in leases]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return won, lost


def test_second_run_is_refused_with_the_holder_named(tmp_path):
    store = OutputStore(str(tmp_path))
    first = Lease(store, "k", run_id="20250101T000000Z-aaaaaa")
    assert first.acquire() is None and first.held
    with pytest.raises(LeaseHeld) as info:
        Lease(store, "k", run_id="other").acquire()
    message = str(info.value)
    holder = read_holder(store, "k")
    assert holder is not None
    for part in ("20250101T000000Z-aaaaaa", f"host {holder.host}", f"pid {holder.pid}", "since ",
                 "--break-lease", "--wait-lease", "_leases/k.json"):
        assert part in message, part
    Lease(store, "other-key", run_id="other").acquire()  # another output key is free


def test_many_runs_at_once_exactly_one_wins_local(tmp_path):
    won, lost = _race(OutputStore(str(tmp_path)))
    assert len(won) == 1 and len(lost) == 5
    assert {e.holder.run_id for e in lost} == {won[0].run_id}  # type: ignore[attr-defined]


def test_release_expiry_and_dead_process_free_the_lease(tmp_path):
    store = OutputStore(str(tmp_path))
    a = Lease(store, "k", run_id="a")
    a.acquire()
    a.release()
    b = Lease(store, "k", run_id="b", ttl_s=0.3)
    previous = b.acquire()
    assert previous is not None and previous.run_id == "a" and previous.released_at is not None
    time.sleep(0.4)  # b's driver stopped heartbeating
    c = Lease(store, "k", run_id="c")
    previous = c.acquire()
    assert previous is not None and previous.run_id == "b" and "expired" in previous.dead_reason()
    with pytest.raises(LeaseLost, match="expired"):
        b.renew()
    # a holder whose process on this host has ended (a SIGKILLed driver) binds no one, before its expiry
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = replace(c.holder, token="dead", run_id="killed", pid=int(proc.stdout), pid_started=None)  # type: ignore[type-var]
    (tmp_path / "_leases" / "k.json").write_bytes(dead.to_bytes())
    assert "has ended" in str(dead.dead_reason())
    assert live_holders(store) == []
    d = Lease(store, "k", run_id="d")
    assert d.acquire().run_id == "killed"  # type: ignore[union-attr]


def test_break_lease_takes_it_and_fences_the_old_holder(tmp_path):
    store = OutputStore(str(tmp_path))
    old = Lease(store, "k", run_id="old")
    old.acquire()
    old.check()
    new = Lease(store, "k", run_id="new")
    assert new.acquire(force=True).run_id == "old"  # type: ignore[union-attr]
    with pytest.raises(LeaseLost, match="run new"):
        old.check()
    with pytest.raises(LeaseLost):
        old.renew()
    old.release()  # a lost lease is not ours to release: nothing happens
    assert read_holder(store, "k").run_id == "new"  # type: ignore[union-attr]


def test_heartbeat_keeps_the_lease_alive_and_wait_lease_queues(tmp_path):
    store = OutputStore(str(tmp_path))
    a = Lease(store, "k", run_id="a", ttl_s=0.6)
    a.acquire()
    a.start_heartbeat(interval_s=0.1)
    time.sleep(1.0)  # longer than the time to live: only the heartbeat keeps it
    a.check()
    assert [h.run_id for h in live_holders(store)] == ["a"]
    threading.Timer(0.5, a.release).start()
    lines: list[str] = []
    b = Lease(store, "k", run_id="b")
    t0 = time.monotonic()
    assert b.acquire(wait_s=10, poll_s=0.1, say=lines.append).run_id == "a"  # type: ignore[union-attr]
    assert 0.3 < time.monotonic() - t0 < 5 and "waiting up to 10 s" in lines[0]


def test_an_unreadable_lease_object_binds_no_one(tmp_path):
    store = OutputStore(str(tmp_path))
    (tmp_path / "_leases").mkdir()
    (tmp_path / "_leases" / "k.json").write_text("{not json")
    assert Lease(store, "k", run_id="a").acquire() is not None


@pytest.mark.integration
def test_many_runs_at_once_exactly_one_wins_on_s3(s3):
    s3.make_bucket("leases")
    store = OutputStore("s3://leases/race")
    won, lost = _race(store)
    assert len(won) == 1 and len(lost) == 5
    holder = read_holder(store, "k")
    assert isinstance(holder, Holder) and holder.run_id == won[0].run_id
    # the lease expires: several runs take it over at once, exactly one wins (If-Match on the ETag read)
    won[0].stop_heartbeat()
    expired = replace(holder, renewed_at=time.time() - 1000)
    store.write_bytes("_leases/k.json", expired.to_bytes())
    won2, lost2 = _race(store)
    assert len(won2) == 1 and len(lost2) == 5
    won2[0].renew()
    won2[0].check()
    won2[0].release()
    assert read_holder(store, "k").released_at is not None  # type: ignore[union-attr]
