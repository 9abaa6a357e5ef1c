"""A run directory: per-sample JSONL written as it goes, one writer at a time, never mixed or lost.

* ``samples.jsonl``: one JSON object per finished sample, flushed and fsync'ed per line, so a
  killed run loses at most the sample in flight. On resume only a torn last line (no newline:
  the write a kill cut short) is dropped, and that is logged; any other bad line, or an id seen
  twice, is refused with its line number and nothing is deleted.
* ``run.json``: ``{"identity": ..., "launches": [...]}``. The identity is what defines the results
  (settings, code and library versions); resuming with another one is refused, naming the keys
  that differ, and so are records without a ``run.json``. ``launches`` lists the environment of
  every launch that computed samples (device, threads, date, load): what the timings depend on.
* ``summary.json``: aggregate metrics, rewritten atomically at the end.
* ``.lock``: an exclusive ``flock`` held while a run writes. The OS drops it when the process
  dies, so a crash never leaves a stale lock; a second run into the same directory is refused.

Every check that can refuse a run happens before anything in the directory changes. Temp files
are unique per writer (``tempfile.mkstemp``), so concurrent processes never share one.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from vtclab.errors import UsageError

log = logging.getLogger(__name__)

SAMPLES_FILE = "samples.jsonl"
RUN_FILE = "run.json"
SUMMARY_FILE = "summary.json"
LOCK_FILE = ".lock"
UNSET = "<unset>"


class RunStoreError(UsageError):
    """The run directory cannot be used as asked; the message says why and what to do."""


class RunMismatchError(RunStoreError):
    """The run directory holds results of different settings or code."""


class RunLockedError(RunStoreError):
    """Another process is writing to the run directory."""


class CorruptRunError(RunStoreError):
    """``samples.jsonl`` has a damaged line (other than a torn last one) or a duplicate id."""


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def identity_differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """``"key: old -> new"`` for every flattened key whose value differs (1 and 1.0 are equal)."""
    old_flat, new_flat = flatten(old), flatten(new)
    keys = sorted(k for k in old_flat.keys() | new_flat.keys() if old_flat.get(k, UNSET) != new_flat.get(k, UNSET))
    return [f"{k}: {old_flat.get(k, UNSET)!r} -> {new_flat.get(k, UNSET)!r}" for k in keys]


def write_json_atomic(path: str | Path, payload: Any) -> None:
    """Write JSON through a temp file unique to this writer, fsync, then rename over ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(payload, handle, indent=2, ensure_ascii=False)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def launch_token() -> str:
    """Names one launch: the same in every process of it, different between launches.

    Today a launch is one process. ``torchrun``/``accelerate launch`` give all their processes the
    same ``MASTER_ADDR:MASTER_PORT`` (and ``TORCHELASTIC_RUN_ID``), so a data-parallel launch will
    get one token for all its ranks: the lock below can then admit the ranks of the holder's launch
    (each writing its own shard file) and still refuse any other run.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return "launch:{}@{}:{}".format(os.environ.get("TORCHELASTIC_RUN_ID", ""),
                                        os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", ""))
    return f"{socket.gethostname()}:{os.getpid()}"


class RunLock:
    """An exclusive ``flock`` on ``<directory>/.lock``, recording who holds it.

    flock belongs to the open file: the kernel releases it when the holder closes it or dies,
    however it dies (kill -9 included), so no stale lock survives a crash.
    """

    def __init__(self, directory: str | Path, token: str) -> None:
        self.path = Path(directory) / LOCK_FILE
        self.token = token
        self._fd: int | None = None

    def _refusal(self) -> RunLockedError:
        try:
            holder = json.loads(self.path.read_text(encoding="utf-8"))
            who = f"pid {holder['pid']} on {holder['host']}, since {holder['since']}"
        except (OSError, ValueError, KeyError, TypeError):
            who = "another process"
        return RunLockedError(f"{self.path.parent} is in use by another run ({who}). Wait for it to finish "
                              "or stop it; a run that dies releases the directory by itself.")

    def probe(self) -> None:
        """Raise ``RunLockedError`` if a holder exists, creating nothing (a read-only check)."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise self._refusal() from None
        finally:
            os.close(fd)  # closing drops the probe's own lock

    def acquire(self) -> "RunLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise self._refusal() from None
        self._fd = fd
        return self

    def announce(self) -> None:
        """Record the holder (token, pid, host, time) for the message a refused run prints."""
        holder = {"token": self.token, "pid": os.getpid(), "host": socket.gethostname(),
                  "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, json.dumps(holder).encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


@dataclass
class SamplesFile:
    """What ``samples.jsonl`` holds: its records, and where the complete lines end."""

    records: dict[str, dict]
    complete_bytes: int  # bytes up to and including the last newline
    torn_bytes: int  # bytes after it: a line a kill cut short


def read_samples(path: Path) -> SamplesFile:
    """Parse every complete line strictly; raise ``CorruptRunError`` naming the first bad line."""
    if not path.exists():
        return SamplesFile({}, 0, 0)
    data = path.read_bytes()
    complete = data.rfind(b"\n") + 1
    records: dict[str, dict] = {}
    lines: dict[str, int] = {}
    for number, line in enumerate(data[:complete].split(b"\n")[:-1], start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise CorruptRunError(f"{path}:{number}: not a JSON record ({error}). Nothing was deleted: fix or "
                                  "remove that line, or rerun with resume=false to start the run over.") from None
        if not isinstance(record, dict) or not isinstance(record.get("id"), str):
            raise CorruptRunError(f"{path}:{number}: a record must be a JSON object with a string 'id'. Nothing "
                                  "was deleted: fix or remove that line, or rerun with resume=false.")
        sample_id = record["id"]
        if sample_id in records:
            raise CorruptRunError(f"{path}:{number}: sample {sample_id!r} is already on line {lines[sample_id]} "
                                  "(two runs wrote here). Nothing was deleted: remove one of the two lines, or "
                                  "rerun with resume=false.")
        records[sample_id], lines[sample_id] = record, number
    return SamplesFile(records, complete, len(data) - complete)


def read_run_file(directory: Path) -> dict[str, Any] | None:
    """``run.json`` as ``{"identity", "launches"}``, or None when there is none."""
    path = directory / RUN_FILE
    if not path.exists():
        return None
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CorruptRunError(f"{path} is not valid JSON ({error}); rerun with resume=false to start over.") from None
    if not isinstance(content, dict) or "identity" not in content:  # a run.json from before launches were kept
        content = {"identity": content, "launches": []}
    content.setdefault("launches", [])
    return content


class RunStore:
    """The files of one run directory, locked for this process while it is open.

    Args:
        directory: the run directory (created once every check has passed).
        identity: what defines the results (nested mapping, JSON-serialisable).
        resume: keep finished samples (True) or delete them and start over (False).
        token: this launch's token (see ``launch_token``), recorded in the lock.
    """

    def __init__(self, directory: str | Path, identity: Mapping[str, Any], resume: bool = True,
                 token: str | None = None) -> None:
        self.directory = Path(directory)
        self.samples_path = self.directory / SAMPLES_FILE
        self.identity = json.loads(json.dumps(identity))  # as it reads back from run.json
        self._handle = None
        lock = RunLock(self.directory, token or launch_token())
        if self.directory.exists():  # refuse before creating anything
            lock.probe()
            if resume:
                self._check_identity()
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock = lock.acquire()
        try:
            self._open(resume)
        except BaseException:
            self._lock.release()
            raise
        self._lock.announce()

    @classmethod
    def check(cls, directory: str | Path, identity: Mapping[str, Any], resume: bool = True) -> None:
        """Read-only: raise what opening the directory now would raise (in use, other identity, a bad
        record), changing nothing; a sweep checks every job's directory before the first one runs."""
        store = cls.__new__(cls)
        store.directory, store.samples_path = Path(directory), Path(directory) / SAMPLES_FILE
        store.identity = json.loads(json.dumps(identity))
        if store.directory.exists():
            RunLock(store.directory, "").probe()
            if resume:
                store._check_identity()
                read_samples(store.samples_path)

    # -- opening ---------------------------------------------------------------------------------
    def _check_identity(self) -> list[dict]:
        """Refuse results of other settings or of unknown settings; return the kept launches."""
        stored = read_run_file(self.directory)
        has_records = self.samples_path.exists() and self.samples_path.stat().st_size > 0
        if stored is None:
            if has_records:
                raise RunMismatchError(
                    f"{self.samples_path} has records but {self.directory / RUN_FILE} is missing, so nothing says "
                    "which settings produced them. Use another directory, or resume=false to delete them.")
            return []
        differing = identity_differences(stored["identity"], self.identity)
        if differing and has_records:
            raise RunMismatchError(
                f"{self.directory} holds results of different settings or code ({'; '.join(differing)}). Use "
                "another directory (run_dir=...), or resume=false to delete them and start over.")
        return stored["launches"] if not differing else []

    def _open(self, resume: bool) -> None:
        launches: list[dict] = []
        if resume:
            launches = self._check_identity()  # again, now that this process holds the lock
            samples = read_samples(self.samples_path)
            if samples.torn_bytes:
                log.warning("%s: dropped a torn last line (%d bytes, the sample in flight when a run was killed)",
                            self.samples_path, samples.torn_bytes)
                with open(self.samples_path, "r+b") as handle:
                    handle.truncate(samples.complete_bytes)
            self._records = samples.records
        else:
            self.samples_path.unlink(missing_ok=True)
            (self.directory / SUMMARY_FILE).unlink(missing_ok=True)
            self._records = {}
        self._launches = launches
        self._write_run_file()

    def _write_run_file(self) -> None:
        write_json_atomic(self.directory / RUN_FILE, {"identity": self.identity, "launches": self._launches})

    # -- samples ---------------------------------------------------------------------------------
    def completed_ids(self) -> set[str]:
        return set(self._records)

    def append(self, record: dict) -> None:
        """Write one sample's record durably (flush + fsync) before moving on."""
        if record["id"] in self._records:
            raise ValueError(f"sample {record['id']!r} is already in {self.samples_path}")
        if self._handle is None:
            self._handle = open(self.samples_path, "a", encoding="utf-8")
        self._handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._records[record["id"]] = record

    def records(self, order: Iterable[str]) -> list[dict]:
        """Finished records in the given id order (ids without a record are skipped)."""
        return [self._records[i] for i in order if i in self._records]

    # -- launches and summary --------------------------------------------------------------------
    @property
    def launches(self) -> list[dict]:
        return list(self._launches)

    def record_launch(self, environment: Mapping[str, Any]) -> None:
        """Add this launch's environment to ``run.json`` (before its first sample)."""
        self._launches.append(dict(environment))
        self._write_run_file()

    def write_summary(self, summary: Mapping[str, Any]) -> Path:
        path = self.directory / SUMMARY_FILE
        write_json_atomic(path, dict(summary))
        return path

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        self._lock.release()

    def __enter__(self) -> "RunStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
