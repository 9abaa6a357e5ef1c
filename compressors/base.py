"""The compressor interface: two stages, declared signals, plain-tensor inputs and outputs.

A compressor can act at two points of the LLaVA-NeXT pipeline; it overrides the hook of the stage
it uses and inherits the pass-through for the other one:

* **image level** (``transform_image``): before the processor, may hand the vision tower a smaller
  image at a smaller tile size (``downsample``);
* **vision stage** (``compress_vision``): sees one image's projected tile features with its AnyRes
  layout (and, for methods that merge in CLIP space, the vision tower's features and the
  projector) and returns the token segment spliced into the prompt (GlobalCom2, HiRED, VisionZip,
  ...).
* **LLM stage** (``llm_layer`` + ``select_llm_tokens``): at the input of decoder layer K, during
  prefill, picks which sequence positions the layers from K on keep (FastV, ...).

Expensive signals (a vision layer's [CLS] attention, the last prompt token's attention inside the
LLM) are computed by the pipeline only when a compressor lists them in ``vision_signals`` /
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


@dataclass(frozen=True)
class LayerKeys(VisionSignal):
    """Key projections of one vision-tower layer, per head, for every token ([CLS] first).

    Value in ``VisionInput.signals[request]``: ``[num_tiles, 1 + side**2, heads, head_dim]``, the
    layer's ``k_proj`` (bias included) applied to its normed input: the keys its attention uses.
    """


@dataclass(frozen=True)
class LLMSignal:
    """Base of LLM-stage signals; each type has one provider in ``models.llm_stage``."""


@dataclass(frozen=True)
class LastTokenAttention(LLMSignal):
    """Post-softmax attention of the last prompt token at decoder layer ``llm_layer - 1``, per head.

    Value in ``LLMInput.signals[request]`` (and ``LLMInput.attention``): ``[batch, heads, seq]``
    (rows sum to 1 over unmasked keys).
    """


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
    """The prefill sequence at the input of decoder layer ``llm_layer`` (batch size 1).

    Attributes:
        hidden_states: ``[1, L, D]`` input of layer K.
        image_mask: ``[1, L]`` bool, True at image-token positions (thumbnail, crops, newlines).
        position_ids: ``[1, L]`` position ids of the sequence.
        attention: ``[1, heads, L]`` the ``LastTokenAttention`` value, if requested, else None.
        signals: every requested LLM signal's value, keyed by its request.
    """

    hidden_states: torch.Tensor
    image_mask: torch.Tensor
    position_ids: torch.Tensor
    attention: torch.Tensor | None = None
    signals: dict[Any, torch.Tensor] = field(default_factory=dict)


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
        llm_layer: decoder layer K at whose input ``select_llm_tokens`` runs; None = no LLM stage.
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
    llm_layer: int | None = None
    llm_layer_key: ClassVar[str] = "layer"  # the config key that sets llm_layer, for error messages

    def check_llm_depth(self, num_layers: int) -> None:
        """Fail before the first sample when the LLM stage needs a decoder layer the model lacks
        (runners call this with the depth read from the model's config, before loading weights)."""
        if self.llm_layer is not None and not self.llm_layer < num_layers:
            raise ValueError(
                f"compressor.{self.llm_layer_key}={self.llm_layer} is beyond the model's depth: it has {num_layers} "
                f"decoder layers (0..{num_layers - 1}), so the LLM stage must run at a layer below {num_layers}"
            )

    @property
    def llm_signals(self) -> tuple[LLMSignal, ...]:
        return ()

    def select_llm_tokens(self, inp: LLMInput) -> torch.Tensor:
        """Sorted sequence positions ``[L']`` that layers ``llm_layer..`` keep. Default: all."""
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
