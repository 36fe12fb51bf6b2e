"""An experiment folder on any file system pyarrow.fs knows: a local path (or a shared mount such
as EFS/NFS), or a URI: s3://bucket/prefix, gs://bucket/prefix, hdfs://host/path, file:///abs/path.
Plain pyarrow; no Ray.

Every file appears under its final name only when complete: it is written under a temporary name
(".{name}.{random}.tmp") in the same folder and then moved. A local move is a rename; on object
stores (S3, GCS) a move is a server-side copy, and the copy appears whole or not at all. A writer
killed mid-write leaves only a temporary, which ``remove_stale_temporaries`` deletes and every
reader ignores (pyarrow datasets skip names starting with ".").

Object stores need credentials the usual way (AWS_* variables, instance roles, ...). A custom
endpoint (MinIO, a local test server) goes into the URI:
``s3://bucket/exp?endpoint_override=127.0.0.1:9000&scheme=http``.

Two things cannot be written in place on an object store and are staged on local disk instead:
TensorBoard event files (appended to by the writer; uploaded after every epoch) and the Optuna
journal (a file-locked log; downloaded before a search, uploaded after every trial).
"""
from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
import tempfile
import uuid
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs

from .errors import ConfigError
from .faults import disk_full

TEMP_SUFFIX = ".tmp"


class Damaged(Exception):
    """A result file that exists but cannot be used: truncated, unparsable, of the wrong kind.

    ``str(err)`` is one line: what, where and why.
    """

    def __init__(self, what: str, where: str, why: str):
        self.what, self.where, self.why = what, where, why
        super().__init__(f"damaged {what} {where}: {why}")

    def __reduce__(self):
        return (Damaged, (self.what, self.where, self.why))


def _stderr(line: str) -> None:
    import sys

    print(line, file=sys.stderr, flush=True)


_SCHEME_LIKE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):(/?)(?!/)")


def check_uri(root: str) -> None:
    """Refuses a storage root that is a malformed URI instead of letting it become a local folder: ``s3:/b/x`` or
    ``s3:b/x`` (a scheme without "//") and ``s3://`` without a bucket. One-line ConfigError naming the fix."""
    if not root:
        raise ConfigError("storage", "is empty; give a folder or a URI such as s3://bucket/prefix")
    m = _SCHEME_LIKE.match(root)
    if m and "://" not in root:
        rest = root[m.end():]
        raise ConfigError("storage", f"{redact(root)!r} looks like a URI without '//': write {m.group(1)}://{rest} "
                                     f"(or ./{root} for a local folder of that name)")
    if "://" in root:
        parsed = urlparse(root)
        if parsed.scheme not in ("file",) and not parsed.netloc:
            raise ConfigError("storage", f"{redact(root)!r} names no bucket or host: write "
                                         f"{parsed.scheme}://BUCKET/prefix")


class Storage:
    """Paths and atomic file I/O inside one experiment folder (a local path or a URI)."""

    def __init__(self, root):
        root = os.fspath(root)
        check_uri(root)
        self.scheme = urlparse(root).scheme if "://" in root else ""
        if not self.scheme or self.scheme == "file":
            path = urlparse(root).path if self.scheme else root
            self.fs, self.base = pafs.LocalFileSystem(), os.path.abspath(path)
            self.root, self.scheme = self.base, ""
        else:
            try:
                self.fs, base = pafs.FileSystem.from_uri(root)
            except (pa.ArrowException, OSError, ValueError) as e:
                raise ConfigError("storage", f"cannot open {redact(root)!r}: {_first_line(e)} (use a local path or a URI such as "
                                             "s3://bucket/prefix, gs://bucket/prefix, file:///abs/path)") from None
            self.base, self.root = base.rstrip("/"), root
        self._made: set[str] = set()
        self._verified: dict = {}       # (path, size, mtime) -> problem or None, for model checks
        self._warned: set[str] = set()
        self.warn = _stderr             # where one-line reports of damaged files go

    def __repr__(self):
        return f"Storage({self.name!r})"

    def __reduce__(self):  # rebuilt from its root wherever it is unpickled (Ray workers, other nodes)
        return (Storage, (self.root,))

    @property
    def local(self) -> bool:
        return not self.scheme

    @property
    def name(self) -> str:
        """The root as shown to users: credentials in the URI's query are masked."""
        return redact(self.root)

    # ------------------------------------------------------------------ paths (file-system paths, not URIs)

    def path(self, *parts) -> str:
        return os.path.join(self.base, *parts) if self.local else posixpath.join(self.base, *parts)

    def url(self, path: str) -> str:
        """What to show a user for a path: the local path, or scheme://path."""
        return path if self.local else f"{self.scheme}://{path}"

    def model(self, key):
        return self.path("models", f"{key}.pt")

    def record(self, key):
        return self.path("records", f"{key}.json")

    def logits(self, teacher_key, mode, ext="npy"):
        return self.path("logits", f"{teacher_key}-{mode}.{ext}")

    def attack_file(self, job):
        return self.path("results", "attacks", f"dataset={job.dataset}", f"attack={job.attack}", f"{job.key}.parquet")

    def tensorboard(self, key):
        return self.path("tensorboard", key)

    def check_reachable(self) -> None:
        """A one-line ConfigError when the storage cannot be used: no such bucket, no credentials, ..."""
        try:
            if not self.local:
                top = self.base.split("/")[0]
                if self._type(top) == pafs.FileType.NotFound:
                    raise ConfigError("storage", f"{self.scheme}://{top} does not exist (or these credentials "
                                                 f"cannot see it); create it first: {self.name}")
            kind = self._type(self.base)
        except (OSError, pa.ArrowException) as e:
            raise ConfigError("storage", f"cannot reach {self.name}: {_first_line(e)}") from None
        if kind == pafs.FileType.File:
            raise ConfigError("storage", f"{self.name} is a file, not a folder; give a folder (it is created "
                                         "when missing)")

    def check_writable(self) -> None:
        """A one-line ConfigError unless files can be written here (a read-only folder, a full disk,
        credentials that may read but not write), checked before any work starts. Leaves nothing
        behind: a local folder that does not exist yet is not created (its nearest existing parent
        is probed instead)."""
        self.check_reachable()
        folder = self.base
        if self.local:
            while not os.path.isdir(folder) and os.path.dirname(folder) != folder:
                if os.path.exists(folder):
                    raise ConfigError("storage", f"{folder} is a file, not a folder")
                folder = os.path.dirname(folder)
        probe = (os.path.join if self.local else posixpath.join)(folder, f".nodekd-write-probe.{uuid.uuid4().hex[:12]}{TEMP_SUFFIX}")
        try:
            with self.fs.open_output_stream(probe) as f:
                f.write(b"x" * 65536)
        except (OSError, pa.ArrowException) as e:
            raise ConfigError("storage", f"cannot write to {self.name}: {_first_line(e)}") from None
        finally:
            try:
                self.fs.delete_file(probe)
            except (OSError, pa.ArrowException):
                pass

    # ------------------------------------------------------------------ file I/O

    def _type(self, path):
        return self.fs.get_file_info(path).type

    def exists(self, path) -> bool:
        return self._type(path) != pafs.FileType.NotFound

    def isdir(self, path) -> bool:
        return self._type(path) == pafs.FileType.Directory

    def read_bytes(self, path) -> bytes | None:
        """The file's bytes, or None when there is no such file."""
        if self._type(path) != pafs.FileType.File:
            return None
        with self.fs.open_input_stream(path) as f:
            return f.read()

    def read_json(self, path):
        """The parsed file, or None when there is no such file; Damaged when it does not parse."""
        data = self.read_bytes(path)
        if data is None:
            return None
        try:
            return json.loads(data)
        except ValueError as e:
            raise Damaged("file", self.url(path), f"not valid JSON ({len(data)} bytes): {_first_line(e)}") from None

    def report(self, problem: str) -> None:
        """Reports a damaged file once per process, in one line."""
        if problem not in self._warned:
            self._warned.add(problem)
            self.warn(problem)

    def makedirs(self, path) -> None:
        if path not in self._made:
            self.fs.create_dir(path, recursive=True)
            self._made.add(path)

    def temporary(self, path) -> str:
        """A fresh temporary name in path's folder (that folder is created)."""
        folder, name = os.path.split(path) if self.local else posixpath.split(path)
        try:
            self.makedirs(folder)
        except (OSError, pa.ArrowException) as e:
            if self.local and os.path.isfile(self.base):
                raise ConfigError("storage", f"{self.name} is a file, not a folder") from None
            raise e
        tmp = f".{name}.{uuid.uuid4().hex[:12]}{TEMP_SUFFIX}"
        return os.path.join(folder, tmp) if self.local else posixpath.join(folder, tmp)

    def write_bytes(self, path, data: bytes) -> None:
        """Writes the file atomically: a temporary in the same folder, then a move onto the final name."""
        disk_full(path)
        tmp = self.temporary(path)
        try:
            with self.fs.open_output_stream(tmp) as f:
                f.write(data)
            self.fs.move(tmp, path)
        except BaseException:
            try:
                self.fs.delete_file(tmp)
            except (OSError, pa.ArrowException):
                pass
            raise

    def write_json(self, obj, path) -> None:
        self.write_bytes(path, json.dumps(obj, indent=2, sort_keys=True).encode())

    def write_text(self, text: str, path) -> None:
        self.write_bytes(path, text.encode())

    def delete(self, path) -> None:
        self.fs.delete_file(path)

    def files(self, folder, *, recursive=False) -> list[str]:
        """Paths of the files in a folder (none when it does not exist), sorted."""
        infos = self.fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True, recursive=recursive))
        return sorted(i.path for i in infos if i.type == pafs.FileType.File)

    # ------------------------------------------------------------------ the experiment's records

    def record_state(self, key) -> tuple[dict | None, str | None]:
        """(record, None); (None, None) when there is none; (None, why) when it is damaged."""
        path = self.record(key)
        try:
            rec = self.read_json(path)
        except Damaged as e:
            return None, str(e)
        if rec is None:
            return None, None
        if not isinstance(rec, dict) or not isinstance(rec.get("status"), str) or rec.get("key") != key:
            return None, str(Damaged("record", self.url(path), f"not a trial record of {key}"))
        return rec, None

    def read_record(self, key) -> dict | None:
        """The job's record; None when there is none or it is damaged (reported once, then redone)."""
        rec, problem = self.record_state(key)
        if problem:
            self.report(f"{problem}; the job is redone")
        return rec

    def write_record(self, key, rec: dict) -> None:
        self.write_json(rec, self.record(key))

    def model_problem(self, key, rec: dict | None, expect_arch=None) -> str | None:
        """Why the finished model of ``key`` cannot be used, or None when it can.

        A record written since model hashes exist holds the model's size and SHA-256: the file
        must match both (a truncated, swapped or rewritten file does not). An older record is
        checked by loading the checkpoint with the expected architecture. Results are cached per
        (path, size, mtime), so a sweep reads each model once.
        """
        path = self.model(key)
        info = self.fs.get_file_info(path)
        if info.type != pafs.FileType.File:
            return f"missing model {self.url(path)}"
        tag = (path, info.size, info.mtime_ns, (rec or {}).get("model_sha256"), str(expect_arch))
        if tag not in self._verified:
            self._verified[tag] = self._check_model(path, info.size, rec or {}, expect_arch)
        return self._verified[tag]

    def _check_model(self, path, size, rec, expect_arch) -> str | None:
        where = self.url(path)
        want_size, want_sha = rec.get("model_bytes"), rec.get("model_sha256")
        if want_sha:
            if want_size is not None and size != want_size:
                return str(Damaged("model", where, f"{size} bytes, {want_size} were written (truncated or replaced)"))
            data = self.read_bytes(path)
            if data is None or hashlib.sha256(data).hexdigest() != want_sha:
                return str(Damaged("model", where, "its SHA-256 differs from the one recorded when it was written"))
            return None
        import io

        from .checkpoints import load_checkpoint

        data = self.read_bytes(path)
        try:
            load_checkpoint(io.BytesIO(data or b""), name=where, expect_arch=expect_arch)
        except ConfigError as e:
            return str(Damaged("model", where, e.message))
        return None

    def done(self, job) -> bool:
        """True when the job's record says done and its model checks out (see model_problem)."""
        rec = self.read_record(job.key)
        if rec is None or rec.get("status") != "done":
            return False
        problem = self.model_problem(job.key, rec, getattr(job, "arch", "node"))
        if problem:
            self.report(f"{problem}; the job is redone")
        return problem is None

    def stale_done(self, job) -> bool:
        """The job's record is damaged, or says done while the model is missing or damaged: the job
        is redone, and never counts as an 'unfinished' trial that only --resume may continue."""
        rec, problem = self.record_state(job.key)
        if problem:
            return True
        return rec is not None and rec.get("status") == "done" and not self.done(job)

    def records(self) -> list[dict]:
        """Every readable trial record; damaged ones are reported in one line each and left out,
        files that are not records (other names, hidden temporaries) ignored."""
        out = []
        for path in self.files(self.path("records")):
            name = _base_name(path)
            if name.endswith(".json") and not name.startswith("."):
                rec, problem = self.record_state(name[:-len(".json")])
                if problem:
                    self.report(f"{problem}; left out")
                elif rec is not None:
                    out.append(rec)
        return out

    def check_settings(self, settings, *, create: bool) -> None:
        """Refuses a folder made with other scale settings (their results would mix)."""
        mine = settings.to_dict()
        try:
            theirs = self.read_json(self.path("settings.json"))
        except Damaged as e:  # the records keep every job's own config; the folder's settings are rewritten
            self.report(f"{e}; rewritten with this run's settings")
            theirs = None
            create = True
        if theirs is not None:
            if theirs != mine:
                diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
                raise ConfigError("storage", f"{self.name} was made with other settings ({', '.join(diff)} differ); "
                                             "use another --storage or the same options")
        elif create:
            self.write_json(mine, self.path("settings.json"))

    def remove_stale_temporaries(self) -> int:
        """Deletes temporaries left by killed writers (never under a final name). Only a run that
        holds the folder's lock (lock.py) calls it, so no other sweep is writing here; Tune's folder
        is Tune's, and report/ may be written by a ``nodekd report`` running beside the sweep."""
        top = self.fs.get_file_info(pafs.FileSelector(self.base, allow_not_found=True))
        paths = [i.path for i in top if i.type == pafs.FileType.File]
        for i in top:
            if i.type == pafs.FileType.Directory and i.base_name not in ("tune", "report"):
                paths += self.files(i.path, recursive=True)
        stale = [p for p in paths if _base_name(p).startswith(".") and p.endswith(TEMP_SUFFIX)
                 and not _base_name(p).startswith(".lock.json.")]   # the live lock's heartbeat
        for p in stale:
            self.delete(p)
        return len(stale)

    # ------------------------------------------------------------------ local staging (remote storage only)

    def staging(self, *parts) -> str:
        """A local folder that stands in for a remote path (TensorBoard, the Optuna journal)."""
        tag = hashlib.sha1(self.root.encode()).hexdigest()[:12]
        return os.path.join(tempfile.gettempdir(), "nodekd-staging", tag, *parts)

    def upload_tree(self, local_dir: str, path: str, sent: dict | None = None) -> int:
        """Copies the files under local_dir to path/..., each atomically; returns the count.

        sent: {local file: size when uploaded}, updated here; files whose size has not changed
        since are skipped (event files only ever grow).
        """
        n = 0
        for dirpath, _, names in os.walk(local_dir):
            for name in names:
                src = os.path.join(dirpath, name)
                size = os.path.getsize(src)
                if sent is not None and sent.get(src) == size:
                    continue
                rel = os.path.relpath(src, local_dir)
                with open(src, "rb") as f:
                    self.write_bytes(posixpath.join(path, *rel.split(os.sep)), f.read())
                if sent is not None:
                    sent[src] = size
                n += 1
        return n

    def download(self, path, local_path: str) -> bool:
        data = self.read_bytes(path)
        if data is None:
            return False
        os.makedirs(os.path.dirname(local_path), exist_ok=True)
        tmp = local_path + ".download" + TEMP_SUFFIX
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, local_path)
        return True


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


def _base_name(path: str) -> str:
    return path.replace(os.sep, "/").rsplit("/", 1)[-1]


_SECRET = re.compile(r"((?:access_key|secret_key|session_token|credentials_[a-z_]*|token)=)[^&]*", re.I)


def redact(uri: str) -> str:
    """A URI with the values of credential query parameters replaced by ***."""
    return _SECRET.sub(r"\1***", uri)
