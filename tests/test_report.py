"""runners.report on hand-written records and summaries: the numbers, the labels and the order."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from runners.report import collect_summaries, main, render_table, summarise, summary_row, write_csv


def _record(before, after, layer_mean, score, prefill):
    return {"visual_tokens_before": before, "visual_tokens_spliced": before if after == layer_mean else before,
            "visual_tokens_after": after, "visual_tokens_layer_mean": layer_mean, "score": score,
            "vision_s": 0.01, "compress_s": 0.0, "prefill_s": prefill, "decode_s": 0.1}


def test_summarise_by_hand():
    # two FastV-like samples, 4 layers, K=2: (2*1000 + 2*250)/4 = 625 and (2*2000 + 2*500)/4 = 1250
    records = [_record(1000, 250, 625.0, 1.0, 0.2), _record(2000, 500, 1250.0, 0.0, 0.4)]
    summary = summarise(records, {"accuracy": 50.0}, run={"model": "tiny"})
    assert summary["num_samples"] == 2
    assert summary["tokens"]["visual_tokens_after"] == 375.0
    assert summary["tokens"]["visual_tokens_layer_mean"] == 937.5
    assert summary["retention_actual"] == pytest.approx(750 / 3000)  # summed over samples, not a mean of ratios
    assert summary["retention_layer_mean"] == pytest.approx(1875 / 3000)
    assert summary["timings_mean_s"]["prefill_s"] == pytest.approx(0.3)
    assert summary["model"] == "tiny" and summary["metrics"] == {"accuracy": 50.0}


def _summary(name, ratio, accuracy, after, layer_mean, **options):
    return {"model": "tiny", "benchmark": "synthetic", "compressor": {"name": name, "ratio": ratio, **options},
            "num_samples": 4, "metrics": {"accuracy": accuracy},
            "tokens": {"visual_tokens_before": 2000.0, "visual_tokens_spliced": 2000.0,
                       "visual_tokens_after": after, "visual_tokens_layer_mean": layer_mean},
            "retention_actual": after / 2000, "retention_layer_mean": layer_mean / 2000,
            "timings_mean_s": {"vision_s": 0.01, "compress_s": 0.001, "prefill_s": 0.2, "decode_s": 0.1},
            "run_dir": f"runs/{name}-{ratio}"}


def test_summary_row_labels_and_non_default_options():
    row = summary_row(_summary("fastv", 0.25, 10.0, 500.0, 1250.0, layer=3))
    assert row["compressor"] == "fastv" and row["ratio"] == 0.25
    assert row["options"] == "layer=3"  # layer differs from FastV's default 2
    assert row["tokens/after"] == 500.0 and row["tokens/layer_mean"] == 1250.0
    assert row["retention_actual"] == 0.25 and row["retention_layer_mean"] == 0.625
    assert row["metric/accuracy"] == 10.0 and row["time/prefill_s"] == 0.2
    assert summary_row(_summary("fastv", 0.25, 10.0, 500.0, 1250.0, layer=2))["options"] == ""


def test_table_shows_both_retentions_labelled():
    table = render_table([_summary("fastv", 0.25, 10.0, 500.0, 1250.0, layer=2)])
    headers = [c.header for c in table.columns]
    assert "tokens last layer" in headers and "tokens layer mean" in headers
    cells = {c.header: c._cells[0] for c in table.columns}
    assert cells["tokens last layer"] == "500" and cells["tokens layer mean"] == "1250"
    assert cells["retention last layer"] == "0.250" and cells["retention layer mean"] == "0.625"


def test_collect_orders_by_model_benchmark_method_and_descending_ratio(tmp_path):
    for i, (name, ratio) in enumerate([("random", 0.25), ("pooling", 0.5), ("random", 0.75), ("none", 1.0)]):
        run = tmp_path / f"run{i}"
        run.mkdir()
        (run / "summary.json").write_text(json.dumps(_summary(name, ratio, 0.0, 2000 * ratio, 2000 * ratio)))
    order = [(s["compressor"]["name"], s["compressor"]["ratio"]) for s in collect_summaries(tmp_path)]
    assert order == [("none", 1.0), ("pooling", 0.5), ("random", 0.75), ("random", 0.25)]
    csv_path = write_csv([summary_row(s) for s in collect_summaries(tmp_path)], tmp_path / "t.csv")
    frame = pd.read_csv(csv_path)
    assert list(frame["compressor"]) == ["none", "pooling", "random", "random"]
    assert main([str(tmp_path), "--csv", str(tmp_path / "u.csv")]) == 0
    assert pd.read_csv(tmp_path / "u.csv").shape[0] == 4
