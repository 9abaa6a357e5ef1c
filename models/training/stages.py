"""The two training objectives and the tower features that link them.

Shapes: ``T`` tiles of one image (thumbnail first), ``P`` = 576 patches, ``C`` the tower width,
``K`` = ``len(CLASSES)`` object classes, ``D`` the language-model width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from transformers.modeling_outputs import BaseModelOutputWithPooling

from compressors.geometry import AnyResLayout
from compressors.packing import pack_spatial
from models.training.conversation import Conversation
from benchmarks.hires_detail import DIGITS
from models.training.labels import COLORS, KINDS, PRESENCE_CLASSES, ViewLabels


class VisionHeads(nn.Module):
    """Stage-1 heads: presence from the pooled [CLS] (last layer); per patch of the feature layer, its
    kind, colour, digit and whether an object's centre lies in it (``models.training.labels``)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.presence = nn.Linear(width, len(PRESENCE_CLASSES))
        self.patch_norm = nn.LayerNorm(width)
        self.kind = nn.Linear(width, len(KINDS))
        self.color = nn.Linear(width, len(COLORS))
        self.digit = nn.Linear(width, len(DIGITS))
        self.centre = nn.Linear(width, 1)


FIELDS = ("presence", "kind", "color", "digit", "centre")


@dataclass
class VisionTargets:
    """Stage-1 targets of a batch of views: presence ``[T, K]`` bool; per patch ``[T, P]``: kind (long,
    0 = background), colour (-1 on background), digit (-1 off glyphs) and centre (bool)."""

    presence: torch.Tensor
    kind: torch.Tensor
    color: torch.Tensor
    digit: torch.Tensor
    centre: torch.Tensor

    @classmethod
    def of(cls, labels: ViewLabels) -> "VisionTargets":
        """Each patch takes the attributes of the object (and glyph) covering it."""

        def gather(index: torch.Tensor, values: torch.Tensor, empty: int) -> torch.Tensor:
            fill = torch.full_like(index, empty)
            return fill if values.numel() == 0 else torch.where(index < 0, fill, values[index.clamp(min=0)])

        objects = labels.objects
        return cls(labels.presence, gather(labels.patch_object, objects.kind, 0),
                   gather(labels.patch_object, objects.color, -1), gather(labels.patch_glyph, objects.digit, -1),
                   labels.centre)

    @classmethod
    def cat(cls, parts: list["VisionTargets"]) -> "VisionTargets":
        return cls(*(torch.cat([getattr(p, name) for p in parts]) for name in FIELDS))

    def to(self, device) -> "VisionTargets":
        return VisionTargets(*(getattr(self, name).to(device) for name in FIELDS))


def feature_layer_hidden(tower, pixel_values: torch.Tensor, feature_layer: int):
    """The tower's output and its ``feature_layer`` hidden state without [CLS]: ``[T, P, C]``."""
    out = tower(pixel_values=pixel_values, output_hidden_states=True)
    return out, out.hidden_states[feature_layer][:, 1:]


def vision_loss(tower, heads: VisionHeads, pixel_values: torch.Tensor, targets: VisionTargets, feature_layer: int,
                patch_weight: float = 1.0, background_weight: float = 0.02) -> tuple[torch.Tensor, dict[str, float]]:
    """Presence BCE on the pooled [CLS] plus per-patch losses on the feature layer: cross-entropies of
    kind, colour and digit, and a centre BCE. Objects cover ~2% of the patches, so background patches
    weigh ``background_weight`` in the kind loss (about as much as all object patches together), and
    centre patches are up-weighted by the inverse of their share."""
    out, patches = feature_layer_hidden(tower, pixel_values, feature_layer)
    losses = {"presence": F.binary_cross_entropy_with_logits(heads.presence(out.pooler_output),
                                                             targets.presence.float())}
    normed = heads.patch_norm(patches).flatten(0, 1)  # [T*P, C]
    weight = torch.ones(len(KINDS), device=patches.device)
    weight[0] = background_weight
    losses["kind"] = F.cross_entropy(heads.kind(normed), targets.kind.flatten(), weight=weight)
    for name in ("color", "digit"):
        labels = getattr(targets, name).flatten()
        scored = labels >= 0
        if bool(scored.any()):
            losses[name] = F.cross_entropy(getattr(heads, name)(normed[scored]), labels[scored])
    centre = targets.centre.flatten().float()
    pos_weight = (centre.numel() - centre.sum()) / centre.sum().clamp(min=1)
    losses["centre"] = F.binary_cross_entropy_with_logits(heads.centre(normed)[:, 0], centre, pos_weight=pos_weight)
    loss = losses["presence"] + patch_weight * sum(v for k, v in losses.items() if k != "presence")
    return loss, {name: float(value.detach()) for name, value in losses.items()}


@torch.no_grad()
def tower_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """What LLaVA-NeXT feeds its projector: the feature layer's patch tokens, ``[T, P, C]``."""
    tower = model.model.vision_tower
    return feature_layer_hidden(tower, pixel_values, model.config.vision_feature_layer)[1]


def language_loss(model, features: torch.Tensor, layout: AnyResLayout, conversation: Conversation) -> torch.Tensor:
    """Mean cross-entropy of the answer tokens, given cached tower ``features`` ``[T, P, C]``.

    The image segment is built as at inference: projector, then vanilla packing with ``image_newline``.
    """
    projected = model.model.multi_modal_projector(features)  # [T, P, D]
    segment = pack_spatial(projected, layout, model.model.image_newline).embeds  # [N_img, D]
    input_ids = conversation.input_ids.to(features.device)
    hidden = model.model(  # one unpadded sequence: the causal mask alone (SDPA's fused causal kernel)
        input_ids=input_ids, attention_mask=None,
        mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=[segment])}, use_cache=False,
    ).last_hidden_state  # [1, N, D]
    logits = model.lm_head(hidden[0, conversation.positions.to(features.device)])  # [A, V]
    return F.cross_entropy(logits, conversation.targets.to(features.device))


@torch.no_grad()
def whiten_projector(projector, features: torch.Tensor) -> None:
    """Fold a per-channel standardisation of the tower ``features`` ``[M, C]`` into the projector's first
    linear layer (``W x + b`` becomes ``W (x - mu) / sigma + b``; same architecture, new weights).

    Why: the feature layer's tokens share a large common component (norm ~10 vs ~2 for what varies
    between patches), so at initialisation every projected image token looks alike to the decoder.
    """
    mean, std = features.mean(0), features.std(0).clamp(min=1e-6)  # [C]
    linear = projector.linear_1
    linear.weight.div_(std)
    linear.bias.sub_(linear.weight @ mean)


def crop_language_loss(model, crop_features: list[torch.Tensor], conversations: list[Conversation]) -> torch.Tensor:
    """Mean cross-entropy of the answer tokens over a batch of crop conversations.

    ``crop_features[i]`` ``[n_i, C]`` are the tower features of the kept patches (raster order); they
    replace the ``n_i`` ``<image>`` placeholders of ``conversations[i]``. Sequences are right-padded.
    """
    language_model = model.model.language_model
    embed = language_model.get_input_embeddings()
    image_token = model.config.image_token_id
    sequences = []
    for features, conversation in zip(crop_features, conversations):
        ids = conversation.input_ids[0].to(features.device)  # [N]
        is_image = ids == image_token
        tokens = embed(ids.masked_fill(is_image, 0))  # [N, D]
        image = model.model.multi_modal_projector(features).to(tokens.dtype)  # [n_i, D]
        sequences.append(tokens.masked_scatter(is_image[:, None], image))
    lengths = torch.tensor([len(s) for s in sequences])
    padded = torch.nn.utils.rnn.pad_sequence(sequences, batch_first=True)  # [B, L, D]
    mask = (torch.arange(padded.shape[1])[None] < lengths[:, None]).long().to(padded.device)  # [B, L]
    hidden = language_model(inputs_embeds=padded, attention_mask=mask).last_hidden_state  # [B, L, D]
    rows = torch.cat([torch.full_like(c.positions, i) for i, c in enumerate(conversations)])
    positions = torch.cat([c.positions for c in conversations])
    logits = model.lm_head(hidden[rows.to(hidden.device), positions.to(hidden.device)])  # [A, V]
    return F.cross_entropy(logits, torch.cat([c.targets for c in conversations]).to(hidden.device))
