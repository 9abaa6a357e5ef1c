"""Run directories are named by what the run is; the identity holds everything that changes results."""

from __future__ import annotations

import subprocess
from importlib import metadata
from pathlib import Path

import pytest

import vtclab
from runners.evaluate import resolve_settings
from runners.identity import canonical, code_versions, run_directory, run_identity, run_name

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def directory(compose_cfg):
    """The run directory of a command's overrides (relative to ``outputs/runs/tiny/synthetic``)."""
    def name(*overrides: str, in_sweep: bool = False) -> str:
        settings = resolve_settings(compose_cfg(overrides), in_sweep=in_sweep)
        return str(run_directory(settings).relative_to("outputs/runs/tiny/synthetic"))
    return name


def test_one_run_is_one_directory_however_it_is_spelled(directory):
    assert directory("compressor=random", "compressor.ratio=0.5") == "random,ratio=0.5"
    assert directory("compressor.ratio=0.50", "compressor=random") == "random,ratio=0.5"
    assert directory("compressor=random", "compressor.ratio=.5") == "random,ratio=0.5"
    # the default ratio spelled out, and a preset's job, land where the README's main command ran
    assert directory("compressor=random") == directory("compressor=random", "compressor.ratio=0.25") == (
        directory("experiment=ratio_sweep", "compressor=random", "compressor.ratio=0.25")) == "random,ratio=0.25"
    assert directory("compressor=random", "compressor.ratio=1") == directory("compressor=random",
                                                                            "compressor.ratio=1.0")


def test_settings_other_than_the_defaults_name_the_directory(directory):
    assert directory("compressor=fastv", "compressor.layer=3") == "fastv,ratio=0.5,layer=3"
    assert directory("compressor=fastv", "compressor.layer=2") == "fastv,ratio=0.5"  # the default
    assert directory("compressor=globalcom2", "compressor.temperature=10") == "globalcom2,ratio=0.25"
    assert directory("compressor=globalcom2", "compressor.layout=spatial", "model.seed=1", "benchmark.seed=3",
                     "save_provenance=true", "cost.attention=causal") == (
        "globalcom2,ratio=0.25,layout=spatial,benchmark.seed=3,model.seed=1,cost.attention=causal,"
        "save_provenance=true")
    assert directory("cost=fastv_eq5") == "none,ratio=1,cost.flops_per_mac=1,cost.lm_head=false,cost.mlp_matrices=2," \
                                          "cost.name=fastv_eq5"


def test_where_and_how_a_run_executes_does_not_name_it(directory, compose_cfg):
    plain = directory("compressor=random")
    assert directory("compressor=random", "benchmark.limit=3", "progress=false", "resume=false",
                     "num_threads=1") == plain
    assert run_directory(resolve_settings(compose_cfg(["paths.output_dir=/x"]))).parent == Path(
        "/x/runs/tiny/synthetic")
    assert run_directory(resolve_settings(compose_cfg(["run_dir=/somewhere/else"]))) == Path("/somewhere/else")


def test_the_uncompressed_run_takes_its_fixed_ratio_in_a_sweep(directory):
    assert directory("compressor=none", "compressor.ratio=0.25", in_sweep=True) == "none,ratio=1"
    assert directory("compressor=none", in_sweep=True) == "none,ratio=1"


def test_an_adaptive_count_runs_once_in_a_ratio_sweep(directory):
    assert directory("compressor=prumerge_plus", "compressor.ratio=0.25", in_sweep=True) == "prumerge_plus,ratio=null"
    assert directory("compressor=prumerge_plus", "compressor.ratio=0.1", in_sweep=True) == "prumerge_plus,ratio=null"


def test_canonical_numbers():
    assert [canonical(v) for v in (0.5, 0.50, 1, 1.0, 0.1, 1e-5, True, None, [1, 2])] == [
        "0.5", "0.5", "1", "1", "0.1", "1e-05", "true", "null", "[1,2]"]


def test_a_long_name_stays_a_valid_unique_path_component():
    settings = {"compressor": {"name": "random", "ratio": 0.5, "seed": 1}, "benchmark": {"name": "synthetic"},
                "model": {"name": "tiny", "loader": "tiny", "attn_implementation": "x" * 300}}
    other = {**settings, "model": {**settings["model"], "attn_implementation": "y" * 300}}
    assert len(run_name(settings)) <= 200 and run_name(settings) != run_name(other)


def test_the_identity_holds_settings_and_code_but_not_where_it_runs(compose_cfg):
    identity = run_identity(resolve_settings(compose_cfg(["compressor=random", "benchmark.limit=3",
                                                          "save_provenance=true", "num_threads=1"])))
    assert identity["save_provenance"] is True
    assert identity["compressor"] == {"name": "random", "ratio": 0.25, "seed": 0}
    assert "limit" not in identity["benchmark"]
    assert not {"paths", "resume", "progress", "num_threads", "run_dir"} & identity.keys()
    assert identity["code"] == code_versions()


def test_code_versions_are_the_installed_ones():
    versions = code_versions()
    assert versions["vtclab"] == vtclab.__version__
    assert versions["torch"] == metadata.version("torch") and versions["transformers"] == metadata.version(
        "transformers")
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:  # a git checkout (CI clones one)
        status = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True).stdout
        assert versions["git_commit"] == head.stdout.strip()
        assert versions["git_dirty"] is bool(status.strip())
