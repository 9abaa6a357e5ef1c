"""LLaVA-NeXT inference with a compressor, on transformers' own modules and ``generate``.

processor -> vision tower (thumbnail + crops) -> feature layer -> projector -> vision-stage
compressor (sees the AnyRes layout) -> ``k`` ``<image>`` placeholders in the prompt, the kept
tokens passed as ``mm_encoder_outputs`` -> prefill (with the LLM-stage hook when the compressor
has one) -> greedy decoding with the KV cache. With ``compressor=none`` this produces exactly the
tokens of ``LlavaNextForConditionalGeneration.generate`` on the processor's inputs.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch
from PIL import Image
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList
from transformers.modeling_outputs import BaseModelOutputWithPooling

from compressors.base import Compressor, Provenance, VisionInput, VisionOutput
from compressors.geometry import AnyResLayout, layout_for_image
from models.image_input import check_image_size, fixed_size, process_scaled, scaled_pinpoints
from models.llm_stage import LLMStagePruning, with_decode_mode
from models.prompts import format_prompt
from models.timing import stopwatch, synchronize
from models.vision import encode_vision


class _PrefillClock(LogitsProcessor):
    """Notes when ``generate`` first asks for logits processing: the end of the prefill forward."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.first_call: float | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.first_call is None:
            synchronize(self.device)
            self.first_call = time.perf_counter()
        return scores


def splice_image_tokens(input_ids: torch.Tensor, image_token_id: int, count: int) -> torch.Tensor:
    """Replace the prompt's single run of ``<image>`` placeholders by ``count`` placeholders.

    Args:
        input_ids: ``[1, N]`` processor output (the run has the vanilla token count).
    Returns:
        ``[1, N - run + count]``.
    """
    positions = (input_ids[0] == image_token_id).nonzero().flatten()
    if positions.numel() == 0:
        raise ValueError("the prompt has no <image> placeholder")
    start, end = int(positions[0]), int(positions[-1]) + 1
    if end - start != positions.numel():
        raise ValueError("the prompt must hold exactly one image (one contiguous run of <image> tokens)")
    placeholders = torch.full((1, count), image_token_id, dtype=input_ids.dtype, device=input_ids.device)
    return torch.cat([input_ids[:, :start], placeholders, input_ids[:, end:]], dim=1)


@dataclass
class GenerationResult:
    """One answer and what it cost.

    Token counts are per image: ``before`` = vanilla LLaVA-NeXT's count for the input image (after
    the fixed-size resize, if any, before any compressor's own resize); ``spliced`` = tokens
    placed at ``<image>`` (after the vision stage); ``after`` = visual tokens the last decoder
    layers see (after the LLM stage, if any); ``layer_mean`` = visual tokens averaged over decoder
    layers (the convention FastV-style papers quote). ``layer_lengths`` / ``layer_newlines``: the
    prefill positions / ``image_newline`` tokens at every decoder layer's input (the cost model's
    input: an LLM-stage method's layers from K on see fewer); ``signal_query_rows``: per LLM stage,
    the query rows each attention-row signal used (the cost model counts their FLOPs).
    """

    text: str
    new_tokens: int
    prompt_tokens: int
    layout: AnyResLayout
    visual_tokens_before: int
    visual_tokens_spliced: int
    visual_tokens_after: int
    visual_tokens_layer_mean: float
    provenance: Provenance
    timings: dict[str, float] = field(default_factory=dict)
    layer_lengths: list[int] = field(default_factory=list)
    layer_newlines: list[int] = field(default_factory=list)
    signal_query_rows: list[dict] = field(default_factory=list)
    first_token_logits: torch.Tensor | None = None  # [vocab] float32 on CPU, when asked for (fidelity)


@dataclass
class ImageView:
    """One image question as the vision tower will see it (the processor's side, no model yet)."""

    tiles: torch.Tensor  # [T, 3, s, s] thumbnail first; s = 336, or smaller after transform_image
    layout: AnyResLayout
    input_ids: torch.Tensor  # [1, N] the processor's prompt ids (one run of <image> placeholders)
    tokens_before: int  # vanilla LLaVA-NeXT's visual tokens for the input image


@dataclass
class PreparedPrompt:
    """The compressed prompt, ready for the language model."""

    input_ids: torch.Tensor  # [1, N'] with segment.num_tokens <image> placeholders
    layout: AnyResLayout
    segment: VisionOutput
    timings: dict[str, float]
    tokens_before: int = 0  # vanilla LLaVA-NeXT's visual tokens for the input image


class LlavaNextPipeline:
    """A loaded LLaVA-NeXT model + processor that answers one image question at a time.

    ``image_size`` (``model.image_size``): resize every image to that square first (672: the
    papers' fixed 2x2 grid); None keeps native AnyRes.
    """

    def __init__(self, model, processor, prompt_format: str = "vicuna_v1", image_size: int | None = None) -> None:
        format_prompt("", prompt_format)  # fail fast on an unknown format
        self.model = model
        self.processor = processor
        self.prompt_format = prompt_format
        self.image_size = check_image_size(image_size)
        config = model.config
        self.image_token_id = config.image_token_id
        self.tile_px = config.vision_config.image_size
        self.patch_px = config.vision_config.patch_size
        self.tile_side = self.tile_px // self.patch_px

    @property
    def device(self) -> torch.device:
        return self.model.model.language_model.embed_tokens.weight.device

    def processor_inputs(self, image: Image.Image, question: str, side: int | None = None):
        """The processor's tensors for one image question (placeholders already expanded).

        With a tile ``side`` other than the model's, tiles of ``side * patch`` pixels and a single
        placeholder (``models.image_input.process_scaled``).
        """
        prompt = format_prompt(question, self.prompt_format)
        if side is not None and side != self.tile_side:
            return process_scaled(self.processor, image, prompt, side, self.patch_px)
        return self.processor(images=image, text=prompt, return_tensors="pt")

    def layout_of(self, image_hw: tuple[int, int], side: int | None = None) -> AnyResLayout:
        """The AnyRes layout of an image of ``image_hw`` (H, W) on tiles of ``side`` tokens."""
        side = self.tile_side if side is None else side
        pinpoints = scaled_pinpoints(self.model.config.image_grid_pinpoints, side, self.tile_side)
        return layout_for_image(tuple(image_hw), pinpoints, side * self.patch_px, self.patch_px)

    def generation_config(self, max_new_tokens: int, output_logits: bool = False) -> GenerationConfig:
        """Greedy decoding, one beam, the model's own eos/pad ids (``output_logits``: also return the
        raw logits of every step, in a ``GenerateDecoderOnlyOutput``)."""
        base = self.model.generation_config
        return GenerationConfig(
            max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
            eos_token_id=base.eos_token_id, pad_token_id=base.pad_token_id, bos_token_id=base.bos_token_id,
            output_logits=output_logits, return_dict_in_generate=output_logits,
        )

    def view(self, image: Image.Image, question: str, compressor: Compressor) -> ImageView:
        """Image -> (fixed size, then the compressor's image hook) -> processor -> tiles and layout."""
        image = fixed_size(image, self.image_size)
        tokens_before = self.layout_of((image.height, image.width)).vanilla_token_count()
        image, side = compressor.transform_image(image, self.tile_side)
        inputs = self.processor_inputs(image, question, side)
        layout = self.layout_of(inputs["image_sizes"][0].tolist(), side)
        tiles = inputs["pixel_values"][0, : layout.num_tiles]  # [T, 3, s, s]; batch padding tiles dropped
        return ImageView(tiles=tiles, layout=layout, input_ids=inputs["input_ids"], tokens_before=tokens_before)

    @torch.inference_mode()
    def encode(self, view: ImageView, compressor: Compressor, sample_seed: int = 0,
               timings: dict[str, float] | None = None, signal_timings: dict[str, float] | None = None) -> VisionInput:
        """Tiles -> vision features, the compressor's signals and (unless it projects its own output)
        the projected features: the vision stage's input.

        ``timings["vision_s"]`` gets the whole step; ``signal_timings["signals_s"]`` the signals alone
        (device-synchronised per signal: for benchmarks).
        """
        projector = self.model.model.multi_modal_projector
        with stopwatch(timings, "vision_s", self.device):
            vision_features, signals = encode_vision(self.model, view.tiles, compressor.vision_signals,
                                                     signal_timings)  # [T, 1+P, C]
            features = projector(vision_features[:, 1:]) if compressor.uses_projected_features else None  # [T, P, D]
        return VisionInput(features=features, layout=view.layout, newline=self.model.model.image_newline,
                           signals=signals, sample_seed=sample_seed, vision_features=vision_features,
                           projector=projector)

    @torch.inference_mode()
    def prepare(self, image: Image.Image, question: str, compressor: Compressor, sample_seed: int = 0) -> PreparedPrompt:
        """Everything up to the LLM: image -> tiles -> features -> vision-stage compressor -> spliced prompt."""
        timings: dict[str, float] = {}
        view = self.view(image, question, compressor)
        vision_input = self.encode(view, compressor, sample_seed, timings=timings)
        with stopwatch(timings, "compress_s", self.device):
            segment = compressor.compress_vision(vision_input)
        input_ids = splice_image_tokens(view.input_ids, self.image_token_id, segment.num_tokens).to(self.device)
        return PreparedPrompt(input_ids=input_ids, layout=view.layout, segment=segment, timings=timings,
                              tokens_before=view.tokens_before)

    def llm_stage(self, compressor: Compressor, prepared: PreparedPrompt, timed: bool = False):
        """Context that applies the compressor's LLM stage (a no-op for vision-stage methods)."""
        if compressor.llm_layer is None:
            return contextlib.nullcontext()
        image_mask = prepared.input_ids == self.image_token_id  # [1, N']
        newlines = torch.ones(prepared.segment.num_tokens, dtype=torch.bool)  # segment tokens without a source
        newlines[prepared.segment.provenance.token.cpu()] = False
        return LLMStagePruning(self.model.model.language_model, compressor, image_mask, timed=timed,
                               segment_newlines=newlines)

    def model_inputs(self, prepared: PreparedPrompt) -> dict:
        """Keyword arguments for the model's ``forward``/``generate`` on a prepared prompt."""
        return {
            "input_ids": prepared.input_ids,
            "attention_mask": torch.ones_like(prepared.input_ids),
            "mm_encoder_outputs": {"image": BaseModelOutputWithPooling(pooler_output=[prepared.segment.embeds])},
        }

    @torch.inference_mode()
    def prefill_logits(self, image: Image.Image, question: str, compressor: Compressor,
                       sample_seed: int = 0) -> torch.Tensor:
        """Logits of one forward pass over the compressed prompt, ``[1, N', vocab]`` (for checks)."""
        return self.forward(self.prepare(image, question, compressor, sample_seed), compressor)

    @torch.inference_mode()
    def forward(self, prepared: PreparedPrompt, compressor: Compressor,
                timings: dict[str, float] | None = None, logits_to_keep: int = 0) -> torch.Tensor:
        """One forward pass (the prefill) over a prepared prompt, LLM stage included.

        Returns ``[1, N', vocab]`` logits, or only the last ``logits_to_keep`` positions (``generate``'s
        prefill keeps 1). With ``timings``, the LLM stage's scoring + selection time is stored as
        ``llm_select_s``.
        """
        stage = self.llm_stage(compressor, prepared, timed=timings is not None)
        with stage:
            logits = self.model(**self.model_inputs(prepared), logits_to_keep=logits_to_keep).logits
        if timings is not None and isinstance(stage, LLMStagePruning):
            timings["llm_select_s"] = stage.record.select_s
        return logits

    @torch.inference_mode()
    def generate(
        self,
        image: Image.Image,
        question: str,
        compressor: Compressor,
        max_new_tokens: int,
        sample_seed: int = 0,
        first_token_logits: bool = False,
    ) -> GenerationResult:
        """Answer ``question`` about ``image`` with ``compressor`` applied; greedy, batch size 1.

        ``first_token_logits=True`` also returns the raw logits the first answer token was chosen
        from (the prefill's last position), for fidelity to the uncompressed model.
        """
        device = self.device
        prepared = self.prepare(image, question, compressor, sample_seed)
        stage = self.llm_stage(compressor, prepared)
        clock = _PrefillClock(device)
        synchronize(device)
        start = time.perf_counter()
        generation_config = with_decode_mode(  # e.g. no KV cache
            self.generation_config(max_new_tokens, output_logits=first_token_logits), stage)
        with stage:
            output = self.model.generate(
                **self.model_inputs(prepared),
                generation_config=generation_config,
                logits_processor=LogitsProcessorList([clock]),
            )
        synchronize(device)
        end = time.perf_counter()
        timings = dict(prepared.timings)
        timings["prefill_s"] = (clock.first_call or end) - start
        timings["decode_s"] = end - (clock.first_call or end)

        input_ids = prepared.input_ids
        sequences = output.sequences if first_token_logits else output  # [1, N' + new]
        new_ids = sequences[0, input_ids.shape[1]:]
        text = self.processor.tokenizer.decode(new_ids, skip_special_tokens=True).strip()
        spliced = prepared.segment.num_tokens
        provenance = prepared.segment.provenance
        after, layer_mean = spliced, float(spliced)
        num_layers = self.model.config.text_config.num_hidden_layers
        layer_lengths = [int(input_ids.shape[1])] * num_layers
        layer_newlines = [prepared.segment.num_newlines] * num_layers
        signal_rows = []
        if isinstance(stage, LLMStagePruning):  # the hook counted; read its record
            record = stage.record
            after, layer_mean = record.kept_image_tokens, record.image_tokens_layer_mean
            provenance = provenance.compose(record.image_token, record.segment_index, spliced)
            layer_lengths, layer_newlines = list(record.layer_lengths), list(record.layer_newlines)
            signal_rows = record.stage_query_rows
        return GenerationResult(
            text=text,
            new_tokens=int(new_ids.numel()),
            prompt_tokens=int(input_ids.shape[1]),
            layout=prepared.layout,
            visual_tokens_before=prepared.tokens_before,
            visual_tokens_spliced=spliced,
            visual_tokens_after=after,
            visual_tokens_layer_mean=layer_mean,
            provenance=provenance,
            timings=timings,
            layer_lengths=layer_lengths,
            layer_newlines=layer_newlines,
            signal_query_rows=signal_rows,
            first_token_logits=output.logits[0][0].float().cpu() if first_token_logits else None,
        )
