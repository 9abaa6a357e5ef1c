"""A multirun checked as a whole before its first job runs.

Hydra's basic sweeper composes each job only when it launches it, so a typo or a ratio of 1.5 in
job 17 used to surface hours into a sweep. ``check_sweep`` expands the sweep exactly as that
sweeper will (``BasicSweeper.split_arguments``), composes every job as its launcher will
(``load_sweep_config``) and runs the same checks as a single run (``prepare_run``), so every bad
job is reported at once and nothing is run or written.
"""

from __future__ import annotations

import copy
import logging
from collections import defaultdict
from dataclasses import dataclass

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.config_loader import ConfigLoader
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from runners.errors import UsageError
from runners.evaluate import RunPlan, prepare_run
from runners.store import RunStore, identity_differences

log = logging.getLogger(__name__)


class SweepError(UsageError):
    """Jobs of a sweep are invalid; the message lists each with its reason."""


def expand_sweep(cfg: DictConfig, config_loader: ConfigLoader | None = None) -> list[list[str]]:
    """Every job's overrides, as Hydra's basic sweeper expands them: the preset's
    ``hydra.sweeper.params`` first, then the command line's overrides (which win on the same key)."""
    params = OmegaConf.select(cfg, "hydra.sweeper.params") or {}
    arguments = [f"{key}={value}" for key, value in params.items()]
    arguments += list(OmegaConf.select(cfg, "hydra.overrides.task") or [])
    parsed = OverridesParser.create(config_loader=config_loader).parse_overrides(arguments)
    return BasicSweeper.split_arguments(parsed, None)[0]


def one_line(error: HydraException) -> str:
    """Hydra's composition error on one line: ``Could not find 'compressor/x' (available: a, b)``."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    options = [line for line in lines[1:] if not line.startswith(("Available options", "Config search path",
                                                                   "provider="))]
    text = lines[0] + (f" (available: {', '.join(options)})" if "Available options" in str(error) else "")
    return text + (f": {error.__cause__}" if error.__cause__ else "")


@dataclass
class SweepJob:
    """One job of a sweep: its overrides, and either its checked plan or why it cannot run."""

    overrides: list[str]
    plan: RunPlan | None = None
    error: str | None = None


def job_config(cfg: DictConfig, overrides: list[str], config_loader: ConfigLoader) -> tuple[DictConfig, DictConfig]:
    """``(task config, full config)`` of a job, composed as the launcher does (``run_job`` gives the
    task the config without its ``hydra`` node)."""
    composed = config_loader.load_sweep_config(cfg, list(overrides))
    task = copy.deepcopy(composed)
    with read_write(task), open_dict(task):
        del task["hydra"]
    return task, composed


def check_sweep(cfg: DictConfig, config_loader: ConfigLoader | None = None) -> list[SweepJob]:
    """Check every job; raise ``SweepError`` listing all the invalid ones, or return the jobs."""
    config_loader = config_loader or GlobalHydra.instance().config_loader()
    jobs, memo = [], {}  # memo: each checkpoint read and each benchmark listed once
    hydra_config = HydraConfig.instance().cfg
    try:
        for overrides in expand_sweep(cfg, config_loader):
            job = SweepJob(overrides)
            try:
                task, composed = job_config(cfg, overrides, config_loader)
                HydraConfig.instance().set_config(composed)  # as run_job does, for ${hydra:...} values
                job.plan = prepare_run(task, in_sweep=True, memo=memo)
                RunStore.check(job.plan.directory, job.plan.identity, resume=job.plan.settings["resume"])
            except UsageError as error:
                job.error = str(error)
            except HydraException as error:  # composition: an unknown option or key
                job.error = one_line(error)
            jobs.append(job)
    finally:
        HydraConfig.instance().cfg = hydra_config
    by_directory = defaultdict(list)
    for job in jobs:
        if job.plan is not None:
            by_directory[job.plan.directory].append(job)
    for directory, same in by_directory.items():
        for job in same[1:]:  # one directory, one run: jobs that differ cannot share it (a fixed run_dir)
            if identity_differences(same[0].plan.identity, job.plan.identity):
                job.error = (f"writes to {directory} like {' '.join(same[0].overrides)}, but with other settings; "
                             "give each job its own directory (leave run_dir unset)")
    bad = [job for job in jobs if job.error]
    if bad:
        lines = "\n".join(f"  {' '.join(job.overrides)}: {job.error}" for job in bad)
        raise SweepError(f"{len(bad)} of {len(jobs)} jobs of the sweep are invalid; nothing was run:\n{lines}")
    log.info("sweep checked: %d jobs, %d distinct runs", len(jobs), len(by_directory))
    for directory, same in by_directory.items():
        if len(same) > 1:
            log.info("  %d jobs are one run (the first computes it, the others reuse it): %s", len(same), directory)
    return jobs
