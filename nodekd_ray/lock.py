"""One sweep per storage folder: a lock file (STORAGE/lock.json) that names its holder.

The lock holds the holder's host, pid, start time and a heartbeat that a background thread
renews every ``HEARTBEAT_S`` seconds. A second sweep (or search) into the same folder is refused
with one line naming the holder, unless the holder is dead:

- on the same host, a holder whose pid no longer runs is dead at once;
- on another host, a holder whose heartbeat is older than ``STALE_S`` seconds is dead (a killed
  driver, a lost node); a live holder renews it 8 times in that window.

Creating the lock is atomic on a local or shared POSIX folder (a hard link of a complete file,
which fails if the name exists). Object stores (S3, GCS) have no create-if-absent through
pyarrow: there the lock is written, then read back after a pause, and the run goes on only if it
still names this run (two drivers starting within that pause can both pass; documented, not
solved). Plain pyarrow and threads; no Ray.

A process may take the same folder's lock again (the search runs the teachers' sweep inside its
own lock): a count, released when the outermost holder lets go.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import socket
import threading
import time
import uuid

import pyarrow as pa

from .errors import ConfigError
from .storage import Storage

HEARTBEAT_S = float(os.environ.get("NODEKD_LOCK_HEARTBEAT_S", 15))
STALE_S = float(os.environ.get("NODEKD_LOCK_STALE_S", 120))
LOCK_NAME = "lock.json"

_HELD: dict[str, "StorageLock"] = {}   # storage root -> this process's lock on it


def _now() -> float:
    return time.time()


def _iso(t: float) -> str:
    return _dt.datetime.fromtimestamp(t).isoformat(timespec="seconds")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it runs
        return True
    return True


class StorageLock:
    """``with StorageLock(storage, "table2 sweep"): ...`` holds the folder's lock for the block."""

    def __init__(self, storage: Storage, what: str, *, heartbeat_s: float | None = None, stale_s: float | None = None,
                 log=print):
        self.storage, self.what, self.log = storage, what, log
        self.heartbeat_s = HEARTBEAT_S if heartbeat_s is None else heartbeat_s
        self.stale_s = STALE_S if stale_s is None else stale_s
        self.path = storage.path(LOCK_NAME)
        self.id = uuid.uuid4().hex
        self.count = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = False

    # ------------------------------------------------------------------ the holder's identity

    def _content(self, started: float) -> dict:
        return {"id": self.id, "what": self.what, "host": socket.gethostname(), "pid": os.getpid(),
                "started": started, "started_at": _iso(started), "heartbeat": _now(),
                "stale_after_s": self.stale_s}

    def holder(self) -> dict | None:
        """The current lock's content; {} for a lock file that cannot be read (treated as stale)."""
        try:
            data = self.storage.read_bytes(self.path)
        except (OSError, pa.ArrowException):
            return {}
        if data is None:
            return None
        try:
            d = json.loads(data)
            return d if isinstance(d, dict) else {}
        except ValueError:
            return {}

    def dead_reason(self, h: dict) -> str | None:
        """Why the holder ``h`` is dead, or None while it is alive."""
        if not h or "heartbeat" not in h:
            return "the lock file is unreadable"
        age = _now() - float(h["heartbeat"])
        if h.get("host") == socket.gethostname() and not _pid_alive(int(h.get("pid", -1))):
            return f"pid {h.get('pid')} no longer runs on this host"
        if age > float(h.get("stale_after_s", self.stale_s)):
            return f"its last heartbeat was {age:.0f}s ago"
        return None

    @staticmethod
    def describe(h: dict) -> str:
        age = _now() - float(h.get("heartbeat", 0))
        return (f"{h.get('what', 'a run')} on host {h.get('host')} pid {h.get('pid')}, started {h.get('started_at')}, "
                f"last heartbeat {age:.0f}s ago")

    # ------------------------------------------------------------------ acquire / release

    def acquire(self) -> "StorageLock":
        mine = _HELD.get(self.storage.root)
        if mine is not None:        # this process holds it already (the search's inner sweep)
            mine.count += 1
            return mine
        started = _now()
        for _ in range(3):
            h = self.holder()
            if h is not None:
                why = self.dead_reason(h)
                if why is None:
                    raise ConfigError("storage", f"{self.storage.name} is in use by {self.describe(h)}; wait for "
                                                 "it to finish or use another --storage (a dead holder's lock "
                                                 f"expires {h.get('stale_after_s', self.stale_s):g}s after its "
                                                 "last heartbeat)")
                self.log(f"storage: taking over the lock of {self.describe(h)}: {why}")
                try:
                    self.storage.delete(self.path)
                except (OSError, pa.ArrowException):
                    pass
            if self._create(self._content(started)):
                break
        else:
            raise ConfigError("storage", f"could not take the lock {self.storage.url(self.path)}: other runs keep "
                                         "taking it; is another sweep starting on this folder?")
        self.started, self.count = started, 1
        _HELD[self.storage.root] = self
        self._thread = threading.Thread(target=self._beat, name="nodekd-lock-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _create(self, content: dict) -> bool:
        """Creates the lock file if there is none; True when this run now holds it."""
        data = json.dumps(content, indent=2).encode()
        if self.storage.local:
            tmp = self.storage.temporary(self.path)
            with open(tmp, "wb") as f:
                f.write(data)
            try:
                os.link(tmp, self.path)   # atomic: fails when the name exists
                return True
            except FileExistsError:
                return False
            finally:
                os.unlink(tmp)
        if self.storage.exists(self.path):
            return False
        self.storage.write_bytes(self.path, data)
        time.sleep(min(2.0, self.heartbeat_s))
        return (self.holder() or {}).get("id") == self.id

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                h = self.holder()
                if (h or {}).get("id") != self.id:
                    self.lost = True
                    self.log(f"storage: WARNING: lost the lock on {self.storage.name} to "
                             f"{self.describe(h) if h else 'nobody (deleted)'}")
                    return
                self.storage.write_json({**h, "heartbeat": _now()}, self.path)
            except (OSError, pa.ArrowException) as e:  # a full disk, a network blip: try again next beat
                self.log(f"storage: could not renew the lock ({type(e).__name__}: {e}); retrying")

    def release(self) -> None:
        """Lets go of one hold; the last one stops the heartbeat and deletes the lock (a no-op
        when nothing is held)."""
        if self.count <= 0:
            return
        self.count -= 1
        if self.count > 0:
            return
        _HELD.pop(self.storage.root, None)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        try:
            if (self.holder() or {}).get("id") == self.id:
                self.storage.delete(self.path)
        except (OSError, pa.ArrowException):
            pass

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        (_HELD.get(self.storage.root) or self).release()
        return False
