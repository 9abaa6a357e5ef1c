"""Analytic cost of one LLaVA-NeXT sample: FLOPs and KV-cache bytes from the HF config and token counts.

The method is LLM-Viewer's (hahnyuan/LLM-Viewer, the tool the GlobalCom2 and FiCoCo authors point
to for theoretical efficiency): a decoder layer is a list of matrix products whose cost follows from
their shapes (q/k/v/o projections, QK^T, softmax(QK^T)V, the MLP's matrices), counted for the
prefill at the sequence length *that layer* sees (an LLM-stage method such as FastV feeds its layers
from K on fewer tokens) and for one decoding step against each layer's KV cache; the KV cache is
``2 x kv_heads x head_dim`` elements per token per layer. LLM-Viewer has no vision side; here the
CLIP tower (the layers ``encode_tiles`` runs), the patch embedding and the projector are counted the
same way, per tile.

Papers differ in what they count, so every convention is a switch of ``CostConvention`` and every
figure carries the convention it used (``describe()``). The presets in ``conf/cost/``:

* ``default``: what a sample computes. 2 FLOPs per multiply-add, the architecture's MLP (SwiGLU:
  3 matrices), full (non-causal) attention squares, every prompt token, the LM head on the last
  position (``generate`` keeps only its logits). This is what ``FlopCounterMode`` counts.
* ``globalcom2_paper``: the GlobalCom2 efficiency table. Decoder only, visual tokens only (no text,
  no newlines), full attention, 3-matrix MLP, 2 FLOPs per MAC, KV cache in float16; reproduces
  41.7 TFLOPs / 1,536 MB for 2,880 tokens on LLaVA-NeXT-7B (see README, "Cost").
* ``fastv_eq5``: FastV's eq. 5 (``4nd^2 + 2n^2d + 2ndm`` per layer): 1 FLOP per MAC, 2 MLP matrices.

Units: 1 TFLOP = 1e12 FLOPs, 1 MB = 1e6 bytes (the papers' units).
"""

from __future__ import annotations

import statistics
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from enum import Enum
from typing import Any, Optional

import torch

from compressors.base import AttentionRows, ClsAttention, DecoderKeys, DecoderOutput, LayerKeys, PromptEmbeddings
from models.vision import vision_layers_run

TERA = 1e12
MEGA = 1e6
# Decoder families the cost model knows, and how many d x m matrices their MLP has.
MLP_MATRICES = {"llama": 3, "mistral": 3}  # SwiGLU: gate, up, down
KV_DTYPES = {"float16": 2, "bfloat16": 2, "float32": 4}
# LLM-Viewer's element-wise op counts (FLOPs per element): softmax (max, sub, exp, sum, div) per
# attention score; RMSNorm (sum, sub, pow, sum, div, mul, add) per hidden element, two per layer;
# the two residual adds; the MLP activation, which LLM-Viewer counts on the hidden size.
SOFTMAX_OPS, NORM_OPS, NORMS, ADD_OPS, ADDS, ACT_OPS = 5, 7, 2, 1, 2, 2


class AttentionCount(str, Enum):
    """How many (query, key) pairs a prefill attention costs."""

    full = "full"  # every query against every key: LLM-Viewer, FlopCounterMode, the papers
    causal = "causal"  # only keys at or before the query: n (n + 1) / 2 pairs


@dataclass
class CostConvention:
    """What the analytic cost counts. Field values are validated on construction.

    Attributes:
        name: a label carried with every figure (the ``conf/cost`` preset's name).
        flops_per_mac: 2 (a multiply-add is two FLOPs) or 1 (MAC-style, FastV's eq. 5).
        mlp_matrices: ``d x m`` matrices per MLP; None = the architecture's (3 for SwiGLU).
        attention: ``full`` or ``causal`` pair counting at prefill.
        include_text: count the prompt's text tokens (they are never pruned).
        include_newlines: count the ``image_newline`` tokens of the image segment.
        lm_head: count the LM head on the positions whose logits are computed (one per forward).
        elementwise: add LLM-Viewer's element-wise ops (softmax, norms, adds, activation).
        kv_dtype: element type of the KV cache (float16, bfloat16, float32); None = the model's.
    """

    name: str = "default"
    flops_per_mac: int = 2
    mlp_matrices: Optional[int] = None
    attention: AttentionCount = AttentionCount.full
    include_text: bool = True
    include_newlines: bool = True
    lm_head: bool = True
    elementwise: bool = False
    kv_dtype: Optional[str] = None

    def __post_init__(self) -> None:
        if self.flops_per_mac not in (1, 2):
            raise ValueError(f"cost.flops_per_mac must be 1 or 2, got {self.flops_per_mac!r}")
        if self.mlp_matrices not in (None, 2, 3):
            raise ValueError(f"cost.mlp_matrices must be null (the architecture's), 2 or 3, got {self.mlp_matrices!r}")
        try:
            self.attention = AttentionCount(self.attention)
        except ValueError:
            allowed = ", ".join(a.value for a in AttentionCount)
            raise ValueError(f"cost.attention must be one of {allowed}, got {self.attention!r}") from None
        if self.kv_dtype is not None and self.kv_dtype not in KV_DTYPES:
            raise ValueError(f"cost.kv_dtype must be null (the model's) or one of {', '.join(KV_DTYPES)}, "
                             f"got {self.kv_dtype!r}")

    def describe(self) -> dict[str, Any]:
        """JSON-ready fields plus the units, stored beside every figure."""
        return {**asdict(self), "attention": self.attention.value, "tflops": TERA, "mb": MEGA}


# -- shapes -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DecoderShape:
    """The decoder dimensions the cost depends on (from ``config.text_config``)."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    mlp_matrices: int

    @classmethod
    def from_config(cls, text_config) -> "DecoderShape":
        model_type = text_config.model_type
        if model_type not in MLP_MATRICES:
            raise ValueError(f"the cost model does not know decoder type {model_type!r}; "
                             f"known: {', '.join(MLP_MATRICES)}")
        heads = text_config.num_attention_heads
        head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
        return cls(layers=text_config.num_hidden_layers, hidden=text_config.hidden_size, heads=heads,
                   kv_heads=text_config.num_key_value_heads or heads, head_dim=head_dim,
                   intermediate=text_config.intermediate_size, vocab=text_config.vocab_size,
                   mlp_matrices=MLP_MATRICES[model_type])


@dataclass(frozen=True)
class VisionShape:
    """The vision tower as ``encode_tiles`` runs it, plus the projector (per tile)."""

    layers_run: int  # encoder layers run: up to the feature layer or the deepest signal layer
    hidden: int  # C
    intermediate: int  # F (2-matrix GELU MLP)
    tokens: int  # 1 + patches ([CLS] + P)
    patch_macs: int  # 3 * patch^2: MACs of the patch embedding per patch and channel out
    projector: tuple[int, int]  # (C, D): the projector is C -> D, GELU, D -> D

    @classmethod
    def from_config(cls, config, vision_signals: Iterable = ()) -> "VisionShape":
        vision = config.vision_config
        patches = (vision.image_size // vision.patch_size) ** 2
        return cls(layers_run=vision_layers_run(config, tuple(vision_signals)), hidden=vision.hidden_size,
                   intermediate=vision.intermediate_size, tokens=1 + patches,
                   patch_macs=vision.num_channels * vision.patch_size ** 2,
                   projector=(vision.hidden_size, config.text_config.hidden_size))


# -- token accounting ------------------------------------------------------------------------------


@dataclass(frozen=True)
class PrefillTokens:
    """The tokens every decoder layer sees at prefill.

    Attributes:
        layer_lengths: positions at each decoder layer's input (text + image segment).
        layer_newlines: ``image_newline`` tokens among them, per layer.
        text: text positions (every layer keeps all of them).
        query_rows: per LLM stage, the query rows each ``AttentionRows`` signal used (the hook's
            record); needed for ``instruction``/``mask`` queries, whose number is data-dependent.
    """

    layer_lengths: tuple[int, ...]
    layer_newlines: tuple[int, ...]
    text: int
    query_rows: tuple[Mapping[Any, int], ...] = ()  # per LLM stage: query rows of each AttentionRows signal

    @classmethod
    def uniform(cls, layers: int, visual: int, text: int = 0, newlines: int = 0) -> "PrefillTokens":
        """Every layer sees the same ``text + visual`` tokens (``visual`` includes ``newlines``)."""
        return cls((text + visual,) * layers, (newlines,) * layers, text)

    @classmethod
    def from_result(cls, result) -> "PrefillTokens":
        """From a ``GenerationResult`` (its per-layer lengths and newline counts, its signals' query rows)."""
        return cls(tuple(result.layer_lengths), tuple(result.layer_newlines),
                   result.prompt_tokens - result.visual_tokens_spliced,
                   tuple(dict(rows) for rows in getattr(result, "signal_query_rows", ())))

    def counted(self, convention: CostConvention) -> list[int]:
        """Per layer, the tokens the convention counts."""
        text = 0 if convention.include_text else self.text
        return [length - text - (0 if convention.include_newlines else newlines)
                for length, newlines in zip(self.layer_lengths, self.layer_newlines)]


# -- FLOPs -------------------------------------------------------------------------------------------


def attention_pairs(queries: int, keys: int, attention: AttentionCount) -> int:
    """(query, key) pairs of one attention: ``queries x keys``, or the causal triangle at prefill
    (``queries == keys``); a decoding step (one query) is the same either way."""
    if attention is AttentionCount.causal and queries == keys:
        return queries * (queries + 1) // 2
    return queries * keys


def decoder_layer_flops(shape: DecoderShape, queries: int, keys: int, convention: CostConvention) -> dict[str, int]:
    """FLOPs of one decoder layer on ``queries`` new tokens attending to ``keys`` tokens.

    ``attention_projections``: q and o (``d x H*hd``) and k, v (``d x kvH*hd``) per token;
    ``attention_scores``: QK^T and softmax(.)V, ``H*hd`` MACs each per (query, key) pair;
    ``mlp``: ``mlp_matrices`` matrices of ``d x m`` per token; ``elementwise`` (optional):
    LLM-Viewer's softmax, norm, residual-add and activation ops.
    """
    mac = convention.flops_per_mac
    matrices = convention.mlp_matrices or shape.mlp_matrices
    q_width, kv_width = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    pairs = attention_pairs(queries, keys, convention.attention)
    flops = {
        "attention_projections": mac * queries * shape.hidden * (2 * q_width + 2 * kv_width),
        "attention_scores": mac * 2 * q_width * pairs,
        "mlp": mac * queries * matrices * shape.hidden * shape.intermediate,
    }
    if convention.elementwise:
        flops["elementwise"] = (SOFTMAX_OPS * shape.heads * pairs
                                + (NORM_OPS * NORMS + ADD_OPS * ADDS + ACT_OPS) * shape.hidden * queries)
    return flops


def _add(total: dict[str, int], part: Mapping[str, int]) -> None:
    for key, value in part.items():
        total[key] = total.get(key, 0) + value


def prefill_flops(shape: DecoderShape, tokens: PrefillTokens, convention: CostConvention) -> dict[str, int]:
    """Prefill FLOPs by op, summed over the decoder layers at their own lengths, plus the LM head
    on the last position (if counted). ``total`` is the sum."""
    counted = tokens.counted(convention)
    if len(counted) != shape.layers:
        raise ValueError(f"token counts cover {len(counted)} decoder layers, the model has {shape.layers}")
    total: dict[str, int] = {}
    for length in counted:
        _add(total, decoder_layer_flops(shape, length, length, convention))
    total["lm_head"] = convention.flops_per_mac * shape.hidden * shape.vocab if convention.lm_head else 0
    total["total"] = sum(total.values())
    return total


def decode_step_flops(shape: DecoderShape, tokens: PrefillTokens, convention: CostConvention, step: int = 1) -> int:
    """FLOPs of decoding step ``step`` (1 = the first forward after the prefill): one new token per
    layer, attending to that layer's counted prefill tokens, the ``step - 1`` earlier new tokens and
    itself; plus the LM head on it."""
    if step < 1:
        raise ValueError(f"decoding steps count from 1, got {step}")
    total = sum(sum(decoder_layer_flops(shape, 1, length + step, convention).values())
                for length in tokens.counted(convention))
    return total + (convention.flops_per_mac * shape.hidden * shape.vocab if convention.lm_head else 0)


def vision_flops(shape: VisionShape, num_tiles: int, convention: CostConvention,
                 projected_tokens: int | None = None) -> dict[str, int]:
    """Vision-side FLOPs of one image by part: the patch embedding, the encoder layers that run
    (q, k, v, o projections, full bidirectional attention over ``1 + P`` tokens, a 2-matrix MLP)
    and the 2-layer projector on the P patch tokens, for every tile (or on ``projected_tokens``
    tokens, for methods that project only their own output). ``total`` is the sum.

    Only ``flops_per_mac`` applies here: CLIP's attention is bidirectional (never causal), and
    LLM-Viewer's element-wise ops are a decoder convention.
    """
    mac = convention.flops_per_mac
    n, c, patches = shape.tokens, shape.hidden, shape.tokens - 1
    per_layer = 4 * n * c * c + 2 * n * n * c + 2 * n * c * shape.intermediate
    vision_in, text_hidden = shape.projector
    flops = {
        "patch_embedding": mac * num_tiles * patches * shape.patch_macs * c,
        "encoder": mac * num_tiles * shape.layers_run * per_layer,
        "projector": mac * (num_tiles * patches if projected_tokens is None else projected_tokens)
        * (vision_in * text_hidden + text_hidden * text_hidden),
    }
    flops["total"] = sum(flops.values())
    return flops


def vision_signal_macs(shape: VisionShape, request: Any) -> int | None:
    """MACs of one vision signal per tile (None for a type the cost model does not know).

    ``ClsAttention``: the [CLS] query (``C x C``), the keys of all ``1 + P`` tokens (``C x C`` each)
    and their dot products with the query (``C`` each). ``LayerKeys``: the keys of all ``1 + P``
    tokens.
    """
    c, n = shape.hidden, shape.tokens
    if isinstance(request, ClsAttention):
        return c * c + n * c * c + n * c
    if isinstance(request, LayerKeys):
        return n * c * c
    return None


def llm_signal_macs(shape: DecoderShape, request: Any, length: int, rows: int = 1) -> int | None:
    """MACs of one LLM signal at one stage whose input has ``length`` tokens (None: a type the cost
    model does not know).

    ``AttentionRows`` with ``rows`` query rows (1 for ``"last"``; for ``"instruction"``/``"mask"``
    the number the stage used, from the hook's record): every row against every key, per head (the
    softmax needs the whole row); with ``layer="stage"`` also the key projection of every token and
    the query projection of the rows (with ``"previous"`` the layer's own projections are reused,
    already counted). ``DecoderKeys``, ``DecoderOutput`` and ``PromptEmbeddings`` reuse what the
    layers computed. Element-wise RoPE and norms are left out.
    """
    if isinstance(request, AttentionRows):
        macs = shape.heads * shape.head_dim * length * rows
        if request.layer == "stage":
            macs += shape.hidden * shape.head_dim * (shape.kv_heads * length + shape.heads * rows)  # k_proj, q_proj
        return macs
    if isinstance(request, (DecoderKeys, DecoderOutput, PromptEmbeddings)):
        return 0
    return None


def llm_signal_flops(shape: DecoderShape, request: Any, length: int, rows: int,
                     convention: CostConvention) -> int | None:
    """FLOPs of one LLM signal at one stage: its MACs (``llm_signal_macs``) at ``flops_per_mac``, plus,
    with ``elementwise``, the softmax of its attention rows (``SOFTMAX_OPS`` per score, as the layers')."""
    macs = llm_signal_macs(shape, request, length, rows)
    if macs is None:
        return None
    flops = convention.flops_per_mac * macs
    if convention.elementwise and isinstance(request, AttentionRows):
        flops += SOFTMAX_OPS * shape.heads * rows * length
    return flops


def signal_rows(tokens: PrefillTokens, stage: int, request: Any) -> int:
    """Query rows of ``request`` at ``stage``: 1 for the last token, else what the hook recorded."""
    if not isinstance(request, AttentionRows) or request.queries == "last":
        return 1
    recorded = tokens.query_rows[stage] if stage < len(tokens.query_rows) else {}
    if request not in recorded:
        raise ValueError(f"the cost of {request!r} at LLM stage {stage} needs the number of query rows it used "
                         "(PrefillTokens.query_rows, from the LLM-stage hook's record: "
                         "GenerationResult.signal_query_rows); none was recorded")
    return int(recorded[request])


def kv_cache_bytes(shape: DecoderShape, tokens: PrefillTokens, convention: CostConvention,
                   model_dtype: torch.dtype | None = None) -> int:
    """KV-cache bytes after the prefill: every layer keeps K and V (``kv_heads x head_dim`` each) for
    every token it saw, in ``convention.kv_dtype`` (or the model's dtype)."""
    if convention.kv_dtype is not None:
        element = KV_DTYPES[convention.kv_dtype]
    elif model_dtype is not None:
        element = torch.finfo(model_dtype).bits // 8
    else:
        raise ValueError("kv_cache_bytes needs cost.kv_dtype or the model's dtype")
    per_token = 2 * shape.kv_heads * shape.head_dim * element
    return per_token * sum(tokens.counted(convention))


# -- per sample and per run ------------------------------------------------------------------------


class CostModel:
    """The analytic cost of one model x compressor under one convention.

    The compressor's own signals are counted where they run: vision signals in the vision figure
    (a deeper signal layer also runs more CLIP layers), LLM signals in the prefill (key
    ``signals``). A signal type the cost model does not know is left out, with a warning.

    Args:
        config: the model's ``LlavaNextConfig`` (or any config with the same fields).
        convention: what to count.
        dtype: the model's dtype (the KV cache's, unless the convention fixes one).
        compressor: the compressor whose signals and LLM layer to count (None: vanilla).
    """

    def __init__(self, config, convention: CostConvention, dtype: torch.dtype | None = None,
                 compressor: Any = None) -> None:
        self.vision_signals = tuple(compressor.vision_signals) if compressor is not None else ()
        self.llm_signals = tuple(compressor.llm_signals) if compressor is not None else ()
        self.llm_layers = tuple(compressor.llm_layers) if compressor is not None else ()
        # methods that merge in CLIP space project only the tokens they emit
        self.projects_own_output = compressor is not None and not compressor.uses_projected_features
        self.decoder = DecoderShape.from_config(config.text_config)
        self.vision = VisionShape.from_config(config, self.vision_signals)
        self.convention = convention
        self.dtype = dtype
        unknown = [r for r in self.vision_signals if vision_signal_macs(self.vision, r) is None]
        unknown += [r for r in self.llm_signals if llm_signal_macs(self.decoder, r, 0) is None]
        if unknown:
            warnings.warn(f"the cost model does not count the signals {unknown}; their FLOPs are left out",
                          stacklevel=2)

    def prefill(self, tokens: PrefillTokens) -> dict[str, int]:
        """Prefill FLOPs by op (``prefill_flops``), plus the LLM signals of every stage at its input
        length (layer K-1's) and with the query rows it used."""
        flops = prefill_flops(self.decoder, tokens, self.convention)
        if self.llm_signals and self.llm_layers:
            flops["signals"] = sum(
                llm_signal_flops(self.decoder, r, tokens.layer_lengths[layer - 1], signal_rows(tokens, stage, r),
                                 self.convention) or 0
                for stage, layer in enumerate(self.llm_layers) for r in self.llm_signals)
            flops["total"] += flops["signals"]
        return flops

    def decode_step(self, tokens: PrefillTokens, step: int = 1) -> int:
        return decode_step_flops(self.decoder, tokens, self.convention, step)

    def vision_tower(self, num_tiles: int, tokens_per_tile: int | None = None,
                     projected_tokens: int | None = None) -> dict[str, int]:
        """Vision FLOPs by part (``vision_flops``), plus the vision signals (key ``signals``).

        ``tokens_per_tile``: patch tokens per tile when the tiles are not the tower's size
        (``downsample``); ``projected_tokens``: tokens through the projector when not every patch.
        """
        shape = self.vision if tokens_per_tile is None else replace(self.vision, tokens=1 + tokens_per_tile)
        flops = vision_flops(shape, num_tiles, self.convention, projected_tokens)
        if self.vision_signals:
            macs = sum(vision_signal_macs(shape, r) or 0 for r in self.vision_signals)
            flops["signals"] = self.convention.flops_per_mac * num_tiles * macs
            flops["total"] += flops["signals"]
        return flops

    def vision_of(self, result) -> dict[str, int]:
        """``vision_tower`` for a ``GenerationResult``: its tiles, their size, what was projected."""
        projected = result.visual_tokens_spliced if self.projects_own_output else None
        return self.vision_tower(result.layout.num_tiles, result.layout.tokens_per_tile, projected)

    def kv_cache(self, tokens: PrefillTokens) -> int:
        return kv_cache_bytes(self.decoder, tokens, self.convention, self.dtype)

    def sample(self, result) -> dict[str, float]:
        """The per-sample record keys: prefill and vision TFLOPs, KV-cache MB of a ``GenerationResult``."""
        tokens = PrefillTokens.from_result(result)
        return {
            "prefill_tflops": self.prefill(tokens)["total"] / TERA,
            "vision_tflops": self.vision_of(result)["total"] / TERA,
            "kv_cache_mb": self.kv_cache(tokens) / MEGA,
        }


COST_KEYS = ("prefill_tflops", "vision_tflops", "kv_cache_mb")


def cost_summary(records: Sequence[Mapping[str, Any]], convention: CostConvention) -> dict[str, Any]:
    """A run's ``cost``: the mean of each per-sample cost key (None when no record has it), and the
    convention they were computed under."""
    means = {}
    for key in COST_KEYS:
        values = [r[key] for r in records if r.get(key) is not None]
        means[key] = statistics.fmean(values) if values else None
    return {**means, "convention": convention.describe()}


def counted_flops(fn) -> tuple[int, dict[str, int]]:
    """What torch's ``FlopCounterMode`` counts while ``fn()`` runs: the total and the total per module.

    The CPU's fused SDPA kernel (``_scaled_dot_product_flash_attention_for_cpu``) has no formula in
    torch, so it gets torch's own GPU SDPA formula (``2 s_q s_k d`` per head for QK^T and as much for
    the value product: full squares, GQA heads broadcast).
    """
    from torch.utils import flop_counter

    def cpu_sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)

    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_sdpa}
    with flop_counter.FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn()
    per_module = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    return counter.get_total_flops(), per_module
