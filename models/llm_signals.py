"""LLM-stage signals: one provider per request type, each computed from the layers' own modules.

No layer switches to eager attention. Layer K-1's q_proj/k_proj outputs are kept by forward hooks
while that layer runs (they are computed anyway); layer K's projections are applied to the stage
input only for ``AttentionRows(layer="stage")``. A provider computes only what some stage asks
for, and only at prefill (or at every forward in the ``mask`` decode mode).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from compressors.base import AttentionRows, DecoderKeys, DecoderOutput, LLMInput, LLMSignal, PromptEmbeddings


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, module_name: str) -> torch.Tensor:
    """The decoder's own RoPE on ``x`` ``[1, heads, S, d]`` with ``cos``/``sin`` ``[1, S, d]``."""
    rotate_half = sys.modules[module_name].rotate_half
    cos, sin = cos.unsqueeze(1).to(x.device), sin.unsqueeze(1).to(x.device)
    return x * cos + rotate_half(x) * sin


def split_heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """``[1, S, heads * d]`` projection output -> ``[1, heads, S, d]``."""
    return x.view(x.shape[0], x.shape[1], -1, head_dim).transpose(1, 2)


def attention_probs(attn: nn.Module, query: torch.Tensor, key: torch.Tensor, query_index: torch.Tensor,
                    mask_2d: torch.Tensor | None, dtype: str) -> torch.Tensor:
    """Post-softmax attention of some query rows over every key, causal and padding-masked.

    Args:
        attn: the layer's attention module (``scaling``).
        query: ``[1, H, Q, d]`` rotated queries at sequence positions ``query_index`` ``[Q]``.
        key: ``[1, kvH, L, d]`` rotated keys (GQA heads are repeated here).
        mask_2d: ``[1, L]`` padding mask (1 = attend) or None.
        dtype: ``"float32"`` (q.k and softmax in float32, or float64 in a float64 model) or ``"model"``
            (q.k in the model dtype and the float32 softmax rounded back to it: eager attention's arithmetic).
    Returns:
        ``[1, H, Q, L]`` probabilities (float32, or the model dtype for ``"model"``).
    """
    key = key.to(query.device).repeat_interleave(query.shape[1] // key.shape[1], dim=1)  # [1, H, L, d]
    if dtype == "float32":
        compute = score_dtype(query.dtype)
        query, key = query.to(compute), key.to(compute)
    logits = torch.matmul(query, key.transpose(-1, -2)) * attn.scaling  # [1, H, Q, L]
    length = key.shape[2]
    allowed = torch.arange(length, device=query.device)[None, :] <= query_index.to(query.device)[:, None]  # [Q, L]
    if mask_2d is not None:
        allowed = allowed & (mask_2d[0].to(query.device) != 0)[None, :]
    logits = logits.masked_fill(~allowed, torch.finfo(logits.dtype).min)
    if dtype == "float32":
        return logits.softmax(dim=-1)
    return logits.softmax(dim=-1, dtype=torch.float32).to(query.dtype)  # eager attention's rounding


def score_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of ``score_dtype="float32"`` arithmetic: float32, or the model's if it is wider."""
    return torch.promote_types(dtype, torch.float32)


@dataclass
class StageContext:
    """What providers see at one stage: the stage input and how its sequence ran."""

    layer: int  # decoder layer K of the stage
    hidden: torch.Tensor  # [1, L, D] stage input (at a mask-mode decode step: the new tokens only)
    position_embeddings: tuple[torch.Tensor, torch.Tensor]  # (cos, sin) [1, L, d] of the current forward's tokens
    mask_2d: torch.Tensor | None  # [1, L] padding mask of the whole current sequence
    cache: Any  # the KV cache (read at mask-mode decode steps)
    prefill: bool


class ProjectionCapture:
    """Forward hooks that keep layer K-1's q_proj (last row or all rows) and k_proj outputs of the
    current forward, for every stage layer K whose previous layer some signal reads."""

    def __init__(self, layers: list[nn.Module], stage_layers: tuple[int, ...], full_query: bool) -> None:
        self.layers = layers
        self.full_query = full_query
        self.query: dict[int, torch.Tensor] = {}
        self.key: dict[int, torch.Tensor] = {}
        self._handles = []
        for stage_layer in stage_layers:
            attn = layers[stage_layer - 1].self_attn
            self._handles.append(attn.q_proj.register_forward_hook(self._keeper(self.query, stage_layer, True)))
            self._handles.append(attn.k_proj.register_forward_hook(self._keeper(self.key, stage_layer, False)))

    def _keeper(self, store: dict, stage_layer: int, is_query: bool):
        def keep(module, args, output):
            store[stage_layer] = output if (not is_query or self.full_query) else output[:, -1:]

        return keep

    def get(self, stage_layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        if stage_layer not in self.query or stage_layer not in self.key:
            raise RuntimeError(f"layer {stage_layer - 1}'s q/k projections did not run before layer {stage_layer}")
        return self.query[stage_layer], self.key[stage_layer]

    def clear(self) -> None:
        self.query.clear()
        self.key.clear()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self.clear()


def query_positions(request: AttentionRows, inp: LLMInput, query_mask: torch.Tensor | None) -> torch.Tensor:
    """``[Q]`` sequence positions of the request's query rows."""
    length = inp.image_mask.shape[1]
    device = inp.image_mask.device
    if request.queries == "last":
        return torch.tensor([length - 1], device=device)
    if request.queries == "instruction":
        image_positions = inp.image_mask[0].nonzero().flatten()
        after = int(image_positions[-1]) + 1 if image_positions.numel() else 0
        return torch.arange(after, length, device=device)
    if query_mask is None or query_mask.dtype != torch.bool or query_mask.shape != (length,):
        raise ValueError(f"llm_query_mask must return a [{length}] bool tensor, got "
                         f"{None if query_mask is None else (tuple(query_mask.shape), query_mask.dtype)}")
    positions = query_mask.nonzero().flatten()
    if positions.numel() == 0:
        raise ValueError("llm_query_mask selected no query positions")
    return positions


class SignalProviders:
    """Every provider one hook needs, installed once and asked at each stage.

    Args:
        language_model: the ``LlamaModel``/``MistralModel``.
        layers: its decoder layers.
        requests: the compressor's ``llm_signals``.
        stage_layers: the stage layers K.
    """

    def __init__(self, language_model: nn.Module, layers: list[nn.Module], requests: tuple[LLMSignal, ...],
                 stage_layers: tuple[int, ...]) -> None:
        self.check(requests)
        self.lm = language_model
        self.layers = layers
        self.requests = tuple(requests)
        previous = [r for r in requests if isinstance(r, DecoderKeys)
                    or (isinstance(r, AttentionRows) and r.layer == "previous")]
        full_query = any(isinstance(r, AttentionRows) and r.layer == "previous" and r.queries != "last"
                         for r in previous)
        self.capture = ProjectionCapture(layers, stage_layers, full_query) if previous else None
        self.prompt_embeddings: torch.Tensor | None = None
        self.rows: dict[AttentionRows, int] = {}  # query rows each attention signal used at the last stage

    @staticmethod
    def check(requests: tuple[LLMSignal, ...]) -> None:
        """An unknown request type fails, naming the ones the pipeline can compute."""
        for request in requests:
            if type(request) not in LLM_SIGNAL_TYPES:
                known = ", ".join(t.__name__ for t in LLM_SIGNAL_TYPES)
                raise ValueError(f"unknown LLM signal {request!r}; the pipeline can compute: {known}")

    def remove(self) -> None:
        if self.capture is not None:
            self.capture.remove()

    def new_forward(self) -> None:
        if self.capture is not None:
            self.capture.clear()

    def compute(self, ctx: StageContext, inp: LLMInput, compressor) -> dict[Any, Any]:
        """Fill ``inp.signals``: plain signals first, then attention rows (whose ``"mask"`` queries
        the compressor chooses seeing the other signals)."""
        signals = inp.signals
        for request in self.requests:
            if isinstance(request, DecoderKeys):
                signals[request] = self._keys(ctx).repeat_interleave(
                    self.layers[ctx.layer - 1].self_attn.num_key_value_groups, dim=1)
            elif isinstance(request, DecoderOutput):
                signals[request] = self.lm.norm(ctx.hidden) if request.normed else ctx.hidden
            elif isinstance(request, PromptEmbeddings):
                signals[request] = self.prompt_embeddings
        query_mask = None
        self.rows = {}
        for request in self.requests:
            if isinstance(request, AttentionRows):
                if request.queries == "mask" and query_mask is None:
                    query_mask = compressor.llm_query_mask(inp)
                signals[request] = self._attention(request, ctx, inp, query_mask)
                self.rows[request] = signals[request].shape[2]  # [1, H, Q, L]: Q, for the cost model
        if self.capture is not None:
            self.capture.query.pop(ctx.layer, None)
            self.capture.key.pop(ctx.layer, None)
        return signals

    # -- the computations ------------------------------------------------------------------------
    def _keys(self, ctx: StageContext) -> torch.Tensor:
        """Layer K-1's rotated keys of the whole current sequence, ``[1, kvH, L, d]``."""
        attn = self.layers[ctx.layer - 1].self_attn
        _, key = self.capture.get(ctx.layer)
        if not ctx.prefill:  # mask-mode decode: that layer's cache holds every rotated key
            return ctx.cache.layers[ctx.layer - 1].keys
        cos, sin = ctx.position_embeddings
        return apply_rope(split_heads(key, attn.head_dim), cos, sin, type(attn).__module__)

    def _attention(self, request: AttentionRows, ctx: StageContext, inp: LLMInput,
                   query_mask: torch.Tensor | None) -> torch.Tensor:
        index = query_positions(request, inp, query_mask)  # [Q] positions in the whole sequence
        local = index - (inp.image_mask.shape[1] - ctx.hidden.shape[1])  # [Q] among this forward's tokens
        cos, sin = (t[:, local.to(t.device)] for t in ctx.position_embeddings)  # [1, Q, d]
        if request.layer == "previous":
            attn = self.layers[ctx.layer - 1].self_attn
            query, _ = self.capture.get(ctx.layer)  # [1, T, H*d] (all rows) or [1, 1, H*d] (the last)
            query = query[:, local.to(query.device)] if query.shape[1] == ctx.hidden.shape[1] else query
            key = self._keys(ctx)
        else:  # "stage": layer K's own input norm and projections on the stage input
            attn = self.layers[ctx.layer].self_attn
            normed = self.layers[ctx.layer].input_layernorm(ctx.hidden)  # [1, L, D]
            full_cos, full_sin = ctx.position_embeddings
            key = apply_rope(split_heads(attn.k_proj(normed), attn.head_dim), full_cos, full_sin,
                             type(attn).__module__)
            query = attn.q_proj(normed[:, local.to(normed.device)])  # [1, Q, H*d]
        query = apply_rope(split_heads(query, attn.head_dim), cos, sin, type(attn).__module__)
        return attention_probs(attn, query, key, index, ctx.mask_2d, request.dtype)


LLM_SIGNAL_TYPES: tuple[type, ...] = (AttentionRows, DecoderKeys, DecoderOutput, PromptEmbeddings)
