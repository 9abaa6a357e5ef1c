"""``globalcom2``: GlobalCom2 (Liu et al., 2025), thumbnail-guided compression of LLaVA-NeXT crops.

Faithful to the authors' code (xuyang-liu16/GlobalCom2 @ 96b2d00, ``llava/model/llava_arch.py``),
re-implemented vectorised (theirs loops over tokens in Python):

1. Score: the vision tower's LAST layer, [CLS] query against the 576 patch keys, scaled dot
   product BEFORE softmax, averaged over heads; one row for the thumbnail and one per crop.
2. Thumbnail: keep the top ``int(576 r)`` by its own score, in descending score order
   (``thumbnail_order="spatial"``: the same tokens in raster order); no newlines.
3. Crop ratios: cut the thumbnail's 24 x 24 score map into the crop grid (region height
   ``24 // rows``, width ``24 // cols``, the last row/column taking the rest), SUM each region
   (float64, in raster order), ``p = softmax((sums - max) / temperature)`` (with the authors'
   ``+1e-8`` in the denominator), ``ratio_c = min(r (1 + p_c - mean p), 1)``.
4. Crops: only tokens inside the unpadded box, by original LLaVA's unpad rule (``int()``, not
   transformers' rounding). Score = L2-normalised own-crop [CLS] score + L2-normalised global
   score, the thumbnail map bilinearly resized to the whole unpadded grid and cut per crop
   (column offset: widths of earlier crops in the row; row offset: height of each earlier crop
   row's FIRST crop, as the authors do). Keep the top ``int(N_c ratio_c)`` of N_c valid tokens.
5. Layout ``authors`` (default): the kept token with index m among its crop's valid tokens sits
   at slot ``(m // 24, m % 24)`` of that crop's 24 x 24 block (not at its true position); the
   padded canvas is read row by row with a newline after every one of its ``24 rows`` rows.
   ``layout="spatial"``: kept tokens at their true positions with vanilla LLaVA-NeXT's unpadded
   rows and newlines (transformers' unpad box, which always contains LLaVA's: rounding up the
   image extent can only shrink the padding).

Deliberate difference: the authors cast the crop part to float16; this keeps the model dtype.
Faithful GlobalCom2 at ``ratio=1`` is not the identity: below-average crops still get
``ratio_c < 1``, and with padding the authors' layout adds newline-only rows.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from compressors.base import ClsAttention, Compressor, Provenance, VisionInput, VisionOutput
from compressors.geometry import NEWLINE_SOURCE, AnyResLayout
from compressors.packing import gather_sources, kept_spatial_sources
from compressors.registry import register_compressor

LAYOUTS = ("authors", "spatial")
THUMBNAIL_ORDERS = ("score", "spatial")
SCORE_SIGNAL = ClsAttention(layer=-1)
_EMPTY = -2  # an unfilled slot of the authors' canvas


def cls_scores(signal: torch.Tensor) -> torch.Tensor:
    """Per-tile scores from ``ClsAttention`` logits. ``[T, heads, 1 + P]`` -> ``[T, P]`` (head mean)."""
    return signal[:, :, 1:].mean(dim=1)


# -- step 2: thumbnail -------------------------------------------------------------------------


def select_thumbnail(scores: torch.Tensor, ratio: float, order: str = "score") -> torch.Tensor:
    """Kept thumbnail positions: the top ``int(P r)`` of ``scores`` ``[P]``, in descending score order
    (``order="score"``) or ascending position (``"spatial"``). Returns ``[int(P r)]`` long."""
    keep = torch.argsort(scores, descending=True)[: int(scores.numel() * ratio)]
    return keep.sort().values if order == "spatial" else keep


# -- step 3: crop ratios -----------------------------------------------------------------------


def region_index(side: int, rows: int, cols: int) -> np.ndarray:
    """Crop region of each thumbnail token ``[side * side]`` (row-major crop index)."""
    region_h, region_w = max(side // rows, 1), max(side // cols, 1)
    y, x = np.divmod(np.arange(side * side), side)
    return np.minimum(y // region_h, rows - 1) * cols + np.minimum(x // region_w, cols - 1)


def region_sums(thumbnail_scores: torch.Tensor, rows: int, cols: int) -> np.ndarray:
    """Sum of the thumbnail's scores ``[side * side]`` over each crop's region, float64 ``[rows * cols]``.

    Accumulated in raster order from float64 copies of the values, as the authors do, so the sums
    are bit-identical to theirs.
    """
    side = int(round(thumbnail_scores.numel() ** 0.5))
    values = thumbnail_scores.detach().double().cpu().numpy()
    sums = np.zeros(rows * cols)
    np.add.at(sums, region_index(side, rows, cols), values)  # unbuffered, in index order
    return sums


def crop_ratios(sums: np.ndarray, ratio: float, temperature: float = 10.0) -> np.ndarray:
    """Per-crop retention ratios from region sums: ``min(r (1 + p_c - mean p), 1)``, float64."""
    shifted = (sums - np.max(sums)) / temperature
    exp = np.exp(shifted)
    probs = exp / (np.sum(exp) + 1e-8)
    return np.clip(ratio * (1 + probs - np.mean(probs)), None, 1.0)


# -- step 4: crop geometry and scores ------------------------------------------------------------


def crop_valid_boxes(layout: AnyResLayout) -> list[tuple[int, int, int, int]]:
    """Per crop (row-major): ``(top, left, height, width)`` of its unpadded part, in crop coordinates,
    by original LLaVA's unpad rule."""
    box, side = layout.valid_box("llava"), layout.side
    boxes = []
    for i in range(layout.rows):
        top, bottom = max(box.top - i * side, 0), min(box.bottom - i * side, side)
        for j in range(layout.cols):
            left, right = max(box.left - j * side, 0), min(box.right - j * side, side)
            height, width = max(bottom - top, 0), max(right - left, 0)
            if height == 0 or width == 0:
                top_, left_, height, width = 0, 0, 0, 0
            else:
                top_, left_ = top, left
            boxes.append((top_, left_, height, width))
    return boxes


def global_crop_scores(thumbnail_scores: torch.Tensor, layout: AnyResLayout,
                       boxes: list[tuple[int, int, int, int]]) -> list[torch.Tensor]:
    """The thumbnail map resized to the unpadded grid and cut per crop: a list of ``[h_c * w_c]``.

    Offsets follow the authors: columns accumulate the widths of the earlier crops of the row;
    rows accumulate, for each earlier crop row, the height of that row's first crop.
    """
    side = layout.side
    box = layout.valid_box("llava")
    grid = thumbnail_scores.view(1, 1, side, side)
    resized = F.interpolate(grid, size=(box.height, box.width), mode="bilinear", align_corners=False)[0, 0]
    pieces, row_offset = [], 0
    for i in range(layout.rows):
        col_offset = 0
        for j in range(layout.cols):
            _, _, height, width = boxes[i * layout.cols + j]
            pieces.append(resized[row_offset:row_offset + height, col_offset:col_offset + width].flatten())
            col_offset += width
        row_offset += boxes[i * layout.cols][2]
    return pieces


def select_crop_tokens(local: torch.Tensor, global_: torch.Tensor, keep_count: int) -> torch.Tensor:
    """Indices (among a crop's valid tokens) of the top ``keep_count`` by
    ``normalize(local) + normalize(global)``; both ``[N_c]``. Order is not meaningful."""
    combined = F.normalize(local, p=2, dim=-1) + F.normalize(global_, p=2, dim=-1)
    return torch.topk(combined, keep_count).indices


# -- the whole method ------------------------------------------------------------------------------


def globalcom2_plan(scores: torch.Tensor, layout: AnyResLayout, ratio: float, temperature: float = 10.0):
    """Budgets and choices of GlobalCom2 for one image.

    Args:
        scores: ``[1 + n, P]`` per-tile [CLS] scores (thumbnail first).
    Returns:
        ratios ``[n]`` float64, boxes (per crop ``(top, left, h, w)``), and per crop the kept
        indices among its valid tokens.
    """
    ratios = crop_ratios(region_sums(scores[0], layout.rows, layout.cols), ratio, temperature)
    boxes = crop_valid_boxes(layout)
    global_scores = global_crop_scores(scores[0], layout, boxes)
    kept = []
    for c, (top, left, height, width) in enumerate(boxes):
        local = scores[1 + c].view(layout.side, layout.side)[top:top + height, left:left + width].flatten()
        kept.append(select_crop_tokens(local, global_scores[c], int(height * width * ratios[c])))
    return ratios, boxes, kept


def crop_sources_authors(layout: AnyResLayout, boxes, kept) -> torch.Tensor:
    """Source ids of the crop part in the authors' layout, newlines as -1.

    Kept token m of crop c goes to slot ``(m // side, m % side)`` of crop c's block; the padded
    canvas is read row by row, every row ended by a newline; empty slots are dropped.
    """
    side = layout.side
    canvas_h, canvas_w = layout.canvas_hw
    device = kept[0].device if kept else None
    slots = torch.full((canvas_h, canvas_w + 1), _EMPTY, dtype=torch.long, device=device)
    slots[:, canvas_w] = NEWLINE_SOURCE
    for c, (top, left, height, width) in enumerate(boxes):
        if height * width == 0:
            continue
        m = kept[c]
        y, x = torch.div(m, width, rounding_mode="floor") + top, m % width + left  # true position in crop
        source = (1 + c) * side * side + y * side + x
        i, j = divmod(c, layout.cols)
        slots[i * side + m // side, j * side + m % side] = source
    flat = slots.flatten()
    return flat[flat != _EMPTY]


def crop_keep_mask(layout: AnyResLayout, boxes, kept, device=None) -> torch.Tensor:
    """``[1 + n, P]`` bool keep mask of the crops' kept tokens at their true positions (thumbnail False)."""
    side = layout.side
    mask = torch.zeros(layout.num_tiles, layout.tokens_per_tile, dtype=torch.bool, device=device)
    for c, (top, left, height, width) in enumerate(boxes):
        if height * width == 0:
            continue
        m = kept[c]
        y, x = torch.div(m, width, rounding_mode="floor") + top, m % width + left
        mask[1 + c, y * side + x] = True
    return mask


def globalcom2_token_count(inp: VisionInput, ratio: float, layout: str = "authors", temperature: float = 10.0) -> int:
    """Tokens GlobalCom2 emits for this input: ``int(P r) + sum_c int(N_c ratio_c)`` + newlines
    (``24 rows`` for the authors' layout, vanilla's unpadded rows for ``spatial``)."""
    scores = cls_scores(inp.signals[SCORE_SIGNAL])
    ratios = crop_ratios(region_sums(scores[0], inp.layout.rows, inp.layout.cols), ratio, temperature)
    crops = sum(int(h * w * r) for (_, _, h, w), r in zip(crop_valid_boxes(inp.layout), ratios))
    newlines = inp.layout.canvas_hw[0] if layout == "authors" else inp.layout.valid_box("hf").height
    return int(inp.layout.tokens_per_tile * ratio) + crops + newlines


@register_compressor("globalcom2")
class GlobalCom2(Compressor):
    """Thumbnail-guided per-crop budgets and holistic (local + global) token scores."""

    identity_at_full_ratio = False  # below-average crops are pruned even at ratio 1

    def __init__(self, ratio: float = 0.25, temperature: float = 10.0, layout: str = "authors",
                 thumbnail_order: str = "score") -> None:
        super().__init__(ratio)
        if layout not in LAYOUTS:
            raise ValueError(f"compressor.layout must be one of {', '.join(LAYOUTS)}; got {layout!r}")
        if thumbnail_order not in THUMBNAIL_ORDERS:
            raise ValueError(
                f"compressor.thumbnail_order must be one of {', '.join(THUMBNAIL_ORDERS)}; got {thumbnail_order!r}"
            )
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ValueError(f"compressor.temperature must be a positive number, got {temperature!r}")
        self.temperature = float(temperature)
        self.layout = layout
        self.thumbnail_order = thumbnail_order

    @property
    def vision_signals(self) -> tuple[ClsAttention, ...]:
        return (SCORE_SIGNAL,)

    def compress_vision(self, inp: VisionInput) -> VisionOutput:
        layout = inp.layout
        scores = cls_scores(inp.signals[SCORE_SIGNAL])  # [1 + n, P]
        thumbnail = select_thumbnail(scores[0], self.ratio, self.thumbnail_order)  # [k_G] source ids
        _, boxes, kept = globalcom2_plan(scores, layout, self.ratio, self.temperature)
        if self.layout == "spatial":
            keep = crop_keep_mask(layout, boxes, kept, device=inp.features.device)  # thumbnail row all False
            order = torch.cat([thumbnail, kept_spatial_sources(layout, keep, "hf", device=inp.features.device)])
        else:
            order = torch.cat([thumbnail, crop_sources_authors(layout, boxes, kept)])
        embeds = gather_sources(inp.features, inp.newline, order)
        num_newlines = layout.canvas_hw[0] if self.layout == "authors" else layout.valid_box("hf").height
        return VisionOutput(embeds=embeds, provenance=Provenance.one_to_one(order), num_newlines=num_newlines)

    def describe(self) -> dict:
        return {**super().describe(), "temperature": self.temperature, "layout": self.layout,
                "thumbnail_order": self.thumbnail_order}

