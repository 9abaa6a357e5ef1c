"""Hydra callbacks of a multirun: check every job up front, and keep the sweep's table as jobs end.

* ``SweepCheck`` validates every job before the first one runs (``runners.sweep.check_sweep``);
  one invalid job stops the sweep with a list of all of them, and nothing is run or written.
* ``ResultsTable`` rewrites ``multirun_results.csv`` in the sweep's own directory after every job,
  failed jobs included (``status``/``error``/``overrides`` columns), so a failure or a kill never
  loses the rows of the jobs that finished; after the last job it prints the table (Hydra stops
  before ``on_multirun_end`` when a job failed), then the paper table and figures of the sweep's
  runs (``runners.report``; a failed run is a gap with its reason) into the sweep's ``report/``.
  ``runners.report`` builds the union of any runs.

With a launcher that runs jobs in other processes (``hydra/launcher=joblib``, ``submitit_local``,
``submitit_slurm``), ``on_job_end`` runs in the job's process: it saves the job's outcome to the
sweep directory, and the table is printed by the process that launched the sweep, at
``on_multirun_end``, or, when a job failed (Hydra then raises instead of calling it), by
``print_pending_tables`` as ``runners.evaluate`` exits.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from runners.errors import UsageError, reported_errors
from runners.report import console, print_study, render_table, scan_runs, summary_row, write_csv, write_report
from runners.store import write_json_atomic

MULTIRUN_CSV = "multirun_results.csv"
JOBS_DIR = ".jobs"
REPORT_DIR = "report"  # the sweep's paper table (md, tex, csv) and figures


class SweepCheck(Callback):
    """Validate every job of the sweep before the first one runs."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from runners.sweep import check_sweep  # imports the runner (torch): only when a sweep starts

        # Hydra turns a callback's exception into a warning, so a refusal exits from here.
        with reported_errors(verbose=bool(config.hydra.verbose)):
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:
                raise UsageError("a data-parallel launch (accelerate launch, torchrun) evaluates one run; run the "
                                 "jobs of a sweep with a launcher (hydra/launcher=submitit_slurm, submitit_local, "
                                 "joblib), each job with its own GPU")
            check_sweep(config)


def failed_row(job_return: JobReturn) -> dict[str, Any]:
    """A table row for a job that failed: what it was, and why it failed."""
    cfg = job_return.cfg
    return {
        "model": OmegaConf.select(cfg, "model.name", default=None),
        "benchmark": OmegaConf.select(cfg, "benchmark.name", default=None),
        "compressor": OmegaConf.select(cfg, "compressor.name", default=None),
        "ratio": OmegaConf.select(cfg, "compressor.ratio", default=None),
        "status": "failed",
        "error": str(job_return._return_value).strip(),
        "overrides": " ".join(job_return.overrides or []),
        "run_dir": _run_dir(cfg),
    }


def _run_dir(cfg: DictConfig) -> str | None:
    """Where a failed job's run lives, when its settings still resolve (so the report shows the gap)."""
    from runners.evaluate import resolve_settings
    from runners.identity import run_directory

    try:
        return str(run_directory(resolve_settings(cfg, in_sweep=True)))
    except Exception:  # noqa: BLE001  (a job that failed on its settings has no run directory)
        return None


class ResultsTable(Callback):
    """The sweep's table in its directory, rebuilt as each job ends; printed after the last one.

    Each job's outcome is first saved as ``.jobs/<job number>.json`` in the sweep directory and the
    CSV is rebuilt from all of them, so the table is right whichever process a launcher runs a
    job in. Jobs that are one run (``none`` in a ratio sweep) are one row.
    """

    def __init__(self) -> None:
        self.sweep_dir: Path | None = None
        self.expected = 0
        self.finished = 0
        self.printed = False
        self.launcher_pid: int | None = None  # the process that launched the sweep prints its table

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from runners.sweep import expand_sweep

        self.sweep_dir = Path(str(config.hydra.sweep.dir))
        self.expected = len(expand_sweep(config))
        self.launcher_pid = os.getpid()
        PENDING.append(self)

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if config.hydra.mode != RunMode.MULTIRUN:  # Hydra calls it for a single run too
            return
        sweep_dir = Path(str(config.hydra.sweep.dir))
        outcome = job_return._return_value  # the summary, or the exception of a failed job
        if job_return.status == JobStatus.COMPLETED and isinstance(outcome, dict):
            entry = {"summary": outcome, "row": {**summary_row(outcome), "status": "ok", "error": "",
                                                 "overrides": " ".join(job_return.overrides or [])}}
        else:
            entry = {"row": failed_row(job_return)}
        jobs_dir = sweep_dir / JOBS_DIR
        jobs_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(jobs_dir / f"{int(config.hydra.job.num):05d}.json", entry)
        write_table(sweep_dir)
        self.finished += 1
        if self.finished >= self.expected and os.getpid() == self.launcher_pid:  # jobs in this process
            self._print()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        write_table(Path(str(config.hydra.sweep.dir)))
        if not self.printed:
            self._print()

    def _print(self) -> None:
        self.printed = True
        if self in PENDING:
            PENDING.remove(self)
        if self.sweep_dir is not None:
            write_table(self.sweep_dir)  # jobs in other processes may have raced on the CSV
            print_table(self.sweep_dir)


PENDING: list[ResultsTable] = []  # sweeps of this process whose table is not printed yet


def print_pending_tables() -> None:
    """Print the table of every sweep this process launched and has not printed (a job failed in
    another process, so Hydra raised before ``on_multirun_end``)."""
    for table in list(PENDING):
        table._print()


def sweep_entries(sweep_dir: Path) -> list[dict[str, Any]]:
    """The saved job outcomes of a sweep in job order, one per run (a later job of the same run wins)."""
    entries: dict[Any, dict[str, Any]] = {}
    for path in sorted((sweep_dir / JOBS_DIR).glob("*.json")):
        entry = json.loads(path.read_text(encoding="utf-8"))
        key = entry["summary"]["run_dir"] if "summary" in entry else path.name
        entries[key] = entry
    return list(entries.values())


def write_table(sweep_dir: Path) -> Path | None:
    """Rebuild ``multirun_results.csv`` from the saved outcomes (atomically: a reader never sees half)."""
    entries = sweep_entries(sweep_dir)
    if not entries:
        return None
    path = sweep_dir / MULTIRUN_CSV
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write_csv([entry["row"] for entry in entries], temporary)
    os.replace(temporary, path)
    return path


def print_table(sweep_dir: Path) -> None:
    """The finished runs' results table, one line per failed job, then the sweep's paper table."""
    entries = sweep_entries(sweep_dir)
    summaries = [entry["summary"] for entry in entries if "summary" in entry]
    failed = [entry["row"] for entry in entries if "summary" not in entry]
    out = console()
    if summaries:
        out.print(render_table(summaries, title=f"multirun: {len(summaries)} runs"))
    for row in failed:
        out.print(f"failed: {row['overrides']}: {row['error']}", highlight=False, markup=False, soft_wrap=True)
    if entries:
        out.print(f"table written to {sweep_dir / MULTIRUN_CSV}"
                  + (f" ({len(failed)} failed)" if failed else ""), highlight=False, soft_wrap=True)
    run_dirs = [Path(entry["row"]["run_dir"]) for entry in entries if entry["row"].get("run_dir")]
    run_dirs = [directory for directory in run_dirs if directory.exists()]
    if run_dirs:  # the paper table and figures of this sweep's runs, failed ones as gaps
        scan = scan_runs(run_dirs)
        print_study(scan, out)
        written = write_report(scan, sweep_dir / REPORT_DIR)
        out.print(f"paper table and figures written to {sweep_dir / REPORT_DIR} ({len(written)} files)",
                  highlight=False, soft_wrap=True)
