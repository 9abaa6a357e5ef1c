"""The study's figures: written, non-empty, drawn from the right numbers; the Pareto front by hand."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import runners.plots
from runners.paper_table import runs_frame
from runners.plots import mean_over_benchmarks, pareto_front, write_plots
from runners.report import scan_runs
from tests.test_report import study  # noqa: F401  (the fixture run directories)


@pytest.fixture(autouse=True)
def small_figures(monkeypatch):
    monkeypatch.setattr(runners.plots, "DPI", 50)


def test_pareto_front_by_hand():
    cost = np.array([1.0, 2.0, 2.0, 3.0, 0.5, 4.0])
    score = np.array([5.0, 4.0, 6.0, 6.0, 1.0, 7.0])
    # (0.5, 1) < (1, 5) < (2, 6) < (4, 7); (2, 4) is beaten by (1, 5), (3, 6) by (2, 6)
    assert pareto_front(cost, score).tolist() == [4, 0, 2, 5]


def test_every_figure_is_written_from_the_runs(study, tmp_path):  # noqa: F811
    frame = runs_frame(scan_runs([study]))
    written = write_plots(frame, tmp_path / "figures")
    assert set(written) == {"score_vs_ratio", "pareto", "relative_score", "fidelity_vs_ratio"}
    for name, path in written.items():
        assert path.suffix == ".png" and path.stat().st_size > 5_000, name
        with Image.open(path) as image:
            assert image.format == "PNG" and min(image.size) > 100
            assert np.asarray(image.convert("L")).std() > 5, f"{name} is blank"
    # the curves average over benchmarks: fastv @ 0.5 relative = mean of its three ratios to the upper bound
    relative = mean_over_benchmarks(frame, "relative").set_index(["method", "ratio"])["relative"]
    assert relative["fastv", 0.5] == pytest.approx(100 * (58 / 60 + 1450 / 1500 + 83 / 86) / 3)


def test_figures_without_numbers_say_why(study, tmp_path):  # noqa: F811
    frame = runs_frame(scan_runs([study]))
    frame = frame[frame["compressor"] != "none"].assign(relative=np.nan, fid_agreement=np.nan, prefill_ms=np.nan,
                                                       prefill_tflops=np.nan)
    written = write_plots(frame, tmp_path)
    assert "no uncompressed run" in written["relative_score"]
    assert "no cost measure" in written["pareto"] and "eval.fidelity" in written["fidelity_vs_ratio"]
    assert written["score_vs_ratio"].exists()
