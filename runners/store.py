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
* ``shards/rank<r>.jsonl``: in a data-parallel launch (``runners.parallel``) every process appends
  its records to its own shard file, exclusively ``flock``-ed by it; the main process holds
  ``.lock`` for all of them, and the others join under the launch's token (a second, unrelated run
  is refused as before). At the end the main process merges the shards into ``samples.jsonl`` in
  the benchmark's id order (the file a single-process run writes) and deletes them. Shards a kill
  left behind are merged when the run is next opened, with any number of processes: the work is
  keyed by sample id, not by shard.

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
SHARDS_DIR = "shards"
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
    write_lines_atomic(path, [json.dumps(payload, indent=2, ensure_ascii=False), "\n"])


def write_lines_atomic(path: str | Path, lines: Iterable[str]) -> None:
    """Write text lines through a temp file unique to this writer, fsync, then rename over ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # the mode open() gives an appended file, not mkstemp's 0600
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.writelines(lines)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def shard_path(directory: str | Path, rank: int) -> Path:
    return Path(directory) / SHARDS_DIR / f"rank{rank}.jsonl"


def shard_files(directory: str | Path) -> list[Path]:
    """The shard files of ``directory``, by rank."""
    return sorted((Path(directory) / SHARDS_DIR).glob("rank*.jsonl"), key=lambda p: int(p.stem[4:] or 0))


def probe_shards(directory: str | Path) -> None:
    """Raise ``RunLockedError`` if a process (of a launch whose main process died) still writes a shard."""
    for path in shard_files(directory):
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunLockedError(f"{path} is still being written by a process of an earlier launch. Stop it (or "
                                 "wait for it to end); a process that dies releases its shard by itself.") from None
        finally:
            os.close(fd)


def launch_token() -> str:
    """Names one launch: the same in every process of it, different between launches.

    A data-parallel launch's main process adds a random suffix and sends the token to its other
    processes (``runners.parallel.open_run_store``): they join the run the lock's holder announces
    under that token (``RunStore.join``), and any other run is refused.
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

    def wait(self) -> bool:
        """Block until no process holds the lock; False at once if none held it."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return False
            except BlockingIOError:
                fcntl.flock(fd, fcntl.LOCK_EX)  # returns when the holder closes it or dies
                return True
        finally:
            os.close(fd)

    def holder(self) -> dict[str, Any] | None:
        """What the holder announced (token, pid, host, since), or None."""
        try:
            holder = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return holder if isinstance(holder, dict) else None

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
        order: the benchmark's sample ids; ``samples.jsonl`` keeps its records in this order.
        rank: None for a single-process run (records go to ``samples.jsonl``); 0 for the main
            process of a data-parallel launch (it holds the lock; records go to its shard file).
            Other ranks join with ``RunStore.join``.
    """

    def __init__(self, directory: str | Path, identity: Mapping[str, Any], resume: bool = True,
                 token: str | None = None, order: Iterable[str] = (), rank: int | None = None) -> None:
        self.directory = Path(directory)
        self.samples_path = self.directory / SAMPLES_FILE
        self.identity = json.loads(json.dumps(identity))  # as it reads back from run.json
        self.order = list(order)
        self._handle = None
        self._write_path = self.samples_path
        lock = RunLock(self.directory, token or launch_token())
        if self.directory.exists():  # refuse before creating anything
            lock.probe()
            probe_shards(self.directory)
            if resume:
                self._check_identity()
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock = lock.acquire()
        try:
            self._open(resume)
            if rank is not None:
                self._open_shard(rank)
        except BaseException:
            self._lock.release()
            raise
        self._lock.announce()

    @classmethod
    def join(cls, directory: str | Path, identity: Mapping[str, Any], token: str, rank: int,
             order: Iterable[str] = ()) -> "RunStore":
        """Open the run as process ``rank`` (> 0) of the launch whose main process holds the lock
        under ``token``; its records go to its own shard file. Another holder is refused."""
        store = cls.__new__(cls)
        store.directory, store.samples_path = Path(directory), Path(directory) / SAMPLES_FILE
        store.identity = json.loads(json.dumps(identity))
        store.order = list(order)
        store._handle = store._lock = None
        holder = RunLock(store.directory, token).holder() or {}
        if holder.get("token") != token:
            raise RunLockedError(f"{store.directory} is not held by this launch (holder: {holder or 'none'}); a "
                                 "process of a data-parallel launch joins only the run its main process opened.")
        store._records = read_samples(store.samples_path).records  # the main process has merged and truncated
        store._launches = []
        store._open_shard(rank)
        return store

    @classmethod
    def check(cls, directory: str | Path, identity: Mapping[str, Any], resume: bool = True) -> None:
        """Read-only: raise what opening the directory now would raise (in use, other identity, a bad
        record), changing nothing; a sweep checks every job's directory before the first one runs."""
        store = cls.__new__(cls)
        store.directory, store.samples_path = Path(directory), Path(directory) / SAMPLES_FILE
        store.identity = json.loads(json.dumps(identity))
        if store.directory.exists():
            RunLock(store.directory, "").probe()
            probe_shards(store.directory)
            if resume:
                store._check_identity()
                read_samples(store.samples_path)

    # -- opening ---------------------------------------------------------------------------------
    def _check_identity(self) -> list[dict]:
        """Refuse results of other settings or of unknown settings; return the kept launches."""
        stored = read_run_file(self.directory)
        has_records = any(path.exists() and path.stat().st_size > 0
                          for path in (self.samples_path, *shard_files(self.directory)))
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
            self._merge_shards()
        else:
            self.samples_path.unlink(missing_ok=True)
            (self.directory / SUMMARY_FILE).unlink(missing_ok=True)
            for path in shard_files(self.directory):
                path.unlink()
            self._records = {}
        self._launches = launches
        self._write_run_file()

    def _open_shard(self, rank: int) -> None:
        """Append this process's records to ``shards/rank<rank>.jsonl``, holding its ``flock``."""
        self._write_path = shard_path(self.directory, rank)
        self._write_path.parent.mkdir(exist_ok=True)
        self._handle = open(self._write_path, "a", encoding="utf-8")  # new: left over ones were merged at open
        try:
            fcntl.flock(self._handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._handle.close()
            raise RunLockedError(f"{self._write_path} is being written by another process") from None

    def _merge_shards(self) -> None:
        """Fold the shard files of this or an earlier launch into ``samples.jsonl`` (in ``order``),
        then delete them. A torn last line (a process killed mid-write) is dropped; an id already
        stored (a merge cut short after its rename) is kept once."""
        paths = shard_files(self.directory)
        if not paths:
            return
        for path in paths:
            shard = read_samples(path)
            if shard.torn_bytes:
                log.warning("%s: dropped a torn last line (%d bytes, the sample in flight when a process was "
                            "killed)", path, shard.torn_bytes)
            for sample_id, record in shard.records.items():
                self._records.setdefault(sample_id, record)
        self._rewrite_samples()
        for path in paths:
            path.unlink()
        with contextlib.suppress(OSError):  # not empty: a file that is not a shard stays, and so does the folder
            paths[0].parent.rmdir()
        log.info("merged %d shard files into %s", len(paths), self.samples_path)

    def _rewrite_samples(self) -> None:
        """Rewrite ``samples.jsonl`` atomically: the ids of ``order`` first, in that order, then the rest."""
        ordered = [i for i in dict.fromkeys(self.order) if i in self._records]
        placed = set(ordered)
        self._records = {i: self._records[i] for i in ordered + [i for i in self._records if i not in placed]}
        write_lines_atomic(self.samples_path,
                           (json.dumps(record, ensure_ascii=False) + "\n" for record in self._records.values()))

    def finalise(self) -> None:
        """The main process, once every process has finished: merge the shards into ``samples.jsonl``.

        A single-process run's file is rewritten only when it is out of ``order`` (it resumed
        after a data-parallel launch), so it equals what one uninterrupted process writes."""
        if self._write_path != self.samples_path:  # data-parallel: this process wrote a shard
            self._close_handle()
            self._write_path = self.samples_path
            self._merge_shards()
        elif self.order:
            wanted = set(self.order)
            if [i for i in self._records if i in wanted] != [i for i in dict.fromkeys(self.order) if i in self._records]:
                self._close_handle()
                self._rewrite_samples()

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
            self._handle = open(self._write_path, "a", encoding="utf-8")
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
        """Add this launch's environment to ``run.json`` (before its first sample; main process only)."""
        if self._lock is None:
            raise RuntimeError("only the process that holds the run's lock writes run.json")
        self._launches.append(dict(environment))
        self._write_run_file()

    def write_summary(self, summary: Mapping[str, Any]) -> Path:
        path = self.directory / SUMMARY_FILE
        write_json_atomic(path, dict(summary))
        return path

    def _close_handle(self) -> None:
        if self._handle is not None:
            self._handle.close()  # closing also drops a shard's flock
            self._handle = None

    def close(self) -> None:
        self._close_handle()
        if self._lock is not None:
            self._lock.release()

    def __enter__(self) -> "RunStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
