"""The Hydra runner as a user drives it: ``main()`` in this process with a command line (one
subprocess smoke test of the README's main command, and one kill -9 test, which needs a process)."""

from __future__ import annotations

import copy
import io
import json
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf
from rich.console import Console

import runners.evaluate
from runners.callbacks import MULTIRUN_CSV
from runners.errors import UsageError
from runners.evaluate import RunningStatus, main, prepare_run
from runners.report import render_table, summary_row
from tests.conftest import interrupt_generate

ROOT = Path(__file__).resolve().parents[1]
TIMING_FIELDS = {"vision_s", "compress_s", "prefill_s", "decode_s"}
TINY = {"name": "tiny", "loader": "tiny", "seed": 0, "vision_layers": 3, "text_layers": 4,
        "attn_implementation": "sdpa", "prompt_format": "vicuna_v1", "image_size": None}
RUNS = "runs/tiny/synthetic"
COMPRESSOR_OPTIONS = ", ".join(sorted(p.stem for p in (ROOT / "conf/compressor").glob("*.yaml")))


@pytest.fixture()
def cli(tiny, monkeypatch, capsys, tmp_path):
    """``run(*args)`` = ``python -m runners.evaluate progress=false paths.output_dir=<tmp> *args`` in this
    process, from an empty working directory; returns ``(exit code, stdout, stderr)``. The default
    tiny model is the session's (no rebuild per run)."""
    build, builds = runners.evaluate.build_pipeline, []
    monkeypatch.setattr(runners.evaluate, "build_pipeline",
                        lambda cfg: builds.append(cfg) or (tiny if cfg == TINY else build(cfg)))
    monkeypatch.setattr(runners.evaluate, "PIPELINES", runners.evaluate.PipelineCache())
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    root = logging.getLogger()
    saved = root.handlers[:], root.level

    def run(*args: str) -> tuple[int, str, str]:
        flags = [a for a in args if a.startswith("-")]  # Hydra wants -m before the overrides
        argv = ["evaluate", *flags, "progress=false", f"paths.output_dir={tmp_path}",
                *(a for a in args if not a.startswith("-"))]
        monkeypatch.setattr(sys, "argv", argv)
        GlobalHydra.instance().clear()
        code = 0
        try:
            main()
        except SystemExit as exit_:
            code = exit_.code
        finally:
            GlobalHydra.instance().clear()
            root.handlers[:], _ = saved[0], root.setLevel(saved[1])
        out = capsys.readouterr()
        return code, out.out, out.err

    run.builds = builds  # the models built so far
    yield run
    assert list(work.iterdir()) == []  # nothing is ever written to the working directory


def read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def without_timings(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in records]


def summary_without_timings(path: Path) -> dict:
    summary = json.loads(path.read_text())
    for key in ("timings_mean_s", "timings_s", "environment", "run_dir"):
        summary.pop(key)
    for key in ("paths", "run_dir", "num_threads"):
        summary["config"].pop(key)
    return summary


def test_single_run_writes_records_summary_and_its_environment(cli, tmp_path):
    code, out, err = cli("compressor=random", "benchmark.limit=3", "benchmark.max_new_tokens=2",
                         "save_provenance=true")
    assert code == 0, err
    run_dir = tmp_path / RUNS / "random,ratio=0.25,benchmark.max_new_tokens=2,save_provenance=true"
    records = read_records(run_dir / "samples.jsonl")
    assert [r["id"] for r in records] == [f"synthetic-s0-{i:04d}" for i in range(3)]
    for record in records:
        assert TIMING_FIELDS <= record.keys() and record["visual_tokens_after"] < record["visual_tokens_before"]
        assert len(record["provenance"]["token"]) == len(record["provenance"]["source"]) > 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["num_samples"] == 3 and summary["compressor"] == {"name": "random", "ratio": 0.25, "seed": 0}
    assert 0.25 < summary["retention_actual"] < 0.35  # floors + kept row newlines
    for key in TIMING_FIELDS:  # the spread, computed here independently
        values = np.array([r[key] for r in records])
        spread = summary["timings_s"][key]
        assert spread["mean"] == pytest.approx(values.mean()) and spread["std"] == pytest.approx(values.std(ddof=1))
        assert [spread["p10"], spread["median"], spread["p90"]] == pytest.approx(np.percentile(values, [10, 50, 90]))
        assert spread["n"] == 3
        row = summary_row(summary)  # the table's columns carry the spread with the mean
        assert row[f"time/{key}_std"] == spread["std"] and row[f"time/{key}_p90"] == spread["p90"]
    wide = Console(width=400, record=True, file=io.StringIO())
    wide.print(render_table([summary]))
    prefill = f"{1000 * summary['timings_mean_s']['prefill_s']:.1f} ± {1000 * summary['timings_s']['prefill_s']['std']:.1f}"
    assert prefill in wide.export_text()
    (launch,) = json.loads((run_dir / "run.json").read_text())["launches"]
    assert launch["device"] == "cpu" and launch["torch_threads"] == torch.get_num_threads()
    assert {"date", "host", "load_average_1m", "cpu_count"} <= launch.keys()
    assert summary["environment"] == [launch]
    assert (run_dir / ".hydra" / "config.yaml").exists() and "random" in (run_dir / ".hydra/overrides.yaml").read_text()
    assert "3 samples, 0 already done" in (run_dir / "evaluate.log").read_text()
    assert "vtclab" in out and "random" in out  # the results table


def test_growing_the_limit_extends_the_same_run(cli, tmp_path):
    assert cli("compressor=pooling", "benchmark.limit=1", "benchmark.max_new_tokens=2")[0] == 0
    code, out, err = cli("compressor=pooling", "benchmark.limit=2", "benchmark.max_new_tokens=2")
    assert code == 0, err
    assert [p.name for p in (tmp_path / RUNS).iterdir()] == ["pooling,ratio=0.25,benchmark.max_new_tokens=2"]
    assert "2 samples, 1 already done" in out
    run_dir = tmp_path / RUNS / "pooling,ratio=0.25,benchmark.max_new_tokens=2"
    assert [r["id"] for r in read_records(run_dir / "samples.jsonl")] == ["synthetic-s0-0000", "synthetic-s0-0001"]
    assert len(json.loads((run_dir / "run.json").read_text())["launches"]) == 2


# The list: (group choices, key, value as Hydra parses it from the command line) -> the one line.
BAD_VALUES = {
    ("compressor=random", "compressor.ratio", 0): "compressor.ratio must be in (0, 1]",
    ("compressor=random", "compressor.ratio", -0.5): "compressor.ratio must be in (0, 1]",
    ("compressor=random", "compressor.ratio", 1.5): "compressor.ratio must be in (0, 1]",
    ("compressor=random", "compressor.ratio", "abc"): "compressor.ratio must be a number in (0, 1], got 'abc'",
    ("compressor=random", "compressor.ratio", None): "compressor.ratio must be a number in (0, 1], got None",
    ("compressor=random", "benchmark.limit", 0): "benchmark.limit must be a positive integer or null",
    ("compressor=random", "benchmark.limit", -1): "benchmark.limit must be a positive integer or null",
    ("compressor=random", "benchmark.limit", "abc"): "benchmark.limit must be a positive integer or null",
    ("compressor=random", "compressor.foo", 1): "unknown key for compressor 'random': 'foo'. Allowed: ratio, seed",
    ("compressor=random", "num_threads", 0): "num_threads must be a positive integer or null",
    ("compressor=fastv", "compressor.layer", 0): "compressor.layer (FastV's K) must be an integer >= 1",
    ("compressor=fastv", "compressor.layer", -1): "compressor.layer (FastV's K) must be an integer >= 1",
    ("compressor=fastv", "compressor.layer", 4): "compressor.layer=4 is beyond the model's depth: it has 4 decoder",
    ("compressor=globalcom2", "compressor.layout", "foo"): "compressor.layout must be one of authors, spatial",
    ("compressor=globalcom2", "compressor.temperature", 0): "compressor.temperature must be a positive number",
    ("compressor=globalcom2", "compressor.temperature", -1): "compressor.temperature must be a positive number",
    ("model=llava_next_7b", "model.path", "/nowhere/llava"): "model.path '/nowhere/llava' does not exist",
    ("model=llava_next_7b", "model.path", "???"): "no value for model.path (??? in the config)",
}


def test_every_bad_value_is_refused_by_name_before_anything_loads(compose_cfg):
    base = {choice: compose_cfg([choice]) for choice in {choice for choice, _, _ in BAD_VALUES}}
    for (choice, key, value), message in BAD_VALUES.items():
        cfg = copy.deepcopy(base[choice])
        OmegaConf.update(cfg, key, value, force_add=True)
        with pytest.raises(UsageError) as error:
            prepare_run(cfg)
        assert message in str(error.value), (choice, key, value)


@pytest.mark.parametrize("overrides", [("compressor=random", "compressor.ratio=1.5"),
                                       ("compressor=fastv", "compressor.layer=4"),
                                       ("model=llava_next_7b", "model.path=???", "hydra.verbose=true")])
def test_a_mistake_prints_one_line_and_writes_nothing(cli, tmp_path, overrides):
    code, out, err = cli(*overrides)
    message = {"compressor.ratio=1.5": "compressor.ratio must be in (0, 1] (the fraction of visual tokens kept), "
                                       "got 1.5",
               "compressor.layer=4": "compressor.layer=4 is beyond the model's depth: it has 4 decoder layers (0..3)",
               "model.path=???": "no value for model.path (??? in the config)"}[overrides[1]]
    assert code == 2 and message in err
    if "hydra.verbose=true" in overrides:  # the traceback only when asked for
        assert "Traceback" in err and err.rstrip().splitlines()[-1].startswith(f"error: {message}")
    else:
        assert err.startswith(f"error: {message}") and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == [tmp_path / "cwd"]  # no run directory, no outputs/ at all


def test_a_refused_resume_leaves_the_run_untouched(cli, tmp_path):
    assert cli("compressor=random", "benchmark.limit=1", "benchmark.max_new_tokens=2")[0] == 0
    run_dir = tmp_path / RUNS / "random,ratio=0.25,benchmark.max_new_tokens=2"
    run = json.loads((run_dir / "run.json").read_text())
    run["identity"]["code"]["git_commit"] = "0" * 40  # results of other code
    (run_dir / "run.json").write_text(json.dumps(run))
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in run_dir.rglob("*") if p.is_file()}
    code, _, err = cli("compressor=random", "benchmark.limit=1", "benchmark.max_new_tokens=2")
    assert code == 2 and f"code.git_commit: '{'0' * 40}' -> " in err and err.count("\n") == 1
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in run_dir.rglob("*") if p.is_file()} == before


def test_ctrl_c_prints_one_line_and_keeps_what_finished(cli, tiny, tmp_path, monkeypatch):
    interrupt_generate(monkeypatch, tiny)
    code, _, err = cli("compressor=random", "benchmark.limit=3", "benchmark.max_new_tokens=2")
    run_dir = tmp_path / RUNS / "random,ratio=0.25,benchmark.max_new_tokens=2"
    assert code == 130
    assert err == (f"interrupted after 1 of 3 samples (1 in this launch) in {run_dir}; "
                   "rerun the same command to resume\n")
    assert len(read_records(run_dir / "samples.jsonl")) == 1


def test_progress_shows_running_means():
    status = RunningStatus()
    for score, tokens in ((1.0, 100), (0.0, 300), (1.0, 500)):
        status.add({"score": score, "visual_tokens_after": tokens})
        last = tokens
    assert str(status) == "acc 66.7% | mean tokens 300" and last == 500


# -- sweeps --------------------------------------------------------------------------------------


def sweep_tables(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "sweeps").glob(f"*/{MULTIRUN_CSV}"))


def test_a_sweep_is_checked_before_its_first_job_runs(cli, tmp_path):
    code, out, err = cli("-m", "compressor=random,pooling,globalcom3", "compressor.ratio=0.5,1.5")
    assert code == 2 and "Traceback" not in err
    lines = err.splitlines()
    assert lines[0] == "error: 4 of 6 jobs of the sweep are invalid; nothing was run:" and len(lines) == 5
    assert sum("compressor.ratio=1.5: compressor.ratio must be in (0, 1]" in line for line in lines) == 2
    assert sum(f"Could not find 'compressor/globalcom3' (available: {COMPRESSOR_OPTIONS})"
               in line for line in lines) == 2
    code, out, err = cli("-m", "compressor=fastv", "compressor.layer=1,2,9", f"run_dir={tmp_path / 'one'}")
    assert code == 2 and err.startswith("error: 2 of 3 jobs of the sweep are invalid")
    (deep,) = [line for line in err.splitlines() if "compressor.layer=9 " in line]
    assert deep.endswith(": compressor.layer=9 is beyond the model's depth: it has 4 decoder layers (0..3), so the "
                         "LLM stage must run at a layer below 4")
    (shared,) = [line for line in err.splitlines() if "compressor.layer=2 " in line]
    assert "but with other settings" in shared  # one run_dir, two runs
    assert list(tmp_path.iterdir()) == [tmp_path / "cwd"]  # not even the sweep directory


def test_a_sweep_runs_none_once_and_keeps_its_table_when_a_job_fails(cli, tiny, tmp_path, monkeypatch):
    generate, seen = tiny.generate, []

    def pooling_breaks(*args, **kwargs):
        seen.append(args[2].name)
        if args[2].name == "pooling":
            raise RuntimeError("pooling broke")
        return generate(*args, **kwargs)

    monkeypatch.setattr(tiny, "generate", pooling_breaks)
    code, out, err = cli("-m", "compressor=none,random,pooling", "compressor.ratio=0.5,0.25", "benchmark.limit=1",
                         "benchmark.max_new_tokens=2")
    assert code == 1, err  # Hydra's exit status for a failed job
    assert sorted(seen) == ["none", "pooling", "pooling", "random", "random"]  # none: one run for both ratios
    assert cli.builds == [TINY]  # the jobs share one model
    (table,) = sweep_tables(tmp_path)
    frame = pd.read_csv(table)
    assert list(zip(frame["compressor"], frame["ratio"], frame["status"])) == [
        ("none", 1.0, "ok"), ("random", 0.5, "ok"), ("random", 0.25, "ok"),
        ("pooling", 0.5, "failed"), ("pooling", 0.25, "failed")]
    assert set(frame["error"][3:]) == {"pooling broke"} and "compressor=pooling" in frame["overrides"][3]
    failed = [line for line in out.splitlines() if line.startswith("failed: ")]
    assert len(failed) == 2 and all(line.endswith(": pooling broke") for line in failed)
    assert "multirun: 3 runs" in out and "(2 failed)" in out
    assert "RuntimeError: pooling broke" in err  # not a usage error: Hydra shows where it came from
    assert cli("-m", "compressor=none", "benchmark.limit=1", "benchmark.max_new_tokens=2")[0] == 0
    assert len(sweep_tables(tmp_path)) == 2  # a table per sweep, the first one kept


# -- in a real process: the README's main command, and kill -9 ------------------------------------


def _readme_block(marker: str) -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(rf"<!-- {marker} -->\s*```(?:bash)?\n(.*?)```", text, re.S)
    assert match, f"README has no block marked {marker}"
    return match.group(1).strip()


def test_ci_runs_exactly_the_readme_test_command():
    command = _readme_block("test-command")
    ci = (ROOT / ".ci/run").read_text()
    assert command in ci


def run_evaluate(*args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    flags = [a for a in args if a.startswith("-")]
    command = [sys.executable, "-m", "runners.evaluate", *flags, "progress=false",
               *(a for a in args if not a.startswith("-"))]
    return subprocess.run(command, cwd=cwd, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
def test_readme_main_command_runs(tmp_path):
    """The README's main job, minus the install steps, on one sample per method."""
    job = _readme_block("main-command").split("&&")[-1].strip()
    assert job.startswith("python -m runners.evaluate")
    args = shlex.split(job)[3:]
    proc = run_evaluate(*args, "benchmark.limit=1", "benchmark.max_new_tokens=2", f"paths.output_dir={tmp_path}",
                        cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "accuracy" in proc.stdout
    (table,) = sorted((tmp_path / "sweeps").glob(f"*/{MULTIRUN_CSV}"))
    (methods,) = [a.split("=", 1)[1].split(",") for a in args if a.startswith("compressor=")]
    assert len(table.read_text().splitlines()) == 1 + len(methods)  # one row per compressor of the sweep
    chosen = dict(a.split("=", 1) for a in args if a.startswith(("model=", "benchmark=")))
    runs = tmp_path / "runs" / chosen.get("model", "tiny") / chosen.get("benchmark", "synthetic")
    assert sorted(p.name.split(",")[0] for p in runs.iterdir()) == sorted(methods)


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_files(cli, tmp_path):
    """kill -9 mid-run (plus a torn last line), then the same command: equal to an uninterrupted run."""
    # random draws per sample: a resume must draw what an uninterrupted run draws
    args = ("compressor=random", "benchmark.limit=6", "benchmark.max_new_tokens=4")
    reference_dir, run_dir = tmp_path / "reference", tmp_path / "killed"
    assert cli(*args, f"run_dir={reference_dir}")[0] == 0

    command = [sys.executable, "-m", "runners.evaluate", "progress=false", *args, f"run_dir={run_dir}",
               f"num_threads={torch.get_num_threads()}"]  # the threads this process computes with
    process = subprocess.Popen(command, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    samples = run_dir / "samples.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (samples.exists() and samples.read_text().count("\n") >= 2):
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done_before = samples.read_text().count("\n")
    assert 2 <= done_before < 6, "the run should have been killed part-way"
    with open(samples, "a") as handle:  # a torn line, as a kill in the middle of a write leaves
        handle.write('{"id": "synthetic-s0-00')

    code, out, err = cli(*args, f"run_dir={run_dir}")
    assert code == 0, err
    assert f"{done_before} already done" in out
    resumed = read_records(samples)
    assert without_timings(resumed) == without_timings(read_records(reference_dir / "samples.jsonl"))
    assert summary_without_timings(run_dir / "summary.json") == summary_without_timings(
        reference_dir / "summary.json")
