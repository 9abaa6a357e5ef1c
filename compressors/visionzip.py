"""``visionzip``: VisionZip (Yang et al., 2024), dominant + contextual tokens per view, in CLIP space.

Faithful, token for token, to the authors' code (``dvlab-research/VisionZip`` @ 3151f6d:
``visionzip/clip_encoder.py`` ``CLIPVisionTower_VisionZip.forward``, ``visionzip/utils.py``
``CLIPAttention_forward``, ``visionzip/llava_arch.py`` ``restore_image_features_sorted`` and
``prepare_inputs_labels_for_multimodal_visionzip``). Per view (thumbnail and each crop), with ``T``
tokens per view split into ``D`` dominant and ``C`` contextual:

1. Dominant: the [CLS] row of the feature layer's attention (layer 22 of 24, ``layer``; softmax over
   all keys), SUMMED over heads; the top ``D - 1`` patches plus the [CLS] token itself, in index
   order ([CLS] first). VisionZip passes the [CLS] hidden state to the LLM; vanilla LLaVA never does.
2. Candidates: the other ``R = 1 + P - D`` tokens in index order, compared by their keys of the same
   layer averaged over heads (``LayerKeys(layer)``), L2-normalised.
3. Targets: candidates ``0, s, 2s, ...`` with ``s = max(1, R // C)``, the first ``C`` of them
   (uniform in index, not spatial).
4. Every other candidate joins the target of highest cosine similarity (hard ``argmax``).
5. Contextual token = the target's hidden state PLUS the mean of its members' (not a mean that
   includes the target; 0 added when a target has no member).
6. All of it on the feature layer's hidden states (``hidden_states[-2]``, 1024-d, before the
   projector); only the ``V * T`` output tokens are projected.

Layout on LLaVA-NeXT (``spatial_unpad`` branch of their ``prepare_inputs_labels_for_multimodal``):
the thumbnail's ``T`` tokens ([CLS], dominant patches, contextual); then every crop's dominant
patches together, scattered on the padded canvas and read in raster order of the whole canvas; then
the crops' [CLS] tokens in crop order; then the crops' contextual tokens, crop by crop. No
unpadding, no ``image_newline``. The segment is ``V * T`` tokens whatever the aspect (paper: 640 /
320 / 160 tokens on a 2 x 2 grid = 5 x 128 / 64 / 32).

Budget mapping: ``T = floor(P * ratio + 0.5)`` per view (as ``fastervlm``), ``C = floor(T *
contextual_share + 0.5)`` within ``[1, T - 1]``, ``D = T - C``. The default share 10/64 gives the
README's ``dominant=54, contextual=10`` at ``ratio = 64/576`` and the paper's 108+20 and 162+30 at
128 and 192 tokens.

Paper vs code: no difference is documented, so there is no ``variant``; the [CLS] token and the
"target + mean" rule are the authors'. One deliberate difference: with ``C = 0`` their
``image_feature[:, -num_extra:]`` is ``[:, -0:]``, the whole view again; vtclab requires ``C >= 1``.

At ``ratio = 1`` the views are still re-packed (the [CLS] tokens added, 90 contextual merges per
view), so ``ratio = 1`` is not vanilla (``identity_at_full_ratio = False``).

Signals: ``ClsAttention(layer)`` and ``LayerKeys(layer)``; SDPA stays on (the authors turn on
``output_attentions`` for all 24 layers, about 1.3 GB of maps for five views).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from compressors.base import ClsAttention, Compressor, LayerKeys, Provenance, VisionInput, VisionOutput
from compressors.budget import Budget
from compressors.fastervlm import tokens_per_view
from compressors.geometry import AnyResLayout
from compressors.registry import register_compressor

BUDGETS = (Budget(scope="per_view", count_newlines=False),)
README_SHARE = 10 / 64  # dominant=54, contextual=10 (README); also 108+20 and 162+30


def split_budget(tokens: int, ratio: float, contextual_share: float) -> tuple[int, int]:
    """``(D, C)`` for views of ``tokens`` patches: ``T = floor(P r + 0.5)``, ``C = floor(T share + 0.5)``
    clipped to ``[1, T - 1]``, ``D = T - C``."""
    total = tokens_per_view(tokens, ratio)
    if total < 2:
        raise ValueError(f"visionzip needs at least 2 tokens per view ([CLS] + 1 contextual); ratio {ratio} "
                         f"gives {total} of {tokens}")
    contextual = min(max(int(total * contextual_share + 0.5), 1), total - 1)
    return total - contextual, contextual


def zip_views(hidden: torch.Tensor, attention: torch.Tensor, metric: torch.Tensor, dominant: int,
              contextual: int) -> dict[str, torch.Tensor]:
    """VisionZip on every view at once (the authors' batched code path).

    Args:
        hidden: ``[V, L, C]`` feature-layer hidden states, ``L = 1 + P``, [CLS] first.
        attention: ``[V, heads, L]`` post-softmax [CLS] row of the feature layer.
        metric: ``[V, L, d]`` that layer's keys averaged over heads.
        dominant / contextual: D (with [CLS]) and C.
    Returns:
        ``tokens``: ``[V, D + C, C]`` (D dominant in index order, then C contextual);
        ``chosen``: ``[V, D]`` token indices of the dominant tokens (0 = [CLS]), ascending;
        ``targets``: ``[V, C]`` token indices of the targets;
        ``members``: ``[V, R - C]`` token indices of the merged candidates, ``assign``: ``[V, R - C]``
        the target (0..C-1) each joined; ``counts``: ``[V, C]`` members per target (at least 1).
    """
    views, length, width = hidden.shape
    top = attention[:, :, 1:].sum(dim=1).topk(dominant - 1, dim=1).indices + 1  # [V, D-1]
    chosen = torch.cat([torch.zeros_like(top[:, :1]), top], dim=1)  # [V, D]
    rest = torch.ones(views, length, dtype=torch.bool, device=hidden.device).scatter_(1, chosen, False)  # [V, L]
    dominant_tokens = hidden[~rest].view(views, dominant, width)  # index order
    num_rest = length - dominant
    candidates = metric[rest].view(views, num_rest, metric.shape[-1])
    candidates = candidates / candidates.norm(dim=-1, keepdim=True)  # [V, R, d]
    candidate_hidden = hidden[rest].view(views, num_rest, width)  # [V, R, C]
    step = max(1, num_rest // contextual)
    targets = torch.arange(0, num_rest, step, device=hidden.device)[:contextual]  # [C]
    merged = ~torch.isin(torch.arange(num_rest, device=hidden.device), targets)  # [R]
    similarity = torch.bmm(candidates[:, merged], candidates[:, targets].transpose(1, 2))  # [V, R-C, C]
    assign = similarity.argmax(dim=2)  # [V, R-C]
    one_hot = torch.zeros(views, int(merged.sum()), contextual, dtype=hidden.dtype, device=hidden.device)
    one_hot.scatter_(2, assign.unsqueeze(-1), 1)
    counts = one_hot.sum(dim=1).clamp(min=1)  # [V, C]
    mean = torch.bmm(one_hot.transpose(1, 2), candidate_hidden[:, merged]) / counts.unsqueeze(-1)  # [V, C, C]
    contextual_tokens = candidate_hidden[:, targets] + mean
    candidate_index = torch.arange(length, device=hidden.device).expand(views, length)[rest].view(views, num_rest)
    return {
        "tokens": torch.cat([dominant_tokens, contextual_tokens], dim=1),
        "chosen": chosen.sort(dim=1).values,
        "targets": candidate_index[:, targets],
        "members": candidate_index[:, merged],
        "assign": assign,
        "counts": counts,
    }


def source_ids(token_index: torch.Tensor, layout: AnyResLayout) -> torch.Tensor:
    """Source ids of tokens ``[V, k]`` given by their index in their view (0 = [CLS], j = patch j - 1)."""
    view = torch.arange(token_index.shape[0], device=token_index.device).unsqueeze(1).expand_as(token_index)
    patch = view * layout.tokens_per_tile + token_index - 1
    return torch.where(token_index == 0, layout.cls_source_id(view), patch)


def segment_rows(zipped: dict[str, torch.Tensor], layout: AnyResLayout, dominant: int) -> torch.Tensor:
    """The authors' NeXT layout as row indices into ``tokens.reshape(V * T, C)``. Returns ``[V * T]`` long."""
    views, total = zipped["tokens"].shape[:2]
    device = zipped["tokens"].device
    rows = torch.arange(views * total, device=device).view(views, total)  # [V, T]
    crop_patches = rows[1:, 1:dominant].reshape(-1)  # dominant patches of the crops
    canvas_rank = torch.empty(layout.num_tiles * layout.tokens_per_tile, dtype=torch.long, device=device)
    canvas = layout.canvas_source_ids(device).reshape(-1)
    canvas_rank[canvas] = torch.arange(canvas.numel(), device=device)
    patch_sources = source_ids(zipped["chosen"], layout)[1:, 1:].reshape(-1)
    crop_patches = crop_patches[canvas_rank[patch_sources].argsort()]  # global raster order
    return torch.cat([rows[0], crop_patches, rows[1:, 0], rows[1:, dominant:].reshape(-1)])


def zip_provenance(zipped: dict[str, torch.Tensor], layout: AnyResLayout, dominant: int,
                   rows: torch.Tensor) -> Provenance:
    """Vision-space provenance: each dominant token its own source (weight 1); each contextual token its
    target (weight 1) and its members (weight 1 / count each), at their positions in the segment."""
    views, total = zipped["tokens"].shape[:2]
    device = rows.device
    position = torch.empty_like(rows)
    position[rows] = torch.arange(rows.numel(), device=device)  # row -> segment position
    row = torch.arange(views * total, device=device).view(views, total)
    dominant_pos, context_pos = position[row[:, :dominant]], position[row[:, dominant:]]  # [V, D], [V, C]
    member_pos = torch.gather(context_pos, 1, zipped["assign"])  # [V, R-C]
    member_weight = 1.0 / torch.gather(zipped["counts"].double(), 1, zipped["assign"])  # [V, R-C]
    tokens = torch.cat([dominant_pos.reshape(-1), context_pos.reshape(-1), member_pos.reshape(-1)])
    sources = torch.cat([source_ids(zipped["chosen"], layout).reshape(-1),
                         source_ids(zipped["targets"], layout).reshape(-1),
                         source_ids(zipped["members"], layout).reshape(-1)])
    weights = torch.cat([torch.ones(dominant_pos.numel() + context_pos.numel(), dtype=torch.float64, device=device),
                         member_weight.reshape(-1)])
    return Provenance(token=tokens, source=sources, weight=weights, space="vision")


@register_compressor("visionzip")
class VisionZip(Compressor):
    """``D`` dominant ([CLS] + top [CLS]-attention patches) and ``C`` contextual tokens per view.

    Args:
        ratio: each view keeps ``T = floor(576 ratio + 0.5)`` tokens (default 64/576: the README's 64).
        contextual_share: ``C / T`` (10/64, the README's 54 + 10).
        layer: CLIP layer of the attention, keys and hidden states (-2 = 22 of 24, the feature layer;
            it must be the model's ``vision_feature_layer``, whose hidden state VisionZip merges).
        budget: must be ``{scope: per_view, count_newlines: false}``.
    """

    identity_at_full_ratio = False
    uses_projected_features = False  # merges CLIP features, projects only its V * T tokens

    def __init__(self, ratio: float = 64 / 576, contextual_share: float = README_SHARE, layer: int = -2,
                 budget: Mapping[str, Any] | None = BUDGETS[0].as_default()) -> None:
        super().__init__(ratio)
        if (isinstance(contextual_share, bool) or not isinstance(contextual_share, (int, float))
                or not 0.0 < contextual_share < 1.0):
            raise ValueError(f"compressor.contextual_share must be a number in (0, 1); got {contextual_share!r}")
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise ValueError(f"compressor.layer must be an integer CLIP layer index; got {layer!r}")
        self.contextual_share = float(contextual_share)
        self.layer = layer
        self.budget = Budget.parse(budget, BUDGETS)
        split_budget(576, self.ratio, self.contextual_share)  # fail at construction on a too small ratio

    @property
    def vision_signals(self) -> tuple:
        return (ClsAttention(self.layer), LayerKeys(self.layer))

    def compress_vision(self, inp: VisionInput) -> VisionOutput:
        layout = inp.layout
        dominant, contextual = split_budget(layout.tokens_per_tile, self.ratio, self.contextual_share)
        attention = inp.signals[ClsAttention(self.layer)].softmax(dim=-1)  # [V, H, L]
        metric = inp.signals[LayerKeys(self.layer)].mean(dim=2)  # [V, L, d]: head mean
        hidden = inp.vision_features
        if hidden is None:
            raise ValueError("visionzip merges the vision tower's features: VisionInput.vision_features is required")
        zipped = zip_views(hidden, attention.to(hidden.device), metric.to(hidden.device), dominant, contextual)
        rows = segment_rows(zipped, layout, dominant)
        tokens = zipped["tokens"].reshape(-1, hidden.shape[-1])[rows]  # [V * T, C] in segment order
        return VisionOutput(embeds=inp.projector(tokens), provenance=zip_provenance(zipped, layout, dominant, rows),
                            num_newlines=0)

    def describe(self) -> dict:
        return {**super().describe(), "contextual_share": self.contextual_share, "layer": self.layer}
