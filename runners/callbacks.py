"""Hydra callback: after a multirun, print one results table and write it as CSV, then the paper table
and the figures (``runners.report``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from runners.report import (collect_summaries, console, print_study, render_table, scan_runs, summary_row,
                            write_csv, write_report)
from runners.store import SUMMARY_FILE

MULTIRUN_CSV = "multirun_results.csv"
REPORT_DIR = "report"  # the sweep's paper table (md, tex, csv) and figures


class ResultsTable(Callback):
    """Collects the jobs of a multirun; at its end prints their table and writes ``multirun_results.csv``
    in the sweep directory. Launchers that run jobs in other processes leave the job list empty;
    then every run below the sweep directory is shown."""

    def __init__(self) -> None:
        self.job_dirs: list[Path] = []

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        self.job_dirs.append(Path(HydraConfig.get().runtime.output_dir))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        paths = [d / SUMMARY_FILE for d in self.job_dirs if (d / SUMMARY_FILE).exists()]
        summaries = ([json.loads(p.read_text(encoding="utf-8")) for p in paths] if self.job_dirs
                     else collect_summaries(sweep_dir))
        if not summaries:
            return
        console().print(render_table(summaries, title=f"multirun: {len(summaries)} runs"))
        csv_path = write_csv([summary_row(s) for s in summaries], sweep_dir / MULTIRUN_CSV)
        console().print(f"table written to {csv_path}")
        scan = scan_runs(self.job_dirs or [sweep_dir])  # the paper table and figures of this sweep's runs
        print_study(scan, console())
        written = write_report(scan, sweep_dir / REPORT_DIR)
        console().print(f"paper table and figures written to {sweep_dir / REPORT_DIR} ({len(written)} files)")
