"""The output root's lease (manifests/lease.py): one writer at a time, on a local folder and on S3 (moto).

Real storage throughout: a temp folder and a moto S3 server. A corrupt lease.json is a ValueError naming its URI
(never taken over automatically).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from datetime import datetime, timedelta, timezone

import pytest

from conftest import CANARY_KEY_ID, CANARY_SECRET
from manifests import storage
from manifests.lease import LEASE_FILE, Lease, LeaseHeld, LeaseInfo, LeaseLost

N_RACERS = 8


def _old_lease(uri: str, seconds_ago: float, owner: str = "attempt-dead") -> LeaseInfo:
    """Write, by hand, a lease whose heartbeat is ``seconds_ago`` old (a holder that died)."""
    then = (datetime.now(timezone.utc) - timedelta(seconds=seconds_ago)).isoformat(timespec="microseconds")
    info = LeaseInfo(owner=owner, host="gone-host", pid=4242, user="someone", token="0" * 32, acquired_at=then,
                     heartbeat_at=then)
    storage.write_bytes_atomic(uri, info.to_json())
    return info


def _read(uri: str) -> LeaseInfo:
    return LeaseInfo.from_json(storage.read_bytes(uri), uri)


def _race(root: str, steal: bool = False) -> tuple[list[Lease], list[BaseException]]:
    """N_RACERS threads acquire the same root at once: (winners, errors of the others)."""
    barrier = threading.Barrier(N_RACERS)
    winners: list[Lease] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def go(i: int) -> None:
        lease = Lease(root, owner=f"attempt-{i}", timeout=60)
        barrier.wait()
        try:
            lease.acquire(steal=steal)
        except BaseException as e:  # noqa: BLE001 - collected and asserted below
            with lock:
                errors.append(e)
        else:
            with lock:
                winners.append(lease)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(N_RACERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    return winners, errors


# -- shared scenarios (local folder and S3) ---------------------------------------------------------------------------

def _check_acquire_held_release(root: str) -> None:
    first = Lease(root, owner="attempt-a", timeout=60)
    assert first.uri == storage.join(root, LEASE_FILE)
    assert first.acquire() is None
    on_disk = _read(first.uri)
    assert on_disk == first.info
    assert on_disk.owner == "attempt-a" and on_disk.host and on_disk.pid > 0 and len(on_disk.token) == 32

    second = Lease(root, owner="attempt-b", timeout=60)
    with pytest.raises(LeaseHeld) as held:
        second.acquire()
    message = str(held.value)
    assert "\n" not in message
    assert root in message and "attempt-a" in message and on_disk.host in message and str(on_disk.pid) in message
    assert "ago" in message and "--steal-lease" in message
    assert held.value.holder == on_disk
    assert second.info is None

    first.release()
    assert not storage.exists(first.uri)
    first.release()  # idempotent, no file: no error
    assert second.acquire() is None
    assert _read(second.uri).owner == "attempt-b"
    second.release()
    assert not storage.exists(second.uri)


def _check_race(root: str) -> None:
    winners, errors = _race(root)
    assert len(winners) == 1, f"{len(winners)} winners, errors: {errors}"
    assert len(errors) == N_RACERS - 1
    assert all(isinstance(e, LeaseHeld) for e in errors), errors
    assert all(e.holder.token == winners[0].info.token for e in errors)
    assert _read(winners[0].uri).token == winners[0].info.token
    winners[0].release()


def _check_steal_race(root: str) -> None:
    """Several jobs take over the same stale lease at once: exactly one wins, the others are told who holds it."""
    dead = _old_lease(storage.join(root, LEASE_FILE), 600)
    winners, errors = _race(root, steal=True)
    assert len(winners) == 1, f"{len(winners)} winners, errors: {errors}"
    assert all(isinstance(e, LeaseHeld) for e in errors), errors
    assert all(e.holder.token in (winners[0].info.token, dead.token) for e in errors)
    assert _read(winners[0].uri).token == winners[0].info.token
    winners[0].release()


def _check_steal(root: str) -> None:
    old = Lease(root, owner="attempt-old", timeout=60)
    old.acquire()
    # its holder stops beating: make its heartbeat 120 s old, keeping its token
    stale = _old_lease(old.uri, 120, owner="attempt-old")
    storage.write_bytes_atomic(old.uri, LeaseInfo(**{**stale.__dict__, "token": old.info.token}).to_json())

    new = Lease(root, owner="attempt-new", timeout=60)
    with pytest.raises(LeaseHeld) as held:
        new.acquire()
    assert "attempt-old" in str(held.value) and "--steal-lease" in str(held.value)
    assert new.info is None

    previous = new.acquire(steal=True)
    assert previous is not None and previous.owner == "attempt-old" and previous.token == old.info.token
    assert previous.age_seconds() > 60
    assert _read(new.uri).token == new.info.token

    with pytest.raises(LeaseLost, match="attempt-new"):
        old.heartbeat()
    assert old.lost
    old.release()  # must not delete the new holder's lease
    assert _read(new.uri).token == new.info.token
    new.heartbeat()  # still ours
    new.release()
    assert not storage.exists(new.uri)


# -- local folder ----------------------------------------------------------------------------------------------------

def test_local_acquire_held_release(tmp_path):
    root = str(tmp_path / "runs" / "x")  # parent folders do not exist yet
    _check_acquire_held_release(root)
    assert [p.name for p in (tmp_path / "runs" / "x").iterdir()] == []  # no temp files left behind


def test_local_race_has_one_winner(tmp_path):
    _check_race(str(tmp_path / "out"))


def test_local_steal_a_stale_lease(tmp_path):
    _check_steal(str(tmp_path / "out"))


def test_local_steal_race_has_one_winner(tmp_path):
    _check_steal_race(str(tmp_path / "out"))


def test_local_abandoned_take_over_claim(tmp_path):
    """A take-over claim left by a killed process blocks taking over that lease for a while, not for good."""
    root = str(tmp_path / "out")
    dead = _old_lease(storage.join(root, LEASE_FILE), 600)
    digest = hashlib.sha256(f"{dead.token}\0{dead.heartbeat_at}".encode()).hexdigest()[:16]
    claim = tmp_path / "out" / f"{LEASE_FILE}.tmp-steal-{digest}"
    claim.touch()
    with pytest.raises(LeaseHeld, match="taking it over at this moment"):
        Lease(root, owner="attempt-new").acquire(steal=True)
    os.utime(claim, (time.time() - 3600, time.time() - 3600))
    lease = Lease(root, owner="attempt-new")
    assert lease.acquire(steal=True) == dead
    assert not claim.exists()
    lease.release()
    assert list((tmp_path / "out").iterdir()) == []


def test_steal_refuses_a_fresh_lease(tmp_path):
    root = str(tmp_path / "out")
    holder = Lease(root, owner="attempt-alive", timeout=60)
    holder.acquire()
    with pytest.raises(LeaseHeld) as held:
        Lease(root, owner="attempt-thief", timeout=60).acquire(steal=True)
    message = str(held.value)
    assert "only" in message and "younger than the timeout" in message and "60 s" in message
    assert "attempt-alive" in message and "\n" not in message
    assert _read(holder.uri).token == holder.info.token
    holder.release()


def test_stale_by_timeout_and_sleep(tmp_path):
    """A lease with timeout 0.2 s whose holder does not beat becomes stealable after 0.2 s."""
    root = str(tmp_path / "out")
    sleepy = Lease(root, owner="attempt-sleepy", timeout=0.2)
    sleepy.acquire()
    thief = Lease(root, owner="attempt-thief", timeout=0.2)
    with pytest.raises(LeaseHeld):
        thief.acquire(steal=True)
    time.sleep(0.3)
    assert thief.acquire(steal=True).owner == "attempt-sleepy"
    with pytest.raises(LeaseLost):
        sleepy.heartbeat()
    thief.release()


def test_heartbeat_thread_advances_and_stops(tmp_path):
    lease = Lease(str(tmp_path / "out"), owner="attempt-hb", timeout=5, heartbeat_every=0.1)
    lease.acquire()
    first = _read(lease.uri).heartbeat_at
    lease.start_heartbeat()
    deadline = time.monotonic() + 5
    while _read(lease.uri).heartbeat_at == first and time.monotonic() < deadline:
        time.sleep(0.05)
    later = _read(lease.uri)
    assert later.heartbeat_at > first and later.acquired_at == lease.info.acquired_at
    assert later.token == lease.info.token
    thread = lease._thread
    lease.release()
    assert thread is not None and not thread.is_alive()
    assert not storage.exists(lease.uri)
    assert not lease.lost


def test_heartbeat_thread_records_a_lost_lease(tmp_path, caplog):
    root = str(tmp_path / "out")
    lease = Lease(root, owner="attempt-slow", timeout=5, heartbeat_every=0.05)
    lease.acquire()
    _old_lease(lease.uri, 1, owner="attempt-other")  # someone else's token now
    with caplog.at_level("ERROR", logger="manifests.lease"):
        lease.start_heartbeat()
        deadline = time.monotonic() + 5
        while not lease.lost and time.monotonic() < deadline:
            time.sleep(0.02)
        lease._thread.join(timeout=2)
    assert lease.lost and not lease._thread.is_alive()
    assert any("lost the lease" in r.getMessage() for r in caplog.records)
    lease.release()
    assert _read(lease.uri).owner == "attempt-other"  # not ours: left alone


def test_context_manager(tmp_path):
    root = str(tmp_path / "out")
    with Lease(root, owner="attempt-cm") as lease:
        assert _read(lease.uri).owner == "attempt-cm"
        with pytest.raises(LeaseHeld):
            with Lease(root, owner="attempt-other"):
                pass
    assert not storage.exists(storage.join(root, LEASE_FILE))


@pytest.mark.parametrize("content", [b"{not json", b"[]", b'{"owner": "x"}',
                                     json.dumps({"owner": "a", "host": "h", "pid": "12", "user": "u", "token": "t",
                                                 "acquired_at": "x", "heartbeat_at": "y"}).encode()])
def test_corrupt_lease_is_a_value_error_naming_the_uri(tmp_path, content):
    root = str(tmp_path / "out")
    uri = storage.join(root, LEASE_FILE)
    storage.write_bytes_atomic(uri, content)
    for steal in (False, True):
        with pytest.raises(ValueError, match="corrupt lease file") as err:
            Lease(root, owner="attempt-x").acquire(steal=steal)
        assert uri in str(err.value) and "\n" not in str(err.value)
    assert storage.read_bytes(uri) == content  # never taken over


@pytest.mark.parametrize("timeout", [0, -1.0])
def test_timeout_must_be_positive(tmp_path, timeout):
    with pytest.raises(ValueError, match="timeout") as err:
        Lease(str(tmp_path), owner="a", timeout=timeout)
    assert str(timeout) in str(err.value)
    with pytest.raises(ValueError, match="heartbeat_every"):
        Lease(str(tmp_path), owner="a", timeout=10, heartbeat_every=0)


def test_storage_error_names_the_lease_uri(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    root = str(blocker / "out")  # a folder under a regular file cannot be created
    with pytest.raises(OSError, match="cannot write the lease") as err:
        Lease(root, owner="a").acquire()
    assert storage.join(root, LEASE_FILE) in str(err.value)


def test_lease_info_round_trip_and_age():
    now = datetime.now(timezone.utc)
    stamp = (now - timedelta(seconds=30)).isoformat(timespec="microseconds")
    info = LeaseInfo(owner="o", host="h", pid=1, user="u", token="t" * 32, acquired_at=stamp, heartbeat_at=stamp)
    assert LeaseInfo.from_json(info.to_json(), "x") == info
    assert info.age_seconds(now) == pytest.approx(30.0)


def test_memory_filesystem_best_effort():
    root = f"memory://lease-test-{time.monotonic_ns()}"
    _check_acquire_held_release(root)


# -- S3 (moto) -------------------------------------------------------------------------------------------------------

def test_s3_acquire_held_release(s3_bucket):
    _check_acquire_held_release(f"{s3_bucket}/runs/x")


def test_s3_race_has_one_winner(s3_bucket):
    _check_race(f"{s3_bucket}/runs/x")


def test_s3_steal_a_stale_lease(s3_bucket):
    _check_steal(f"{s3_bucket}/runs/x")


def test_s3_steal_race_has_one_winner(s3_bucket):
    _check_steal_race(f"{s3_bucket}/runs/x")


def test_s3_missing_bucket_names_the_lease_uri(s3_server):
    root = "s3://dr-no-such-bucket-here/runs/x"
    with pytest.raises(OSError, match="cannot write the lease") as err:
        Lease(root, owner="a").acquire()
    message = str(err.value)
    assert storage.join(root, LEASE_FILE) in message
    assert CANARY_SECRET not in message and CANARY_KEY_ID not in message  # no credentials


def test_a_lease_of_a_dead_process_on_this_host_is_taken_over(tmp_path):
    """A job killed on this machine (its pid is gone) does not block the next one until the timeout; a live
    process's lease still does."""
    import socket
    import subprocess
    import sys

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(gone.stdout)
    uri = storage.join(str(tmp_path), LEASE_FILE)
    fresh = LeaseInfo.from_json(_old_lease(uri, 1.0).to_json(), uri)
    for pid, taken in ((dead, True), (os.getppid(), False)):
        here = {**json.loads(fresh.to_json()), "pid": pid, "host": socket.gethostname()}
        storage.write_bytes_atomic(uri, json.dumps(here).encode())
        lease = Lease(str(tmp_path), "next", timeout=300)
        if taken:
            assert lease.acquire().pid == dead  # the previous holder is returned, as for a steal
            assert _read(uri).owner == "next"
            lease.release()
        else:
            with pytest.raises(LeaseHeld, match=f"pid {pid}"):
                lease.acquire()
