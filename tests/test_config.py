"""Every config composes, builds, and fails early and clearly on bad values."""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import pytest
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from benchmarks import build_benchmark
from compressors import build_compressor, get_compressor_class
from runners.evaluate import resolve_settings
from runners.sweep import expand_sweep

CONF = Path(__file__).resolve().parents[1] / "conf"


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


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
    if cfg.model.loader == "local" and cfg.model.rebuild is not None:  # built here (tiny_trained), shipped
        assert cfg.model.hub_id is None and Path(cfg.model.path).is_dir()
    elif cfg.model.loader == "local":
        assert cfg.model.hub_id.startswith("llava-hf/")
        assert cfg.model.path.endswith(cfg.model.hub_id.split("/")[1])
        assert cfg.model.prompt_format == ("mistral_instruct" if "mistral" in model else "vicuna_v1")


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
        whole = compose(job)  # the job keeps experiment=..., as in the real sweep
        expected = [OmegaConf.to_container(whole[g], resolve=True) for g in ("compressor", "benchmark")]
        assert [node(job, "compressor"), node(job, "benchmark")] == expected
        yield job, *expected


@pytest.mark.parametrize("experiment", _options("experiment"))
def test_every_experiment_job_composes_and_builds(compose_cfg, experiment):
    """Expand the preset's sweep and build every job's compressor and benchmark: a typo in a method
    or benchmark name, or a ratio of 1.5, fails here, not hours into the sweep."""
    cfg = compose_cfg([f"experiment={experiment}"], return_hydra_config=True)
    build_compressor(OmegaConf.to_container(cfg.compressor, resolve=True))
    jobs = expand_sweep(cfg)
    assert len(jobs) >= 1
    built = 0
    for job, compressor, benchmark in job_configs(compose_cfg, experiment, jobs):
        compressor = resolve_settings({"compressor": compressor}, in_sweep=True)["compressor"]  # as the sweep runs it
        described = build_compressor(compressor).describe()
        for override in job:  # the job's own values reached the built compressor
            key, value = override.split("=")
            if key == "compressor":
                assert described["name"] == value
            elif key == "compressor.ratio":
                method = get_compressor_class(described["name"])  # none: 1 at every swept ratio; prumerge_plus: null
                assert described["ratio"] == (None if method.adaptive_budget else method.fixed_ratio or float(value))
        bench = build_benchmark(benchmark)
        assert all(bench.name == o.split("=")[1] for o in job if o.startswith("benchmark="))
        built += 1
    assert built == len(jobs) + 2


@pytest.mark.parametrize("experiment", _options("experiment"))
def test_every_ratio_sweep_has_its_upper_bound(compose_cfg, experiment):
    """A preset that sweeps ratios also runs the uncompressed model (once: its ratio is fixed)."""
    params = compose_cfg([f"experiment={experiment}"], return_hydra_config=True).hydra.sweeper.params or {}
    if "compressor.ratio" in params:
        assert "none" in str(params["compressor"]).split(","), experiment


def test_paper_presets_sweep_the_papers_grid(compose_cfg):
    """LLaVA-NeXT-7B and 13B: 4 methods x 4 ratios x 10 benchmarks, in the paper's benchmark order, and
    the uncompressed model on every benchmark (its 4 jobs per benchmark are one run)."""
    order = "gqa,mmbench,mmbench_cn,mme,pope,scienceqa_img,vqav2,textvqa,vizwiz,seed_bench".split(",")
    for size in ("7b", "13b"):
        cfg = compose_cfg([f"experiment=paper_llava_next_{size}"], return_hydra_config=True)
        assert cfg.model.name == f"llava_next_{size}" and cfg.model.dtype == "float16"
        jobs = expand_sweep(cfg)
        assert len(jobs) == 5 * 4 * 10
        assert {j[0] for j in jobs} == {f"compressor={c}" for c in ("none", "random", "pooling", "fastv", "globalcom2")}
        assert sorted({j[1] for j in jobs}) == [f"compressor.ratio={r}" for r in ("0.1", "0.25", "0.5", "0.75")]
        assert [j[2].split("=")[1] for j in jobs[:10]] == order


def test_sweep_expansion_catches_a_bad_preset(compose_cfg, tmp_path):
    """The expansion above really builds every value: a preset with a ratio of 1.5 fails."""
    cfg = compose_cfg(["experiment=ratio_sweep"], return_hydra_config=True)
    cfg.hydra.sweeper.params["compressor.ratio"] = "0.5,1.5"
    jobs = expand_sweep(cfg)  # the preset's params, then the command line's overrides, as Hydra runs them
    assert ["compressor=random", "compressor.ratio=1.5", "experiment=ratio_sweep"] in jobs
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        for job in jobs:
            build_compressor(resolve_settings(compose_cfg(job), in_sweep=True)["compressor"])


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


def test_schemas_are_not_offered_as_models(compose_cfg):
    """Only conf/model/*.yaml are models; the structured schemas they extend stay internal."""
    compose_cfg()
    assert GlobalHydra.instance().config_loader().get_group_options("model") == _options("model")
    with pytest.raises(ConfigCompositionException) as error:
        compose_cfg(["model=foo"])
    options = str(error.value).split("Available options in 'model':")[1].split("Config search path")[0]
    assert options.split() == _options("model")


def test_every_model_yaml_names_its_prompt_format(compose_cfg):
    for model in _options("model"):
        assert OmegaConf.missing_keys(compose_cfg([f"model={model}"]).model) - {"path"} == set(), model
