"""The run store never loses, mixes or duplicates results, and a refused run changes nothing."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from runners.store import (
    CorruptRunError,
    RunLockedError,
    RunMismatchError,
    RunStore,
    write_json_atomic,
)

ROOT = Path(__file__).resolve().parents[1]
IDENTITY = {"compressor": {"name": "random", "ratio": 0.5}, "code": {"git_commit": "abc", "git_dirty": False}}


def snapshot(directory: Path) -> dict[str, tuple[bytes, int]]:
    """Every file below ``directory`` with its content and modification time."""
    return {str(p.relative_to(directory)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*")) if p.is_file()}


def filled(directory: Path, count: int = 3, identity=IDENTITY) -> Path:
    with RunStore(directory, identity=identity) as store:
        for i in range(count):
            store.append({"id": f"s{i}", "score": 1.0})
    return directory / "samples.jsonl"


def test_a_corrupt_middle_line_is_refused_by_number_and_nothing_is_deleted(tmp_path):
    samples = filled(tmp_path, 4)
    lines = samples.read_text().splitlines(keepends=True)
    lines[1] = '{"id": "s1", "sco\n'  # damaged, but not the last line: not a kill
    samples.write_text("".join(lines))
    before = snapshot(tmp_path)
    with pytest.raises(CorruptRunError, match=r"samples\.jsonl:2: not a JSON record.*Nothing was deleted"):
        RunStore(tmp_path, identity=IDENTITY)
    assert snapshot(tmp_path) == before


def test_a_record_without_an_id_is_refused(tmp_path):
    samples = filled(tmp_path, 2)
    samples.write_text(samples.read_text() + "[1, 2]\n")
    with pytest.raises(CorruptRunError, match=r"samples\.jsonl:3: a record must be a JSON object"):
        RunStore(tmp_path, identity=IDENTITY)


def test_a_torn_last_line_is_dropped_and_logged(tmp_path, caplog):
    samples = filled(tmp_path, 2)
    samples.write_text(samples.read_text() + '{"id": "s2", "sco')
    with caplog.at_level(logging.WARNING, logger="runners.store"):
        store = RunStore(tmp_path, identity=IDENTITY)
    store.close()
    assert store.completed_ids() == {"s0", "s1"}
    assert samples.read_text().endswith('"s1", "score": 1.0}\n')
    assert "dropped a torn last line (17 bytes" in caplog.text


def test_duplicate_ids_are_refused_naming_both_lines(tmp_path):
    samples = filled(tmp_path, 3)
    samples.write_text(samples.read_text() + '{"id": "s1", "score": 0.0}\n')
    with pytest.raises(CorruptRunError, match=r"samples\.jsonl:4: sample 's1' is already on line 2"):
        RunStore(tmp_path, identity=IDENTITY)


def test_a_second_run_into_the_same_directory_is_refused(tmp_path):
    first = RunStore(tmp_path, identity=IDENTITY)
    first.append({"id": "s0", "score": 1.0})
    before = snapshot(tmp_path)
    with pytest.raises(RunLockedError, match=rf"{tmp_path} is in use by another run \(pid {os.getpid()}"):
        RunStore(tmp_path, identity=IDENTITY)
    with pytest.raises(RunLockedError):
        RunStore(tmp_path, identity=IDENTITY, resume=False)  # nor may it delete the first run's results
    assert snapshot(tmp_path) == before
    first.close()
    with RunStore(tmp_path, identity=IDENTITY) as second:  # free again once the first is done
        assert second.completed_ids() == {"s0"}


def test_a_killed_holder_leaves_no_lock_behind(tmp_path):
    """kill -9 of the process that holds the lock: the next run gets the directory."""
    script = ("import sys, time; from runners.store import RunStore; "
              f"s = RunStore({str(tmp_path)!r}, identity={IDENTITY!r}); print('locked', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockedError, match=rf"pid {holder.pid}"):
            RunStore(tmp_path, identity=IDENTITY)
    finally:
        holder.kill()
        holder.wait()
    RunStore(tmp_path, identity=IDENTITY).close()


def test_temp_files_are_unique_per_writer(tmp_path):
    """Concurrent atomic writes of one file (six launches used to crash on a shared run.json.tmp)."""
    target, errors = tmp_path / "run.json", []

    def write(worker: int) -> None:
        try:
            for i in range(40):
                write_json_atomic(target, {"worker": worker, "i": i, "pad": "x" * 2000})
        except Exception as error:  # noqa: BLE001  (collected and asserted below)
            errors.append(error)

    threads = [threading.Thread(target=write, args=(w,)) for w in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert json.loads(target.read_text())["i"] == 39
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]  # no temp file left


def test_other_settings_or_code_are_refused_naming_the_keys(tmp_path):
    filled(tmp_path, 1)
    before = snapshot(tmp_path)
    other = {"compressor": {"name": "random", "ratio": 0.25}, "code": {"git_commit": "def", "git_dirty": True}}
    with pytest.raises(RunMismatchError) as error:
        RunStore(tmp_path, identity=other)
    message = str(error.value)
    assert "code.git_commit: 'abc' -> 'def'" in message and "code.git_dirty: False -> True" in message
    assert "compressor.ratio: 0.5 -> 0.25" in message and "resume=false" in message
    assert snapshot(tmp_path) == before
    with RunStore(tmp_path, identity=other, resume=False) as store:  # starts over
        assert store.completed_ids() == set()
    assert json.loads((tmp_path / "run.json").read_text())["identity"] == other


def test_records_without_run_json_are_refused(tmp_path):
    filled(tmp_path, 2)
    (tmp_path / "run.json").unlink()
    before = snapshot(tmp_path)
    with pytest.raises(RunMismatchError, match=r"has records but .*run\.json is missing"):
        RunStore(tmp_path, identity=IDENTITY)
    assert snapshot(tmp_path) == before


def test_a_refused_run_creates_nothing(tmp_path):
    """Refusals are decided before the directory is created or touched (the read-only check too)."""
    filled(tmp_path / "run", 1)
    before = snapshot(tmp_path)
    for call in (lambda: RunStore(tmp_path / "run", identity={"other": 1}),
                 lambda: RunStore.check(tmp_path / "run", {"other": 1})):
        with pytest.raises(RunMismatchError):
            call()
    RunStore.check(tmp_path / "new", IDENTITY)  # a new directory is fine, and not created by the check
    assert snapshot(tmp_path) == before and not (tmp_path / "new").exists()


def test_launches_are_kept_across_resumes(tmp_path):
    with RunStore(tmp_path, identity=IDENTITY) as store:
        store.record_launch({"device": "cpu", "torch_threads": 2})
        store.append({"id": "s0", "score": 1.0})
    time.sleep(0.01)
    with RunStore(tmp_path, identity=IDENTITY) as store:
        store.record_launch({"device": "cuda:0", "torch_threads": 8})
        assert [launch["device"] for launch in store.launches] == ["cpu", "cuda:0"]
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["identity"] == IDENTITY and len(run["launches"]) == 2
