"""The token visualiser: patch states from provenance by hand, dimmed pixels equal to the dropped tokens on
the tiny model for pruning, merging and LLM-stage methods, heat maps, and the run-directory mode."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from PIL import Image

import runners.visualize
from benchmarks import Sample, build_benchmark
from compressors import AnyResLayout, Provenance, build_compressor
from runners.evaluate import sample_seed
from runners.visualize import DIM, DROPPED, KEPT, MERGED, PADDING, render, shade, token_map, visualize_sample
from tests.conftest import random_image

CONF = Path(__file__).resolve().parents[1] / "conf"
QUESTION = "What color is the circle?"


def test_token_map_by_hand():
    # 1x2 grid of 4x4-token tiles on a wide image: the canvas is 4 x 8 tokens, rows 0 and 3 are padding
    layout = AnyResLayout(1, 2, 4, (200, 800))
    box = layout.valid_box("hf")
    assert (box.top, box.bottom, box.left, box.right) == (1, 3, 0, 8)
    # output token 0 <- thumbnail patch 5; token 1 <- crop 1 patches 4, 5 (merged); token 2 <- crop 2 patch 6;
    # token 3 <- a padding patch of crop 2 (kept all the same)
    provenance = Provenance(token=torch.tensor([0, 1, 1, 2, 3]), source=torch.tensor([5, 20, 21, 38, 33]))
    tokens = token_map(layout, provenance)
    states = tokens.states
    assert states[0, 5] == KEPT and states[1, 4] == states[1, 5] == MERGED and states[2, 6] == KEPT
    assert states[2, 1] == KEPT  # padding (row 0) but kept: the state says what the method did
    assert states[1, 0] == PADDING and states[1, 15] == PADDING and states[1, 6] == DROPPED
    assert (states[0] == DROPPED).sum() == 15  # the thumbnail has no padding
    assert tokens.kept_patches.tolist() == [1, 2, 2] and tokens.output_tokens.tolist() == [1, 1, 2]
    assert tokens.valid_patches.tolist() == [16, 8, 8]


@pytest.mark.parametrize("name", ["globalcom2", "fastv", "pooling"])
def test_dimmed_patches_are_the_dropped_tokens(tiny, name, tmp_path):
    """Pixels: a patch is dimmed exactly when it lies in the unpadded box and no output token came from it
    (vision-stage pruning, LLM-stage pruning, and merging)."""
    compressor = build_compressor({"name": name, "ratio": 0.25})
    # noise on a 1x2 grid with a padding row above and below the image (1,654 vanilla tokens: a cheap prefill)
    sample = Sample(id="noise", image=random_image(290, 660, seed=3), question=QUESTION, answers=("x",))
    vis = visualize_sample(tiny, compressor, sample, sample_seed(sample.id))
    layout = vis.layout
    side, per_tile = layout.side, layout.tokens_per_tile
    kept = set(vis.provenance.source.tolist())
    valid = layout.tile_valid_mask("hf").reshape(-1).tolist()
    assert (layout.rows, layout.cols) == (1, 2) and not all(valid)
    dropped = {s for s in range(layout.num_tiles * per_tile) if valid[s] and s not in kept}

    shaded = shade(vis.pixels, vis.tokens.states, side).astype(np.float64)
    patch = vis.pixels.shape[1] // side

    def patches(x):  # [T, H, W, 3] -> the mean brightness of every patch, by source id
        return x.reshape(layout.num_tiles, side, patch, side, patch, 3).mean(axis=(2, 4, 5)).reshape(-1)

    before, after = patches(vis.pixels.astype(np.float64)), patches(shaded)
    dimmed = {s for s in range(len(before)) if before[s] > 4 and abs(after[s] - DIM * before[s]) < 1.0}
    assert dimmed == {s for s in dropped if before[s] > 4}  # (a black patch cannot look dimmer)
    if name == "pooling":  # every kept patch is merged; unpadding at the pooled size drops the edge rows
        assert int((vis.tokens.states == MERGED).sum()) == len(kept) and len(dropped) < 0.1 * sum(valid)
    else:  # the tokens the last layer saw, not the segment before FastV's cut
        assert 0.2 * sum(valid) < len(kept) < 0.3 * sum(valid)
    # heat maps: the [CLS] map with GlobalCom2's per-crop ratios; FastV's attention on every patch it saw
    assert [len(m.crop_notes) for m in vis.maps] == {"globalcom2": [2], "fastv": [0], "pooling": []}[name]
    if name == "fastv":
        assert int((~vis.maps[0].values.isnan()).sum()) == sum(valid)
    if name == "globalcom2":
        path = render(vis, tmp_path / "v.png", dpi=40)
        with Image.open(path) as image:
            assert image.format == "PNG" and min(image.size) > 150
            assert np.asarray(image.convert("L")).std() > 10


def test_run_directory_mode_draws_the_stored_provenance(tiny, tmp_path, monkeypatch, caplog):
    sample = build_benchmark({"name": "synthetic", "limit": 1})[0]
    settings = {"model": {"name": "tiny", "loader": "tiny", "seed": 0},
                "compressor": {"name": "random", "ratio": 0.5, "seed": 0},
                "benchmark": {"name": "synthetic", "seed": 0, "num_samples": 24, "max_new_tokens": 16}}
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "run.json").write_text(json.dumps(settings))
    stored = {"token": [0, 1], "source": [3, 700]}  # not what random keeps: the drawing must follow the record
    (run_dir / "samples.jsonl").write_text(json.dumps({"id": sample.id, "provenance": stored}) + "\n")
    drawn = {}
    monkeypatch.setattr(runners.visualize, "render", lambda vis, path, dpi: drawn.setdefault("vis", vis) and path)
    monkeypatch.setattr("models.build_pipeline", lambda cfg: tiny)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="visualize", overrides=[f"run_dir={run_dir}", f"sample={sample.id}",
                                                           f"paths.output_dir={tmp_path}"])
        with caplog.at_level("WARNING"):
            path = runners.visualize.run(cfg)
    GlobalHydra.instance().clear()
    vis = drawn["vis"]
    assert vis.compressor.name == "random" and vis.compressor.ratio == 0.5
    assert (vis.tokens.states.reshape(-1) == KEPT).nonzero().flatten().tolist() == [3, 700]
    assert "differs from a recomputation" in caplog.text
    assert path.parts[-3:-1] == ("synthetic", sample.id) and path.name.startswith("random_ratio=0.5")
