"""The compressor interface: two stages, declared signals, plain-tensor inputs and outputs.

A compressor can act at two points of the LLaVA-NeXT pipeline; it overrides the hook of the stage
it uses and inherits the pass-through for the other one:

* **image level** (``transform_image``): before the processor, may hand the vision tower a smaller
  image at a smaller tile size (``downsample``);
* **vision stage** (``compress_vision``): sees one image's projected tile features with its AnyRes
  layout (and, for methods that merge in CLIP space, the vision tower's features and the
  projector) and returns the token segment spliced into the prompt (GlobalCom2, HiRED, VisionZip,
  ...).
* **LLM stage** (``llm_layers`` + ``select_llm_tokens``): during prefill, at the input of each
  decoder layer in ``llm_layers`` (one stage each), sees the current sequence and decides which
  positions the following layers keep, optionally adding merged tokens (FastV, PyramidDrop,
  SparseVLM, DART, ...).

Expensive signals (a vision layer's [CLS] attention, attention rows inside the LLM, a layer's keys)
are computed by the pipeline only when a compressor lists them in ``vision_signals`` /
``llm_signals``; the default path keeps SDPA everywhere and computes nothing extra.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from compressors.geometry import NEWLINE_SOURCE, AnyResLayout

if TYPE_CHECKING:
    from PIL import Image

    from compressors.budget import Budget

# ---------------------------------------------------------------------------------------------
# Signals a compressor may ask for
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VisionSignal:
    """Base of vision-tower signals: a frozen request naming what to compute, and at which layer.

    ``layer`` indexes ``vision_tower.encoder.layers`` (negative from the end: -1 is the last layer).
    The pipeline computes a request only when a compressor lists it, with the provider registered
    for its exact type (``models.vision.VISION_SIGNAL_PROVIDERS``); an unknown type is an error.
    """

    layer: int = -1


@dataclass(frozen=True)
class ClsAttention(VisionSignal):
    """Pre-softmax [CLS]-query attention logits of one vision-tower layer, per head.

    Value in ``VisionInput.signals[request]``: ``[num_tiles, heads, 1 + side**2]`` holding
    ``(q_cls * scale) . k_j`` for every key j (column 0 is the [CLS] key itself), computed from
    that layer's normed input.
    """


LLM_SIGNAL_LAYERS = ("previous", "stage")
LLM_SIGNAL_QUERIES = ("last", "instruction", "mask")
LLM_SIGNAL_DTYPES = ("float32", "model")


def _check_choice(owner: str, key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{owner}.{key} must be one of {', '.join(allowed)}; got {value!r}")


@dataclass(frozen=True)
class LayerKeys(VisionSignal):
    """Key projections of one vision-tower layer, per head, for every token ([CLS] first).

    Value in ``VisionInput.signals[request]``: ``[num_tiles, 1 + side**2, heads, head_dim]``, the
    layer's ``k_proj`` (bias included) applied to its normed input: the keys its attention uses.
    """


@dataclass(frozen=True)
class LLMSignal:
    """Base of LLM-stage signals: a frozen request, computed at every stage of the compressor that
    lists it, by the provider registered for its exact type (``models.llm_signals``)."""


@dataclass(frozen=True)
class AttentionRows(LLMSignal):
    """Post-softmax attention of chosen query tokens over the current sequence, per head, from a
    layer's own q/k projections (SDPA stays on; nothing runs eager).

    Attributes:
        layer: ``"previous"``: layer K-1, the layer whose output enters the stage, as it ran (its
            q_proj/k_proj outputs, RoPE, causal mask); ``"stage"``: layer K's input norm and q/k
            projections applied to the stage input (what PyramidDrop recomputes).
        queries: ``"last"``: the last position; ``"instruction"``: every text position after the
            last image token; ``"mask"``: the positions ``Compressor.llm_query_mask`` returns.
        dtype: ``"float32"``: q.k, softmax and everything after in float32; ``"model"``: q.k in the
            model dtype and the softmax rounded back to it, as eager attention (and the authors'
            code) computes it. In float32 models the two are the same.

    Value: ``[1, heads, Q, L]`` (rows sum to 1 over the causal, unpadded keys), queries in sequence order.
    """

    layer: str = "previous"
    queries: str = "last"
    dtype: str = "float32"

    def __post_init__(self) -> None:
        _check_choice("AttentionRows", "layer", self.layer, LLM_SIGNAL_LAYERS)
        _check_choice("AttentionRows", "queries", self.queries, LLM_SIGNAL_QUERIES)
        _check_choice("AttentionRows", "dtype", self.dtype, LLM_SIGNAL_DTYPES)


@dataclass(frozen=True)
class DecoderKeys(LLMSignal):
    """Layer K-1's keys after RoPE, as its attention used them: ``[1, heads, L, head_dim]`` (GQA key
    heads repeated to the query heads, as eager attention does), model dtype."""


@dataclass(frozen=True)
class DecoderOutput(LLMSignal):
    """Layer K-1's output hidden states (the stage input), ``[1, L, D]``; with ``normed=True`` passed
    through the model's final norm (what DART compares)."""

    normed: bool = False


@dataclass(frozen=True)
class PromptEmbeddings(LLMSignal):
    """The prefill's input to decoder layer 0 (text embeddings with the image segment spliced in),
    ``[1, L0, D]`` indexed by original prefill position (``LLMInput.original_positions``)."""


# ---------------------------------------------------------------------------------------------
# Stage inputs and outputs
# ---------------------------------------------------------------------------------------------


@dataclass
class VisionInput:
    """One image, as the vision stage sees it.

    Attributes:
        features: ``[num_tiles, side**2, D]`` projected tile features, thumbnail first, crops
            row-major (``layout.num_tiles`` tiles). None when the compressor declared
            ``uses_projected_features = False`` (it merges in the vision tower's space and projects
            only its own output, so the pipeline skips projecting every token).
        layout: crop grid, token side and original image size.
        newline: ``[D]`` the model's ``image_newline`` embedding.
        signals: the values of the compressor's ``vision_signals`` requests.
        sample_seed: a stable per-sample integer; compressors that draw random numbers seed from it
            so a resumed run draws exactly what an uninterrupted one would.
        vision_features: ``[num_tiles, 1 + side**2, C]`` the vision tower's hidden state at the
            feature layer, [CLS] first (what the projector maps; ``features == projector(
            vision_features[:, 1:])``). None where the caller has no vision tower at hand.
        projector: the model's multimodal projector, ``[..., C] -> [..., D]`` (with
            ``vision_features``).
    """

    features: torch.Tensor | None
    layout: AnyResLayout
    newline: torch.Tensor
    signals: dict[Any, torch.Tensor] = field(default_factory=dict)
    sample_seed: int = 0
    vision_features: torch.Tensor | None = None
    projector: Callable[[torch.Tensor], torch.Tensor] | None = None

    def __post_init__(self) -> None:
        tiles, tokens = self.layout.num_tiles, self.layout.tokens_per_tile
        grid = f"{self.layout.rows}x{self.layout.cols}"
        if self.features is None and (self.vision_features is None or self.projector is None):
            raise ValueError("VisionInput needs features, or vision_features and projector to compute them")
        if self.features is not None and (self.features.dim() != 3 or tuple(self.features.shape[:2]) != (tiles, tokens)):
            raise ValueError(
                f"features must be [num_tiles={tiles}, side**2={tokens}, D] for layout "
                f"{grid}; got {tuple(self.features.shape)}"
            )
        vision = self.vision_features
        if vision is not None and (vision.dim() != 3 or tuple(vision.shape[:2]) != (tiles, 1 + tokens)):
            raise ValueError(f"vision_features must be [num_tiles={tiles}, 1 + side**2={1 + tokens}, C] for "
                             f"layout {grid}; got {tuple(vision.shape)}")

    def vision_tokens_by_source(self) -> torch.Tensor:
        """The vision tower's tokens indexed by source id: ``[num_tiles * side**2 + num_tiles, C]``.

        Rows ``tile * side**2 + patch`` are patch tokens, row ``layout.cls_source_id(tile)`` is that
        tile's [CLS] token (see ``compressors.geometry``).
        """
        if self.vision_features is None:
            raise ValueError("this compressor needs vision_features (the pipeline passes them)")
        vision = self.vision_features  # [T, 1 + P, C]
        return torch.cat([vision[:, 1:].reshape(-1, vision.shape[-1]), vision[:, 0]])


PROVENANCE_SPACES = ("projected", "vision")


@dataclass
class Provenance:
    """Which source tokens each output token came from, as (output position, source id) pairs.

    Pruning gives one pair per kept token; pooling or merging gives one pair per member of the
    window. ``image_newline`` tokens have no source and no pair. Source ids are defined in
    ``compressors.geometry`` (``tile * side**2 + patch``; a tile's [CLS] token has
    ``layout.cls_source_id(tile)``).

    Output token t is ``sum_pairs weight * source``: with ``weight=None`` the plain mean of its
    sources. ``space`` says where the sum is taken: ``"projected"``, over the projector's outputs
    (``VisionInput.features``); ``"vision"``, over the vision tower's tokens
    (``VisionInput.vision_tokens_by_source()``), the projector then applied to the sum (methods that
    merge in CLIP space, as VisionZip and PruMerge+ do).
    """

    token: torch.Tensor  # [M] long, position in the output segment
    source: torch.Tensor  # [M] long, source id
    weight: torch.Tensor | None = None  # [M] float, the source's coefficient; None = mean of the token's sources
    space: str = "projected"

    def __post_init__(self) -> None:
        if self.space not in PROVENANCE_SPACES:
            raise ValueError(f"provenance space must be one of {', '.join(PROVENANCE_SPACES)}; got {self.space!r}")

    @staticmethod
    def one_to_one(source: torch.Tensor) -> "Provenance":
        """Provenance of a segment whose token i came from ``source[i]`` (-1 for newlines)."""
        positions = torch.arange(source.numel(), device=source.device)
        real = source != NEWLINE_SOURCE
        return Provenance(token=positions[real], source=source[real])

    def select(self, kept_positions: torch.Tensor, length: int) -> "Provenance":
        """Provenance after keeping ``kept_positions`` (sorted) of a ``length``-token segment."""
        new_index = torch.full((length,), -1, dtype=torch.long, device=self.token.device)
        new_index[kept_positions] = torch.arange(kept_positions.numel(), device=self.token.device)
        mapped = new_index[self.token]
        keep = mapped >= 0
        weight = None if self.weight is None else self.weight[keep]
        return Provenance(token=mapped[keep], source=self.source[keep], weight=weight, space=self.space)

    def compose(self, token: torch.Tensor, member: torch.Tensor, length: int) -> "Provenance":
        """Provenance of a new segment whose token ``token[i]`` takes the sources of this segment's
        token ``member[i]`` (a token may list several members: a merge). ``length``: this segment's
        length. ``select`` is the one-to-one case. Weights, when given, carry over, divided among a
        merged token's members (its value is their mean); ``space`` is kept."""
        device = self.token.device
        order = self.token.argsort(stable=True)
        sources = self.source[order]  # grouped by segment token
        weights = None if self.weight is None else self.weight[order]
        counts = torch.bincount(self.token, minlength=length)  # [length] sources per segment token
        starts = counts.cumsum(0) - counts
        member, token = member.to(device), token.to(device)
        per_pair = counts[member]  # [P]
        pair = torch.arange(member.numel(), device=device).repeat_interleave(per_pair)
        first = (per_pair.cumsum(0) - per_pair).repeat_interleave(per_pair)
        within = torch.arange(pair.numel(), device=device) - first
        index = starts[member][pair] + within
        new_token, new_source = token[pair], sources[index]
        order = new_source.argsort(stable=True)
        order = order[new_token[order].argsort(stable=True)]  # by token, then source
        new_weight = None
        if weights is not None:
            members = torch.bincount(token)  # members per new token
            new_weight = (weights[index] / members[new_token])[order]
        return Provenance(token=new_token[order], source=new_source[order], weight=new_weight, space=self.space)


@dataclass
class VisionOutput:
    """The token segment one image contributes to the prompt.

    Attributes:
        embeds: ``[K, D]`` tokens in the order they are spliced at the ``<image>`` position.
        provenance: which source tokens each of the K tokens came from.
        num_newlines: how many of the K tokens are ``image_newline``.
    """

    embeds: torch.Tensor
    provenance: Provenance
    num_newlines: int

    @property
    def num_tokens(self) -> int:
        return int(self.embeds.shape[0])


@dataclass
class LLMInput:
    """The prefill sequence at the input of one stage's decoder layer K (batch size 1).

    Attributes:
        hidden_states: ``[1, L, D]`` input of layer K (the output of layer K-1).
        image_mask: ``[1, L]`` bool, True at image tokens (thumbnail, crops, newlines, merged tokens).
        position_ids: ``[1, L]`` position ids the current sequence ran with.
        signals: every requested LLM signal's value, keyed by its request.
        stage: index of this stage in ``llm_layers``; ``layer``: its decoder layer K.
        num_layers: the decoder's depth.
        original_positions: ``[L]`` prefill position each current token came from (-1 for a token a
            stage merged).
        position_embeddings: ``(cos, sin)``, each ``[1, L, head_dim]``, of ``position_ids``.
        prefill_image_tokens: image tokens of the prefill, before any stage.
        state: scratch space shared by the stages of one prefill (e.g. a seeded generator).
    """

    hidden_states: torch.Tensor
    image_mask: torch.Tensor
    position_ids: torch.Tensor
    signals: dict[Any, Any] = field(default_factory=dict)
    stage: int = 0
    layer: int = 0
    num_layers: int = 0
    original_positions: torch.Tensor | None = None
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None
    prefill_image_tokens: int = 0
    state: dict[str, Any] = field(default_factory=dict)

    @property
    def num_image_tokens(self) -> int:
        return int(self.image_mask.sum())

    def image_span(self) -> tuple[int, int]:
        """``(start, end)`` of the image tokens, which must be one contiguous run (one image)."""
        positions = self.image_mask[0].nonzero().flatten()
        if positions.numel() == 0:
            raise ValueError("the sequence has no image tokens")
        start, end = int(positions[0]), int(positions[-1]) + 1
        if end - start != positions.numel():
            raise ValueError("the image tokens must be one contiguous run (one image per prompt)")
        return start, end


@dataclass
class LLMDecision:
    """What one LLM stage does to the current sequence.

    Attributes:
        keep: ``[k]`` sorted positions of the current sequence that the next layers keep (every text
            position and the last position must be among them).
        merged: ``[M, D]`` new image tokens (merged or recycled), or None.
        merged_at: index, in the new sequence, of the first merged token (they are contiguous).
        merged_token / merged_member: ``[P]`` pairs: merged token ``merged_token[i]`` (0..M-1)
            summarises current position ``merged_member[i]`` (its provenance).
        merged_position_ids: ``[M]`` their position ids; needed when the compressor keeps original
            position ids (with contiguous re-indexing the sequence is renumbered anyway).
    """

    keep: torch.Tensor
    merged: torch.Tensor | None = None
    merged_at: int = 0
    merged_token: torch.Tensor | None = None
    merged_member: torch.Tensor | None = None
    merged_position_ids: torch.Tensor | None = None

    @property
    def num_merged(self) -> int:
        return 0 if self.merged is None else int(self.merged.shape[0])


# ---------------------------------------------------------------------------------------------
# The base class
# ---------------------------------------------------------------------------------------------


def check_ratio(ratio: Any) -> float:
    """Validate a retention ratio: a number in (0, 1]."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
        raise ValueError(f"compressor.ratio must be a number in (0, 1], got {ratio!r}")
    if not 0.0 < float(ratio) <= 1.0:
        raise ValueError(f"compressor.ratio must be in (0, 1] (the fraction of visual tokens kept), got {ratio}")
    return float(ratio)


def check_choice(key: str, value: Any, allowed: tuple[str, ...]) -> str:
    """Validate a string option: ``compressor.<key>`` must be one of ``allowed``."""
    if value not in allowed:
        raise ValueError(f"compressor.{key} must be one of {', '.join(allowed)}; got {value!r}")
    return value


class Compressor:
    """Base class: pass-through at both stages. Subclasses override the stage they act at.

    Class attributes:
        name: registry name (set by ``@register_compressor``).
        identity_at_full_ratio: True when ``ratio=1`` must reproduce the uncompressed model
            exactly; the test suite checks it for every compressor that claims it.
        fixed_ratio: the only ratio a method takes (``none``: 1.0), or None; a sweep's ratio list
            does not apply to it, so a ratio sweep runs it once per model x benchmark.
        adaptive_budget: True for methods that choose their own token count per image (PruMerge+'s
            outlier rule); their ``ratio`` must be None, so a ratio sweep runs them once too.
        uses_projected_features: False for methods that merge in the vision tower's space and
            project only their output (``VisionInput.features`` is then None).
        vision_signals / llm_signals: the signals the pipeline must compute for this compressor.
        llm_layers: decoder layers at whose input ``select_llm_tokens`` runs, one stage each,
            ascending; ``()`` = no LLM stage (``llm_layer`` is the first one).
        llm_positions: ``"original"``: tokens keep their prefill position ids (FastV, DART, SparseVLM
            v2); ``"contiguous"``: the sequence is renumbered after every stage, and decoding
            continues that numbering per layer (PyramidDrop, SparseVLM v1).
        llm_decode: ``"prefill_once"`` selects at prefill and decodes on the pruned caches;
            ``"recompute"`` decodes without a KV cache, every step re-running and re-selecting;
            ``"mask"`` (one stage) keeps every token, re-selects at every forward from the current
            last token and masks the other image tokens as keys from layer K on.
        budget: what ``ratio`` means for this method (``Budget``), or None where not declared.
    """

    name: ClassVar[str] = ""
    identity_at_full_ratio: ClassVar[bool] = True
    fixed_ratio: ClassVar[float | None] = None
    adaptive_budget: ClassVar[bool] = False
    uses_projected_features: ClassVar[bool] = True
    budget: Budget | None = None

    def __init__(self, ratio: float = 1.0) -> None:
        self.ratio = check_ratio(ratio)

    @classmethod
    def ratio_in_sweep(cls, swept: Any) -> Any:
        """The ratio a job of a ratio sweep runs this method at: its fixed ratio, None for an adaptive
        count, else the swept value."""
        if cls.adaptive_budget:
            return None
        return swept if cls.fixed_ratio is None else cls.fixed_ratio

    # -- image level -----------------------------------------------------------------------------
    def transform_image(self, image: "Image.Image", side: int) -> tuple["Image.Image", int]:
        """The image the processor receives and the tile side (tokens) the vision tower encodes it at.

        Default: unchanged (``side`` is the model's, 24 for 336 px / patch 14). ``downsample``
        returns a smaller image and side; the pipeline then cuts tiles of ``side * patch`` pixels.
        """
        return image, side

    # -- vision stage ----------------------------------------------------------------------------
    @property
    def vision_signals(self) -> tuple[VisionSignal, ...]:
        return ()

    def compress_vision(self, inp: VisionInput) -> VisionOutput:
        """Default: vanilla LLaVA-NeXT packing (thumbnail, unpadded crops, a newline per row)."""
        from compressors.packing import pack_spatial

        return pack_spatial(inp.features, inp.layout, inp.newline)

    # -- LLM stage -------------------------------------------------------------------------------
    llm_layers: tuple[int, ...] = ()
    llm_layer_key: ClassVar[str] = "layer"  # the config key that sets the stage layers, for error messages
    llm_positions: str = "original"  # or "contiguous": re-index 0..L'-1 after every stage
    llm_decode: str = "prefill_once"  # or "recompute" (no KV cache) or "mask" (see models.llm_stage)

    @property
    def llm_layer(self) -> int | None:
        """The first stage's decoder layer K (None: no LLM stage). Setting it makes one stage at K."""
        return self.llm_layers[0] if self.llm_layers else None

    @llm_layer.setter
    def llm_layer(self, layer: int | None) -> None:
        self.llm_layers = () if layer is None else (layer,)

    def check_llm_depth(self, num_layers: int) -> None:
        """Fail before the first sample when a stage needs a decoder layer the model lacks (runners
        call this with the depth read from the model's config, before loading weights). Every stage
        of ``llm_layers`` is checked; the message shows the setting as configured."""
        beyond = [layer for layer in self.llm_layers if not layer < num_layers]
        if beyond:
            setting = getattr(self, self.llm_layer_key, self.llm_layer)
            setting = list(setting) if isinstance(setting, (list, tuple)) else setting
            stages = (f" (its stages run at decoder layers {list(self.llm_layers)})"
                      if len(self.llm_layers) > 1 or setting != self.llm_layers[0] else "")
            raise ValueError(
                f"compressor.{self.llm_layer_key}={setting} is beyond the model's depth: it has {num_layers} "
                f"decoder layers (0..{num_layers - 1}), so the LLM stage must run at a layer below {num_layers}"
                + stages
            )

    @property
    def llm_signals(self) -> tuple[LLMSignal, ...]:
        """Signals computed at every LLM stage (relative to that stage's layer K)."""
        return ()

    def llm_query_mask(self, inp: LLMInput) -> torch.Tensor:
        """``[L]`` bool: the query rows of ``AttentionRows(queries="mask")`` (signals other than
        attention rows are already in ``inp.signals``)."""
        raise NotImplementedError(f"{type(self).__name__} asks for AttentionRows(queries='mask') but does not "
                                  "implement llm_query_mask")

    def select_llm_tokens(self, inp: LLMInput) -> torch.Tensor | LLMDecision:
        """The positions the layers from this stage on keep (a sorted ``[L']`` tensor), or an
        ``LLMDecision`` that also adds merged tokens. Default: all."""
        return torch.arange(inp.hidden_states.shape[1], device=inp.hidden_states.device)

    # -- reporting -------------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """The settings that define this compressor, for logs and result files."""
        described = {"name": self.name, "ratio": self.ratio}
        if self.budget is not None:
            described["budget"] = self.budget.as_dict()
        return described

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.describe().items() if k != "name")
        return f"{type(self).__name__}({args})"
