"""A run directory: per-sample JSONL written as it goes, resumable, and a summary written atomically.

* ``samples.jsonl``: one JSON object per finished sample, flushed and fsync'ed per line, so a
  killed run loses at most the sample in flight (a torn last line is dropped on resume);
* ``run.json``: the settings that define the results; resuming with different ones is refused,
  naming the keys that differ;
* ``summary.json``: aggregate metrics, rewritten atomically (temp file + rename) at the end.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

SAMPLES_FILE = "samples.jsonl"
RUN_FILE = "run.json"
SUMMARY_FILE = "summary.json"


class RunMismatchError(RuntimeError):
    """The run directory holds results of different settings."""


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def write_json_atomic(path: Path, payload: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=2, ensure_ascii=False, sort_keys=False)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


class RunStore:
    """The files of one run directory.

    Args:
        directory: the run directory (created if missing).
        identity: the settings that define the results (nested mapping, JSON-serialisable).
        resume: keep finished samples (True) or start over, deleting them (False).
    """

    def __init__(self, directory: str | Path, identity: Mapping[str, Any], resume: bool = True) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.samples_path = self.directory / SAMPLES_FILE
        self._check_identity(dict(identity), resume)
        if not resume:
            self.samples_path.unlink(missing_ok=True)
            (self.directory / SUMMARY_FILE).unlink(missing_ok=True)
        self._records: dict[str, dict] = {r["id"]: r for r in self._read_complete_records()}
        self._handle = None

    # -- identity --------------------------------------------------------------------------------
    def _check_identity(self, identity: dict, resume: bool) -> None:
        run_file = self.directory / RUN_FILE
        if resume and run_file.exists() and self.samples_path.exists():
            stored = json.loads(run_file.read_text(encoding="utf-8"))
            old, new = flatten(stored), flatten(identity)
            differing = sorted(k for k in old.keys() | new.keys() if old.get(k, "<unset>") != new.get(k, "<unset>"))
            if differing:
                details = "; ".join(f"{k}: {old.get(k, '<unset>')!r} -> {new.get(k, '<unset>')!r}" for k in differing)
                raise RunMismatchError(
                    f"{self.directory} holds results of different settings ({details}). Use another "
                    "directory (hydra.run.dir=...), or resume=false to delete them and start over."
                )
        write_json_atomic(run_file, identity)

    # -- samples ---------------------------------------------------------------------------------
    def _read_complete_records(self) -> list[dict]:
        """Records of every complete line; a torn last line (killed mid-write) is cut off the file."""
        if not self.samples_path.exists():
            return []
        data = self.samples_path.read_bytes()
        records, good_end, start = [], 0, 0
        while True:
            end = data.find(b"\n", start)
            if end < 0:
                break
            line = data[start:end].strip()
            if line:
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    break
            good_end = start = end + 1
        if good_end != len(data):
            with open(self.samples_path, "r+b") as handle:
                handle.truncate(good_end)
        return records

    def completed_ids(self) -> set[str]:
        return set(self._records)

    def append(self, record: dict) -> None:
        """Write one sample's record durably (flush + fsync) before moving on."""
        if self._handle is None:
            self._handle = open(self.samples_path, "a", encoding="utf-8")
        self._handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._records[record["id"]] = record

    def records(self, order: Iterable[str]) -> list[dict]:
        """Finished records in the given id order (ids without a record are skipped)."""
        return [self._records[i] for i in order if i in self._records]

    def write_summary(self, summary: Mapping[str, Any]) -> Path:
        path = self.directory / SUMMARY_FILE
        write_json_atomic(path, dict(summary))
        return path

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def __enter__(self) -> "RunStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
