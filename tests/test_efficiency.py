"""``runners.efficiency`` end to end on the tiny model (CPU), its argument checks, device presets, and
the random-init architectures (``model.random_init=true``)."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig

import runners.resolvers  # noqa: F401
import runners.schema  # noqa: F401
from models import build_pipeline
from models.devices import DEVICE_PRESETS, auto_preset, resolve_preset
from models.random_arch import (
    build_random_llava_next,
    check_fits,
    random_init_device,
    shipped_architectures,
    shipped_config,
)
from models.timing import DeviceClock
from runners.efficiency import (
    EfficiencyTable,
    _DecodeClock,
    check_arguments,
    compare,
    overhead_seconds,
    run_efficiency,
)
from runners.sweep import expand_sweep
from tests.conftest import random_image

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


@pytest.fixture()
def compose_efficiency():
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        yield lambda overrides=(), **kw: compose(config_name="efficiency", overrides=list(overrides), **kw)
    GlobalHydra.instance().clear()


SMOKE = ["compressor=fastv", "compressor.ratio=0.5", "image_hw=[14,300]", "warmup=0", "repeats=1",
         "decode_tokens=2", "progress=false", "flop_check=true"]


def test_efficiency_smoke_on_the_tiny_model(compose_efficiency, tiny, tmp_path):
    """One repeat of every measurement for FastV and vanilla; the derived figures recomputed here."""
    cfg = compose_efficiency(SMOKE)
    record = run_efficiency(cfg, tmp_path / "job", pipeline=tiny)
    m, v, t, tv = record["measured"], record["vanilla"]["measured"], record["theory"], record["vanilla"]["theory"]
    tokens = record["tokens"]
    assert record["skipped"] is None and record["compressor"] == {"name": "fastv", "ratio": 0.5, "layer": 2,
                                                                   "decode": "prefill_once", "score_dtype": "float32"}
    assert tokens["visual_after"] == round(tokens["visual_spliced"] * 0.5) < tokens["visual_before"]
    assert tokens["visual_layer_mean"] == (2 * tokens["visual_spliced"] + 2 * tokens["visual_after"]) / 4
    for part in ("vision_s", "prefill_s", "decode_s_per_token", "llm_stage_s"):
        assert m[part] > 0 and v[part] > 0 or part == "llm_stage_s" and v[part] == 0
    assert m["signals_s"] == 0 and m["ttft_s"] == m["vision_s"] + m["compress_s"] + m["prefill_s"]
    assert m["decode_tokens_timed"] == v["decode_tokens_timed"] == 2  # EOS suppressed: every token generated
    # the real KV cache after the prefill is what the cost model says (model dtype, every token)
    assert m["kv_cache_mb"] == pytest.approx(t["kv_cache_mb"]) and v["kv_cache_mb"] == pytest.approx(tv["kv_cache_mb"])
    assert m["kv_cache_mb"] < v["kv_cache_mb"]
    assert record["flop_check"]["relative_difference"] == pytest.approx(0, abs=0.02)
    s = record["speedup"]
    assert s["prefill"] == pytest.approx(v["prefill_s"] / m["prefill_s"])
    assert s["prefill_theory"] == pytest.approx(tv["prefill_tflops"] / t["prefill_tflops"]) and s["prefill_theory"] > 1
    assert s["prefill_vs_theory"] == pytest.approx(s["prefill"] / s["prefill_theory"])
    assert s["ttft"] == pytest.approx(v["ttft_s"] / m["ttft_s"])
    assert s["ttft_theory"] == pytest.approx((tv["vision_tflops"] + tv["prefill_tflops"])
                                             / (t["vision_tflops"] + t["prefill_tflops"]))
    assert s["decode"] == pytest.approx(v["decode_s_per_token"] / m["decode_s_per_token"])
    # FastV has no vision stage of its own: its overhead is the LLM-stage selection only
    assert record["own_compress"] is False
    assert record["overhead_pct_of_vanilla_prefill"] == pytest.approx(100 * m["llm_stage_s"] / v["prefill_s"])
    assert record["achieved_tflops_per_s"] == pytest.approx(t["prefill_tflops"] / m["prefill_s"])
    assert record["fraction_of_peak"] is None and record["device_preset"] is None  # CPU: no peak

    rows = pd.read_csv(tmp_path / "job" / "efficiency.csv")
    assert list(rows["compressor"]) == ["none", "fastv"]  # vanilla baseline first
    assert rows.loc[0, "speedup.prefill"] == 1.0 and rows.loc[0, "measured.prefill_s"] == pytest.approx(v["prefill_s"])

    # an identical rerun reuses the job; a skipped job and the multirun table
    assert run_efficiency(cfg, tmp_path / "job", pipeline=None) == record
    skipped = run_efficiency(compose_efficiency([*SMOKE, "compressor.layer=4"]), tmp_path / "deep", pipeline=None)
    assert skipped["skipped"] == "fastv's LLM layer K=4 needs at least 5 decoder layers; the model builds 4"
    table = EfficiencyTable()
    table.job_dirs = [tmp_path / "job", tmp_path / "deep"]
    table.on_multirun_end(compose_efficiency(return_hydra_config=True, overrides=[f"hydra.sweep.dir={tmp_path}"]))
    rows = pd.read_csv(tmp_path / "efficiency_results.csv")
    assert list(rows["compressor"]) == ["none", "fastv", "fastv"] and rows["skipped"].notna().tolist() == [False,
                                                                                                           False, True]
    assert len(json.loads((tmp_path / "efficiency_results.json").read_text())) == 3


def test_decode_time_per_step():
    clock = _DecodeClock(DeviceClock(torch.device("cpu")))
    clock.marks = [10.0, 10.5, 11.0, 11.6]  # 4 tokens: the first from the prefill, then 3 decoding steps
    assert clock.seconds_per_step() == pytest.approx(1.6 / 3)  # (11.6 - 10.0) s over 3 steps
    clock.marks = [1.0]
    with pytest.raises(ValueError, match="at least 2 generated tokens"):
        clock.seconds_per_step()


def test_overhead_counts_the_compressors_own_work():
    measured = {"signals_s": 0.002, "compress_s": 0.003, "llm_stage_s": 0.0, "prefill_s": 0.5, "ttft_s": 0.6,
                "decode_s_per_token": 0.02}
    assert overhead_seconds(measured, own_compress=True) == pytest.approx(0.005)
    assert overhead_seconds(measured, own_compress=False) == pytest.approx(0.002)  # compress_s = vanilla packing
    theory = {"prefill_tflops": 1.0, "vision_tflops": 0.5, "kv_cache_mb": 1.0}
    vanilla = {"measured": {**measured, "prefill_s": 1.0, "ttft_s": 1.2}, "theory": {**theory, "prefill_tflops": 4.0},
               "own_compress": False}
    method = {"measured": measured, "theory": theory, "own_compress": True}
    out = compare(method, vanilla, peak=10.0)
    assert out["overhead_pct_of_vanilla_prefill"] == pytest.approx(0.5)
    assert out["speedup"]["prefill"] == 2.0 and out["speedup"]["prefill_theory"] == 4.0
    assert out["speedup"]["prefill_vs_theory"] == 0.5 and out["speedup"]["ttft_theory"] == pytest.approx(4.5 / 1.5)
    assert out["achieved_tflops_per_s"] == 2.0 and out["fraction_of_peak"] == 0.2


def test_bad_arguments_fail_before_building(compose_efficiency):
    with pytest.raises(ValueError, match="unknown device_preset 'h1000'. Did you mean 'h100'.*auto, none, a100"):
        check_arguments(compose_efficiency(["device_preset=h1000"]))
    with pytest.raises(ValueError, match="decode_tokens must be >= 2"):
        check_arguments(compose_efficiency(["decode_tokens=1"]))
    with pytest.raises(ValueError, match="acme/llava-70b.*none ships with vtclab.*llava-v1.6-vicuna-7b-hf"):
        check_arguments(compose_efficiency(["model=llava_next_7b", "model.random_init=true",
                                            "model.hub_id=acme/llava-70b"]))
    with pytest.raises(ValueError, match=r"model.text_layers must be an integer in 1..32"):
        check_arguments(compose_efficiency(["model=llava_next_7b", "model.random_init=true", "model.text_layers=40"]))
    plan = check_arguments(compose_efficiency(["model=llava_next_7b", "model.random_init=true", "model.text_layers=2",
                                               "compressor=fastv"]))
    assert plan.skip == "fastv's LLM layer K=2 needs at least 3 decoder layers; the model builds 2 (model.text_layers)"
    with pytest.raises(ValueError, match="only a random-weight model"):
        build_pipeline({"loader": "local", "name": "x", "path": "/nowhere", "hub_id": "a/b", "text_layers": 2})


def test_device_presets():
    assert resolve_preset("h100", torch.device("cpu")).peak(torch.float16) == 989.4
    assert resolve_preset("a100", torch.device("cpu")).peak(torch.bfloat16) == 312.0
    assert resolve_preset("auto", torch.device("cpu")) is None and resolve_preset("none", torch.device("cpu")) is None
    assert {"a100", "h100", "h200"} <= set(DEVICE_PRESETS)
    assert auto_preset("NVIDIA H100 80GB HBM3").name == "h100" and auto_preset("NVIDIA H100 PCIe").name == "h100_pcie"
    assert auto_preset("NVIDIA A100-SXM4-80GB").name == "a100" and auto_preset("NVIDIA H200").name == "h200"
    assert auto_preset("Tesla V100-SXM2-16GB") is None
    with pytest.raises(ValueError, match="unknown device_preset 'v100'.*Allowed: auto, none, a100, h100, h100_pcie, h200"):
        resolve_preset("v100", torch.device("cpu"))


def test_gpu_script_jobs_all_pass_the_checks(compose_efficiency):
    """scripts/efficiency_7b_gpu.sh: its sweep has 16 measured jobs, and a job of every method composes and
    passes the argument checks (full 7B depth, so FastV's K = 2 is not skipped), on a CPU without
    building anything. (tests/test_config.py builds every ratio of the preset.)"""
    script = (ROOT / "scripts/efficiency_7b_gpu.sh").read_text()
    command = " ".join(line.rstrip("\\").strip() for line in script.split("python -m runners.efficiency", 1)[1]
                       .split("\n\n")[0].splitlines())
    overrides = [a for a in shlex.split(command.split('"$@"')[0]) if a != "-m" and not a.startswith("hydra.")]
    jobs = expand_sweep(compose_efficiency(overrides, return_hydra_config=True))
    assert len(jobs) == 20  # 4 methods x 4 ratios, and ratio_sweep's none (skipped: every job measures vanilla)
    none = compose_efficiency(next(j for j in jobs if "compressor=none" in j), return_hydra_config=True)
    none.hydra.mode = "MULTIRUN"
    HydraConfig.instance().set_config(none)
    try:
        assert check_arguments(none).skip == ("none has a fixed ratio (1.0); every job measures vanilla beside its "
                                              "compressor")
    finally:
        HydraConfig.instance().cfg = None
    for job in [j for j in jobs if "compressor.ratio=0.1" in j and "compressor=none" not in j]:
        plan = check_arguments(compose_efficiency(job))
        assert plan.skip is None and plan.built_layers == plan.full_layers == 32
        assert plan.model["random_init"] and plan.model["dtype"] == "float16" and plan.model["attn_implementation"] == "sdpa"


def test_an_adaptive_count_is_measured_at_a_null_ratio_in_a_sweep(compose_efficiency):
    """prumerge_plus in a ratio sweep: measured (not skipped) with its ratio null, not refused."""
    cfg = compose_efficiency(["compressor=prumerge_plus", "compressor.ratio=0.25"], return_hydra_config=True)
    cfg.hydra.mode = "MULTIRUN"
    HydraConfig.instance().set_config(cfg)
    try:
        plan = check_arguments(cfg)
    finally:
        HydraConfig.instance().cfg = None
    assert plan.skip is None and plan.compressor.name == "prumerge_plus" and plan.compressor.ratio is None


# -- random-init architectures --------------------------------------------------------------------


def test_every_local_model_config_has_a_random_init_shape():
    hub_ids = {line.split(":", 1)[1].strip() for path in (CONF / "model").glob("*.yaml")
               for line in path.read_text().splitlines() if line.startswith("hub_id:")}
    hub_ids.discard("null")  # built here, not downloaded (tiny_trained): no architecture to ship
    assert hub_ids and hub_ids <= set(shipped_architectures())
    mistral = shipped_config("llava-hf/llava-v1.6-mistral-7b-hf").text_config
    assert (mistral.model_type, mistral.num_key_value_heads, mistral.intermediate_size) == ("mistral", 8, 14336)
    vicuna_13b = shipped_config("llava-hf/llava-v1.6-vicuna-13b-hf").text_config
    assert (vicuna_13b.hidden_size, vicuna_13b.num_hidden_layers, vicuna_13b.vocab_size) == (5120, 40, 32064)


def test_memory_check_refuses_what_does_not_fit():
    config = shipped_config("llava-hf/llava-v1.6-vicuna-7b-hf")
    with pytest.raises(MemoryError, match=r"7.06 B parameters\) in float32 needs 28.3 GB.*model.text_layers=2"):
        check_fits(config, torch.float32, torch.device("cpu"), "llava_next_7b", available=16 * 10**9)
    assert check_fits(config, torch.float16, torch.device("cpu"), "llava_next_7b", available=80 * 10**9) \
        == 7_063_431_168 * 2  # 7.06 B parameters, the llava-hf model card's count
    assert random_init_device("auto") == torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            random_init_device("cuda:0")


def test_random_init_builds_a_working_model(tmp_path, monkeypatch):
    """The build path end to end on a small shipped-style config (a full 7B does not fit a test)."""
    import models.random_arch as random_arch

    config = json.loads((random_arch.CONFIG_DIR / "llava-hf--llava-v1.6-vicuna-7b-hf.json").read_text())
    config["vision_config"].update(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    config["text_config"].update(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                                 num_key_value_heads=4)
    (tmp_path / "test--small.json").write_text(json.dumps(config))
    monkeypatch.setattr(random_arch, "CONFIG_DIR", tmp_path)
    pipeline = build_pipeline({"loader": "local", "name": "small", "path": "unused", "hub_id": "test/small",
                               "random_init": True, "text_layers": 2, "dtype": "float32", "device_map": "cpu"})
    model = pipeline.model
    assert model.config.text_config.num_hidden_layers == 2 and model.config.text_config.vocab_size == 32064
    assert model.config.image_token_id == pipeline.processor.tokenizer.convert_tokens_to_ids("<image>")
    again, _ = build_random_llava_next("test/small", text_layers=2)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))  # seeded
    from compressors import build_compressor

    result = pipeline.generate(random_image(40, 300), "What?", build_compressor({"name": "pooling"}), max_new_tokens=2)
    assert result.visual_tokens_after < result.visual_tokens_before and len(result.layer_lengths) == 2
