"""One writer at a time on an output root: the lease file ``{root}/lease.json``.

A batch job takes the lease before it writes into an output root and keeps it alive with a heartbeat; a second job on
the same root is refused (:class:`LeaseHeld`) instead of interleaving its results with the first one's. A job that
died without releasing leaves a lease whose heartbeat stops; once the heartbeat is older than the timeout, a new job
may take it over explicitly (``steal=True``, the CLI's ``--steal-lease``), and the old holder, if it was only slow,
finds out at its next heartbeat (:class:`LeaseLost`).

How atomic it is depends on the storage:

* local filesystem: the lease is created exclusively and with its full content (a temporary sibling hard-linked onto
  ``lease.json``: ``os.link`` fails if the target exists). Heartbeats and take-overs read the file, check it and
  rename a temporary sibling over it (``os.replace``). Concurrent take-overs of one stale lease first claim it
  exclusively (``lease.json.tmp-steal-{digest of its token and heartbeat}``), so exactly one of them wins. Between the
  check and the rename there is still a window of microseconds in which a heartbeat of the old holder and a
  take-over can overwrite each other; a take-over only ever happens on a lease whose heartbeat is ``timeout`` seconds
  old, so this needs a holder that wakes up at the very moment it is being replaced, and whichever of the two is
  overwritten finds out at its next heartbeat (:class:`LeaseLost`).
* S3 (s3fs): exclusive create with a conditional PUT (``If-None-Match: *``), heartbeats and take-overs as a
  compare-and-swap (``If-Match`` on the ETag of the version read). The ETag is read before the content, so the write
  only succeeds if the object is still the version whose content was checked. Release deletes after checking the
  token (a plain DELETE: a take-over in between would be deleted, which again needs a lease stale for ``timeout``).
* any other fsspec filesystem (``memory://``, ``gs://``, ...): best effort, NOT atomic: a lease that exists is held;
  otherwise it is written, read back and our token confirmed.

A corrupt ``lease.json`` is never taken over: reading it raises a ValueError naming its URI (delete the file by hand
once no job is writing into the root).
"""

from __future__ import annotations

import getpass
import hashlib
import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass, fields, replace
from datetime import datetime, timezone
from typing import Any

from fsspec.implementations.local import LocalFileSystem

from manifests import storage

logger = logging.getLogger(__name__)

LEASE_FILE = "lease.json"
_ACQUIRE_TRIES = 5  # the lease vanished between "it exists" and reading it: start over, a few times
_CLAIM_EXPIRY = 30.0  # seconds after which a local take-over claim left by a killed process is removed


class LeaseHeld(RuntimeError):
    """Another submission holds the lease; :attr:`holder` is the :class:`LeaseInfo` read from the lease file."""

    def __init__(self, message: str, holder: LeaseInfo, root: str = ""):
        super().__init__(message)
        self.holder = holder
        self.root = root


class LeaseLost(RuntimeError):
    """Our lease was taken over by someone else: the lease file holds another token, or is gone."""


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name in some containers
        return str(os.getuid()) if hasattr(os, "getuid") else "?"


def _one_line(value: Any) -> str:
    return " ".join(str(value).split())


def _redact(uri: str) -> str:
    """``uri`` without the user-info part of a URL (``scheme://user:secret@host`` -> ``scheme://***@host``)."""
    return re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/@]+@", r"\1***@", str(uri))


def _died_here(holder: "LeaseInfo") -> bool:
    """True when the holder ran on this host and its process is gone (a killed job: no need to wait for the
    timeout). Hosts are told apart by name, so containers must not share one (Kubernetes pods and Docker
    containers get their own by default)."""
    if holder.host != socket.gethostname() or holder.pid == os.getpid():
        return False
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # it exists, owned by another user
        return False
    return False


def _fmt_age(seconds: float) -> str:
    return f"{seconds:.1f} s" if abs(seconds) < 100 else f"{seconds:.0f} s"


@dataclass(frozen=True)
class LeaseInfo:
    """What the lease file holds: who holds it, and when it last proved to be alive."""

    owner: str  # e.g. the attempt id of the submission holding it
    host: str
    pid: int
    user: str
    token: str  # uuid4 hex, unique per acquisition
    acquired_at: str  # ISO 8601 UTC with microseconds
    heartbeat_at: str  # ISO 8601 UTC with microseconds

    def age_seconds(self, now: datetime | None = None) -> float:
        """Seconds since :attr:`heartbeat_at` (negative if the holder's clock is ahead of ours)."""
        beat = datetime.fromisoformat(self.heartbeat_at)
        if beat.tzinfo is None:
            beat = beat.replace(tzinfo=timezone.utc)
        now = now or datetime.now(timezone.utc)
        if now.tzinfo is None:
            now = now.replace(tzinfo=timezone.utc)
        return (now - beat).total_seconds()

    def to_json(self) -> bytes:
        return (json.dumps(asdict(self), indent=2) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes, uri: str) -> LeaseInfo:
        """Parse a lease file; anything but a complete lease record is a ValueError naming ``uri``."""
        where = _redact(uri)
        try:
            raw = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"corrupt lease file {where}: not JSON ({_one_line(e)}); delete it if no job is writing "
                             f"into this output root") from e
        if not isinstance(raw, dict):
            raise ValueError(f"corrupt lease file {where}: expected a JSON object, got {type(raw).__name__}; delete "
                             f"it if no job is writing into this output root")
        names = [f.name for f in fields(cls)]
        missing = [n for n in names if n not in raw]
        if missing:
            raise ValueError(f"corrupt lease file {where}: missing {', '.join(missing)}; delete it if no job is "
                             f"writing into this output root")
        values: dict[str, Any] = {}
        for name in names:
            value = raw[name]
            ok = isinstance(value, int) and not isinstance(value, bool) if name == "pid" else isinstance(value, str)
            if not ok:
                raise ValueError(f"corrupt lease file {where}: {name}={value!r} has the wrong type; delete it if no "
                                 f"job is writing into this output root")
            values[name] = value
        info = cls(**values)
        try:
            info.age_seconds()
            datetime.fromisoformat(info.acquired_at)
        except (TypeError, ValueError) as e:
            raise ValueError(f"corrupt lease file {where}: a timestamp is not ISO 8601 ({_one_line(e)}); delete it "
                             f"if no job is writing into this output root") from e
        return info


class Lease:
    """The lease on ``root``: :meth:`acquire` it, keep it alive (:meth:`start_heartbeat`), :meth:`release` it.

    Also a context manager (``with Lease(root, owner): ...`` acquires without stealing and releases on exit).
    """

    def __init__(self, root: str, owner: str, timeout: float = 300.0, heartbeat_every: float | None = None):
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got timeout={timeout!r}")
        heartbeat_every = timeout / 4 if heartbeat_every is None else heartbeat_every
        if not heartbeat_every > 0:
            raise ValueError(f"heartbeat_every must be > 0 seconds, got heartbeat_every={heartbeat_every!r}")
        if heartbeat_every >= timeout:
            logger.warning("lease heartbeat every %s s is not shorter than its timeout %s s: another job may take "
                           "it over while it is alive", heartbeat_every, timeout)
        self.root = str(root)
        self.owner = str(owner)
        self.timeout = float(timeout)
        self.heartbeat_every = float(heartbeat_every)
        self.uri = storage.join(self.root, LEASE_FILE)
        self.info: LeaseInfo | None = None
        self.lost = False
        self._fs, self._path = storage.filesystem(self.uri)
        protocols = self._fs.protocol if isinstance(self._fs.protocol, (tuple, list)) else (self._fs.protocol,)
        if isinstance(self._fs, LocalFileSystem):
            self._kind = "local"
        elif "s3" in protocols or type(self._fs).__name__ == "S3FileSystem":
            self._kind = "s3"
        else:
            self._kind = "other"
        self._lock = threading.RLock()  # one heartbeat / release at a time (thread and caller)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"Lease({_redact(self.uri)!r}, owner={self.owner!r}, held={self.info is not None})"

    # -- public API --------------------------------------------------------------------------------------------------

    def acquire(self, steal: bool = False) -> LeaseInfo | None:
        """Take the lease. Returns None when it was free, the previous holder's :class:`LeaseInfo` when a stale one
        was taken over (``steal=True`` and its heartbeat older than ``timeout``); raises :class:`LeaseHeld` otherwise.
        A storage error is an OSError naming the lease URI."""
        with self._lock:
            if self.info is not None:
                raise RuntimeError(f"the lease {_redact(self.uri)} is already held by this Lease (owner "
                                   f"{_one_line(self.owner)}); release it first")
            now = _utc_now()
            mine = LeaseInfo(owner=self.owner, host=socket.gethostname(), pid=os.getpid(), user=_user(),
                             token=uuid.uuid4().hex, acquired_at=now, heartbeat_at=now)
            for _ in range(_ACQUIRE_TRIES):
                if self._guard("write", self._create, mine):
                    self._won(mine)
                    logger.info("acquired the lease %s (owner %s, token %s)", _redact(self.uri), mine.owner,
                                mine.token)
                    return None
                current = self._guard("read", self._read)
                if current is None:  # released between our create and our read: try again
                    continue
                holder, version = current
                if holder.token == mine.token:  # "other" filesystems: our own write, confirmed
                    self._won(mine)
                    return None
                age = holder.age_seconds()
                dead = _died_here(holder)
                if not dead and (not steal or age <= self.timeout):
                    raise self._held(holder, age, steal)
                if dead:
                    logger.warning("the lease %s belongs to pid %s on this host (%s), which is no longer running: "
                                   "taking it over", _redact(self.uri), holder.pid, holder.host)
                if not self._guard("write", self._swap, version, mine, True):
                    # another job changed it since we read it, or is taking it over right now: name the holder
                    current = self._guard("read", self._read)
                    if current is None:
                        continue
                    racing = current[1] == version  # unchanged: a concurrent take-over holds the claim
                    raise self._held(current[0], current[0].age_seconds(), steal, racing=racing)
                self._won(mine)
                logger.warning("took over the stale lease %s from owner %s (host %s, pid %s; heartbeat %s ago, "
                               "timeout %s s)", _redact(self.uri), holder.owner, holder.host, holder.pid,
                               _fmt_age(age), f"{self.timeout:g}")
                return holder
            raise OSError(f"cannot write the lease {_redact(self.uri)}: it kept changing while being acquired "
                          f"({_ACQUIRE_TRIES} tries)")

    def heartbeat(self) -> None:
        """Refresh ``heartbeat_at``, only if the lease file still holds our token (else :class:`LeaseLost`)."""
        with self._lock:
            if self.info is None:
                raise RuntimeError(f"the lease {_redact(self.uri)} is not held by this Lease (owner "
                                   f"{_one_line(self.owner)}): nothing to refresh")
            current = self._guard("refresh", self._read)
            if current is None:
                raise self._lost("the lease file is gone")
            holder, version = current
            if holder.token != self.info.token:
                raise self._lost(f"it now belongs to owner {_one_line(holder.owner)} (host {_one_line(holder.host)}, "
                                 f"pid {holder.pid})")
            fresh = replace(self.info, owner=self.owner, heartbeat_at=_utc_now())  # owner: set once known
            if not self._guard("refresh", self._swap, version, fresh, False):
                raise self._lost("it was changed by someone else during the heartbeat")
            self.info = fresh

    def start_heartbeat(self) -> None:
        """Call :meth:`heartbeat` every ``heartbeat_every`` seconds in a daemon thread until :meth:`release`.

        A lost lease sets :attr:`lost` (logged as an error) and stops the thread; a transient storage error is logged
        as a warning and retried at the next beat."""
        with self._lock:
            if self.info is None:
                raise RuntimeError(f"the lease {_redact(self.uri)} is not held by this Lease: acquire it first")
            if self._thread is not None and self._thread.is_alive():
                return
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._beat, args=(self._stop,), daemon=True,
                                            name=f"lease-heartbeat-{self.owner}")
            self._thread.start()

    def release(self) -> None:
        """Stop the heartbeat and delete the lease file if it still holds our token. Idempotent; never raises for a
        missing file; a storage error is logged as a warning (the lease then goes stale and may be taken over)."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=max(5.0, self.heartbeat_every))
        self._thread = None
        with self._lock:
            info, self.info = self.info, None
            if info is None:
                return
            try:
                current = self._read()
                if current is None:
                    logger.warning("the lease %s was already gone at release", _redact(self.uri))
                    return
                if current[0].token != info.token:
                    logger.warning("the lease %s now belongs to owner %s (host %s, pid %s): not deleting it",
                                   _redact(self.uri), current[0].owner, current[0].host, current[0].pid)
                    return
                self._fs.rm_file(self._path)
                self._fs.invalidate_cache(self._path)
                logger.info("released the lease %s", _redact(self.uri))
            except FileNotFoundError:
                pass
            except Exception as e:  # noqa: BLE001 - release runs in finally blocks: never mask the real error
                logger.warning("cannot release the lease %s: %s: %s", _redact(self.uri), type(e).__name__,
                               _one_line(e))

    def __enter__(self) -> Lease:
        self.acquire()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    # -- internals ---------------------------------------------------------------------------------------------------

    def _won(self, mine: LeaseInfo) -> None:
        self.info = mine
        self.lost = False

    def _held(self, holder: LeaseInfo, age: float, steal: bool, racing: bool = False) -> LeaseHeld:
        who = (f"owner {_one_line(holder.owner)} (host {_one_line(holder.host)}, pid {holder.pid}, user "
               f"{_one_line(holder.user)})")
        if racing:
            message = (f"the output root {_redact(self.root)} is leased by {who}, last heartbeat {_fmt_age(age)} ago, "
                       f"and another job is taking it over at this moment with --steal-lease; not taken over")
        elif steal:
            message = (f"the output root {_redact(self.root)} is leased by {who}, whose heartbeat is only "
                       f"{_fmt_age(age)} old, younger than the timeout ({self.timeout:g} s): it looks alive and is not "
                       f"taken over; only a lease whose heartbeat is older than the timeout may be taken with "
                       f"--steal-lease")
        else:
            message = (f"the output root {_redact(self.root)} is leased by {who}, last heartbeat {_fmt_age(age)} ago; "
                       f"a lease whose heartbeat is older than the timeout ({self.timeout:g} s) may be taken with "
                       f"--steal-lease")
        return LeaseHeld(message, holder, self.root)

    def _lost(self, why: str) -> LeaseLost:
        self.lost = True
        return LeaseLost(f"lost the lease {_redact(self.uri)} (owner {_one_line(self.owner)}): {why}")

    def _guard(self, verb: str, func: Any, *args: Any) -> Any:
        """Run a storage step; an OSError from it becomes one naming the lease URI (never credentials)."""
        try:
            return func(*args)
        except OSError as e:
            raise OSError(f"cannot {verb} the lease {_redact(self.uri)}: {type(e).__name__}: {_one_line(e)}") from e

    def _beat(self, stop: threading.Event) -> None:
        while not stop.wait(self.heartbeat_every):
            if self.info is None:  # released meanwhile
                return
            try:
                self.heartbeat()
            except LeaseLost as e:
                self.lost = True
                logger.error("%s; stopping its heartbeat", e)
                return
            except Exception as e:  # noqa: BLE001 - transient storage errors: try again at the next beat
                logger.warning("lease heartbeat failed, retrying in %s s: %s: %s", f"{self.heartbeat_every:g}",
                               type(e).__name__, _one_line(e))

    # storage primitives: _create (exclusive), _read (info + version), _swap (compare-and-swap on the version read)

    def _create(self, mine: LeaseInfo) -> bool:
        """Create the lease file with ``mine`` if there is none; False if one exists."""
        data = mine.to_json()
        fs, path = self._fs, self._path
        if self._kind == "local":
            parent = os.path.dirname(path)
            if parent:
                os.makedirs(parent, exist_ok=True)
            tmp = self._write_tmp(data)
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
            finally:
                os.unlink(tmp)
            return True
        if self._kind == "s3":
            try:
                fs.pipe_file(path, data, mode="create")
            except OSError as e:
                if _precondition_failed(e):
                    return False
                raise
            return True
        fs.invalidate_cache(path)
        if fs.exists(path):
            return False
        parent = path.rsplit("/", 1)[0] if "/" in path else ""
        if parent and not fs.exists(parent):
            fs.makedirs(parent, exist_ok=True)
        fs.pipe_file(path, data)
        return False  # not atomic: the caller reads it back and wins only if our token is there

    def _read(self) -> tuple[LeaseInfo, Any] | None:
        """(the lease, its version) or None if there is none. The version is what :meth:`_swap` compares against:
        the ETag on S3, (token, heartbeat_at) elsewhere."""
        fs, path = self._fs, self._path
        fs.invalidate_cache(path)
        try:
            if self._kind == "s3":
                etag = fs.info(path)["ETag"]  # before the content: a swap on it fails if the content read is newer
                data = fs.cat_file(path)
            else:
                etag = None
                data = fs.cat_file(path)
        except FileNotFoundError:
            return None
        info = LeaseInfo.from_json(data, self.uri)
        return info, (etag if self._kind == "s3" else (info.token, info.heartbeat_at))

    def _swap(self, version: Any, new: LeaseInfo, steal: bool) -> bool:
        """Replace the lease read as ``version`` by ``new``; False if it changed since (or is gone).

        Locally a heartbeat compares the token only (ours); a take-over compares the whole version and first claims
        it (an exclusive ``lease.json.tmp-steal-{digest}``), so that of several concurrent take-overs of one stale
        lease exactly one replaces it."""
        data = new.to_json()
        fs, path = self._fs, self._path
        if self._kind == "s3":
            try:
                fs.pipe_file(path, data, IfMatch=version)
            except FileNotFoundError:
                return False
            except OSError as e:
                if _precondition_failed(e):
                    return False
                raise
            return True
        if self._kind == "local":
            claim = self._claim(version) if steal else ""
            if claim is None:
                return False
            tmp = self._write_tmp(data)
            try:
                current = self._read()  # as late as possible: the window until os.replace is microseconds
                if current is None or not (current[1] == version if steal else current[1][0] == version[0]):
                    return False
                os.replace(tmp, path)
                tmp = ""
            finally:
                for leftover in (tmp, claim):
                    if leftover:
                        _unlink(leftover)
            return True
        current = self._read()
        if current is None or current[1] != version:
            return False
        fs.pipe_file(path, data)
        confirm = self._read()
        return confirm is not None and confirm[0].token == new.token

    def _claim(self, version: tuple[str, str]) -> str | None:
        """Local take-over: exclusively create the claim file of ``version``; None if another process holds it.

        A claim lives for microseconds; one left behind by a process killed in between is removed after
        ``_CLAIM_EXPIRY`` seconds, so it cannot block a take-over for good."""
        digest = hashlib.sha256("\0".join(version).encode()).hexdigest()[:16]
        claim = f"{self._path}.tmp-steal-{digest}"
        for _ in range(2):
            try:
                os.close(os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
                return claim
            except FileExistsError:
                try:
                    age = time.time() - os.stat(claim).st_mtime
                except FileNotFoundError:
                    continue
                if age < _CLAIM_EXPIRY:
                    return None
                logger.warning("removing an abandoned take-over claim %s (%.0f s old)", claim, age)
                _unlink(claim)
        return None

    def _write_tmp(self, data: bytes) -> str:
        tmp = f"{self._path}.tmp-{uuid.uuid4().hex}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return tmp


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _precondition_failed(error: BaseException) -> bool:
    """True if ``error`` (s3fs's translation of a botocore error) is a failed ``If-None-Match`` / ``If-Match``.

    s3fs raises FileExistsError for a failed ``If-None-Match: *`` when the server names the condition (AWS, moto),
    and a plain OSError(EINVAL) for a failed ``If-Match`` (or servers that do not name it); the botocore ClientError
    is its ``__cause__``. AWS answers 409 ConditionalRequestConflict to a conditional write racing another one."""
    if isinstance(error, FileExistsError):
        return True
    seen = 0
    cause: BaseException | None = error
    while cause is not None and seen < 5:
        response = getattr(cause, "response", None)
        if isinstance(response, dict):
            code = str((response.get("Error") or {}).get("Code", ""))
            status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
            if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412):
                return True
        cause = cause.__cause__ or cause.__context__
        seen += 1
    return False
