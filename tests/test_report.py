"""runners.report on hand-written records and summaries: the numbers, the labels and the order."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pandas as pd
import pytest

from runners.report import collect_summaries, main, render_table, summarise, summary_row, write_csv


def _record(before, after, layer_mean, score, prefill):
    return {"visual_tokens_before": before, "visual_tokens_spliced": before,
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


# -- issue 8's report points and issue 11's paper table -------------------------------------------------


def test_ratios_print_with_the_digits_they_have():
    from runners.report import format_percent, format_ratio, significant

    assert [format_ratio(r) for r in (0.001, 0.25, 0.1, 1.0, 0.0625, 1 / 9)] == ["0.001", "0.25", "0.1", "1", "0.0625",
                                                                                 "0.1111"]
    assert [format_percent(r) for r in (0.001, 0.07, 0.25, 1.0, 0.125, 1 / 9, 0.2)] == ["0.1", "7", "25", "100", "12.5",
                                                                                       "11.11", "20"]
    assert [significant(v) for v in (0.000123456, 12.345, 1234.5, 0.0, None)] == ["0.000123", "12.3", "1234", "0",
                                                                                      "-"]
    table = render_table([_summary("random", 0.001, 0.0, 2.0, 2.0)])
    assert {c.header: c._cells[0] for c in table.columns}["ratio"] == "0.001"


def _run(root, benchmark, name, ratio, score, tokens, *, headline=None, fidelity=None, tflops=None, prefill_s=0.1,
         n=4, accuracy=None, folder=None, **options):
    """A finished run directory: summary.json and n sample lines."""
    run = root / "tiny" / benchmark / (folder or f"{name}-{ratio}")
    run.mkdir(parents=True)
    # the last layer sees fewer tokens than the layer mean (as for FastV): the table shows the layer mean
    summary = _summary(name, ratio, score if accuracy is None else accuracy, tokens / 2, tokens, **options)
    summary.update(benchmark=benchmark, num_samples=n, run_dir=str(run))
    summary["timings_mean_s"]["prefill_s"] = prefill_s
    if headline is not None:
        summary["headline"] = {"metric": "perception", "label": headline, "value": score, "unit": "points"}
    if fidelity is not None:
        summary["fidelity"] = dict(zip(("answer_agreement", "first_token_kl", "first_token_top1", "samples"),
                                       (*fidelity, n)))
    if tflops is not None:
        summary["cost"] = {"prefill_tflops": tflops, "vision_tflops": 1.0, "kv_cache_mb": 10.0, "convention": {}}
    (run / "summary.json").write_text(json.dumps(summary))
    (run / "samples.jsonl").write_text('{"id": "x"}\n' * n)
    return run


# Scores per benchmark (pope, gqa, mme listed out of paper order on purpose); mme's headline is in points and
# its metrics.accuracy is a decoy (a table that fell back to it would show 1.0).
SCORES = {
    "pope": {("none", 1.0): 86.0, ("fastv", 0.5): 83.0, ("globalcom2", 0.5): 84.0, ("fastv", 0.25): 80.0},
    "gqa": {("none", 1.0): 60.0, ("fastv", 0.5): 58.0, ("globalcom2", 0.5): 59.0, ("fastv", 0.25): 55.0,
            ("globalcom2", 0.25): 56.5},
    "mme": {("none", 1.0): 1500.0, ("fastv", 0.5): 1450.0, ("globalcom2", 0.5): 1470.0, ("fastv", 0.25): 1380.0,
            ("globalcom2", 0.25): 1400.0},
}
TOKENS = {("none", 1.0): 2000.0, ("fastv", 0.5): 1000.0, ("globalcom2", 0.5): 1024.0, ("fastv", 0.25): 500.0,
          ("globalcom2", 0.25): 524.0}
TFLOPS = {("none", 1.0): 41.7, ("fastv", 0.5): 21.0, ("globalcom2", 0.5): 20.0, ("fastv", 0.25): 11.0,
          ("globalcom2", 0.25): 10.0}
OFFSET = {"pope": 0.0, "gqa": 2.0, "mme": 7.0}
FIDELITY = {("fastv", 0.5): (75.0, 0.2, 90.0), ("globalcom2", 0.5): (80.0, 0.1, 95.0),
            ("fastv", 0.25): (50.0, 0.4, 70.0),
            ("globalcom2", 0.25): (60.0, 0.3, 80.0), ("none", 1.0): (100.0, 0.0, 100.0)}


@pytest.fixture()
def study(tmp_path):
    """Finished runs of SCORES, plus one unfinished run (pope, globalcom2 @ 0.25), one broken summary
    (gqa, random @ 0.5) and one summary older than later records (pope, random @ 0.25)."""
    root = tmp_path / "runs"
    for benchmark, scores in SCORES.items():
        for (name, ratio), score in scores.items():
            agree, kl, top1 = FIDELITY[name, ratio]
            extra = OFFSET[benchmark]  # per-benchmark figures differ, so a mean over benchmarks is visible
            _run(root, benchmark, name, ratio, score, TOKENS[name, ratio] + extra,
                 headline="MME-P" if benchmark == "mme" else None, accuracy=1.0 if benchmark == "mme" else None,
                 fidelity=(agree + extra, kl + extra / 100, top1 + extra), tflops=TFLOPS[name, ratio] + extra,
                 prefill_s=(TOKENS[name, ratio] + extra) / 10000)
    unfinished = root / "tiny/pope/globalcom2-0.25"
    unfinished.mkdir(parents=True)
    (unfinished / "run.json").write_text(json.dumps({
        "model": {"name": "tiny"}, "benchmark": {"name": "pope"},
        "compressor": {"name": "globalcom2", "ratio": 0.25, "temperature": 10.0, "layout": "authors",
                       "thumbnail_order": "score"}}))
    (unfinished / "samples.jsonl").write_text('{"id": "a"}\n{"id": "b"}\n{"id": "c", "sc')
    broken = root / "tiny/gqa/random-0.5"
    broken.mkdir(parents=True)
    (broken / "run.json").write_text(json.dumps({"model": {"name": "tiny"}, "benchmark": {"name": "gqa"},
                                                 "compressor": {"name": "random", "ratio": 0.5, "seed": 0}}))
    (broken / "summary.json").write_text('{"model": "tiny", "benchm')
    stale = _run(root, "pope", "random", 0.25, 70.0, 500.0, n=2)
    (stale / "samples.jsonl").write_text('{"id": "x"}\n' * 5)  # a longer rerun was killed after the summary
    os.utime(stale / "summary.json", ns=(1_000_000_000, 1_000_000_000))
    return root


def test_incomplete_runs_are_named_never_dropped(study, caplog):
    from runners.report import scan_runs

    scan = scan_runs([study])
    problems = {str(run.file.relative_to(study)): run.reason for run in scan.incomplete}
    assert set(problems) == {"tiny/pope/globalcom2-0.25/samples.jsonl", "tiny/gqa/random-0.5/summary.json",
                             "tiny/pope/random-0.25/samples.jsonl"}
    unfinished = problems["tiny/pope/globalcom2-0.25/samples.jsonl"]
    assert "no summary.json, 2 sample records and a torn last line" in unfinished
    assert "unreadable" in problems["tiny/gqa/random-0.5/summary.json"]
    assert "5 records" in problems["tiny/pope/random-0.25/samples.jsonl"]
    assert len(scan.summaries) == sum(len(s) for s in SCORES.values())
    with caplog.at_level("WARNING"):
        assert len(collect_summaries(study)) == len(scan.summaries)
    assert sum("incomplete run" in r.message for r in caplog.records) == 3


def _table(root):
    from runners.paper_table import paper_tables, runs_frame
    from runners.report import scan_runs

    tables = paper_tables(runs_frame(scan_runs([root])))
    assert [t.model for t in tables] == ["tiny"]
    return tables[0]


def test_paper_table_values_order_and_gaps(study):
    table = _table(study)
    values = table.values
    assert list(values.index) == [("Upper bound", "none"), ("Retain 50%", "fastv"), ("Retain 50%", "globalcom2"),
                                  ("Retain 50%", "random"), ("Retain 25%", "fastv"), ("Retain 25%", "globalcom2"),
                                  ("Retain 25%", "random")]
    assert list(values.columns) == ["gqa", "MME-P", "pope", "Avg. (%)", "Agree (%)", "KL", "Top-1 (%)", "Tokens",
                                    "TFLOPs", "Prefill (ms)"]
    for benchmark, header in (("gqa", "gqa"), ("mme", "MME-P"), ("pope", "pope")):
        for (name, ratio), score in SCORES[benchmark].items():
            group = "Upper bound" if name == "none" else f"Retain {int(ratio * 100)}%"
            assert values.loc[(group, name), header] == score
    # Avg. = mean over benchmarks of score / upper bound, in %
    fastv = [58.0 / 60.0, 1450.0 / 1500.0, 83.0 / 86.0]
    assert values.loc[("Retain 50%", "fastv"), "Avg. (%)"] == pytest.approx(100 * sum(fastv) / 3)
    assert values.loc[("Retain 25%", "globalcom2"), "Avg. (%)"] == pytest.approx(50 * (56.5 / 60 + 1400 / 1500))
    assert values.loc[("Upper bound", "none"), "Avg. (%)"] == pytest.approx(100.0)
    # fidelity and cost: means over the row's benchmarks (offsets 0, 2, 7 -> +3; gqa and mme only -> +4.5)
    row = values.loc[("Retain 25%", "fastv")]
    assert row["Agree (%)"] == pytest.approx(53.0) and row["KL"] == pytest.approx(0.43)
    assert row["Top-1 (%)"] == pytest.approx(73.0)
    assert values.loc[("Retain 50%", "globalcom2"), "Tokens"] == pytest.approx(1027.0)
    assert values.loc[("Retain 25%", "globalcom2"), "Tokens"] == pytest.approx(528.5)
    assert values.loc[("Retain 50%", "globalcom2"), "TFLOPs"] == pytest.approx(23.0)
    assert row["Prefill (ms)"] == pytest.approx(50.3)
    # gaps: never a zero, always a footnote that says why and names the file
    notes = dict(enumerate(table.footnotes, start=1))
    gap = values.loc[("Retain 25%", "globalcom2"), "pope"]
    assert np.isnan(gap)
    assert "globalcom2-0.25/samples.jsonl: unfinished" in notes[table.marks.loc[("Retain 25%", "globalcom2"), "pope"]]
    assert "random-0.5/summary.json: unreadable" in notes[table.marks.loc[("Retain 50%", "random"), "gqa"]]
    stale = notes[table.marks.loc[("Retain 25%", "random"), "pope"]]
    assert "random-0.25/samples.jsonl: unfinished: 5 records" in stale
    missing = notes[table.marks.loc[("Retain 50%", "random"), "pope"]]
    assert missing == "no run of this method and ratio on this benchmark"
    assert "2 of 3 benchmarks" in notes[table.marks.loc[("Retain 25%", "globalcom2"), "Avg. (%)"]]
    assert values.loc[("Retain 50%", "random")].isna().all()
    # bold: the best of each retention group, the upper bound never
    best = table.best
    assert best.loc[("Retain 50%", "globalcom2"), "gqa"] and not best.loc[("Retain 50%", "fastv"), "gqa"]
    assert best.loc[("Retain 50%", "fastv"), "Tokens"] and best.loc[("Retain 50%", "globalcom2"), "KL"]
    assert not best.loc[("Upper bound", "none")].any()


def test_paper_table_markdown_latex_and_csv_layout(study):
    table = _table(study)
    lines = table.to_markdown().splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| Retention"))
    headers = [c.strip() for c in lines[header].strip("|").split("|")]
    assert headers[:5] == ["Retention", "Method", "gqa", "MME-P", "pope"]
    assert set(lines[header + 1]) <= set("|:- ")
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[header + 2:header + 9]]
    assert [r[0] for r in rows] == ["Upper bound", "Retain 50%", "", "", "Retain 25%", "", ""]
    assert rows[2][:3] == ["", "globalcom2", "**59.0**"] and rows[1][2] == "58.0"
    assert rows[3][2].startswith("–") and rows[0][3] == "1500.0"  # MME-P from the headline, not accuracy
    assert any(line.startswith("¹ ") for line in lines) and "(MME-P in points)" in table.to_markdown()

    latex = table.to_latex()
    assert latex.count(r"\toprule") == latex.count(r"\bottomrule") == 1
    assert latex.count(r"\midrule") == 3 and r"\cline" not in latex  # header, then between the 3 groups
    assert r"\multirow[t]{3}{*}{Retain 50\%}" in latex
    assert r"\textbf{59.0}" in latex and r"Avg. (\%)" in latex
    assert r"--\textsuperscript{" in latex and "nan" not in latex
    body = latex.split(r"\midrule")[2]  # the Retain 50% block
    assert body.count(r"\\") == 3

    frame = pd.read_csv(io.StringIO(table.to_csv()))
    assert list(frame.columns[:4]) == ["model", "retention", "method", "ratio"]
    assert frame.loc[frame["method"].eq("globalcom2") & frame["ratio"].eq(0.25), "pope"].isna().all()
    assert frame.loc[frame["method"].eq("fastv") & frame["ratio"].eq(0.5), "MME-P"].item() == 1450.0


def test_report_cli_formats(study, tmp_path, capsys):
    out = tmp_path / "t.md"
    assert main([str(study), "--format", "md", "-o", str(out)]) == 0
    assert out.read_text().startswith("### tiny")
    captured = capsys.readouterr()
    assert "3 incomplete run(s)" in captured.err and "random-0.5/summary.json" in captured.err
    assert main([str(study)]) == 0  # rich, on the console
    assert "paper table" in capsys.readouterr().out
    assert main([str(tmp_path / "nowhere")]) == 2


def test_fidelity_summary_and_columns_by_hand():
    from runners.fidelity import summarise_fidelity

    records = [{"fidelity_answer_match": 1.0, "fidelity_first_token_kl": 0.2, "fidelity_first_token_top1": 1.0},
               {"fidelity_answer_match": 0.0, "fidelity_first_token_kl": 0.4, "fidelity_first_token_top1": 1.0},
               {"fidelity_answer_match": 0.0, "fidelity_first_token_kl": 0.9, "fidelity_first_token_top1": 0.0},
               {"id": "made without eval.fidelity"}]
    fidelity = summarise_fidelity(records)
    assert fidelity["answer_agreement"] == pytest.approx(100 / 3) and fidelity["first_token_top1"] == pytest.approx(
        200 / 3)
    assert fidelity["first_token_kl"] == pytest.approx(0.5) and fidelity["samples"] == 3
    assert summarise_fidelity([{"id": "a"}]) is None
    base = [_record(1000, 250, 250.0, 0.0, 0.1)] * 4
    summary = summarise([{**b, **r} for b, r in zip(base, records)], {"accuracy": 0.0}, run={})
    assert summary["fidelity"] == fidelity
    assert "fidelity" not in summarise(base, {"accuracy": 0.0}, run={})

    flat = _summary("random", 0.25, 0.0, 500.0, 500.0)
    flat.update(fidelity=fidelity, cost={"prefill_tflops": 1.5, "convention": {"x": 1}},
                headline={"metric": "accuracy", "label": "GQA", "value": 61.9, "unit": "%"})
    row = summary_row(flat)
    assert row["fidelity/first_token_kl"] == 0.5 and row["cost/prefill_tflops"] == 1.5 and "cost/convention" not in row
    assert row["headline/label"] == "GQA" and row["headline/value"] == 61.9
    cells = {c.header: c._cells[0] for c in render_table([flat]).columns}
    assert (cells["agree %"], cells["first-token KL"], cells["top-1 %"]) == ("33.3", "0.500", "66.7")
    assert "agree %" not in {c.header for c in render_table([_summary("random", 0.25, 0.0, 5.0, 5.0)]).columns}


def test_a_summary_newer_than_its_records_is_finished(tmp_path):
    """A rerun with a smaller benchmark.limit summarises fewer samples than the file holds: not unfinished."""
    from runners.report import scan_runs

    run = _run(tmp_path, "gqa", "random", 0.25, 10.0, 500.0, n=2)
    (run / "samples.jsonl").write_text('{"id": "x"}\n' * 5)
    os.utime(run / "samples.jsonl", ns=(1_000_000_000, 1_000_000_000))
    scan = scan_runs([tmp_path])
    assert not scan.incomplete and len(scan.summaries) == 1
