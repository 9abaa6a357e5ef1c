"""Checks that the trained model's signals mean what they mean in LLaVA-NeXT (reported in the card).

* ``cls_attention_share``: how much of the last CLIP layer's [CLS] attention (GlobalCom2's signal)
  falls on patches that show an object, beside the share of such patches (uniform attention);
* ``ThumbnailOnly``: drops every crop token (the thumbnail and the row newlines stay), so the val
  accuracy without crops shows how much of the task the 336 px thumbnail alone answers.
"""

from __future__ import annotations

import torch

from benchmarks.hires_detail import Scene
from compressors.base import ClsAttention, Compressor, VisionInput, VisionOutput
from compressors.packing import pack_spatial
from models.training.data import image_tiles
from models.training.labels import view_labels
from models.vision import encode_tiles


class ThumbnailOnly(Compressor):
    """Keeps the thumbnail's 576 tokens and the newlines; every crop token is dropped (not registered)."""

    name = "thumbnail_only"
    identity_at_full_ratio = False

    def compress_vision(self, inp: VisionInput) -> VisionOutput:
        keep = torch.zeros(inp.layout.num_tiles, inp.layout.tokens_per_tile, dtype=torch.bool,
                           device=inp.features.device)
        keep[0] = True
        return pack_spatial(inp.features, inp.layout, inp.newline, keep=keep)


@torch.no_grad()
def cls_attention_share(model, processor, scenes: list[Scene]) -> dict[str, float]:
    """Mean over views of the [CLS] attention mass (last layer, head-mean logits, softmax over the
    patches) on object patches, and the mean share of object patches."""
    request = ClsAttention(layer=-1)
    vision = model.config.vision_config
    on_objects, share, views = 0.0, 0.0, 0
    for scene in scenes:
        tiles = image_tiles(processor, scene).to(model.device)
        _, signals = encode_tiles(model, tiles, (request,))
        attention = signals[request].float().mean(1)[:, 1:].softmax(-1)  # [T, P]
        labels = view_labels(scene, model.config.image_grid_pinpoints, vision.image_size, vision.patch_size)
        objects = (labels.patch_object >= 0).to(attention.device)  # [T, P]
        on_objects += float((attention * objects).sum())
        share += float(objects.float().mean(-1).sum())
        views += attention.shape[0]
    return {"cls_attention_on_object_patches": on_objects / views, "object_patch_share": share / views}
