"""LLM-stage pruning inside transformers' Llama/Mistral decoder, with forward pre-hooks only.

``LLMStagePruning`` never replaces a ``forward``: it registers forward pre-hooks (``with_kwargs``)
on the language model and on its decoder layers, and removes exactly those on exit. Whatever the
model already had stays in place: transformers' decorators (``output_hidden_states`` still works;
hidden states of layers >= K cover the kept positions only) and accelerate's instance-level
``forward`` wrappers (``device_map`` dispatch and offloading).

* the language model's pre-hook notes, per forward, whether it is a prefill (empty cache) and the
  2-D padding mask the caller passed;
* prefill, at layer K's input: the compressor sees the sequence (and the signals it declared, e.g.
  the last prompt token's attention at layer K-1 from that layer's own q/k projections: SDPA stays
  on) and returns the positions to keep; layers K.. run on those positions only, each keeping its
  original position id (RoPE sees the gaps, as in FastV);
* decoding: layers < K keep the full KV cache, layers >= K the pruned one; the padding mask of
  layers >= K is the prefill mask at the kept positions plus the new tokens, and new tokens
  continue the original positions (``generate`` computes them from the full-length mask).

The causal mask of layers >= K is built against cache layer K and WITHOUT position ids: with
neither a 2-D mask nor a cache, transformers reads gaps in the position ids as packed-sequence
boundaries and would make the mask block-diagonal. Layer 0 stays full, so ``generate``'s own
bookkeeping (cache length from layer 0) is unchanged. Without a KV cache every forward is a
prefill and selects afresh (the authors' no-cache loop). Batch size 1 only: kept counts differ per
row, which would make the batch ragged.

The hook is also the one place that counts: ``PruningRecord`` holds the kept prefill positions,
their index in the image segment, and the image tokens every decoder layer saw at prefill, so
the pipeline reads the token accounting instead of re-deriving it.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

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
    cos, sin = (t.to(key_states.device) for t in position_embeddings)
    module = type(attn).__module__
    q = query_states.view(1, 1, -1, head_dim).transpose(1, 2)  # [1, H, 1, d]
    k = key_states.view(1, key_states.shape[1], -1, head_dim).transpose(1, 2)  # [1, kvH, L, d]
    q = _rotate(q, cos[:, -1:], sin[:, -1:], module)
    k = _rotate(k, cos, sin, module)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # GQA: [1, H, L, d]
    logits = torch.matmul(q.float(), k.float().transpose(-1, -2)).squeeze(2) * attn.scaling  # [1, H, L]
    if attention_mask_2d is not None:
        mask = attention_mask_2d.to(logits.device)[:, None, :] == 0
        logits = logits.masked_fill(mask, torch.finfo(logits.dtype).min)
    return logits.softmax(dim=-1)


# -- LLM signals: one provider per request type ---------------------------------------------------


class _LastTokenAttentionProvider:
    """``LastTokenAttention``: forward hooks keep layer K-1's q_proj output at the last position and
    its k_proj output (prefill only); ``value`` turns them into the attention row."""

    def __init__(self, stage: "LLMStagePruning") -> None:
        self.stage = stage
        self.attn = stage.layers[stage.layer - 1].self_attn
        self.query: torch.Tensor | None = None
        self.key: torch.Tensor | None = None
        self._handles = [
            self.attn.q_proj.register_forward_hook(self._keep_query),
            self.attn.k_proj.register_forward_hook(self._keep_key),
        ]

    def _keep_query(self, module, args, output) -> None:
        if self.stage.prefill:
            self.query = output[:, -1:]

    def _keep_key(self, module, args, output) -> None:
        if self.stage.prefill:
            self.key = output

    def value(self, position_embeddings, attention_mask_2d) -> torch.Tensor:
        if self.query is None or self.key is None:
            raise RuntimeError(f"layer {self.stage.layer - 1}'s q/k projections did not run before layer "
                               f"{self.stage.layer}; cannot compute LastTokenAttention")
        value = last_token_attention(self.attn, self.query, self.key, position_embeddings, attention_mask_2d)
        self.query = self.key = None
        return value

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


LLM_SIGNAL_PROVIDERS: dict[type, type] = {LastTokenAttention: _LastTokenAttentionProvider}


def llm_signal_provider(request: Any) -> type:
    """The provider class of an LLM signal request; an unknown type fails naming the known ones."""
    try:
        return LLM_SIGNAL_PROVIDERS[type(request)]
    except KeyError:
        known = ", ".join(t.__name__ for t in LLM_SIGNAL_PROVIDERS)
        raise ValueError(f"unknown LLM signal {request!r}; the pipeline can compute: {known}") from None


# -- the record and the checks ---------------------------------------------------------------------


@dataclass
class PruningRecord:
    """What the LLM stage did to the last prefilled prompt (the pipeline only reads this).

    Attributes:
        keep: ``[L']`` kept prefill positions (sorted).
        kept_segment_index: ``[k]`` index, within the spliced image segment (image-token order), of
            every kept image token: the kept map that provenance follows.
        prefill_length: ``L``, the prefill's length.
        layer_lengths: sequence length at every decoder layer's input, prefill.
        layer_image_tokens: image tokens at every decoder layer's input, prefill.
        select_s: scoring + selection time, when timed.
    """

    keep: torch.Tensor | None = None
    kept_segment_index: torch.Tensor | None = None
    prefill_length: int = 0
    layer_lengths: list[int] = field(default_factory=list)
    layer_image_tokens: list[int] = field(default_factory=list)
    select_s: float = 0.0

    @property
    def kept_image_tokens(self) -> int:
        """Image tokens the last decoder layer saw."""
        return self.layer_image_tokens[-1]

    @property
    def image_tokens_layer_mean(self) -> float:
        """Image tokens averaged over the decoder layers (what FastV-style papers quote)."""
        return sum(self.layer_image_tokens) / len(self.layer_image_tokens)


def check_selection(keep: Any, image_mask: torch.Tensor, compressor: Compressor) -> torch.Tensor:
    """Validate ``select_llm_tokens``' answer: a 1-D long tensor of sorted, unique, in-range positions
    that keeps every text position (the last prompt position included). Returns it unchanged."""
    length = image_mask.shape[-1]

    def fail(problem: str) -> ValueError:
        return ValueError(f"compressor {compressor.name or type(compressor).__name__!r}: select_llm_tokens must "
                          f"return sorted unique positions in 0..{length - 1} that keep every text position "
                          f"and the last prompt position; {problem}")

    if not isinstance(keep, torch.Tensor) or keep.dim() != 1 or keep.dtype != torch.long:
        shape = tuple(keep.shape) if isinstance(keep, torch.Tensor) else type(keep).__name__
        raise fail(f"got {shape} {getattr(keep, 'dtype', '')}, expected a 1-D torch.long tensor")
    if keep.numel() == 0:
        raise fail("got no positions")
    if not bool((keep[1:] > keep[:-1]).all()):
        raise fail("got positions that are not strictly increasing (unsorted or repeated)")
    if int(keep[0]) < 0 or int(keep[-1]) >= length:
        raise fail(f"got positions {int(keep[0])}..{int(keep[-1])}")
    if int(keep[-1]) != length - 1:
        raise fail(f"the last prompt position {length - 1} was dropped")
    text_kept = int((~image_mask[keep.to(image_mask.device)]).sum())
    text_total = int((~image_mask).sum())
    if text_kept != text_total:
        raise fail(f"{text_total - text_kept} of {text_total} text positions were dropped")
    return keep


# -- the hook ----------------------------------------------------------------------------------------


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
        config = language_model.config
        num_layers = config.num_hidden_layers
        layer = compressor.llm_layer
        if layer is None or not 1 <= layer < num_layers:
            raise ValueError(f"compressor {compressor.name!r}: llm_layer {layer} is out of range for this model "
                             f"({num_layers} decoder layers); allowed: 1..{num_layers - 1} (llm_layer must be in "
                             f"1..{num_layers - 1})")
        if image_mask.dim() != 2 or image_mask.shape[0] != 1:
            raise ValueError(f"LLM-stage pruning supports batch size 1, got an image mask of {tuple(image_mask.shape)}")
        self.lm = language_model
        self.config = config
        self.layers = list(language_model.layers[:num_layers])
        self.compressor = compressor
        self.layer = layer
        self.image_mask = image_mask
        self.provider_classes = {request: llm_signal_provider(request) for request in compressor.llm_signals}
        self.record = PruningRecord()
        self.timed = timed
        self.prefill = False
        self._mask_2d: torch.Tensor | None = None
        self._late: dict[str, Any] | None = None  # kwargs that layers >= K get instead of the loop's
        self._providers: dict[Any, Any] = {}
        self._handles: list = []

    # -- install / remove ------------------------------------------------------------------------
    def __enter__(self) -> "LLMStagePruning":
        try:
            self._handles.append(self.lm.register_forward_pre_hook(self._on_model_call, with_kwargs=True))
            for index, layer in enumerate(self.layers):
                hook = functools.partial(self._on_layer_call, index)
                self._handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
            self._providers = {request: cls(self) for request, cls in self.provider_classes.items()}
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        for provider in self._providers.values():
            provider.remove()
        self._handles, self._providers, self._late = [], {}, None

    # -- hooks -------------------------------------------------------------------------------------
    def _on_model_call(self, module, args, kwargs):
        """Start of a language-model forward: prefill or decode step, and the caller's 2-D mask."""
        embeds = kwargs.get("inputs_embeds")
        ids = kwargs.get("input_ids", args[0] if args else None)
        batch = (embeds if embeds is not None else ids).shape[0]
        if batch != 1:
            raise ValueError(f"LLM-stage pruning supports batch size 1, got {batch}")
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() != 2:
            raise ValueError("LLM-stage pruning needs a 2-D padding mask (or none)")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        self.prefill = cache is None or cache.get_seq_length() == 0
        self._mask_2d = mask
        self._late = None
        if self.prefill:
            self.record = PruningRecord()
        return None

    def _on_layer_call(self, index: int, module, args, kwargs):
        """Before decoder layer ``index``: cut at K (prefill) or set up K's decode mask; substitute the
        pruned kwargs for every layer >= K; count the image tokens each layer sees at prefill."""
        hidden = args[0] if args else kwargs["hidden_states"]
        if index == self.layer:
            hidden = self._enter_pruned_layers(hidden, kwargs)
        if self.prefill:
            if index == 0:
                self.record.prefill_length = hidden.shape[1]
                self._count(self.record.prefill_length, int(self.image_mask.sum()))
            elif index == self.layer:
                self._count(hidden.shape[1], int(self.record.kept_segment_index.numel()))
            else:
                self._count(*self._last_counts())
        if index < self.layer:
            return None
        kwargs = {**kwargs, **self._late}
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    # -- at layer K --------------------------------------------------------------------------------
    def _enter_pruned_layers(self, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """Prefill: select and cut every per-position input to the kept positions. Decode: extend the
        prefill's kept padding mask by the new tokens. Either way, build layers K..'s causal mask."""
        mask_2d = self._mask_2d
        position_ids = kwargs.get("position_ids")
        position_embeddings = kwargs.get("position_embeddings")
        update: dict[str, Any] = {}
        if self.prefill:
            keep = self._select(hidden, position_ids, position_embeddings, mask_2d).to(hidden.device)
            hidden = hidden[:, keep]  # [1, L', D]
            update["position_ids"] = position_ids[:, keep.to(position_ids.device)]  # original ids, gaps included
            update["position_embeddings"] = tuple(t[:, keep.to(t.device)] for t in position_embeddings)
            mask_2d = mask_2d[:, keep.to(mask_2d.device)] if mask_2d is not None else None
        elif mask_2d is not None:
            keep, length = self.record.keep, self.record.prefill_length
            mask_2d = torch.cat([mask_2d[:, keep.to(mask_2d.device)], mask_2d[:, length:]], dim=1)
        update["attention_mask"] = self._causal_mask(hidden, mask_2d, kwargs.get("cache"))
        self._late = update
        return hidden

    def _causal_mask(self, hidden: torch.Tensor, mask_2d: torch.Tensor | None, cache):
        """Layers >= K's mask, sized against cache layer K; no position ids (see the module doc)."""
        make = (create_sliding_window_causal_mask if getattr(self.config, "sliding_window", None) is not None
                else create_causal_mask)
        return make(config=self.config, inputs_embeds=hidden, attention_mask=mask_2d, cache=cache,
                    position_ids=None, layer_idx=self.layer)

    def _select(self, hidden, position_ids, position_embeddings, mask_2d) -> torch.Tensor:
        """Ask the compressor which prefill positions layers K.. keep, check and record the answer."""
        image_mask = self.image_mask.to(hidden.device)
        if image_mask.shape[1] != hidden.shape[1]:
            raise ValueError(
                f"image mask covers {image_mask.shape[1]} positions but the prefill has {hidden.shape[1]}"
            )
        timings: dict[str, float] | None = {} if self.timed else None
        with stopwatch(timings, "select_s", hidden.device):
            signals = {request: provider.value(position_embeddings, mask_2d)
                       for request, provider in self._providers.items()}
            inp = LLMInput(hidden_states=hidden, image_mask=image_mask, position_ids=position_ids,
                           attention=signals.get(LastTokenAttention()), signals=signals)
            keep = check_selection(self.compressor.select_llm_tokens(inp), image_mask[0], self.compressor)
        self.record.select_s = timings["select_s"] if timings is not None else 0.0
        segment_index = image_mask[0].long().cumsum(0) - 1  # [L] rank of each image token in the segment
        kept = keep[image_mask[0, keep]]
        self.record.keep = keep
        self.record.kept_segment_index = segment_index[kept]
        return keep

    # -- accounting ------------------------------------------------------------------------------
    def _count(self, length: int, image_tokens: int) -> None:
        self.record.layer_lengths.append(length)
        self.record.layer_image_tokens.append(image_tokens)

    def _last_counts(self) -> tuple[int, int]:
        return self.record.layer_lengths[-1], self.record.layer_image_tokens[-1]
