"""Helpers for the LLM-stage method tests (not a test module).

* the tiny float64 Llama of the authors' reference runs (``tests/data/README.md``): same seeded
  weights and inputs, so this transformers build and the authors' 4.37 code see the same model;
* ``run_with_cache``: a compressor's hook on that model, prefill then cached decode steps;
* ``replay``: a cache-free recomputation of a recorded prefill over the whole sequence (prompt and
  generated tokens), written from the definition: at each stage the prompt part is cut (and merged
  tokens inserted) as the record says, generated tokens follow, position ids are the kept original
  ones or renumbered, and every layer runs plain causal attention without any cache.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaModel

from models.llm_stage import LLMStagePruning, PruningRecord

DATA = Path(__file__).resolve().parent / "data" / "llm_stage_reference.pt"
HIDDEN, HEADS, INTERMEDIATE = 128, 16, 256


@contextlib.contextmanager
def one_thread():
    """These models are tiny: one thread avoids OpenMP spin-waits that dominate on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@lru_cache(maxsize=1)
def authors_reference() -> dict:
    return torch.load(DATA)


def reference_model(num_layers: int, seed: int, heads: int = HEADS, kv_heads: int = HEADS,
                    dtype: torch.dtype = torch.float64, attn_implementation: str = "sdpa") -> LlamaModel:
    """The reference runs' decoder: weights drawn per parameter in sorted-name order."""
    config = LlamaConfig(vocab_size=32, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=num_layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=4096,
                         rms_norm_eps=1e-6)
    model = LlamaModel._from_config(config, attn_implementation=attn_implementation).to(torch.float64).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                param.copy_(1 + 0.1 * torch.randn(param.shape, generator=gen, dtype=torch.float64))
            else:
                param.copy_(torch.randn(param.shape, generator=gen, dtype=torch.float64) / param.shape[-1] ** 0.5)
    return model.to(dtype)


def reference_inputs(seed: int, length: int, steps: int, dtype: torch.dtype = torch.float64):
    """``([1, length, D]`` prompt embeddings, ``[steps, D]`` embeddings of the decoded tokens)."""
    gen = torch.Generator().manual_seed(seed)
    embeds = torch.randn(1, length, HIDDEN, generator=gen, dtype=torch.float64)
    new = torch.randn(steps, HIDDEN, generator=gen, dtype=torch.float64)
    return embeds.to(dtype), new.to(dtype)


def image_mask(prefix: int, n_img: int, suffix: int) -> torch.Tensor:
    mask = torch.zeros(1, prefix + n_img + suffix, dtype=torch.bool)
    mask[0, prefix:prefix + n_img] = True
    return mask


@dataclass
class HookRun:
    record: PruningRecord
    prefill_hidden: torch.Tensor  # [L', D] final-norm output at prefill
    cache_lengths: list[int]  # per layer, after the prefill
    decode_hidden: torch.Tensor  # [steps, D] final-norm output of every decoded token
    embeds: torch.Tensor  # [1, L + steps, D] the whole sequence's input embeddings


@torch.no_grad()
def run_with_cache(model: LlamaModel, compressor, prefix: int, n_img: int, suffix: int, seed: int,
                   steps: int, padded: tuple[int, ...] = ()) -> HookRun:
    """Prefill and ``steps`` cached decode steps under the hook, with a 2-D padding mask that is 0 at
    the prompt positions ``padded`` and 1 elsewhere."""
    length = prefix + n_img + suffix
    embeds, new = reference_inputs(seed, length, steps, dtype=model.dtype)
    mask = torch.ones(1, length + steps, dtype=torch.long)
    mask[0, list(padded)] = 0
    with one_thread(), LLMStagePruning(model, compressor, image_mask(prefix, n_img, suffix)) as stage:
        out = model(inputs_embeds=embeds, attention_mask=mask[:, :length], use_cache=True)
        cache = out.cache
        prefill = out.last_hidden_state[0]
        lengths = [int(layer.keys.shape[-2]) for layer in cache.layers]
        decode = []
        for step in range(steps):
            out = model(inputs_embeds=new[step][None, None], cache=cache, use_cache=True,
                        attention_mask=mask[:, :length + step + 1])
            decode.append(out.last_hidden_state[0, -1])
    return HookRun(stage.record, prefill, lengths, torch.stack(decode), torch.cat([embeds, new[None]], dim=1))


@torch.no_grad()
def replay(model: LlamaModel, embeds: torch.Tensor, record: PruningRecord, contiguous: bool,
           padded: tuple[int, ...] = ()) -> torch.Tensor:
    """Final-norm hidden states of a cache-free run over ``embeds`` ``[1, L + T, D]`` (the prompt of
    ``record`` and T generated tokens) that applies the record's stage decisions to the prompt part;
    the prompt positions ``padded`` are masked as keys wherever they are kept.
    Returns ``[1, L'' + T, D]``: the prompt positions left after the last stage, then the T tokens."""
    total = embeds.shape[1]
    origin = torch.arange(total)  # original position of every current token (-1: merged)
    stages = {stage.layer: stage for stage in record.stages}
    with one_thread():
        hidden, positions, prompt = embeds, torch.arange(total), record.prefill_length
        for index, layer in enumerate(model.layers):
            if index in stages:
                decision = stages[index].decision
                cut = [(t[:, :prompt] if t.dim() == 3 else t[:prompt]) for t in (hidden, positions, origin)]
                rest = [(t[:, prompt:] if t.dim() == 3 else t[prompt:]) for t in (hidden, positions, origin)]
                kept, kept_positions, kept_origin = cut[0][:, decision.keep], cut[1][decision.keep], cut[2][decision.keep]
                if decision.merged is not None:
                    at, count = decision.merged_at, decision.num_merged
                    merged_positions = (decision.merged_position_ids if decision.merged_position_ids is not None
                                        else torch.zeros(count, dtype=torch.long))
                    kept = torch.cat([kept[:, :at], decision.merged[None].to(kept.dtype), kept[:, at:]], dim=1)
                    kept_positions = torch.cat([kept_positions[:at], merged_positions, kept_positions[at:]])
                    kept_origin = torch.cat([kept_origin[:at], torch.full((count,), -1), kept_origin[at:]])
                prompt = kept.shape[1]
                generated_positions = rest[1]
                if contiguous:  # the prompt renumbered, generated tokens right after it
                    kept_positions = torch.arange(prompt)
                    generated_positions = prompt + torch.arange(rest[1].numel())
                hidden = torch.cat([kept, rest[0]], dim=1)
                positions = torch.cat([kept_positions, generated_positions])
                origin = torch.cat([kept_origin, rest[2]])
            length = hidden.shape[1]
            allowed = torch.ones(length, length, dtype=torch.bool).tril() & ~torch.isin(origin, torch.tensor(padded, dtype=torch.long))
            mask = torch.zeros(length, length, dtype=hidden.dtype).masked_fill(~allowed, torch.finfo(hidden.dtype).min)
            hidden = layer(hidden, attention_mask=mask[None, None], position_ids=positions[None],
                           position_embeddings=model.rotary_emb(hidden, positions[None]))
        return model.norm(hidden)


@torch.no_grad()
def masked_forward(model: LlamaModel, embeds: torch.Tensor, late: torch.Tensor, layer_k: int) -> torch.Tensor:
    """Final-norm hidden states ``[1, n, D]`` of one cache-free pass with original positions: layers < K
    causal, layers >= K with the ``[n, n]`` bool mask ``late`` (query row, key; taken as given)."""
    length = embeds.shape[1]
    positions = torch.arange(length)[None]
    neg = torch.finfo(embeds.dtype).min
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    masks = [torch.zeros(length, length, dtype=embeds.dtype).masked_fill(~m, neg)[None, None] for m in (causal, late)]
    hidden = embeds
    with one_thread():
        cos_sin = model.rotary_emb(embeds, positions)
        for index, layer in enumerate(model.layers):
            hidden = layer(hidden, attention_mask=masks[int(index >= layer_k)], position_ids=positions,
                           position_embeddings=cos_sin)
        return model.norm(hidden)
