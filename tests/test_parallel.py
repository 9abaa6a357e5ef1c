"""Data-parallel evaluation: shards keyed by sample id, merged in the benchmark's order, one lock per launch.

The store's side is tested in this process (the processes of a launch are stores opened with their
rank); one test launches ``accelerate launch`` with two CPU processes, kills one, and reruns with
another process count.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from runners.report import IncompleteRun, inspect_run
from runners.parallel import ProcessGroup, open_run_store, process_model_settings
from runners.store import RunLockedError, RunMismatchError, RunStore, shard_files
from test_runner import cli, read_records, summary_without_timings, without_timings  # noqa: F401  (cli: a fixture)
from vtclab.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
IDENTITY = {"compressor": {"name": "random", "ratio": 0.5}, "code": {"git_commit": "abc", "git_dirty": False}}
IDS = [f"s{i}" for i in (3, 0, 5, 1, 4, 2)]  # the benchmark's order, which is not the ids' sorted order


def record(sample_id: str) -> dict:
    return {"id": sample_id, "score": float(sample_id[1:])}


def launch(directory: Path, world_size: int, token: str) -> list[RunStore]:
    """The stores of one launch, as ``runners.parallel.open_run_store`` opens them (main first)."""
    main = RunStore(directory, IDENTITY, order=IDS, token=token, rank=0)
    return [main] + [RunStore.join(directory, IDENTITY, token=token, rank=r, order=IDS) for r in range(1, world_size)]


def test_shards_keyed_by_id_merge_to_the_single_process_file_whatever_the_process_counts(tmp_path):
    with RunStore(tmp_path / "single", IDENTITY, order=IDS) as single:  # the reference: one process
        for sample_id in IDS:
            single.append(record(sample_id))
        single.finalise()
    expected = (tmp_path / "single" / "samples.jsonl").read_bytes()

    run = tmp_path / "run"
    stores = launch(run, 2, token="launch-a")
    todo = [i for i in IDS if i not in stores[0].completed_ids()]
    assert [ProcessGroup(rank=r, world_size=2).shard(todo) for r in (0, 1)] == [["s3", "s5", "s4"], ["s0", "s1", "s2"]]
    stores[0].append(record("s3"))
    stores[1].append(record("s0"))
    stores[1].append(record("s1"))
    with open(shard_files(run)[1], "a") as handle:  # rank 1 killed mid-write
        handle.write('{"id": "s2", "sc')
    for store in stores:  # killed: no merge, no summary
        store._close_handle()
        store._lock and store._lock.release()
    assert [p.name for p in shard_files(run)] == ["rank0.jsonl", "rank1.jsonl"]
    assert "no summary.json, 3 sample records and a torn last line" in inspect_run(run).reason  # runners.report

    stores = launch(run, 3, token="launch-b")  # rerun with three processes: the shards merged first
    assert shard_files(run) == [run / "shards" / f"rank{r}.jsonl" for r in range(3)]  # this launch's, empty
    assert [json.loads(line)["id"] for line in (run / "samples.jsonl").read_text().splitlines()] == ["s3", "s0", "s1"]
    todo = [i for i in IDS if i not in stores[1].completed_ids()]  # every process sees the same done set
    assert todo == ["s5", "s4", "s2"]
    for rank, store in enumerate(stores):
        for sample_id in ProcessGroup(rank=rank, world_size=3).shard(todo):
            store.append(record(sample_id))
    for store in stores[1:]:
        store.close()
    (run / "summary.json").write_text(json.dumps({"compressor": "random", "metrics": {}, "num_samples": 6}))
    gap = inspect_run(run)
    assert isinstance(gap, IncompleteRun) and "6 records, some in shard files not merged yet" in gap.reason
    stores[0].finalise()
    stores[0].close()
    assert not isinstance(inspect_run(run), IncompleteRun)
    assert (run / "samples.jsonl").read_bytes() == expected
    assert not (run / "shards").exists()
    assert oct((run / "samples.jsonl").stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_single_process_rerun_after_a_killed_launch_writes_the_benchmark_order(tmp_path):
    main, member = launch(tmp_path, 2, token="t")
    member.append(record("s2"))
    main.append(record("s3"))
    for store in (main, member):
        store.close()  # killed before the merge
    with RunStore(tmp_path, IDENTITY, order=IDS) as store:  # one process now
        for sample_id in IDS:
            if sample_id not in store.completed_ids():
                store.append(record(sample_id))
        store.finalise()
    assert [json.loads(line)["id"] for line in (tmp_path / "samples.jsonl").read_text().splitlines()] == IDS


def test_the_processes_of_one_launch_are_one_run_and_any_other_run_is_refused(tmp_path):
    main, member = launch(tmp_path, 2, token="launch-a")
    with pytest.raises(RunLockedError, match="in use by another run"):
        RunStore(tmp_path, IDENTITY)  # an unrelated single-process run
    with pytest.raises(RunLockedError, match="in use by another run"):
        RunStore.check(tmp_path, IDENTITY)  # a sweep's check
    with pytest.raises(RunLockedError, match="not held by this launch"):
        RunStore.join(tmp_path, IDENTITY, token="launch-b", rank=1)  # a process of another launch
    with pytest.raises(RunLockedError, match="rank1.jsonl is being written"):
        RunStore.join(tmp_path, IDENTITY, token="launch-a", rank=1)  # the same rank twice
    with pytest.raises(RuntimeError, match="only the process that holds"):
        member.record_launch({"device": "cpu"})
    member.append(record("s0"))
    main.close()  # the main process died; its other process still writes
    with pytest.raises(RunLockedError, match=r"rank1\.jsonl is still being written by a process of an earlier"):
        RunStore(tmp_path, IDENTITY)
    member.close()
    with RunStore(tmp_path, IDENTITY, order=IDS) as store:
        assert store.completed_ids() == {"s0"}


def test_a_sweep_job_waits_for_another_job_of_the_same_run(tmp_path):
    first = RunStore(tmp_path, IDENTITY, order=IDS)
    first.append(record("s3"))
    with pytest.raises(RunLockedError):  # a single run is refused
        open_run_store(tmp_path, IDENTITY, resume=True, group=ProcessGroup(), order=IDS)
    release = threading.Timer(0.3, first.close)
    release.start()
    with open_run_store(tmp_path, IDENTITY, resume=True, group=ProcessGroup(), order=IDS, wait=True) as second:
        assert second.completed_ids() == {"s3"}  # it waited for the first and finds its results
    release.join()


def test_a_sweep_inside_a_data_parallel_launch_is_refused(cli, monkeypatch, tmp_path):  # noqa: F811
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    code, out, err = cli("-m", "compressor=random,pooling")
    assert code == 2 and err.startswith("error: a data-parallel launch (accelerate launch, torchrun) evaluates one run")
    assert list(tmp_path.iterdir()) == [tmp_path / "cwd"]


def test_shards_of_other_settings_are_refused_not_merged(tmp_path):
    main, member = launch(tmp_path, 2, token="t")
    member.append(record("s0"))
    main.close()
    member.close()  # killed before any merge: the records exist only in a shard
    with pytest.raises(RunMismatchError, match="compressor.ratio: 0.5 -> 0.25"):
        RunStore(tmp_path, {**IDENTITY, "compressor": {"name": "random", "ratio": 0.25}})


def test_process_group_from_the_launcher_environment():
    assert ProcessGroup.from_environment({}) == ProcessGroup()
    group = ProcessGroup.from_environment({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"})
    assert (group.rank, group.world_size, group.local_rank, group.local_world_size, group.is_main) == (3, 4, 1, 2, False)
    assert group.shard(list(range(10))) == [3, 7]
    with pytest.raises(ConfigError, match="RANK=4 is outside WORLD_SIZE=4"):
        ProcessGroup.from_environment({"RANK": "4", "WORLD_SIZE": "4"})


def test_each_process_loads_its_model_on_its_own_gpus(monkeypatch):
    monkeypatch.setattr("runners.parallel._gpu_memory", lambda index: 80 * 2**30 + index)
    local = {"loader": "local", "device_map": "auto"}
    rank = lambda r, n: ProcessGroup(rank=r, world_size=n, local_rank=r, local_world_size=n)  # noqa: E731
    assert process_model_settings(local, ProcessGroup(), gpus=8) == local  # one process: as configured
    assert process_model_settings({"loader": "tiny"}, rank(1, 2), gpus=2) == {"loader": "tiny"}
    assert process_model_settings({**local, "device_map": "cuda:0"}, rank(2, 4), gpus=4)["device_map"] == "cuda:2"
    split = process_model_settings(local, rank(1, 4), gpus=8)  # two GPUs per process for a big model
    assert split["device_map"] == "auto" and split["max_memory"] == {2: 80 * 2**30 + 2, 3: 80 * 2**30 + 3}
    assert process_model_settings(local, rank(1, 2), gpus=0)["device_map"] == "cpu"
    assert process_model_settings({**local, "random_init": True}, rank(1, 4), gpus=8)["device_map"] == "cuda:2"
    with pytest.raises(ConfigError, match="4 processes on .* but 2 GPUs"):
        process_model_settings(local, rank(0, 4), gpus=2)
    with pytest.raises(ConfigError, match="use model.device_map=auto"):
        process_model_settings({**local, "device_map": {"": 0}}, rank(0, 2), gpus=2)


# -- two real processes: accelerate launch ---------------------------------------------------------


def worker_pids(launcher: int) -> dict[int, int]:
    """``{rank: pid}`` of the workers below a launcher process (from /proc: their parent and RANK)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        rank = [v[5:] for v in environ if v.startswith(b"RANK=")]
        if parent == launcher and rank:
            found[int(rank[0])] = int(entry.name)
    return found


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def accelerate_launch(*args: str, cwd: Path) -> subprocess.Popen:
    # `accelerate launch --cpu --num_processes 2` starts one process (accelerate wants mpirun for several
    # CPU processes); `--multi_gpu` starts them with torch.distributed.run, and without a GPU they run on the CPU.
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
               "-m", "runners.evaluate", "progress=false", *args]
    return subprocess.Popen(command, cwd=cwd, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture()
def one_thread():
    """Runs here with ``num_threads=1`` (as each launched process), then this process's threads back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_accelerate_launch_two_processes_one_killed_then_rerun_with_one(cli, one_thread, tmp_path):  # noqa: F811
    args = ("compressor=random", "benchmark.max_new_tokens=2", "num_threads=1")  # one thread per process, here too
    reference, run = tmp_path / "reference", tmp_path / "run"

    # two processes, three samples each; rank 1 killed (kill -9) once its shard has a record: torchrun stops
    # rank 0. Its pid is looked up while it starts, so the kill follows the first record at once.
    args = (*args, f"paths.output_dir={tmp_path}")  # as the in-process runs (cli) have it
    process = accelerate_launch(*args, "benchmark.limit=6", f"run_dir={run}", cwd=tmp_path)
    deadline, shard, workers = time.time() + 240, run / "shards" / "rank1.jsonl", {}
    while time.time() < deadline and not (1 in workers and shard.exists() and shard.read_text().count("\n") >= 1):
        workers = workers if 1 in workers else worker_pids(process.pid)
        time.sleep(0.01)
    os.kill(workers[1], signal.SIGKILL)
    output = process.communicate(timeout=120)[0]
    assert process.returncode != 0 and not (run / "summary.json").exists(), output
    left = sum(path.read_text().count("\n") for path in shard_files(run))
    assert 1 <= left < 6, output

    # one process resumes it: the files equal those of one uninterrupted process
    args = args[:-1]  # cli sets paths.output_dir itself
    assert cli(*args, "benchmark.limit=6", f"run_dir={reference}")[0] == 0
    code, out, err = cli(*args, "benchmark.limit=6", f"run_dir={run}")
    assert code == 0 and f"{left} already done" in out, err
    assert without_timings(read_records(run / "samples.jsonl")) == without_timings(
        read_records(reference / "samples.jsonl"))
    assert summary_without_timings(run / "summary.json") == summary_without_timings(reference / "summary.json")
    launches = json.loads((run / "run.json").read_text())["launches"]
    assert [entry.get("processes") for entry in launches] == [2, None]
    assert not (run / "shards").exists()
