"""LLM-stage pruning inside transformers' Llama/Mistral decoder, with forward pre-hooks only.

``LLMStagePruning`` never replaces a ``forward``: it registers forward pre-hooks (``with_kwargs``)
on the language model and on its decoder layers, and removes exactly those on exit. Whatever the
model already had stays in place: transformers' decorators (``output_hidden_states`` still works;
hidden states of pruned layers cover the kept positions only) and accelerate's instance-level
``forward`` wrappers (``device_map`` dispatch and offloading).

A compressor has one stage per layer in ``llm_layers`` (K_0 < K_1 < ...). Layers K_s..K_{s+1}-1 form
group s and run on the sequence stage s left.

* the language model's pre-hook notes, per forward, whether it is a prefill (empty cache) and the
  2-D padding mask the caller passed;
* prefill, at layer K_s's input: the compressor sees the current sequence (hidden states, image
  mask, position ids, the original prefill position of every token) and the signals it declared
  (``models.llm_signals``), and returns the positions to keep, optionally with merged tokens. Every
  per-position input of the group (hidden states, position ids and RoPE, padding mask, causal mask)
  is cut accordingly. Position ids are the kept tokens' original ones (``llm_positions =
  "original"``; merged tokens take the ids the compressor gives) or ``0..L'-1`` (``"contiguous"``);
* decoding: group s's layers hold KV caches of the length stage s left (plus the new tokens); its
  padding mask is the prefill mask composed through every stage, plus the new tokens; new tokens
  continue the original numbering (``generate`` computes it from the full-length mask) or, with
  contiguous positions, the numbering of their group (original minus the tokens removed before it).

Group masks are built against cache layer K_s and WITHOUT position ids: with neither a 2-D mask nor
a cache, transformers reads gaps in the position ids as packed-sequence boundaries and would make
the mask block-diagonal. Layer 0 stays full, so ``generate``'s own bookkeeping (cache length from
layer 0) is unchanged. Batch size 1 only: kept counts differ per row.

Decode modes (``compressor.llm_decode``): ``prefill_once`` (above; the llava-hf FastV fork);
``recompute``: ``generate`` runs without a KV cache (``generate_kwargs``), so every step is a prefill
of the whole sequence that selects afresh, the record keeping the prompt's prefill; ``mask`` (one
stage): nothing is removed; at every forward, prefill and decode steps, the stage selects from the
current last token and layers >= K see the other image tokens masked as keys (the original FastV's
token-mask path).

The hook is also the one place that counts: ``PruningRecord`` holds, for the prefill, the image
tokens every decoder layer saw and which image-segment tokens every final image token stands for.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from compressors.base import AttentionRows, Compressor, DecoderKeys, LLMDecision, LLMInput, Provenance
from models.llm_signals import SignalProviders, StageContext
from models.timing import stopwatch

POSITION_POLICIES = ("original", "contiguous")
DECODE_MODES = ("prefill_once", "recompute", "mask")


# -- the record and the checks ---------------------------------------------------------------------


@dataclass
class StageRecord:
    """One stage of one prefill. ``keep``: kept positions of the sequence the stage saw;
    ``merged``: merged tokens it added; ``length``/``image_tokens``: what it left; ``decision``: the
    compressor's validated answer; ``query_rows``: the query rows each ``AttentionRows`` signal used
    (data-dependent for ``instruction``/``mask`` queries; the cost model counts them)."""

    layer: int
    keep: torch.Tensor
    merged: int
    length: int
    image_tokens: int
    decision: LLMDecision | None = None
    query_rows: dict[AttentionRows, int] = field(default_factory=dict)


@dataclass
class PruningRecord:
    """What the LLM stage did to the last prompt prefill (the pipeline only reads this).

    Attributes:
        prefill_length: ``L``, the prefill's length.
        layer_lengths: sequence length at every decoder layer's input, prefill.
        layer_image_tokens: image tokens at every decoder layer's input, prefill (in ``mask`` mode: the
            image tokens a layer attends to).
        layer_newlines: ``image_newline`` tokens among them (tokens that stand for newline segment
            tokens only), when the hook was given the segment's newlines.
        stages: one ``StageRecord`` per stage.
        original_positions: ``[L']`` original prefill position of every token the last layer sees
            (-1 for merged tokens).
        image_token / segment_index: ``[P]`` pairs: final image token ``image_token[i]`` (its index
            among the image tokens the last layer sees) stands for image-segment token
            ``segment_index[i]`` (index in the spliced segment). One pair per kept token, one per
            member of a merged token: the kept map that provenance follows.
        select_s: scoring + selection time over all stages, when timed.
        recompute_steps: forwards of longer sequences re-selected without a cache (``recompute``).
    """

    prefill_length: int = 0
    layer_lengths: list[int] = field(default_factory=list)
    layer_image_tokens: list[int] = field(default_factory=list)
    layer_newlines: list[int] = field(default_factory=list)
    stages: list[StageRecord] = field(default_factory=list)
    original_positions: torch.Tensor | None = None
    image_token: torch.Tensor | None = None
    segment_index: torch.Tensor | None = None
    select_s: float = 0.0
    recompute_steps: int = 0

    @property
    def keep(self) -> torch.Tensor | None:
        """Original prefill positions the last layer sees (merged tokens left out)."""
        if self.original_positions is None:
            return None
        return self.original_positions[self.original_positions >= 0]

    @property
    def kept_image_tokens(self) -> int:
        """Image tokens the last decoder layer saw."""
        return self.layer_image_tokens[-1]

    @property
    def image_tokens_layer_mean(self) -> float:
        """Image tokens averaged over the decoder layers (what FastV-style papers quote)."""
        return sum(self.layer_image_tokens) / len(self.layer_image_tokens)

    @property
    def stage_query_rows(self) -> list[dict[AttentionRows, int]]:
        """Per stage, the query rows each attention-row signal used."""
        return [dict(stage.query_rows) for stage in self.stages]

    @property
    def kept_segment_index(self) -> torch.Tensor | None:
        """Segment index of every final image token that stands for exactly one segment token."""
        if self.segment_index is None:
            return None
        counts = torch.bincount(self.image_token, minlength=self.kept_image_tokens)
        single = counts[self.image_token] == 1
        return self.segment_index[single]


def _name(compressor: Compressor) -> str:
    return compressor.name or type(compressor).__name__


def check_selection(keep: Any, image_mask: torch.Tensor, compressor: Compressor) -> torch.Tensor:
    """Validate kept positions: a 1-D long tensor of sorted, unique, in-range positions that keeps
    every text position (the last prompt position included). Returns it unchanged."""
    length = image_mask.shape[-1]

    def fail(problem: str) -> ValueError:
        return ValueError(f"compressor {_name(compressor)!r}: select_llm_tokens must "
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


def check_decision(decision: LLMDecision, image_mask: torch.Tensor, hidden: torch.Tensor,
                   compressor: Compressor) -> LLMDecision:
    """Validate an ``LLMDecision``: its ``keep`` as ``check_selection``, and merged tokens that fit."""
    keep = check_selection(decision.keep, image_mask, compressor)
    if decision.merged is None:
        return decision

    def fail(problem: str) -> ValueError:
        return ValueError(f"compressor {_name(compressor)!r}: an LLMDecision with merged tokens {problem}")

    count = decision.num_merged
    if decision.merged.dim() != 2 or decision.merged.shape[1] != hidden.shape[-1] or count == 0:
        raise fail(f"needs merged [M >= 1, {hidden.shape[-1]}], got {tuple(decision.merged.shape)}")
    if not 0 <= decision.merged_at <= keep.numel() - 1:
        raise fail(f"needs merged_at in 0..{keep.numel() - 1} (before the last position), got {decision.merged_at}")
    if decision.merged_token is None or decision.merged_member is None:
        raise fail("needs merged_token/merged_member pairs (the provenance of every merged token)")
    token, member = decision.merged_token, decision.merged_member
    if token.shape != member.shape or token.dim() != 1 or token.numel() == 0:
        raise fail(f"needs 1-D merged_token/merged_member of equal length, got {tuple(token.shape)}, "
                   f"{tuple(member.shape)}")
    if set(token.unique().tolist()) != set(range(count)):
        raise fail(f"needs every merged token 0..{count - 1} to have members")
    if int(member.min()) < 0 or int(member.max()) >= image_mask.shape[-1] or not bool(image_mask[member.to(image_mask.device)].all()):
        raise fail("needs members that are image positions of the current sequence")
    if compressor.llm_positions == "original":
        ids = decision.merged_position_ids
        if ids is None or ids.shape != (count,):
            raise fail(f"needs merged_position_ids [{count}] when position ids stay original")
    return decision


def _as_decision(answer: torch.Tensor | LLMDecision) -> LLMDecision:
    return answer if isinstance(answer, LLMDecision) else LLMDecision(keep=answer)


# -- the hook ----------------------------------------------------------------------------------------


@dataclass
class _Sequence:
    """The current prefill sequence between stages (batch size 1)."""

    original: torch.Tensor  # [L] original prefill position, -1 for merged tokens
    image: torch.Tensor  # [L] bool
    position_ids: torch.Tensor  # [1, L]
    position_embeddings: tuple[torch.Tensor, torch.Tensor]
    mask_2d: torch.Tensor | None  # [1, L]
    # provenance: pairs (current position, image-segment index)
    pair_position: torch.Tensor
    pair_segment: torch.Tensor
    newlines: int | None = None  # newline tokens, counted once when asked


def with_decode_mode(config: Any, stage: Any) -> Any:
    """``config`` (a ``GenerationConfig``) with the ``generate`` arguments ``stage``'s decode mode needs
    (``recompute``: no KV cache); a copy when there are any. ``stage``: the pipeline's LLM-stage
    context (an ``LLMStagePruning``, or a null context for methods without an LLM stage)."""
    extra = getattr(stage, "generate_kwargs", {})
    if not extra:
        return config
    config = copy.deepcopy(config)
    config.update(**extra)
    return config


class LLMStagePruning:
    """Context manager that makes ``language_model`` prune per ``compressor`` at its ``llm_layers``.

    Args:
        language_model: the ``LlamaModel``/``MistralModel`` inside LLaVA-NeXT.
        compressor: supplies ``llm_layers``, ``llm_signals``, ``llm_positions``, ``llm_decode`` and
            ``select_llm_tokens``.
        image_mask: ``[1, L]`` bool, image-token positions of the prompt that will be prefilled.
        timed: record the scoring + selection time in ``record.select_s`` (device-synchronised).
        segment_newlines: ``[N]`` bool, which image-segment tokens are ``image_newline`` (for
            ``record.layer_newlines``).
    """

    def __init__(self, language_model: nn.Module, compressor: Compressor, image_mask: torch.Tensor,
                 timed: bool = False, segment_newlines: torch.Tensor | None = None) -> None:
        config = language_model.config
        num_layers = config.num_hidden_layers
        layers = tuple(compressor.llm_layers or ())
        name = _name(compressor)
        valid = (len(layers) > 0 and all(isinstance(k, int) and not isinstance(k, bool) for k in layers)
                 and all(1 <= k < num_layers for k in layers) and list(layers) == sorted(set(layers)))
        if not valid:
            raise ValueError(f"compressor {name!r}: llm_layers {layers} is out of range for this model "
                             f"({num_layers} decoder layers); allowed: strictly increasing layers in "
                             f"1..{num_layers - 1} (llm_layer must be in 1..{num_layers - 1})")
        if compressor.llm_positions not in POSITION_POLICIES:
            raise ValueError(f"compressor {name!r}: llm_positions must be one of {', '.join(POSITION_POLICIES)}, "
                             f"got {compressor.llm_positions!r}")
        if compressor.llm_decode not in DECODE_MODES:
            raise ValueError(f"compressor {name!r}: llm_decode must be one of {', '.join(DECODE_MODES)}, "
                             f"got {compressor.llm_decode!r}")
        if compressor.llm_decode == "mask":
            previous_only = all(isinstance(r, DecoderKeys) or (isinstance(r, AttentionRows) and r.layer == "previous")
                                for r in compressor.llm_signals)
            if len(layers) != 1 or compressor.llm_positions != "original" or not previous_only:
                raise ValueError(f"compressor {name!r}: llm_decode='mask' needs one stage, original positions and "
                                 "signals of layer K-1 only (AttentionRows(layer='previous'), DecoderKeys)")
        if image_mask.dim() != 2 or image_mask.shape[0] != 1:
            raise ValueError(f"LLM-stage pruning supports batch size 1, got an image mask of {tuple(image_mask.shape)}")
        self.lm = language_model
        self.config = config
        self.num_layers = num_layers
        self.layers = list(language_model.layers[:num_layers])
        self.compressor = compressor
        self.stage_layers = layers
        self.stage_of = {k: s for s, k in enumerate(layers)}
        self.image_mask = image_mask
        self.segment_newlines = segment_newlines
        self.mode = compressor.llm_decode
        self.timed = timed
        self.record = PruningRecord()
        self.prefill = False
        self._requests = tuple(compressor.llm_signals)
        self._signals: SignalProviders | None = None
        self._handles: list = []
        self._forward_record: PruningRecord | None = None
        self._mask_2d: torch.Tensor | None = None
        self._group: dict[str, Any] | None = None  # kwargs that the current group's layers get
        self._seq: _Sequence | None = None
        self._chain: list[tuple[_Sequence, int]] = []  # per stage: the sequence it left, and its length
        self._prefill_length = 0  # length of the prefill whose caches decoding extends
        self._state: dict[str, Any] = {}
        self._stage_rows: dict[AttentionRows, int] = {}  # query rows of the stage being decided
        SignalProviders.check(self._requests)

    @property
    def generate_kwargs(self) -> dict[str, Any]:
        """Extra ``generate`` arguments the decode mode needs (``recompute``: no KV cache)."""
        return {"use_cache": False} if self.mode == "recompute" else {}

    # -- install / remove ------------------------------------------------------------------------
    def __enter__(self) -> "LLMStagePruning":
        try:
            self._handles.append(self.lm.register_forward_pre_hook(self._on_model_call, with_kwargs=True))
            for index, layer in enumerate(self.layers):
                hook = functools.partial(self._on_layer_call, index)
                self._handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
            self._signals = SignalProviders(self.lm, self.layers, self._requests, self.stage_layers)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        if self._signals is not None:
            self._signals.remove()
        self._handles, self._signals, self._group, self._seq = [], None, None, None

    # -- hooks -------------------------------------------------------------------------------------
    def _on_model_call(self, module, args, kwargs):
        """Start of a language-model forward: prefill or decode step, and the caller's 2-D mask."""
        embeds = kwargs.get("inputs_embeds")
        ids = kwargs.get("input_ids", args[0] if args else None)
        tokens = embeds if embeds is not None else ids
        if tokens.shape[0] != 1:
            raise ValueError(f"LLM-stage pruning supports batch size 1, got {tokens.shape[0]}")
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() != 2:
            raise ValueError("LLM-stage pruning needs a 2-D padding mask (or none)")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        self.prefill = cache is None or cache.get_seq_length() == 0
        self._mask_2d = mask
        self._group, self._seq = None, None
        if self._signals is not None:
            self._signals.new_forward()
        if self.prefill:
            length = tokens.shape[1]
            prompt = self.image_mask.shape[1]
            if length < prompt:
                raise ValueError(f"image mask covers {prompt} positions but the prefill has {length}")
            self._forward_record = PruningRecord(prefill_length=length)
            if length == prompt:
                self.record = self._forward_record
            else:  # a longer sequence without a cache: a recompute step of the prompt's generation
                self.record.recompute_steps += 1
            self._prefill_length = length
            self._chain = []
            self._state = {}
        return None

    def _on_layer_call(self, index: int, module, args, kwargs):
        """Before decoder layer ``index``: run a stage (prefill) or set up its group (decode); give the
        group's kwargs to every layer from the first stage on; count the image tokens at prefill."""
        hidden = args[0] if args else kwargs["hidden_states"]
        if self.prefill and index == 0:
            self._seq = self._initial_sequence(hidden, kwargs)
            if self._signals is not None:
                self._signals.prompt_embeddings = hidden
        stage = self.stage_of.get(index)
        if stage is not None:
            if self.mode == "mask":
                self._mask_stage(stage, hidden, kwargs)
            elif self.prefill:
                hidden = self._run_stage(stage, hidden, kwargs)
            else:
                self._decode_group(stage, hidden, kwargs)
        if self.prefill:
            record = self._forward_record
            record.layer_lengths.append(hidden.shape[1])
            record.layer_image_tokens.append(self._attended_image_tokens())
            if self.segment_newlines is not None:
                record.layer_newlines.append(self._newline_tokens())
        if self._group is None:
            return None
        kwargs = {**kwargs, **self._group}
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    # -- prefill -------------------------------------------------------------------------------------
    def _initial_sequence(self, hidden: torch.Tensor, kwargs: dict) -> _Sequence:
        length = hidden.shape[1]
        device = hidden.device
        image = torch.zeros(length, dtype=torch.bool, device=device)
        image[: self.image_mask.shape[1]] = self.image_mask[0].to(device)  # recompute steps: text after
        positions = image.nonzero().flatten()
        return _Sequence(
            original=torch.arange(length, device=device), image=image,
            position_ids=kwargs["position_ids"], position_embeddings=kwargs["position_embeddings"],
            mask_2d=self._mask_2d, pair_position=positions, pair_segment=torch.arange(positions.numel(), device=device),
        )

    def _newline_tokens(self) -> int:
        """Image tokens of the current sequence (in ``mask`` mode: the attended ones) that stand for
        newline segment tokens only."""
        if self.mode == "mask" and self._group is not None:
            kept = self._forward_record.segment_index
            return int(self.segment_newlines.to(kept.device)[kept].sum())
        seq = self._seq
        if seq.newlines is None:
            length = seq.original.numel()
            newline = self.segment_newlines.to(seq.pair_segment.device)[seq.pair_segment]  # [P]
            pairs = torch.bincount(seq.pair_position, minlength=length)
            newline_pairs = torch.bincount(seq.pair_position[newline], minlength=length)
            seq.newlines = int(((pairs > 0) & (newline_pairs == pairs)).sum())
        return seq.newlines

    def _attended_image_tokens(self) -> int:
        if self.mode == "mask" and self._group is not None:
            return self._forward_record.stages[-1].image_tokens
        return int(self._seq.image.sum())

    def _stage_input(self, stage: int, hidden: torch.Tensor, seq: _Sequence, image: torch.Tensor) -> LLMInput:
        return LLMInput(
            hidden_states=hidden, image_mask=image[None], position_ids=seq.position_ids, stage=stage,
            layer=self.stage_layers[stage], num_layers=self.num_layers, original_positions=seq.original,
            position_embeddings=seq.position_embeddings, prefill_image_tokens=int(self.image_mask.sum()),
            state=self._state,
        )

    def _decide(self, stage: int, hidden: torch.Tensor, inp: LLMInput, mask_2d, cache) -> LLMDecision:
        """Signals, the compressor's answer, and its validation (timed together)."""
        timings: dict[str, float] | None = {} if self.timed else None
        with stopwatch(timings, "select_s", hidden.device):
            ctx = StageContext(layer=self.stage_layers[stage], hidden=hidden, position_embeddings=inp.position_embeddings,
                               mask_2d=mask_2d, cache=cache, prefill=self.prefill)
            self._signals.compute(ctx, inp, self.compressor)
            self._stage_rows = dict(self._signals.rows)
            decision = _as_decision(self.compressor.select_llm_tokens(inp))
            decision = check_decision(decision, inp.image_mask[0], hidden, self.compressor)
        if timings is not None:
            self._forward_record.select_s += timings["select_s"]
        return decision

    def _run_stage(self, stage: int, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """Prefill at layer K_s: select, then cut every per-position input of the group."""
        seq = self._seq
        inp = self._stage_input(stage, hidden, seq, seq.image)
        decision = self._decide(stage, hidden, inp, seq.mask_2d, kwargs.get("cache"))
        device = hidden.device
        keep = decision.keep.to(device)
        new_index = torch.full((hidden.shape[1],), -1, dtype=torch.long, device=device)
        new_index[keep] = torch.arange(keep.numel(), device=device)

        hidden = hidden[:, keep]  # [1, k, D]
        original, image = seq.original[keep], seq.image[keep]
        ids = seq.position_ids[:, keep.to(seq.position_ids.device)]
        mask_2d = seq.mask_2d[:, keep.to(seq.mask_2d.device)] if seq.mask_2d is not None else None
        kept_pair = new_index[seq.pair_position] >= 0
        pair_position, pair_segment = new_index[seq.pair_position][kept_pair], seq.pair_segment[kept_pair]

        count = decision.num_merged
        if count:
            at = decision.merged_at
            merged = decision.merged.to(hidden.device, hidden.dtype)[None]  # [1, M, D]
            hidden = torch.cat([hidden[:, :at], merged, hidden[:, at:]], dim=1)
            original = torch.cat([original[:at], original.new_full((count,), -1), original[at:]])
            image = torch.cat([image[:at], image.new_ones(count), image[at:]])
            if decision.merged_position_ids is not None:
                merged_ids = decision.merged_position_ids.to(ids.device, ids.dtype)[None]
            else:
                merged_ids = ids.new_zeros(1, count)  # renumbered below
            ids = torch.cat([ids[:, :at], merged_ids, ids[:, at:]], dim=1)
            if mask_2d is not None:
                mask_2d = torch.cat([mask_2d[:, :at], mask_2d.new_ones(1, count), mask_2d[:, at:]], dim=1)
            pair_position = pair_position + (pair_position >= at).long() * count
            # a merged token stands for every segment token its members stood for
            merged_pairs = Provenance(token=seq.pair_position, source=seq.pair_segment).compose(
                token=decision.merged_token, member=decision.merged_member, length=seq.original.numel())
            pair_position = torch.cat([pair_position, merged_pairs.token.to(device) + at])
            pair_segment = torch.cat([pair_segment, merged_pairs.source.to(device)])
        if self.compressor.llm_positions == "contiguous":
            ids = seq.position_ids[:, :1] + torch.arange(hidden.shape[1], device=ids.device)[None]  # 0..L'-1
        if count or self.compressor.llm_positions == "contiguous":  # new position ids: their RoPE
            position_embeddings = self.lm.rotary_emb(hidden, ids)
        else:  # the kept tokens' own
            position_embeddings = tuple(t[:, keep.to(t.device)] for t in seq.position_embeddings)

        self._seq = _Sequence(original=original, image=image, position_ids=ids, position_embeddings=position_embeddings,
                              mask_2d=mask_2d, pair_position=pair_position, pair_segment=pair_segment)
        self._chain.append((self._seq, hidden.shape[1]))
        self._group = {"position_ids": ids, "position_embeddings": position_embeddings,
                       "attention_mask": self._causal_mask(hidden, mask_2d, kwargs.get("cache"), self.stage_layers[stage])}
        record = self._forward_record
        record.stages.append(StageRecord(layer=self.stage_layers[stage], keep=keep, merged=count,
                                         length=hidden.shape[1], image_tokens=int(image.sum()), decision=decision,
                                         query_rows=self._stage_rows))
        self._finish_record(record)
        return hidden

    def _finish_record(self, record: PruningRecord) -> None:
        seq = self._seq
        rank = seq.image.long().cumsum(0) - 1  # [L'] index among the image tokens
        order = seq.pair_segment.argsort(stable=True)
        image_token, segment = rank[seq.pair_position][order], seq.pair_segment[order]
        order = image_token.argsort(stable=True)
        record.original_positions = seq.original
        record.image_token, record.segment_index = image_token[order], segment[order]

    # -- decoding ----------------------------------------------------------------------------------
    def _decode_group(self, stage: int, hidden: torch.Tensor, kwargs: dict) -> None:
        """A cached decode step at layer K_s: group s's mask, position ids and RoPE for the new tokens."""
        if len(self._chain) != len(self.stage_layers):
            raise RuntimeError("decoding with a cache that was not prefilled under this LLM-stage hook")
        seq, length = self._chain[stage]
        prefill = self._prefill_length
        mask_2d = self._mask_2d
        if mask_2d is not None:
            new = mask_2d[:, prefill:]
            kept = seq.mask_2d if seq.mask_2d is not None else new.new_ones(1, length)
            mask_2d = torch.cat([kept.to(new.device, new.dtype), new], dim=1)
        ids, position_embeddings = kwargs["position_ids"], kwargs["position_embeddings"]
        if self.compressor.llm_positions == "contiguous":
            ids = ids - (prefill - length)
            position_embeddings = self.lm.rotary_emb(hidden, ids)
        self._group = {"position_ids": ids, "position_embeddings": position_embeddings,
                       "attention_mask": self._causal_mask(hidden, mask_2d, kwargs.get("cache"), self.stage_layers[stage])}

    # -- mask mode -----------------------------------------------------------------------------------
    def _mask_stage(self, stage: int, hidden: torch.Tensor, kwargs: dict) -> None:
        """Every forward: select from the current last token, mask the other image tokens as keys."""
        cache = kwargs.get("cache")
        total = (cache.get_seq_length(self.stage_layers[stage]) if cache is not None and not self.prefill else 0)
        total += hidden.shape[1]
        device = hidden.device
        image = torch.zeros(total, dtype=torch.bool, device=device)
        image[: self.image_mask.shape[1]] = self.image_mask[0].to(device)
        mask_2d = self._mask_2d
        # the whole sequence; at a decode step hidden states, position ids and RoPE are the new token's
        inp = LLMInput(hidden_states=hidden, image_mask=image[None], position_ids=kwargs["position_ids"], stage=stage,
                       layer=self.stage_layers[stage], num_layers=self.num_layers,
                       original_positions=torch.arange(total, device=device),
                       position_embeddings=kwargs["position_embeddings"],
                       prefill_image_tokens=int(self.image_mask.sum()), state=self._state)
        decision = self._decide(stage, hidden, inp, mask_2d, cache)
        if decision.merged is not None:
            raise ValueError(f"compressor {_name(self.compressor)!r}: llm_decode='mask' cannot add merged tokens")
        allowed = torch.zeros(total, dtype=torch.long, device=device)
        allowed[decision.keep.to(device)] = 1
        group_mask = allowed[None] if mask_2d is None else mask_2d * allowed[None].to(mask_2d.device, mask_2d.dtype)
        self._group = {"attention_mask": self._causal_mask(hidden, group_mask, cache, self.stage_layers[stage])}
        if self.prefill:
            record = self._forward_record
            keep = decision.keep.to(device)
            kept_image = keep[image[keep]]
            record.stages.append(StageRecord(layer=self.stage_layers[stage], keep=keep, merged=0, length=total,
                                             image_tokens=int(kept_image.numel()), query_rows=self._stage_rows))
            rank = image.long().cumsum(0) - 1
            record.original_positions = keep
            record.image_token = torch.arange(kept_image.numel(), device=device)
            record.segment_index = rank[kept_image]

    def _causal_mask(self, hidden: torch.Tensor, mask_2d: torch.Tensor | None, cache, layer: int):
        """A group's mask, sized against cache layer K; no position ids (see the module doc)."""
        make = (create_sliding_window_causal_mask if getattr(self.config, "sliding_window", None) is not None
                else create_causal_mask)
        return make(config=self.config, inputs_embeds=hidden, attention_mask=mask_2d, cache=cache,
                    position_ids=None, layer_idx=layer)
