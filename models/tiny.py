"""An embedded LLaVA-NeXT with the real AnyRes geometry and seeded random weights, built offline.

It keeps everything a compressor can observe (336 px tiles, patch 14, 24 x 24 tokens per tile,
thumbnail first, LLaVA-NeXT-vicuna's grid pinpoints, ``image_newline``, feature layer -2, a [CLS]
token, a GQA Llama decoder deep enough for FastV at K=2) and shrinks only widths and depths, so one
sample runs in well under a second on two CPU cores. The weights are random: its answers are
meaningless, its token counts, shapes, timings ratios and code paths are the real ones.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlamaTokenizer,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
    MistralConfig,
)
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

from models.prompts import VICUNA_SYSTEM

# LLaVA-NeXT-vicuna's pinpoints, (height, width) in pixels: grids 1x2, 2x1, 2x2, 1x3, 3x1.
GRID_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]

# Text the byte-fallback BPE is trained on: the prompt template and typical short answers.
_TOKENIZER_CORPUS = [
    VICUNA_SYSTEM,
    "USER: ASSISTANT: [INST] [/INST]",
    "What color is the circle? What color is the square? What color is the triangle?",
    "How many squares are there? How many circles are there? What word is written in the image?",
    "Answer the question using a single word or phrase.",
    "red green blue yellow white black orange purple gray yes no zero one two three four five six",
    "Is there a cat in the image? Please answer yes or no. The answer is",
]


def build_tiny_tokenizer(corpus: Sequence[str] = tuple(_TOKENIZER_CORPUS)) -> LlamaTokenizer:
    """A Llama byte-fallback BPE trained in code (same class as vicuna's), plus ``<image>``/``<pad>``.

    ``corpus`` is the text the merges are learned from (a trained model ships its own tokenizer).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=True)
    special = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    bpe.train_from_iterator(list(corpus), trainers.BpeTrainer(vocab_size=512, special_tokens=special,
                                                                    show_progress=False))
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tokenizer = LlamaTokenizer(vocab=model["vocab"], merges=merges, add_bos_token=True)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"], "pad_token": "<pad>"})
    return tokenizer


def build_tiny_processor(tokenizer: LlamaTokenizer) -> LlavaNextProcessor:
    """LLaVA-NeXT processor at the llava-hf checkpoints' settings (336 px, one extra [CLS] token)."""
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": 336},
        crop_size={"height": 336, "width": 336},
        image_grid_pinpoints=GRID_PINPOINTS,
    )
    return LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )


TEXT_MODELS = ("llama", "mistral")


def build_tiny_config(tokenizer: LlamaTokenizer, vision_layers: int = 3, text_layers: int = 4,
                      text_model: str = "llama", sliding_window: int | None = None,
                      rope_theta: float = 10000.0) -> LlavaNextConfig:
    """Real AnyRes geometry, small widths: vision h64 x 3 layers, decoder h128 x 4 layers, GQA 4q/2kv.

    ``text_model="mistral"`` gives the decoder of llava-v1.6-mistral (``MistralModel``; its
    checkpoint has no sliding window, ``sliding_window`` sets one to exercise that mask path).
    """
    if text_model not in TEXT_MODELS:
        raise ValueError(f"unknown text_model {text_model!r}; allowed: {', '.join(TEXT_MODELS)}")
    vision = CLIPVisionConfig(
        image_size=336, patch_size=14, hidden_size=64, intermediate_size=128,
        num_hidden_layers=vision_layers, num_attention_heads=4,
    )
    text_kwargs = dict(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=text_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
    )
    text = (LlamaConfig(**text_kwargs) if text_model == "llama"
            else MistralConfig(**text_kwargs, sliding_window=sliding_window))
    return LlavaNextConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=GRID_PINPOINTS,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )


def build_tiny_llava_next(
    seed: int = 0, attn_implementation: str = "sdpa", vision_layers: int = 3, text_layers: int = 4,
    text_model: str = "llama", sliding_window: int | None = None, tokenizer: LlamaTokenizer | None = None,
    rope_theta: float = 10000.0,
) -> tuple[LlavaNextForConditionalGeneration, LlavaNextProcessor]:
    """The tiny model (eval mode, float32, CPU) and its processor; same seed, same weights.

    ``tokenizer`` replaces the default one (its vocabulary sizes the embeddings).
    """
    tokenizer = build_tiny_tokenizer() if tokenizer is None else tokenizer
    processor = build_tiny_processor(tokenizer)
    config = build_tiny_config(tokenizer, vision_layers=vision_layers, text_layers=text_layers,
                               text_model=text_model, sliding_window=sliding_window, rope_theta=rope_theta)
    fork = torch.random.fork_rng(devices=[])
    with fork:
        torch.manual_seed(seed)
        model = LlavaNextForConditionalGeneration._from_config(config, attn_implementation=attn_implementation)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), processor
