"""``globalcom2``: GlobalCom2 (Liu et al., 2025), thumbnail-guided compression of LLaVA-NeXT crops.

Faithful, token for token, to the authors' code (``xuyang-liu16/GlobalCom2`` @ 96b2d00,
``llava/model/llava_arch.py``), re-implemented with vectorised torch (theirs loops over tokens in
Python with one host sync per token). Notation: ``S`` tokens per tile side (24), ``P = S**2``,
``n = rows * cols`` crops, ``r`` the retention ratio.

1. Score: the vision tower's LAST layer, [CLS] query against the P patch keys, scaled dot product
   BEFORE softmax, averaged over heads (``ClsAttention(-1)``); one row for the thumbnail and one per
   crop, in the model dtype.
2. Thumbnail: keep the top ``int(P r)`` by its own score, emitted in DESCENDING score order
   (``thumbnail_order="spatial"``: the same tokens in raster order); no newlines.
3. Crop ratios: cut the thumbnail's ``S x S`` map into the crop grid (region height ``S // rows``,
   width ``S // cols``, the last row/column taking the rest), SUM each region in float64,
   ``p = exp((sums - max) / T) / (sum exp + 1e-8)`` with ``T = temperature`` (10), and
   ``ratio_c = min(r (1 + p_c - mean p), 1)``: no lower clip, clipped budget not redistributed.
4. Crops: only tokens inside the unpadded box, by original LLaVA's unpad rule (``int()``
   truncation, ``layout.valid_box("llava")``; transformers rounds). Score = L2-normalised own-crop
   score + L2-normalised global score, the thumbnail map bilinearly resized to the whole unpadded
   grid and cut per crop (column offset: widths of the earlier crops of the row; row offset: the
   height of each earlier crop row's FIRST crop, the authors' rule even when that crop is empty).
   Keep the top ``int(N_c ratio_c)`` of the crop's N_c valid tokens.
5. Layout ``authors`` (default): the kept token with index m among its crop's valid tokens is
   written at slot ``(m // S, m % S)`` of the crop's ``S x S`` block (NOT its true position); the
   padded canvas is read row by row, every one of its ``S rows`` rows ended by a newline; empty
   slots are dropped. Segment length: ``int(P r) + sum_c int(N_c ratio_c) + S rows``.
   ``layout="spatial"``: the kept tokens at their true positions, packed as vanilla LLaVA-NeXT in
   this pipeline packs them (transformers' unpad box, one newline per unpadded row). That box
   always contains LLaVA's (rounding can only raise the image extent, so only lower the padding),
   so every kept token is placed; a row the two rules disagree on holds only its newline. This keeps
   the newline count equal to vanilla's and to the other spatial pruners' (random).

Deliberate differences from the authors' code:

* The authors cast the crop part to float16; this keeps the model dtype (identical for an fp16
  model; under bf16/fp32 a cast would only lose precision).
* The authors' ``F.interpolate`` fails when the unpadded box is empty (aspect ratio beyond ~70:1,
  where LLaVA's ``int()`` gives 0 rows or columns); here every crop is then empty and the crop part
  is its ``S rows`` newlines. (A 1-row/1-column box, where their ``squeeze()`` would also fail,
  cannot occur with S = 24: the canvas sides are even, so the box extent ``side - 2 pad`` is even.)

Faithful GlobalCom2 at ``ratio=1`` is not the identity: below-average crops still get
``ratio_c < 1`` and, with padding, the authors' layout emits newline-only rows
(``identity_at_full_ratio = False``).

Paper vs code: the paper counts "up to 2880 r tokens" for a 2 x 2 grid, i.e. thumbnail + crops
without the ``S rows`` newlines; actual segments are therefore a little longer than ``r`` of
vanilla. The thumbnail's score ordering, the slot layout and the newline per padded row are code
details the paper does not describe; the defaults follow the code.

Host syncs on CUDA: one copy of the thumbnail's P scores to the host (the float64 region sums, and
the integer budgets, which ``topk`` needs as Python ints), and one when the crop part drops its
empty slots. Nothing per token.
"""

from __future__ import annotations

from typing import NamedTuple

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
_EMPTY = -2  # an unfilled slot of the authors' canvas (newlines are -1)


class CropBox(NamedTuple):
    """The unpadded part of one crop, in that crop's token coordinates; all zero when empty."""

    top: int
    left: int
    height: int
    width: int

    @property
    def count(self) -> int:
        return self.height * self.width


class CropPlan(NamedTuple):
    """GlobalCom2's decisions for the crops of one image.

    ratios: ``[n]`` float64 per-crop retention ratios; boxes: per crop its ``CropBox``;
    budgets: per crop ``int(N_c * ratio_c)``; kept: per crop ``[budget_c]`` long, the kept tokens'
    indices among that crop's valid tokens (row-major inside the box), in ``topk`` order.
    """

    ratios: np.ndarray
    boxes: list[CropBox]
    budgets: list[int]
    kept: list[torch.Tensor]


# -- step 1: scores ------------------------------------------------------------------------------


def cls_scores(signal: torch.Tensor) -> torch.Tensor:
    """Per-tile scores from ``ClsAttention`` logits: drop the [CLS] key, average over heads.

    ``[T, heads, 1 + P]`` -> ``[T, P]`` in the signal's dtype (per-head logits first, then the mean,
    as the authors do).
    """
    return signal[:, :, 1:].mean(dim=1)


# -- step 2: thumbnail ---------------------------------------------------------------------------


def select_thumbnail(scores: torch.Tensor, ratio: float, order: str = "score") -> torch.Tensor:
    """Kept thumbnail positions.

    Args:
        scores: ``[P]`` the thumbnail's scores.
        ratio: r; ``int(P * r)`` tokens are kept.
        order: ``"score"`` (authors: descending score) or ``"spatial"`` (ascending position).
    Returns:
        ``[int(P r)]`` long positions (= source ids, the thumbnail being tile 0).
    """
    keep = torch.argsort(scores, descending=True)[: int(scores.numel() * ratio)]  # as the authors
    return keep.sort().values if order == "spatial" else keep


# -- step 3: crop ratios -------------------------------------------------------------------------


def region_index(side: int, rows: int, cols: int) -> np.ndarray:
    """Crop region (row-major crop index) of every thumbnail token. Returns ``[side * side]`` int.

    Regions are ``max(side // rows, 1)`` x ``max(side // cols, 1)`` tokens; the last region row and
    column absorb the remainder.
    """
    region_h, region_w = max(side // rows, 1), max(side // cols, 1)
    y, x = np.divmod(np.arange(side * side), side)
    return np.minimum(y // region_h, rows - 1) * cols + np.minimum(x // region_w, cols - 1)


def region_sums(thumbnail_scores: torch.Tensor, rows: int, cols: int) -> np.ndarray:
    """SUM of the thumbnail's scores over each crop's region.

    Args:
        thumbnail_scores: ``[P]`` (any device / float dtype).
    Returns:
        ``[rows * cols]`` float64. Each value is widened exactly to float64 and accumulated in
        raster order (``np.add.at`` is unbuffered and in order), as the authors' Python loop does,
        so the sums are bit-identical to theirs. One device-to-host copy.
    """
    side = int(thumbnail_scores.numel() ** 0.5)
    values = thumbnail_scores.detach().to("cpu", torch.float64).numpy()  # [P]
    sums = np.zeros(rows * cols)
    np.add.at(sums, region_index(side, rows, cols), values)
    return sums


def crop_ratios(sums: np.ndarray, ratio: float, temperature: float = 10.0) -> np.ndarray:
    """Per-crop retention ratios from region sums ``[n]``: ``min(r (1 + p_c - mean p), 1)``.

    ``p = exp((sums - max) / temperature) / (sum(exp) + 1e-8)`` (the authors' epsilon). Before the
    clip the ratios sum to ``n r`` (up to the epsilon). Returns ``[n]`` float64.
    """
    exp = np.exp((sums - np.max(sums)) / temperature)
    probs = exp / (np.sum(exp) + 1e-8)
    return np.minimum(ratio * (1 + probs - np.mean(probs)), 1.0)


# -- step 4: crop geometry, scores and selection ---------------------------------------------------


def crop_valid_boxes(layout: AnyResLayout) -> list[CropBox]:
    """Per crop (row-major), its part of the unpadded box (LLaVA's ``int()`` rule) in crop coordinates.

    An empty crop (all padding) gets ``CropBox(0, 0, 0, 0)``, as the authors' ``(0, 0)`` size.
    """
    box, side = layout.valid_box("llava"), layout.side
    boxes = []
    for i in range(layout.rows):
        top, bottom = max(box.top - i * side, 0), min(box.bottom - i * side, side)
        for j in range(layout.cols):
            left, right = max(box.left - j * side, 0), min(box.right - j * side, side)
            if bottom > top and right > left:
                boxes.append(CropBox(top, left, bottom - top, right - left))
            else:
                boxes.append(CropBox(0, 0, 0, 0))
    return boxes


def global_crop_scores(thumbnail_scores: torch.Tensor, layout: AnyResLayout,
                       boxes: list[CropBox] | None = None) -> list[torch.Tensor]:
    """The thumbnail map resized to the unpadded grid and cut per crop.

    Args:
        thumbnail_scores: ``[P]``.
        boxes: ``crop_valid_boxes(layout)`` (computed when omitted).
    Returns:
        per crop, ``[h_c * w_c]`` (row-major), in ``thumbnail_scores``' dtype.

    The ``[S, S]`` map is resized to ``[H_u, W_u]`` (bilinear, ``align_corners=False``, no
    antialias). Crop (i, j) reads rows ``[h0_i, h0_i + h_c)`` and columns ``[w0_ij, w0_ij + w_c)``:
    ``w0`` sums the widths of the earlier crops of row i, ``h0`` sums, over the earlier crop rows,
    the height of each row's FIRST crop (the authors' rule; it differs from the row's height only
    when that first crop is empty, which LLaVA-NeXT's own grids never produce).
    """
    boxes = crop_valid_boxes(layout) if boxes is None else boxes
    side = layout.side
    box = layout.valid_box("llava")
    if box.height == 0 or box.width == 0:  # the authors' interpolate would fail here
        return [thumbnail_scores.new_zeros(0) for _ in boxes]
    grid = thumbnail_scores.reshape(1, 1, side, side)  # [1, 1, S, S]
    resized = F.interpolate(grid, size=(box.height, box.width), mode="bilinear", align_corners=False)[0, 0]
    pieces, row_offset = [], 0  # resized: [H_u, W_u]
    for i in range(layout.rows):
        col_offset = 0
        for j in range(layout.cols):
            crop = boxes[i * layout.cols + j]
            piece = resized[row_offset:row_offset + crop.height, col_offset:col_offset + crop.width]
            pieces.append(piece.reshape(-1))  # [h_c * w_c]
            col_offset += crop.width
        row_offset += boxes[i * layout.cols].height
    return pieces


def local_crop_scores(crop_scores: torch.Tensor, layout: AnyResLayout,
                      boxes: list[CropBox] | None = None) -> list[torch.Tensor]:
    """Each crop's own scores ``[n, P]`` at its valid tokens: per crop ``[h_c * w_c]`` (row-major)."""
    boxes = crop_valid_boxes(layout) if boxes is None else boxes
    grids = crop_scores.reshape(len(boxes), layout.side, layout.side)  # [n, S, S]
    return [g[b.top:b.top + b.height, b.left:b.left + b.width].reshape(-1) for g, b in zip(grids, boxes)]


def select_crop_tokens(local: torch.Tensor, global_: torch.Tensor, keep_count: int) -> torch.Tensor:
    """Top ``keep_count`` of one crop's valid tokens by ``normalize(local) + normalize(global_)``.

    Args:
        local, global_: ``[N_c]`` (L2-normalised with ``F.normalize`` semantics, eps 1e-12).
    Returns:
        ``[keep_count]`` long indices among the crop's valid tokens, in ``topk`` order (only the set
        matters). ``topk`` runs on exactly the authors' ``[N_c]`` vector, so ties break as theirs.
    """
    combined = F.normalize(local, p=2, dim=-1) + F.normalize(global_, p=2, dim=-1)  # [N_c]
    return torch.topk(combined, keep_count).indices


def plan_crops(scores: torch.Tensor, layout: AnyResLayout, ratio: float,
               temperature: float = 10.0) -> CropPlan:
    """Ratios, budgets and kept tokens of every crop of one image.

    Args:
        scores: ``[1 + n, P]`` per-tile scores, thumbnail first.
    """
    ratios = crop_ratios(region_sums(scores[0], layout.rows, layout.cols), ratio, temperature)  # [n]
    boxes = crop_valid_boxes(layout)
    budgets = crop_budgets(boxes, ratios)
    local = local_crop_scores(scores[1:], layout, boxes)
    global_ = global_crop_scores(scores[0], layout, boxes)
    kept = [select_crop_tokens(l, g, k) for l, g, k in zip(local, global_, budgets)]  # <= 9 crops
    return CropPlan(ratios, boxes, budgets, kept)


def crop_budgets(boxes: list[CropBox], ratios: np.ndarray) -> list[int]:
    """``int(N_c * ratio_c)`` per crop (float64 product, as the authors)."""
    return [int(b.count * float(r)) for b, r in zip(boxes, ratios)]


# -- step 5: output layouts --------------------------------------------------------------------------


def _kept_crop_coordinates(layout: AnyResLayout, plan: CropPlan, device) -> tuple[torch.Tensor, ...]:
    """All crops' kept tokens at once: crop index c, valid-token index m and true source id, ``[K]`` each."""
    total = sum(plan.budgets)
    m = torch.cat(plan.kept).to(device)  # [K]
    counts = torch.tensor(plan.budgets, device=device)  # [n]
    c = torch.repeat_interleave(torch.arange(len(plan.boxes), device=device), counts, output_size=total)  # [K]
    geometry = torch.tensor([[b.top, b.left, max(b.width, 1)] for b in plan.boxes], device=device)  # [n, 3]
    top, left, width = geometry[c].unbind(-1)  # [K] each; empty crops keep nothing, width>=1 is a guard
    y, x = m // width + top, m % width + left  # true position inside the crop
    side = layout.side
    source = (1 + c) * side * side + y * side + x  # [K]
    return c, m, source


def crop_sources_authors(layout: AnyResLayout, plan: CropPlan, device=None) -> torch.Tensor:
    """Source ids of the crop part in the authors' layout, newlines as -1. Returns ``[K + S rows]`` long.

    Kept token m of crop c is written at slot ``(m // S, m % S)`` of crop c's block on the padded
    ``[S rows, S cols]`` canvas, with a newline column appended; the canvas is read row by row and
    the empty slots are dropped.
    """
    side = layout.side
    canvas_h, canvas_w = layout.canvas_hw
    c, m, source = _kept_crop_coordinates(layout, plan, device)
    slots = torch.full((canvas_h, canvas_w + 1), _EMPTY, dtype=torch.long, device=device)  # [Hc, Wc + 1]
    slots[:, canvas_w] = NEWLINE_SOURCE
    slot_row = (c // layout.cols) * side + m // side  # [K]
    slot_col = (c % layout.cols) * side + m % side  # [K]
    slots[slot_row, slot_col] = source
    flat = slots.reshape(-1)
    return flat[flat != _EMPTY]


def crop_keep_mask(layout: AnyResLayout, plan: CropPlan, device=None) -> torch.Tensor:
    """Kept crop tokens at their true positions. Returns ``[1 + n, P]`` bool (thumbnail row False)."""
    _, _, source = _kept_crop_coordinates(layout, plan, device)
    mask = torch.zeros(layout.num_tiles * layout.tokens_per_tile, dtype=torch.bool, device=device)
    mask[source] = True
    return mask.view(layout.num_tiles, layout.tokens_per_tile)


def crop_sources_spatial(layout: AnyResLayout, plan: CropPlan, device=None) -> torch.Tensor:
    """Source ids of the crop part in vanilla order (transformers' unpad box, a newline per row)."""
    # the mask's thumbnail row is all False, so only the crop tokens and the newlines come back
    return kept_spatial_sources(layout, crop_keep_mask(layout, plan, device), "hf", device=device)


def num_newlines(layout: AnyResLayout, output_layout: str = "authors") -> int:
    """Newlines in the segment: every padded-canvas row (authors) or every unpadded row (spatial)."""
    return layout.canvas_hw[0] if output_layout == "authors" else layout.valid_box("hf").height


def globalcom2_token_count(inp: VisionInput, ratio: float, layout: str = "authors",
                           temperature: float = 10.0) -> int:
    """Tokens GlobalCom2 emits for this input: ``int(P r) + sum_c int(N_c ratio_c)`` + newlines.

    The crop budgets depend on the thumbnail's scores, so this needs ``inp.signals`` (not the
    features). Cheap: no crop scoring or selection.
    """
    scores = cls_scores(inp.signals[SCORE_SIGNAL][:1])  # [1, P]
    ratios = crop_ratios(region_sums(scores[0], inp.layout.rows, inp.layout.cols), ratio, temperature)
    crops = sum(crop_budgets(crop_valid_boxes(inp.layout), ratios))
    return int(inp.layout.tokens_per_tile * ratio) + crops + num_newlines(inp.layout, layout)


def _check_choice(key: str, value, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"compressor.{key} must be one of {', '.join(allowed)}; got {value!r}")
    return value


@register_compressor("globalcom2")
class GlobalCom2(Compressor):
    """Thumbnail-guided per-crop budgets and holistic (local + global) token scores.

    Args:
        ratio: r, the nominal retention ratio (default 0.25, the authors').
        temperature: softmax temperature of the crop allocation (10).
        layout: ``"authors"`` (slot layout, newline per padded row) or ``"spatial"``.
        thumbnail_order: ``"score"`` (authors: descending score) or ``"spatial"`` (raster).
    """

    identity_at_full_ratio = False  # below-average crops are pruned even at ratio 1 (see module doc)

    def __init__(self, ratio: float = 0.25, temperature: float = 10.0, layout: str = "authors",
                 thumbnail_order: str = "score") -> None:
        super().__init__(ratio)
        self.layout = _check_choice("layout", layout, LAYOUTS)
        self.thumbnail_order = _check_choice("thumbnail_order", thumbnail_order, THUMBNAIL_ORDERS)
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ValueError(f"compressor.temperature must be a positive number, got {temperature!r}")
        self.temperature = float(temperature)

    @property
    def vision_signals(self) -> tuple[ClsAttention, ...]:
        return (SCORE_SIGNAL,)

    def token_count(self, inp: VisionInput) -> int:
        """The segment length ``compress_vision(inp)`` will produce."""
        return globalcom2_token_count(inp, self.ratio, self.layout, self.temperature)

    def compress_vision(self, inp: VisionInput) -> VisionOutput:
        layout, device = inp.layout, inp.features.device
        scores = cls_scores(inp.signals[SCORE_SIGNAL]).to(device)  # [1 + n, P]
        thumbnail = select_thumbnail(scores[0], self.ratio, self.thumbnail_order)  # [int(P r)]
        plan = plan_crops(scores, layout, self.ratio, self.temperature)
        if self.layout == "spatial":
            crops = crop_sources_spatial(layout, plan, device)
        else:
            crops = crop_sources_authors(layout, plan, device)
        order = torch.cat([thumbnail, crops])  # [K] source ids, -1 = newline
        embeds = gather_sources(inp.features, inp.newline, order)  # [K, D], model dtype
        return VisionOutput(embeds=embeds, provenance=Provenance.one_to_one(order),
                            num_newlines=num_newlines(layout, self.layout))

    def describe(self) -> dict:
        return {**super().describe(), "temperature": self.temperature, "layout": self.layout,
                "thumbnail_order": self.thumbnail_order}
