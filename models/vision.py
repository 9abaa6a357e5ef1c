"""Tile features and vision-side signals from LLaVA-NeXT's own modules, computing only what is asked.

``encode_vision`` runs the CLIP tower layer by layer and stops at the deepest layer anything needs:
vanilla LLaVA-NeXT reads ``hidden_states[-2]``, so the last CLIP layer never has to run.
``encode_tiles`` adds the projector. Signals are dispatched by request type to one provider each
(``VISION_SIGNAL_PROVIDERS``): a provider gets the encoder layer a request names and that layer's
input, so a new signal is one function registered with ``@vision_signal_provider(RequestType)``. A
``ClsAttention(layer=l)`` request costs one [CLS]-row query and one key projection of layer l's
normed input, a ``LayerKeys(layer=l)`` request one key projection; no attention map is
materialised and the tower keeps its SDPA attention.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from compressors.base import ClsAttention, LayerKeys, VisionSignal
from models.timing import stopwatch

# request type -> fn(encoder layer, that layer's input [T, 1+P, C], request) -> value
VisionSignalProvider = Callable[[nn.Module, torch.Tensor, VisionSignal], torch.Tensor]
VISION_SIGNAL_PROVIDERS: dict[type, VisionSignalProvider] = {}


def vision_signal_provider(request_type: type) -> Callable[[VisionSignalProvider], VisionSignalProvider]:
    """Register the function that computes requests of ``request_type`` (one provider per type)."""
    if not (isinstance(request_type, type) and issubclass(request_type, VisionSignal)):
        raise TypeError(f"vision signal types subclass VisionSignal, got {request_type!r}")

    def decorator(fn: VisionSignalProvider) -> VisionSignalProvider:
        if request_type in VISION_SIGNAL_PROVIDERS:
            raise ValueError(f"{request_type.__name__} already has a provider")
        VISION_SIGNAL_PROVIDERS[request_type] = fn
        return fn

    return decorator


def _provider(request: object) -> VisionSignalProvider:
    try:
        return VISION_SIGNAL_PROVIDERS[type(request)]
    except KeyError:
        known = ", ".join(t.__name__ for t in VISION_SIGNAL_PROVIDERS)
        raise ValueError(f"unknown vision signal {request!r}; the pipeline can compute: {known}") from None


def _resolve_index(index: int, size: int, what: str) -> int:
    """Python-style index (negative from the end) into something of ``size`` entries."""
    if not -size <= index < size:
        raise ValueError(f"{what} {index} is out of range; allowed: {-size}..{size - 1}")
    return index % size


def vision_layers_run(config, requests: Iterable[VisionSignal] = ()) -> int:
    """How many CLIP encoder layers ``encode_vision`` runs: up to the feature layer or the deepest
    layer a requested signal reads, whichever is deeper (the cost model counts the same layers)."""
    num_layers = config.vision_config.num_hidden_layers
    feature_index = _resolve_index(config.vision_feature_layer, num_layers + 1, "vision_feature_layer")
    signal_indices = [_resolve_index(req.layer, num_layers, f"{type(req).__name__} layer") for req in requests]
    return max([feature_index, *signal_indices])


@vision_signal_provider(ClsAttention)
def _cls_attention(layer: nn.Module, hidden: torch.Tensor, request: ClsAttention) -> torch.Tensor:
    return cls_attention_logits(layer, hidden)


@vision_signal_provider(LayerKeys)
def _layer_keys(layer: nn.Module, hidden: torch.Tensor, request: LayerKeys) -> torch.Tensor:
    return layer_keys(layer, hidden)


def layer_keys(layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Keys of one CLIP encoder layer, per head.

    Args:
        layer: a ``CLIPEncoderLayer``.
        hidden: ``[T, 1 + P, C]`` the layer's input.
    Returns:
        ``[T, 1 + P, heads, head_dim]``: ``k_proj(layer_norm1(hidden))`` in the model dtype.
    """
    attn = layer.self_attn
    key = attn.k_proj(layer.layer_norm1(hidden))  # [T, 1+P, C]
    return key.view(*key.shape[:2], attn.num_heads, attn.head_dim)


def cls_attention_logits(layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Pre-softmax [CLS]-query logits of one CLIP encoder layer, per head.

    Args:
        layer: a ``CLIPEncoderLayer``.
        hidden: ``[T, 1 + P, C]`` the layer's input.
    Returns:
        ``[T, heads, 1 + P]``: ``(q_cls * scale) . k_j`` in the model dtype (q scaled before the
        product, as GlobalCom2's custom attention does).
    """
    attn = layer.self_attn
    normed = layer.layer_norm1(hidden)  # [T, 1+P, C]
    tiles, tokens, _ = normed.shape
    query = attn.q_proj(normed[:, :1]) * attn.scale  # [T, 1, C]
    key = attn.k_proj(normed)  # [T, 1+P, C]
    query = query.view(tiles, 1, attn.num_heads, attn.head_dim)  # [T, 1, H, d]
    key = key.view(tiles, tokens, attn.num_heads, attn.head_dim)  # [T, 1+P, H, d]
    return torch.einsum("tqhd,tkhd->thk", query, key)  # [T, H, 1+P]


@torch.no_grad()
def encode_vision(
    model: nn.Module,
    pixel_values: torch.Tensor,
    requests: Iterable[VisionSignal] = (),
    timings: dict[str, float] | None = None,
) -> tuple[torch.Tensor, dict[VisionSignal, torch.Tensor]]:
    """The vision tower's hidden state at the feature layer and the requested vision signals.

    Args:
        model: a ``LlavaNextForConditionalGeneration``.
        pixel_values: ``[T, 3, S, S]`` one image's tiles (thumbnail first). ``S`` is normally the
            tower's ``image_size`` (336); other multiples of the patch size are encoded with
            interpolated position embeddings (``downsample``'s smaller tiles).
        requests: vision signals to compute (each type needs a registered provider).
        timings: if given, ``timings["signals_s"]`` gets the time spent computing the signals
            (device-synchronised; for benchmarks, it stalls the GPU pipeline).
    Returns:
        vision_features: ``[T, 1 + P, C]`` ``hidden_states[vision_feature_layer]``, [CLS] first
            (P = 576 at 336 px / patch 14; C = the tower width).
        signals: ``{request: value}``, e.g. ``[T, heads, 1 + P]`` for ``ClsAttention``.
    """
    config = model.config
    if config.vision_feature_select_strategy != "default":
        raise ValueError(
            f"vision_feature_select_strategy {config.vision_feature_select_strategy!r} is not supported; "
            "allowed: 'default' (LLaVA-NeXT drops [CLS])"
        )
    if not isinstance(config.vision_feature_layer, int):
        raise ValueError(f"only a single vision_feature_layer is supported, got {config.vision_feature_layer!r}")
    tower = model.model.vision_tower
    layers = tower.encoder.layers
    num_layers = len(layers)

    # hidden_states[i] is the input of encoder layer i (i = 0..num_layers; the last is the output)
    feature_index = _resolve_index(config.vision_feature_layer, num_layers + 1, "vision_feature_layer")
    probes = {req: (_provider(req), _resolve_index(req.layer, num_layers, f"{type(req).__name__} layer"))
              for req in requests}
    deepest = vision_layers_run(config, probes)

    pixel_values = pixel_values.to(device=tower.device, dtype=tower.dtype)
    interpolate = pixel_values.shape[-1] != config.vision_config.image_size
    hidden = tower.pre_layrnorm(tower.embeddings(pixel_values, interpolate_pos_encoding=interpolate))  # [T, 1+P, C]
    signals: dict[VisionSignal, torch.Tensor] = {}
    selected = hidden
    for index in range(deepest + 1):
        for req, (provide, probe_index) in probes.items():
            if probe_index == index:
                with stopwatch(timings, "signals_s", hidden.device):
                    signals[req] = provide(layers[index], hidden, req)
        if index == feature_index:
            selected = hidden
        if index < deepest:
            hidden = layers[index](hidden, attention_mask=None)
    return selected, signals


@torch.no_grad()
def encode_tiles(
    model: nn.Module,
    pixel_values: torch.Tensor,
    requests: Iterable[VisionSignal] = (),
    timings: dict[str, float] | None = None,
) -> tuple[torch.Tensor, dict[VisionSignal, torch.Tensor]]:
    """Projected tile features and the requested vision signals (``encode_vision`` + projector).

    Returns:
        features: ``[T, P, D]`` projector outputs of ``vision_feature_layer`` without [CLS]
            (D = the LLM width).
        signals: as ``encode_vision``.
    """
    selected, signals = encode_vision(model, pixel_values, requests, timings)
    return model.model.multi_modal_projector(selected[:, 1:]), signals  # [T, P, D]
