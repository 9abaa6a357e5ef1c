"""Each benchmark end to end: a tiny folder in the real layout through ``runners.evaluate`` (in-process,
composed config, tiny model) and back through ``runners.rescore``; failed samples; a missing root."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from bench_layouts import WRITERS, write_gqa
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

import runners.resolvers  # noqa: F401
import runners.schema  # noqa: F401
from benchmarks.base import DataRootError
from benchmarks.registry import get_benchmark_class
from runners.evaluate import evaluate
from runners.rescore import main as rescore_main
from runners.rescore import read_records, rescore

CONF = Path(__file__).resolve().parents[1] / "conf"
HEADLINES = {"gqa": "GQA", "mmbench": "MMB", "mmbench_cn": "MMB-CN", "mme": "MME-P", "pope": "POPE",
             "scienceqa_img": "SQA-IMG", "textvqa": "TextVQA", "seed_bench": "SEED-I", "vqav2": None, "vizwiz": None}


@pytest.fixture()
def run_cfg(tiny, monkeypatch):
    """Composed configs (tiny model, no progress bar); runs reuse the session's tiny pipeline, which is
    what ``build_pipeline`` would build from the default model config."""
    monkeypatch.setattr("runners.evaluate.build_pipeline", lambda cfg: tiny if cfg["name"] == "tiny" else None)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        yield lambda *overrides: compose(config_name="config", overrides=["progress=false", *overrides])
    GlobalHydra.instance().clear()


def without_timings(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k != "timings_mean_s"}


@pytest.mark.parametrize("name", sorted(HEADLINES))
def test_benchmark_runs_and_rescores_to_the_same_summary(run_cfg, tmp_path, name):
    layout = "lmms_lab" if name in ("pope", "mmbench_cn") else "llava"  # both readers run end to end
    root = WRITERS[name](tmp_path / "data", layout)
    cfg = run_cfg(f"benchmark={name}", f"benchmark.root={root}", f"benchmark.layout={layout}", "benchmark.limit=1",
                  "benchmark.max_new_tokens=1", "compressor=pooling", "compressor.ratio=0.1")
    run_dir = tmp_path / "run"
    summary = evaluate(cfg, run_dir)

    records = read_records(run_dir / "samples.jsonl")
    assert len(records) == summary["num_samples"] == 1 and summary["failed"]["count"] == 0
    assert {"id", "prompt", "prediction", "reference", "score", "parsed_prediction", "meta"} <= set(records[0])
    assert summary["config"]["benchmark"]["scorer_variant"] == "llava"
    headline = get_benchmark_class(name).build_scorer().headline(summary["metrics"])
    assert summary.get("headline") == headline
    if HEADLINES[name] is None:  # test splits: no local score
        assert headline is None and records[0]["score"] is None
    elif headline is not None:  # (POPE has no F1 when the one prediction is "no")
        assert headline["label"] == HEADLINES[name]
        assert headline["value"] == summary["metrics"][headline["metric"]]

    stored = json.loads((run_dir / "summary.json").read_text())
    again, path = rescore(run_dir)
    assert path == run_dir / "summary.json" and again == stored  # the same summary, from samples.jsonl alone
    other, path = rescore(run_dir, ["benchmark.scorer_variant=lmms_eval"])
    assert path.name == "summary.lmms_eval.json" and other["config"]["benchmark"]["scorer_variant"] == "lmms_eval"
    assert json.loads((run_dir / "summary.json").read_text()) == stored
    assert set(other["metrics"]) - {"binary", "open"} <= set(stored["metrics"]) | {"accuracy"}


def test_failed_samples_are_counted_and_the_run_goes_on(run_cfg, tmp_path):
    root = write_gqa(tmp_path / "gqa", "llava")
    (root / "data/images/n288870.jpg").write_bytes(b"corrupt")  # the image of questions 1 and 3
    with open(root / "llava_gqa_testdev_balanced.jsonl", "a") as handle:
        handle.write('{"question_id": "torn", "ima\n')
    overrides = ("benchmark=gqa", "benchmark.max_new_tokens=1", "compressor=pooling", "compressor.ratio=0.1")
    cfg = run_cfg(*overrides, f"benchmark.root={root}")
    summary = evaluate(cfg, tmp_path / "run")
    assert summary["num_samples"] == 1 and summary["failed"]["count"] == 3
    assert set(summary["failed"]["samples"]) == {"20968379", "20507580", "line-3"}
    assert "cannot decode image" in summary["failed"]["samples"]["20968379"]
    assert "not valid JSON" in summary["failed"]["samples"]["line-3"]
    records = read_records(tmp_path / "run" / "samples.jsonl")
    assert [r["id"] for r in records] == ["20968379", "201640614", "20507580", "line-3"]
    assert records[0] == {"id": "20968379", "failed": True, "error": summary["failed"]["samples"]["20968379"]}
    assert summary["metrics"]["accuracy"] in (0.0, 100.0)  # over the one scored sample
    again = evaluate(cfg, tmp_path / "run")  # resume: nothing left to run, failures are not retried
    assert without_timings(again) == without_timings(summary)
    moved = root.rename(tmp_path / "moved")  # the data's location is not part of the run's identity
    assert evaluate(run_cfg(*overrides, f"benchmark.root={moved}"), tmp_path / "run")["failed"]["count"] == 3
    assert rescore(tmp_path / "run")[0] == json.loads((tmp_path / "run" / "summary.json").read_text())
    predictions = json.loads((tmp_path / "run" / "testdev_balanced_predictions.json").read_text())
    assert [p["questionId"] for p in predictions] == ["201640614"]


def test_missing_root_fails_before_anything_is_written(run_cfg, tmp_path):
    cfg = run_cfg("benchmark=mme", f"benchmark.root={tmp_path / 'MME'}")
    with pytest.raises(DataRootError, match=r"(?s)llava_mme\.jsonl.*MME_Benchmark_release_version.*Get them from"):
        evaluate(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_rescore_refuses_other_overrides_and_unfinished_runs(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="needs a finished run"):
        rescore(tmp_path)
    with pytest.raises(ValueError, match=r"only benchmark.scorer_variant=\.\.\. changes scoring"):
        from runners.rescore import parse_overrides

        parse_overrides(["benchmark.limit=3"])
    with pytest.raises(FileNotFoundError):
        rescore_main([str(tmp_path)])
