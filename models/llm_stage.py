"""LLM-stage pruning inside transformers' Llama/Mistral decoder, without forking the modeling code.

While ``LLMStagePruning`` is active, the language model's ``forward`` is replaced *on that
instance* by a decoder loop equal to transformers' (``LlamaModel.forward`` in 5.24) except at
layer K:

* prefill: the compressor sees the input of layer K (and, if it asks, the last prompt token's
  attention at layer K-1, computed from that layer's own q/k projections: one query row, SDPA
  stays on) and returns the positions to keep; layers K.. run on those positions only, each
  keeping its original position id (RoPE sees the gaps, as in FastV);
* decoding: layers < K keep the full KV cache, layers >= K the pruned one; the padding mask of
  layers >= K is the prefill mask at the kept positions plus the new tokens, and new tokens
  continue the original positions (``generate`` computes them from the full-length mask).

Layer 0 stays full, so ``generate``'s own bookkeeping (cache length from layer 0) is unchanged.
Without a KV cache every forward is a prefill and selects afresh (the authors' no-cache loop).
Batch size 1 only: kept counts differ per row, which would make the batch ragged.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast

from compressors.base import Compressor, LastTokenAttention, LLMInput
from models.timing import stopwatch


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, module_name: str) -> torch.Tensor:
    """Apply the decoder's own RoPE to ``x`` ``[B, heads, S, d]`` with ``cos``/``sin`` ``[B, S, d]``."""
    rotate_half = sys.modules[module_name].rotate_half
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


def last_token_attention(
    attn: nn.Module,
    query_states: torch.Tensor,
    key_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    attention_mask_2d: torch.Tensor | None,
) -> torch.Tensor:
    """Post-softmax attention of the last position over the whole sequence, per head.

    Args:
        attn: the layer's ``LlamaAttention``/``MistralAttention`` (for head sizes and scaling).
        query_states: ``[1, 1, H*d]`` q_proj output at the last position.
        key_states: ``[1, L, kvH*d]`` k_proj output at every position.
        position_embeddings: ``(cos, sin)``, each ``[1, L, d]``.
        attention_mask_2d: ``[1, L]`` padding mask (1 = attend) or None.
    Returns:
        ``[1, H, L]`` float32 probabilities, equal to eager attention's last row.
    """
    head_dim = attn.head_dim
    cos, sin = position_embeddings
    module = type(attn).__module__
    q = query_states.view(1, 1, -1, head_dim).transpose(1, 2)  # [1, H, 1, d]
    k = key_states.view(1, key_states.shape[1], -1, head_dim).transpose(1, 2)  # [1, kvH, L, d]
    q = _rotate(q, cos[:, -1:], sin[:, -1:], module)
    k = _rotate(k, cos, sin, module)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # GQA: [1, H, L, d]
    logits = torch.matmul(q.float(), k.float().transpose(-1, -2)).squeeze(2) * attn.scaling  # [1, H, L]
    if attention_mask_2d is not None:
        logits = logits.masked_fill(attention_mask_2d[:, None, :] == 0, torch.finfo(logits.dtype).min)
    return logits.softmax(dim=-1)


class _ProjectionProbe:
    """Forward hooks keeping layer K-1's q_proj output at the last position and its k_proj output."""

    def __init__(self, attn: nn.Module) -> None:
        self.query: torch.Tensor | None = None
        self.key: torch.Tensor | None = None
        self._handles = [
            attn.q_proj.register_forward_hook(self._keep_query),
            attn.k_proj.register_forward_hook(self._keep_key),
        ]

    def _keep_query(self, module, args, output) -> None:
        self.query = output[:, -1:]

    def _keep_key(self, module, args, output) -> None:
        self.key = output

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


@dataclass
class PruningRecord:
    """What the LLM stage did to one prompt: the kept positions and per-layer lengths."""

    keep: torch.Tensor | None = None  # [L'] kept prefill positions
    prefill_length: int = 0
    kept_image_tokens: int = 0
    layer_lengths: list[int] = field(default_factory=list)
    select_s: float = 0.0  # scoring + selection time, when timed


class LLMStagePruning:
    """Context manager that makes ``language_model`` prune per ``compressor`` at ``llm_layer``.

    Args:
        language_model: the ``LlamaModel``/``MistralModel`` inside LLaVA-NeXT.
        compressor: supplies ``llm_layer``, ``llm_signals`` and ``select_llm_tokens``.
        image_mask: ``[1, L]`` bool, image-token positions of the prompt that will be prefilled.
        timed: record the scoring + selection time in ``record.select_s`` (device-synchronised,
            for benchmarks).
    """

    def __init__(self, language_model: nn.Module, compressor: Compressor, image_mask: torch.Tensor,
                 timed: bool = False) -> None:
        layer = compressor.llm_layer
        num_layers = language_model.config.num_hidden_layers
        if layer is None or not 1 <= layer < num_layers:
            raise ValueError(f"llm_layer must be in 1..{num_layers - 1} for this model, got {layer}")
        if image_mask.shape[0] != 1:
            raise ValueError(f"LLM-stage pruning supports batch size 1, got a batch of {image_mask.shape[0]}")
        self.lm = language_model
        self.compressor = compressor
        self.layer = layer
        self.image_mask = image_mask
        self.wants_attention = any(isinstance(s, LastTokenAttention) for s in compressor.llm_signals)
        self.record = PruningRecord()
        self.timed = timed

    def __enter__(self) -> "LLMStagePruning":
        self.lm.forward = self._forward  # instance attribute shadows the class method
        return self

    def __exit__(self, *exc) -> None:
        del self.lm.forward

    def _mask(self, **kwargs):
        config = self.lm.config
        if getattr(config, "sliding_window", None) is not None:
            return create_sliding_window_causal_mask(config=config, **kwargs)
        return create_causal_mask(config=config, **kwargs)

    def _forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        lm, config = self.lm, self.lm.config
        if inputs_embeds is None:
            inputs_embeds = lm.embed_tokens(input_ids)
        if inputs_embeds.shape[0] != 1:
            raise ValueError(f"LLM-stage pruning supports batch size 1, got {inputs_embeds.shape[0]}")
        use_cache = config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache(config=config)
        past = cache.get_seq_length() if cache is not None else 0  # layer 0 is never pruned
        if position_ids is None:
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device)[None] + past
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError("LLM-stage pruning needs a 2-D padding mask (or none)")

        hidden = inputs_embeds  # [1, S, D]
        position_embeddings = lm.rotary_emb(hidden, position_ids=position_ids)  # (cos, sin): [1, S, d]
        mask = self._mask(inputs_embeds=hidden, attention_mask=attention_mask, cache=cache,
                          position_ids=position_ids)
        prefill = past == 0
        if prefill:
            self.record = PruningRecord(prefill_length=hidden.shape[1])
        probe = None
        try:
            for index, layer in enumerate(lm.layers[: config.num_hidden_layers]):
                if index == self.layer:
                    hidden, position_ids, position_embeddings, attention_mask, mask = self._enter_pruned_layers(
                        prefill, hidden, position_ids, position_embeddings, attention_mask, cache, probe)
                    probe = None  # removed by _enter_pruned_layers
                if prefill:
                    self.record.layer_lengths.append(hidden.shape[1])
                    if index == self.layer - 1 and self.wants_attention:
                        probe = _ProjectionProbe(layer.self_attn)
                hidden = layer(hidden, attention_mask=mask, position_embeddings=position_embeddings,
                               position_ids=position_ids, cache=cache, use_cache=use_cache, **kwargs)
        finally:
            if probe is not None:  # something raised before layer K: do not leave hooks on the model
                probe.remove()
        hidden = lm.norm(hidden)
        return BaseModelOutputWithPast(last_hidden_state=hidden, cache=cache if use_cache else None)

    def _enter_pruned_layers(self, prefill, hidden, position_ids, position_embeddings, attention_mask, cache, probe):
        """At layer K: at prefill, select and cut every per-position tensor to the kept positions;
        when decoding, extend the prefill's kept padding mask by the new tokens. Returns the inputs
        of layers K.. and their causal mask, sized against cache layer K."""
        if prefill:
            timings = {} if self.timed else None
            with stopwatch(timings, "select_s", hidden.device):
                keep = self._select(hidden, position_ids, position_embeddings, attention_mask, probe)
            self.record.select_s = timings["select_s"] if timings else 0.0
            if probe is not None:
                probe.remove()
            hidden = hidden[:, keep]  # [1, L', D]
            position_ids = position_ids[:, keep]  # original positions, gaps included
            position_embeddings = tuple(t[:, keep] for t in position_embeddings)
            attention_mask = attention_mask[:, keep] if attention_mask is not None else None
        elif attention_mask is not None:
            keep, length = self.record.keep, self.record.prefill_length
            attention_mask = torch.cat([attention_mask[:, keep], attention_mask[:, length:]], dim=1)
        mask = self._mask(inputs_embeds=hidden, attention_mask=attention_mask, cache=cache,
                          position_ids=position_ids, layer_idx=self.layer)
        return hidden, position_ids, position_embeddings, attention_mask, mask

    def _select(self, hidden, position_ids, position_embeddings, attention_mask, probe) -> torch.Tensor:
        """Ask the compressor which prefill positions layers K.. keep; record the result."""
        attention = None
        if probe is not None:
            attention = last_token_attention(
                self.lm.layers[self.layer - 1].self_attn, probe.query, probe.key, position_embeddings,
                attention_mask,
            )
        image_mask = self.image_mask.to(hidden.device)
        if image_mask.shape[1] != hidden.shape[1]:
            raise ValueError(
                f"image mask covers {image_mask.shape[1]} positions but the prefill has {hidden.shape[1]}"
            )
        keep = self.compressor.select_llm_tokens(
            LLMInput(hidden_states=hidden, image_mask=image_mask, position_ids=position_ids, attention=attention)
        )
        self.record.keep = keep
        self.record.kept_image_tokens = int(image_mask[0, keep].sum())
        return keep
