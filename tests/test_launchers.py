"""Multiruns on Hydra's launcher plugins: jobs in other processes (joblib, submitit), table and resume kept.

The sweep is launched in this process (``main()`` with a command line); the launchers run its jobs
in worker processes, as they would on a cluster.
"""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import pandas as pd
import pytest
from hydra.errors import ConfigCompositionException

import test_runner
from runners.callbacks import PENDING, ResultsTable, print_pending_tables
from tests.conftest import interrupt_generate
from test_runner import RUNS, cli, sweep_tables  # noqa: F401  (cli: a fixture)

ARGS = ("benchmark.limit=2", "benchmark.max_new_tokens=2")
# pytest resets warning filters per test; runners.schema says why this deprecation warning is expected
pytestmark = [pytest.mark.filterwarnings("ignore:(?s).*is validated against ConfigStore schema:UserWarning"),
              pytest.mark.filterwarnings("ignore:'runners.evaluate' found in sys.modules:RuntimeWarning")]  # runpy


def as_python_m() -> None:
    """What ``python -m runners.evaluate`` runs (its ``__main__`` block). The launchers pickle the task
    function, which must then be importable by name (``runners.evaluate.main``)."""
    runpy.run_module("runners.evaluate", run_name="__main__", alter_sys=True)


@pytest.fixture()
def as_script(monkeypatch):
    """``cli`` runs the module as ``python -m`` does rather than calling ``main()``."""
    monkeypatch.setattr(test_runner, "main", as_python_m)


def test_launcher_configs_carry_vtclab_values_and_are_type_checked(compose_cfg):
    slurm = compose_cfg(["hydra/launcher=submitit_slurm", "hydra.launcher.partition=gpu"], return_hydra_config=True)
    launcher = slurm.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")  # the plugin's launcher, our values
    assert (launcher.partition, launcher.gpus_per_node, launcher.timeout_min, launcher.max_num_timeout) == (
        "gpu", 1, 720, 3)
    local = compose_cfg(["hydra/launcher=submitit_local"], return_hydra_config=True).hydra.launcher
    assert local._target_.endswith("LocalLauncher") and local.gpus_per_node == 0
    assert compose_cfg(["hydra/launcher=joblib"], return_hydra_config=True).hydra.launcher.n_jobs == 2
    with pytest.raises(ConfigCompositionException):  # the plugin's dataclass still checks the types
        compose_cfg(["hydra/launcher=submitit_slurm", "hydra.launcher.gpus_per_node=two"], return_hydra_config=True)


@pytest.mark.slow
def test_joblib_runs_jobs_in_two_processes_resuming_each_run_and_skipping_finished_ones(cli, tiny, tmp_path,
                                                                                        monkeypatch):
    # A sweep cut off earlier: `random` finished, `pooling` interrupted after its first sample.
    assert cli("compressor=random", *ARGS)[0] == 0
    generate = tiny.generate
    interrupt_generate(monkeypatch, tiny)
    assert cli("compressor=pooling", *ARGS)[0] == 130
    monkeypatch.setattr(tiny, "generate", generate)
    finished, cut = (tmp_path / RUNS / f"{name},benchmark.max_new_tokens=2" for name in ("random,ratio=0.25",
                                                                                        "pooling,ratio=0.25"))
    finished_files = {name: (finished / name).read_bytes() for name in ("samples.jsonl", "run.json")}
    first_record = (cut / "samples.jsonl").read_text()

    monkeypatch.setattr(test_runner, "main", as_python_m)
    code, out, err = cli("-m", "hydra/launcher=joblib", "compressor=random,pooling", *ARGS)
    assert code == 0, err
    assert "multirun: 2 runs" in out  # printed by this process, though the jobs ran in the workers
    (table,) = sweep_tables(tmp_path)
    frame = pd.read_csv(table)
    assert sorted(zip(frame["compressor"], frame["status"])) == [("pooling", "ok"), ("random", "ok")]
    assert {name: (finished / name).read_bytes() for name in finished_files} == finished_files  # no launch, no work
    records = (cut / "samples.jsonl").read_text()
    assert records.startswith(first_record) and records.count("\n") == 2
    assert len(json.loads((cut / "run.json").read_text())["launches"]) == 2
    assert len(cli.builds) == 2  # this process built the model for the two runs before the sweep, not for its jobs


@pytest.mark.slow
def test_submitit_local_runs_each_job_as_a_submitit_job(cli, as_script, tmp_path):
    # one job keeps the test short (a job is a fresh Python process); joblib's test runs two at once
    code, out, err = cli("-m", "hydra/launcher=submitit_local", "compressor=random", *ARGS)
    assert code == 0, err
    assert out.count("multirun: 1 runs") == 1  # by this process (the job's own process logs to submitit's file)
    (table,) = sweep_tables(tmp_path)
    assert list(pd.read_csv(table)["status"]) == ["ok"]
    (log,) = table.parent.glob(".submitit/*/*_log.out")  # a submitit job, with its log
    assert "1 samples" not in log.read_text() and "2 samples, 0 already done" in log.read_text()
    summary = tmp_path / RUNS / "random,ratio=0.25,benchmark.max_new_tokens=2" / "summary.json"
    assert json.loads(summary.read_text())["num_samples"] == 2
    assert cli.builds == []  # the model was loaded in the job's process, not here


def test_a_table_left_unprinted_by_a_failed_job_in_another_process_is_printed_on_exit(tmp_path, capsys):
    jobs = tmp_path / ".jobs"
    jobs.mkdir()
    row = {"model": "tiny", "benchmark": "synthetic", "compressor": "pooling", "ratio": 0.5, "status": "failed",
           "error": "pooling broke", "overrides": "compressor=pooling", "run_dir": None}
    (jobs / "00000.json").write_text(json.dumps({"row": row}))  # what the job's process saved
    table = ResultsTable()
    table.sweep_dir = tmp_path
    PENDING.append(table)  # as on_multirun_start does; Hydra raised before on_multirun_end
    print_pending_tables()
    assert "failed: compressor=pooling: pooling broke" in capsys.readouterr().out
    assert table not in PENDING and (tmp_path / "multirun_results.csv").exists()
    print_pending_tables()
    assert capsys.readouterr().out == ""  # printed once
