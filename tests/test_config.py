"""Every config composes, builds, and fails early and clearly on bad values."""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

import runners.resolvers  # noqa: F401
import runners.schema  # noqa: F401
from benchmarks import build_benchmark
from compressors import build_compressor

CONF = Path(__file__).resolve().parents[1] / "conf"


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.fixture()
def compose_cfg():
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        yield lambda overrides=(), **kw: compose(config_name="config", overrides=list(overrides), **kw)
    GlobalHydra.instance().clear()


def test_defaults_compose(compose_cfg):
    cfg = compose_cfg()
    assert cfg.model.name == "tiny" and cfg.compressor.name == "none" and cfg.benchmark.name == "synthetic"
    assert cfg.resume is True


@pytest.mark.parametrize("compressor", _options("compressor"))
@pytest.mark.parametrize("benchmark", _options("benchmark"))
def test_every_compressor_and_benchmark_composes_and_builds(compose_cfg, compressor, benchmark):
    cfg = compose_cfg([f"compressor={compressor}", f"benchmark={benchmark}"])
    build_compressor(OmegaConf.to_container(cfg.compressor, resolve=True))
    build_benchmark(OmegaConf.to_container(cfg.benchmark, resolve=True))


@pytest.mark.parametrize("model", _options("model"))
def test_every_model_composes(compose_cfg, model):
    cfg = compose_cfg([f"model={model}"])
    assert cfg.model.name == model
    if cfg.model.loader == "local":
        assert cfg.model.hub_id.startswith("llava-hf/")
        assert cfg.model.path.endswith(cfg.model.hub_id.split("/")[1])
        assert cfg.model.prompt_format == ("mistral_instruct" if "mistral" in model else "vicuna_v1")


def sweep_jobs(cfg) -> list[list[str]]:
    """Every job's overrides of a preset's ``hydra.sweeper.params``, as Hydra's basic sweeper expands them."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = cfg.hydra.sweeper.params or {}
    overrides = [f"{key}={value}" for key, value in params.items()]
    parsed = OverridesParser.create().parse_overrides(overrides)
    jobs = [[]]
    for override in parsed:
        values = list(override.sweep_string_iterator()) if override.is_sweep_override() else [override.get_value_element_as_str()]
        jobs = [job + [f"{override.get_key_element()}={value}"] for job in jobs for value in values]
    return jobs


def job_configs(compose, experiment: str, jobs: list[list[str]]):
    """Each job's ``(compressor, benchmark)`` config nodes.

    Composing every job of a paper preset (4 methods x 4 ratios x 10 benchmarks) through Hydra would
    cost minutes, so the preset is composed once and each job's nodes are built as Hydra builds
    them: the chosen group file, the preset's own values for that group on top, then the job's
    value overrides (``compressor.ratio=0.1``). The first and last jobs are also composed whole by
    Hydra, and must give the same nodes.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    base = compose([f"experiment={experiment}"])
    preset = OmegaConf.load(CONF / "experiment" / f"{experiment}.yaml")

    @functools.lru_cache(maxsize=None)
    def group_node(group: str, overrides: tuple[str, ...]):
        return node(list(overrides), group)

    def node(job: list[str], group: str):
        cfg = OmegaConf.create(OmegaConf.to_container(base))
        choice = next((o.split("=")[1] for o in job if o.split("=")[0] == group), None)
        if choice is not None:
            assert (CONF / group / f"{choice}.yaml").exists(), f"{experiment}: no config {group}/{choice}"
            cfg[group] = OmegaConf.merge(OmegaConf.load(CONF / group / f"{choice}.yaml"), preset.get(group) or {})
        for override in parser.parse_overrides([o for o in job if o.startswith(f"{group}.")]):
            OmegaConf.update(cfg, override.get_key_element(), override.value())
        return OmegaConf.to_container(cfg[group], resolve=True)

    def mine(job: list[str], group: str) -> tuple[str, ...]:
        return tuple(o for o in job if o.split("=")[0].split(".")[0] == group)

    for job in jobs:
        yield job, *(copy.deepcopy(group_node(g, mine(job, g))) for g in ("compressor", "benchmark"))
    for job in (jobs[0], jobs[-1]):
        whole = compose([f"experiment={experiment}", *job])
        expected = [OmegaConf.to_container(whole[g], resolve=True) for g in ("compressor", "benchmark")]
        assert [node(job, "compressor"), node(job, "benchmark")] == expected
        yield job, *expected


@pytest.mark.parametrize("experiment", _options("experiment"))
def test_every_experiment_job_composes_and_builds(compose_cfg, experiment):
    """Expand the preset's sweep and build every job's compressor and benchmark: a typo in a method
    or benchmark name, or a ratio of 1.5, fails here, not hours into the sweep."""
    cfg = compose_cfg([f"experiment={experiment}"], return_hydra_config=True)
    build_compressor(OmegaConf.to_container(cfg.compressor, resolve=True))
    jobs = sweep_jobs(cfg)
    assert len(jobs) >= 1
    built = 0
    for job, compressor, benchmark in job_configs(compose_cfg, experiment, jobs):
        described = build_compressor(compressor).describe()
        for override in job:  # the job's own values reached the built compressor
            key, value = override.split("=")
            if key == "compressor":
                assert described["name"] == value
            elif key == "compressor.ratio":
                assert described["ratio"] == float(value)
        bench = build_benchmark(benchmark)
        assert all(bench.name == o.split("=")[1] for o in job if o.startswith("benchmark="))
        built += 1
    assert built == len(jobs) + 2


def test_paper_presets_sweep_the_papers_grid(compose_cfg):
    """LLaVA-NeXT-7B and 13B: 4 methods x 4 ratios x 10 benchmarks, in the paper's benchmark order."""
    order = "gqa,mmbench,mmbench_cn,mme,pope,scienceqa_img,vqav2,textvqa,vizwiz,seed_bench".split(",")
    for size in ("7b", "13b"):
        cfg = compose_cfg([f"experiment=paper_llava_next_{size}"], return_hydra_config=True)
        assert cfg.model.name == f"llava_next_{size}" and cfg.model.dtype == "float16"
        jobs = sweep_jobs(cfg)
        assert len(jobs) == 4 * 4 * 10
        assert {j[0] for j in jobs} == {f"compressor={c}" for c in ("random", "pooling", "fastv", "globalcom2")}
        assert sorted({j[1] for j in jobs}) == [f"compressor.ratio={r}" for r in ("0.1", "0.25", "0.5", "0.75")]
        assert [j[2].split("=")[1] for j in jobs[:10]] == order


def test_sweep_expansion_catches_a_bad_preset(compose_cfg, tmp_path):
    """The expansion above really builds every value: a preset with a ratio of 1.5 fails."""
    cfg = compose_cfg(["experiment=ratio_sweep"], return_hydra_config=True)
    cfg.hydra.sweeper.params["compressor.ratio"] = "0.5,1.5"
    jobs = sweep_jobs(cfg)
    assert ["compressor=random", "compressor.ratio=1.5"] in jobs
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        for job in jobs:
            build_compressor(OmegaConf.to_container(compose_cfg(["experiment=ratio_sweep", *job]).compressor))


def test_schema_rejects_bad_types_and_keys(compose_cfg):
    with pytest.raises(ConfigCompositionException):
        compose_cfg(["model=llava_next_7b", "model.dtype=fp16"])  # not one of float16/bfloat16/float32/auto
    with pytest.raises(ConfigCompositionException):
        compose_cfg(["model.dtpye=float16"])  # typo: not in the schema
    with pytest.raises(ConfigCompositionException):
        compose_cfg(["resume=maybe"])
    with pytest.raises(ConfigCompositionException, match="Available options"):
        compose_cfg(["compressor=globalcom3"])


def test_bad_compressor_values_fail_in_build(compose_cfg):
    cfg = compose_cfg(["compressor=random", "compressor.ratio=1.5"])
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        build_compressor(OmegaConf.to_container(cfg.compressor))
    cfg = compose_cfg(["compressor=random", "+compressor.ratoi=0.5"])
    with pytest.raises(ValueError, match="Did you mean 'ratio'"):
        build_compressor(OmegaConf.to_container(cfg.compressor))


def test_run_directories_come_from_the_overrides(compose_cfg):
    cfg = compose_cfg(["compressor=random", "compressor.ratio=0.5", "progress=false"], return_hydra_config=True)
    from hydra.core.hydra_config import HydraConfig

    HydraConfig.instance().set_config(cfg)
    run_dir = OmegaConf.to_container(cfg.hydra.run, resolve=True)["dir"]
    assert run_dir == "outputs/runs/tiny/synthetic/compressor.ratio=0.5,compressor=random"
    default = compose_cfg([], return_hydra_config=True)
    HydraConfig.instance().set_config(default)
    assert OmegaConf.to_container(default.hydra.run, resolve=True)["dir"] == "outputs/runs/tiny/synthetic/default"
