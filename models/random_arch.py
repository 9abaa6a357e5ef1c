"""Full-size LLaVA-NeXT architectures with random weights, for timing where no checkpoint exists.

Shapes are the real ones (CLIP ViT-L/14-336 with 24 layers; Vicuna-7B/13B decoders), so the
cost of a compressor can be set against the vision tower and prefill it runs beside. The
weights are random, so the outputs are meaningless. ``text_layers`` can build fewer decoder
layers than the real model (a CPU cannot hold 7B in float32); prefill time per layer is then
measured on those layers and scaled to the full depth, and is reported as scaled.
"""

from __future__ import annotations

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

from models.tiny import GRID_PINPOINTS, build_tiny_processor, build_tiny_tokenizer

# name -> (hidden, intermediate, layers, heads): the decoders of llava-v1.6-vicuna-{7b,13b}
ARCHITECTURES = {
    "llava_next_7b": (4096, 11008, 32, 32),
    "llava_next_13b": (5120, 13824, 40, 40),
}
VOCAB = 32064  # llava-hf vicuna: 32000 + <image> + <pad>, padded to a multiple of 64


def full_size_config(arch: str, image_token_id: int, text_layers: int | None = None) -> LlavaNextConfig:
    try:
        hidden, intermediate, layers, heads = ARCHITECTURES[arch]
    except KeyError:
        raise ValueError(f"unknown architecture {arch!r}; allowed: {', '.join(ARCHITECTURES)}") from None
    vision = CLIPVisionConfig(image_size=336, patch_size=14, hidden_size=1024, intermediate_size=4096,
                              num_hidden_layers=24, num_attention_heads=16, projection_dim=768)
    text = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=intermediate,
                       num_hidden_layers=text_layers or layers, num_attention_heads=heads,
                       num_key_value_heads=heads, max_position_embeddings=4096, rms_norm_eps=1e-5)
    return LlavaNextConfig(vision_config=vision, text_config=text, image_token_index=image_token_id,
                           image_grid_pinpoints=GRID_PINPOINTS, vision_feature_layer=-2,
                           vision_feature_select_strategy="default")


def full_depth(arch: str) -> int:
    return ARCHITECTURES[arch][2]


def build_random_llava_next(arch: str, device: str = "cpu", dtype: torch.dtype = torch.float32,
                            text_layers: int | None = None, seed: int = 0):
    """A random-weight model of ``arch`` on ``device`` (eval mode) and the tiny model's processor
    (same AnyRes geometry; its tokenizer's ids all fit the full vocabulary)."""
    tokenizer = build_tiny_tokenizer()
    processor = build_tiny_processor(tokenizer)
    config = full_size_config(arch, tokenizer.convert_tokens_to_ids("<image>"), text_layers)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlavaNextForConditionalGeneration._from_config(config, dtype=dtype)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), processor
