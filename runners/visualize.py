"""Which visual tokens did a compressor keep? A PNG of one sample, from the compressor's provenance.

    python -m runners.visualize compressor=globalcom2 compressor.ratio=0.25 sample=3
    python -m runners.visualize compressor=fastv sample=synthetic-s0-0007
    python -m runners.visualize run_dir=outputs/runs/tiny/synthetic/compressor=random sample=synthetic-s0-0003

The figure shows the image as the model saw it: the 336 px thumbnail and the AnyRes crops on
their padded canvas, with the crop grid. Every 14 px patch is one source token
(``compressors.geometry``: ``tile * 576 + y * 24 + x``); its state comes from the provenance of
the tokens the last decoder layer saw (``GenerationResult.provenance``, vision and LLM stage
together), so it works for every compressor:

* kept (one output token per patch): clear;
* merged (the patch went into an output token with other patches: pooling, merging methods):
  clear with a blue tint;
* dropped: dimmed;
* padding (outside the unpadded box, which vanilla LLaVA-NeXT drops too): grey.

Each tile is labelled with its kept patches and output tokens. Below, one heat map per score
signal the method asked for: a vision layer's [CLS] attention logits (head mean, min-max per
tile; GlobalCom2 also gets its per-crop retention ratios ``r_c``), or the last prompt token's
attention at decoder layer K-1 (head mean), mapped back to the patches through the provenance of
the segment it was computed on (one colour scale over all tiles, as FastV ranks them jointly).

With ``run_dir=...`` the model, compressor and benchmark come from that run's ``run.json``; when
its record of the sample holds provenance (``save_provenance=true``), that is what is drawn, and
it is checked against the recomputation.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import textwrap
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import hydra
import matplotlib

matplotlib.use("Agg")  # files only
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from hydra.core.config_store import ConfigStore  # noqa: E402
from omegaconf import MISSING, DictConfig, OmegaConf  # noqa: E402

import runners.resolvers  # noqa: F401,E402  (OmegaConf resolvers)
import runners.schema  # noqa: F401,E402  (model schemas)
from compressors import AttentionRows, ClsAttention, Compressor, Provenance, build_compressor  # noqa: E402
from compressors.geometry import AnyResLayout  # noqa: E402

log = logging.getLogger(__name__)

DROPPED, KEPT, MERGED, PADDING = 0, 1, 2, 3
DIM = 0.3  # a dropped patch keeps 30% of its brightness
TINT = np.array([40, 110, 255], dtype=np.float32)  # merged patches: 35% towards this blue
PAD_GREY = 150


# -- what the compressor saw and decided --------------------------------------------------------------


@dataclass
class StageCapture:
    """The inputs and outputs of a compressor's stages during one generation."""

    vision_input: Any = None  # VisionInput (features, layout, signals)
    vision_output: Any = None  # VisionOutput (the spliced segment and its provenance)
    llm_input: Any = None  # LLMInput of the first LLM stage (attention rows, image mask), LLM-stage methods only


@contextlib.contextmanager
def capture_stages(compressor: Compressor) -> Iterator[StageCapture]:
    """Record what ``compressor``'s two stages receive and return (instance-level wrappers, removed after)."""
    capture = StageCapture()
    vision, select = compressor.compress_vision, compressor.select_llm_tokens

    def compress_vision(inp):
        capture.vision_input, capture.vision_output = inp, vision(inp)
        return capture.vision_output

    def select_llm_tokens(inp):
        if capture.llm_input is None:  # the first stage sees the whole image segment, in segment order
            capture.llm_input = inp
        return select(inp)

    compressor.compress_vision, compressor.select_llm_tokens = compress_vision, select_llm_tokens
    try:
        yield capture
    finally:
        del compressor.compress_vision, compressor.select_llm_tokens


# -- patch states from provenance -------------------------------------------------------------------------


@dataclass
class TokenMap:
    """Per source token (``[num_tiles, side**2]``) its state, and per tile the counts of its label."""

    states: torch.Tensor  # [T, P] uint8: DROPPED / KEPT / MERGED / PADDING
    kept_patches: torch.Tensor  # [T] patches that reach at least one output token
    valid_patches: torch.Tensor  # [T] patches inside the unpadded box (all 576 for the thumbnail)
    output_tokens: torch.Tensor  # [T] output tokens with at least one source in the tile


def token_map(layout: AnyResLayout, provenance: Provenance) -> TokenMap:
    """Kept / merged / dropped / padding for every source token of ``layout``."""
    tiles, per_tile = layout.num_tiles, layout.tokens_per_tile
    source, token = provenance.source.cpu(), provenance.token.cpu()
    patch = source < tiles * per_tile  # sources past the patches (VisionZip's [CLS] tokens) have no pixels
    source, token = source[patch], token[patch]
    sources_per_token = torch.bincount(token, minlength=int(token.max()) + 1 if token.numel() else 0)  # [K]
    kept = torch.zeros(tiles * per_tile, dtype=torch.bool)
    kept[source] = True
    merged = torch.zeros_like(kept)
    merged[source[sources_per_token[token] > 1]] = True
    valid = layout.tile_valid_mask("hf").reshape(-1)
    states = torch.where(kept, torch.where(merged, MERGED, KEPT), torch.where(valid, DROPPED, PADDING))
    tile_of_pair = source // per_tile
    pairs = torch.unique(token * tiles + tile_of_pair)  # distinct (output token, tile)
    return TokenMap(
        states=states.to(torch.uint8).view(tiles, per_tile),
        kept_patches=kept.view(tiles, per_tile).sum(1),
        valid_patches=valid.view(tiles, per_tile).sum(1),
        output_tokens=torch.bincount(pairs % tiles, minlength=tiles),
    )


def shade(pixels: np.ndarray, states: torch.Tensor, side: int) -> np.ndarray:
    """Tiles ``[T, H, W, 3]`` uint8 with every patch drawn by its state (``states``: ``[T, side**2]``)."""
    tiles, height, width, _ = pixels.shape
    patch = height // side
    grid = states.numpy().reshape(tiles, side, side)
    per_pixel = np.repeat(np.repeat(grid, patch, axis=1), patch, axis=2)[..., None]  # [T, H, W, 1]
    image = pixels.astype(np.float32)
    out = np.where(per_pixel == DROPPED, image * DIM, image)
    out = np.where(per_pixel == MERGED, 0.65 * image + 0.35 * TINT, out)
    out = np.where(per_pixel == PADDING, np.float32(PAD_GREY), out)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def tile_pixels(pipeline, image, question: str, compressor: Compressor) -> np.ndarray:
    """The tiles the vision tower saw, ``[T, s, s, 3]`` uint8 (the processor's output, un-normalised), after
    the fixed-size resize and the compressor's image hook (``downsample``: smaller tiles)."""
    processor = pipeline.processor.image_processor
    tiles = pipeline.view(image, question, compressor).tiles.float()  # [T, 3, s, s]
    mean = torch.tensor(processor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(processor.image_std).view(1, 3, 1, 1)
    return (((tiles * std + mean).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)).numpy()


def on_canvas(tiles: np.ndarray, layout: AnyResLayout) -> np.ndarray:
    """Crops ``[1 + rows*cols, h, w, ...]`` (thumbnail first) stitched into their ``[rows*h, cols*w, ...]`` canvas."""
    crops = tiles[1:]
    h, w = crops.shape[1:3]
    grid = crops.reshape(layout.rows, layout.cols, h, w, *crops.shape[3:])
    return grid.swapaxes(1, 2).reshape(layout.rows * h, layout.cols * w, *crops.shape[3:])


# -- score heat maps ------------------------------------------------------------------------------------------


@dataclass
class ScoreMap:
    """One score per source token (``[T, P]``, NaN where there is none) and how to colour it."""

    title: str
    values: torch.Tensor
    per_tile: bool  # min-max per tile (True) or over all tiles at once
    crop_notes: list[str] = field(default_factory=list)  # one extra label per crop, e.g. "r_c = 0.31"


def _globalcom2_notes(compressor, signal: torch.Tensor, layout: AnyResLayout) -> list[str]:
    from compressors.globalcom2 import cls_scores, crop_ratios, region_sums

    ratios = crop_ratios(region_sums(cls_scores(signal[:1])[0], layout.rows, layout.cols), compressor.ratio,
                         compressor.temperature)
    return [f"r_c = {r:.3f}" for r in ratios]


# compressor name -> fn(compressor, ClsAttention value [T, heads, 1 + P], layout) -> a note per crop
CLS_NOTES: dict[str, Callable[[Compressor, torch.Tensor, AnyResLayout], list[str]]] = {
    "globalcom2": _globalcom2_notes,
}


def score_maps(compressor: Compressor, capture: StageCapture, layout: AnyResLayout) -> list[ScoreMap]:
    """A heat map per score signal the compressor asked for (others are named in the log)."""
    maps = []
    signals = capture.vision_input.signals if capture.vision_input is not None else {}
    for request, value in signals.items():
        if isinstance(request, ClsAttention):
            notes = CLS_NOTES.get(compressor.name)
            maps.append(ScoreMap(f"[CLS] attention logits, vision layer {request.layer} (head mean, min-max per tile)",
                                 value[:, :, 1:].float().mean(1).cpu(), per_tile=True,
                                 crop_notes=notes(compressor, value, layout) if notes else []))
        else:
            log.info("no heat map for vision signal %r", request)
    llm = capture.llm_input
    if llm is not None:
        for request, value in llm.signals.items():
            if not isinstance(request, AttentionRows):
                log.info("no heat map for LLM signal %r", request)
                continue
            row = value[0].float().mean(0).mean(0).cpu()  # [1, H, Q, L] -> [L]: head mean, then query mean
            segment = row[llm.image_mask[0].cpu()]  # [S] in segment order
            provenance = capture.vision_output.provenance
            values = torch.full((layout.num_tiles * layout.tokens_per_tile,), float("nan"))
            values[provenance.source.cpu()] = segment[provenance.token.cpu()]
            layer = compressor.llm_layer - (request.layer == "previous")  # the first stage's scoring layer
            queries = {"last": "last prompt token's", "instruction": "instruction tokens'", "mask": "chosen queries'"}
            maps.append(ScoreMap(f"{queries[request.queries]} attention at decoder layer {layer} (head mean)",
                                 values.view(layout.num_tiles, layout.tokens_per_tile), per_tile=False))
    return maps


def _normalise(values: torch.Tensor, valid: torch.Tensor, per_tile: bool) -> np.ndarray:
    """Min-max to [0, 1] per tile or overall, NaN outside ``valid``."""
    scores = values.double().clone()
    scores[~valid] = float("nan")
    if per_tile:
        low = torch.nan_to_num(scores, nan=float("inf")).amin(1, keepdim=True)
        high = torch.nan_to_num(scores, nan=float("-inf")).amax(1, keepdim=True)
    else:
        finite = scores[~scores.isnan()]
        low, high = (finite.min(), finite.max()) if finite.numel() else (torch.tensor(0.0), torch.tensor(1.0))
    span = (high - low).clamp(min=1e-12)
    return ((scores - low) / span).numpy()


# -- the figure ------------------------------------------------------------------------------------------------


@dataclass
class Visualization:
    """Everything the figure shows for one sample and compressor."""

    sample_id: str
    compressor: Compressor
    layout: AnyResLayout
    pixels: np.ndarray  # [T, s, s, 3] the tiles as the model saw them (336 px unless downsampled)
    provenance: Provenance  # what is drawn: the last decoder layer's tokens (or a run's stored provenance)
    tokens: TokenMap
    maps: list[ScoreMap]
    visual_tokens: tuple[int, int]  # (after, before)


def visualize_sample(pipeline, compressor: Compressor, sample, sample_seed: int,
                     provenance: Provenance | None = None) -> Visualization:
    """Run the compressor on one sample (one generated token) and collect what the figure needs.

    ``provenance``: draw this one (e.g. a run's stored provenance) instead of the recomputed one;
    it must equal the recomputation, else the run was made with other code or settings.
    """
    with capture_stages(compressor) as capture:
        result = pipeline.generate(sample.image, sample.question, compressor, max_new_tokens=1,
                                   sample_seed=sample_seed)
    if provenance is not None and not (torch.equal(provenance.token, result.provenance.token.cpu())
                                       and torch.equal(provenance.source, result.provenance.source.cpu())):
        log.warning("the stored provenance of %s differs from a recomputation with the same settings; "
                    "drawing the stored one", sample.id)
    layout = result.layout
    provenance = provenance if provenance is not None else result.provenance
    return Visualization(
        sample_id=sample.id, compressor=compressor, layout=layout,
        pixels=tile_pixels(pipeline, sample.image, sample.question, compressor), provenance=provenance,
        tokens=token_map(layout, provenance),
        maps=score_maps(compressor, capture, layout),
        visual_tokens=(result.visual_tokens_after, result.visual_tokens_before),
    )


def _label(ax, x: float, y: float, text: str) -> None:
    ax.text(x, y, text, color="white", fontsize=7, ha="left", va="top",
            bbox={"facecolor": "black", "alpha": 0.6, "pad": 1.5, "linewidth": 0})


def _grid(ax, layout: AnyResLayout, scale: int) -> None:
    """Crop boundaries and the unpadded box on a canvas drawn at ``scale`` units per token."""
    height, width = (v * scale for v in layout.canvas_hw)
    for i in range(1, layout.rows):
        ax.axhline(i * layout.side * scale - 0.5, color="white", linewidth=1.2)
    for j in range(1, layout.cols):
        ax.axvline(j * layout.side * scale - 0.5, color="white", linewidth=1.2)
    box = layout.valid_box("hf")
    ax.add_patch(plt.Rectangle((box.left * scale - 0.5, box.top * scale - 0.5), box.width * scale,
                               box.height * scale, fill=False, edgecolor="yellow", linewidth=1, linestyle=":"))
    ax.set_xlim(-0.5, width - 0.5)
    ax.set_ylim(height - 0.5, -0.5)


def _tile_labels(ax, layout: AnyResLayout, scale: int, texts: list[str]) -> None:
    for c, text in enumerate(texts):
        i, j = divmod(c, layout.cols)
        _label(ax, j * layout.side * scale + 2 * scale, i * layout.side * scale + 2 * scale, text)


def render(vis: Visualization, path: str | Path, dpi: int = 110) -> Path:
    """Write the figure: image row (thumbnail, crops) and one row per heat map."""
    layout, tokens = vis.layout, vis.tokens
    patch = vis.pixels.shape[1] // layout.side
    shaded = shade(vis.pixels, tokens.states, layout.side)
    rows = 1 + len(vis.maps)
    unit = 2.4
    width = unit * (1 + layout.cols) + 0.8
    fig, axes = plt.subplots(rows, 2, figsize=(width, unit * layout.rows * rows + 1.0), layout="constrained",
                             gridspec_kw={"width_ratios": [1, layout.cols]}, squeeze=False)
    describe = ", ".join(f"{k}={v}" for k, v in vis.compressor.describe().items() if k != "name")
    after, before = vis.visual_tokens
    title = [f"{vis.compressor.name} ({describe})",
             f"{vis.sample_id}: {layout.rows}x{layout.cols} grid, {layout.image_hw[1]}x{layout.image_hw[0]} px; "
             f"visual tokens at the last layer: {after} of {before}",
             "kept: clear, merged: blue tint, dropped: dimmed, padding: grey"]
    fig.suptitle("\n".join(textwrap.fill(line, int(width * 13)) for line in title), fontsize=9)
    wrap = 28 * layout.cols + 10  # characters a panel title may take

    def counts(t: int) -> str:
        text = f"kept {int(tokens.kept_patches[t])}/{int(tokens.valid_patches[t])}"
        if int(tokens.output_tokens[t]) != int(tokens.kept_patches[t]):
            text += f" -> {int(tokens.output_tokens[t])} tokens"
        return text

    thumb, crops = axes[0]
    thumb.imshow(shaded[0])
    thumb.set_title("thumbnail", fontsize=8)
    _label(thumb, 2 * patch, 2 * patch, counts(0))
    crops.imshow(on_canvas(shaded, layout))
    crops.set_title("crops", fontsize=8)
    _grid(crops, layout, patch)
    _tile_labels(crops, layout, patch, [counts(t) for t in range(1, layout.num_tiles)])

    valid = tokens.states != PADDING  # [T, P]
    for (thumb, crops), score in zip(axes[1:], vis.maps):
        heat = _normalise(score.values, valid, score.per_tile).reshape(layout.num_tiles, layout.side, layout.side)
        image = thumb.imshow(heat[0], cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
        thumb.set_title("thumbnail", fontsize=8)
        crops.imshow(on_canvas(heat, layout), cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
        crops.set_title(textwrap.fill(score.title, wrap), fontsize=8)
        _grid(crops, layout, 1)
        if score.crop_notes:
            _tile_labels(crops, layout, 1, score.crop_notes)
        fig.colorbar(image, ax=crops, fraction=0.03, pad=0.01)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


# -- the Hydra entry point -------------------------------------------------------------------------------------


@dataclass
class VisualizeConfig:
    """``runners.visualize``: one sample, one compressor; or a run directory and a sample id."""

    paths: Any = MISSING
    model: Any = MISSING
    compressor: Any = MISSING
    benchmark: Any = MISSING
    sample: Any = 0  # index into the benchmark, or a sample id
    run_dir: Optional[str] = None  # take model, compressor and benchmark from this run's run.json
    output: Optional[str] = None  # the PNG; default: <paths.output_dir>/visualize/<model>/<benchmark>/...
    dpi: int = 110


ConfigStore.instance().store(name="visualize_schema", node=VisualizeConfig)


def _settings(cfg: DictConfig) -> tuple[dict, dict, dict, dict | None]:
    """Model, compressor and benchmark settings (from the run's run.json with ``run_dir``) and the run's
    record of the sample when that run has one."""
    from runners.store import RUN_FILE, SAMPLES_FILE

    if not cfg.run_dir:
        model, compressor, benchmark = (OmegaConf.to_container(node, resolve=True, enum_to_str=True)
                                        for node in (cfg.model, cfg.compressor, cfg.benchmark))
        return model, compressor, benchmark, None
    run_dir = Path(cfg.run_dir)
    run_file = run_dir / RUN_FILE
    if not run_file.exists():
        raise FileNotFoundError(f"run_dir={run_dir} has no {RUN_FILE}; give a run directory of runners.evaluate")
    settings = json.loads(run_file.read_text(encoding="utf-8"))
    record = None
    samples = run_dir / SAMPLES_FILE
    if samples.exists():
        for line in samples.read_text(encoding="utf-8").splitlines():
            if f'"{cfg.sample}"' in line:
                candidate = json.loads(line)
                if candidate.get("id") == str(cfg.sample):
                    record = candidate
    return settings["model"], settings["compressor"], settings["benchmark"], record


def _sample_index(benchmark, sample: Any) -> int:
    if isinstance(sample, int):
        return sample
    ids = benchmark.sample_ids()
    if str(sample) not in ids:
        shown = ", ".join(ids[:3]) + (", ..." if len(ids) > 3 else "")
        raise ValueError(f"sample={sample!r} is neither an index nor an id of {benchmark.name} ({shown})")
    return ids.index(str(sample))


def default_output(output_dir: str | Path, model: str, benchmark: str, sample_id: str,
                   compressor: Mapping[str, Any]) -> Path:
    name = "_".join(f"{k}={v}" for k, v in compressor.items() if k != "name")
    return Path(output_dir) / "visualize" / model / benchmark / sample_id / f"{compressor['name']}_{name}.png"


def run(cfg: DictConfig) -> Path:
    """Build what ``cfg`` names, draw the sample, return the PNG's path."""
    from benchmarks import build_benchmark
    from models import build_pipeline
    from runners.evaluate import sample_seed

    model_cfg, compressor_cfg, benchmark_cfg, record = _settings(cfg)
    compressor = build_compressor(compressor_cfg)
    benchmark = build_benchmark(benchmark_cfg)
    sample = benchmark[_sample_index(benchmark, cfg.sample)]
    stored = None
    if record is not None and "provenance" in record:
        stored = Provenance(token=torch.tensor(record["provenance"]["token"], dtype=torch.long),
                            source=torch.tensor(record["provenance"]["source"], dtype=torch.long))
    pipeline = build_pipeline(model_cfg)
    vis = visualize_sample(pipeline, compressor, sample, sample_seed(sample.id), provenance=stored)
    output = cfg.output or default_output(cfg.paths.output_dir, model_cfg["name"], benchmark.name, sample.id,
                                          compressor.describe())
    return render(vis, output, dpi=cfg.dpi)


@hydra.main(version_base="1.3", config_path="../conf", config_name="visualize")
def main(cfg: DictConfig) -> None:
    try:
        path = run(cfg)
    except (ValueError, IndexError, FileNotFoundError) as error:  # a bad setting: its message, no traceback
        print(f"runners.visualize: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
