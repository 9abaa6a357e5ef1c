"""The two training objectives and the tower features that link them.

Shapes: ``T`` tiles of one image (thumbnail first), ``P`` = 576 patches, ``C`` the tower width,
``K`` = ``len(CLASSES)`` object classes, ``D`` the language-model width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from models.training.conversation import ASKED, IGNORE, Conversation
from benchmarks.hires_detail import DIGITS
from models.training.labels import COLORS, KINDS, PRESENCE_CLASSES, ViewLabels
from models.training.symbolic import PatchSymbols


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


class AskedHeads(nn.Module):
    """Stage-2 scaffolding: from a middle layer's hidden state at the position that predicts a turn's
    answer, what the question names (``models.training.conversation.ASKED``).

    Why: to answer "What color is the circle?" the decoder must carry "circle" from the question to
    the answer position *and* look up the circle among the image tokens; neither step pays off alone,
    and a decoder trained from scratch sat at the answer prior for thousands of steps. These heads
    teach the first step from the question's own words (never the answer, never where to look in
    the image), so the look-up is learned by the answer loss alone. Not exported.
    """

    def __init__(self, width: int) -> None:
        super().__init__()
        self.heads = nn.ModuleDict({name: nn.Linear(width, len(values)) for name, values in ASKED.items()})

    def loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of the named fields; ``hidden`` ``[Q, D]``, ``labels`` ``[Q, len(ASKED)]``."""
        losses = [F.cross_entropy(head(hidden), labels[:, i], ignore_index=IGNORE)
                  for i, head in enumerate(self.heads.values()) if bool((labels[:, i] != IGNORE).any())]
        return torch.stack(losses).mean()


class BindHeads(nn.Module):
    """Stage-2 scaffolding: from a middle layer's hidden state at each digit-box image token of a crop,
    the box's frame colour and its digit (``models.training.symbolic.PatchSymbols``).

    Why: the tower's features are local. A glyph's patches give its digit but not the colour of the
    frame around it (stage-1 heads: 99% and 20%, chance), so "the digit in the red box" joins two
    neighbouring image tokens. Answer loss alone taught the decoder to read *a* box's digit, not the
    asked one (right for one box, at chance among two or three). These heads ask every box token to
    carry its whole box by ``layer``, the join the symbolic warm-up's tokens arrive with; the labels
    describe the image only (never a question or an answer). Not exported. On val-500 digits went
    from 61% to 100% (three boxes in the image: 13 to 42 of 42).
    """

    def __init__(self, width: int) -> None:
        super().__init__()
        self.color = nn.Linear(width, len(COLORS))
        self.digit = nn.Linear(width, len(DIGITS))

    def loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean of the colour and digit cross-entropies; ``hidden`` ``[M, D]``, ``labels`` ``[M, 2]``
        (colour, digit; ``IGNORE`` off digit boxes). Zero (with a graph) when no token is labelled."""
        scored = labels[:, 0] != IGNORE
        if not bool(scored.any()):
            return hidden.sum() * 0.0
        hidden, labels = hidden[scored], labels[scored]
        return (F.cross_entropy(self.color(hidden), labels[:, 0]) + F.cross_entropy(self.digit(hidden), labels[:, 1])) / 2


def box_token_labels(symbols: PatchSymbols, sources: torch.Tensor) -> torch.Tensor:
    """``[n, 2]`` long (colour, digit) of the image tokens ``sources`` (``[n]`` ids among an image's
    ``V * P``; -1 = newline): a crop patch of a digit box takes its box's, every other token ``IGNORE``."""
    patches = symbols.kind.shape[1]
    index = sources.clamp(min=0)
    box = (sources >= patches) & (symbols.kind.flatten()[index] == KINDS.index("box"))  # [n]: crops only
    labels = torch.stack([symbols.color.flatten()[index], symbols.digit.flatten()[index]], dim=1)  # [n, 2]
    return torch.where(box[:, None], labels, torch.full_like(labels, IGNORE))


@dataclass(frozen=True)
class BindConfig:
    heads: BindHeads
    layer: int  # hidden_states index, as AskedConfig's
    weight: float


@dataclass(frozen=True)
class AskedConfig:
    heads: AskedHeads
    layer: int  # hidden_states index: 0 = embeddings, i = output of decoder layer i - 1
    weight: float


def category_balanced_mean(losses: torch.Tensor, categories: torch.Tensor) -> torch.Tensor:
    """Mean over the categories present of each category's mean loss (``[A]`` values, ``[A]`` ids).

    Why: a scene yields three count questions but at most three digit boxes, so a plain mean would
    train mostly on counting while ``hires_detail`` scores the four types equally.
    """
    present, index = categories.unique(return_inverse=True)
    sums = torch.zeros(len(present), dtype=losses.dtype, device=losses.device).index_add_(0, index, losses)
    counts = torch.zeros(len(present), dtype=losses.dtype, device=losses.device).index_add_(0, index, torch.ones_like(losses))
    return (sums / counts).mean()


def _pad(rows: list[torch.Tensor]) -> torch.Tensor:
    return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)


def _later_turns_mask(conversations: list[Conversation], kept_index: list[torch.Tensor], first_len: list[int],
                      cached: int, length: int) -> torch.Tensor:
    """``[B, 1, length, cached + length]`` bool: what the later turns' tokens (the second pass's queries)
    attend to among the first pass's ``cached`` keys and their own, by ``Conversation.attention``; a
    padding query attends to itself only, so no row is empty."""
    mask = torch.zeros(len(conversations), 1, length, cached + length, dtype=torch.bool)
    mask[:, 0, :, cached:] = torch.eye(length, dtype=torch.bool)
    for i, (conversation, index, n0) in enumerate(zip(conversations, kept_index, first_len)):
        rows = conversation.attention(index.cpu())[n0:]  # [n - n0, n]
        mask[i, 0, :len(rows), :n0] = rows[:, :n0]
        mask[i, 0, :len(rows), cached:cached + len(rows)] = rows[:, n0:]
    return mask


def _forward(language_model, sequences: list[torch.Tensor], position_ids: list[torch.Tensor],
             conversations: list[Conversation], kept_index: list[torch.Tensor], layers: tuple[int, ...] = ()
             ) -> tuple[list[torch.Tensor], dict[int, list[torch.Tensor]]]:
    """Per sequence its last hidden states ``[n_i, D]`` and, per index in ``layers``, that hidden state's
    (0 = embeddings).

    A conversation runs causally; one of independent turns in two passes: turn 0 (system, image, its
    question and answer) causally, then the later turns' few tokens on its KV cache, each seeing the
    prefix it shares and itself. One masked pass over the whole sequence would give the same values
    but cost a full, not a causal, attention over the ~3k image tokens.
    """
    lengths = [len(s) for s in sequences]
    first_len = [n if c.token_turns is None else int((c.token_turns.to(index.device)[index] == 0).sum())
                 for n, c, index in zip(lengths, conversations, kept_index)]
    first = _pad([s[:n] for s, n in zip(sequences, first_len)])  # [B, L1, D]
    device = first.device
    mask = (torch.arange(first.shape[1])[None] < torch.tensor(first_len)[:, None]).long().to(device)  # [B, L1]
    later_turns = any(n0 < n for n0, n in zip(first_len, lengths))
    out1 = language_model(inputs_embeds=first, attention_mask=mask, use_cache=later_turns,
                          position_ids=_pad([p[:n] for p, n in zip(position_ids, first_len)]).to(device),
                          output_hidden_states=bool(layers))
    outputs = [(out1.last_hidden_state, [out1.hidden_states[k] for k in layers])]
    if later_turns:
        later = _pad([s[n:] for s, n in zip(sequences, first_len)])  # [B, L2, D]
        later_mask = _later_turns_mask(conversations, kept_index, first_len, first.shape[1], later.shape[1])
        out2 = language_model(inputs_embeds=later, attention_mask=later_mask.to(device), cache=out1.cache,
                              position_ids=_pad([p[n:] for p, n in zip(position_ids, first_len)]).to(device),
                              output_hidden_states=bool(layers))
        outputs.append((out2.last_hidden_state, [out2.hidden_states[k] for k in layers]))

    def joined(passes: list[torch.Tensor]) -> list[torch.Tensor]:  # [B, L1, D] (, [B, L2, D]) -> [n_i, D]
        if len(passes) == 1:
            return [passes[0][i, :n] for i, n in enumerate(lengths)]
        return [torch.cat([passes[0][i, :n0], passes[1][i, :n - n0]]) for i, (n0, n) in enumerate(zip(first_len, lengths))]

    return joined([h for h, _ in outputs]), {k: joined([h[i] for _, h in outputs]) for i, k in enumerate(layers)}


def conversation_loss(model, image_embeds: list[torch.Tensor], conversations: list[Conversation],
                      asked: AskedConfig | None = None, balance: bool = False,
                      image_keep: list[torch.Tensor] | None = None, bind: BindConfig | None = None,
                      image_labels: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Cross-entropy of the answer tokens over a batch of conversations (+ the weighted ``asked`` loss,
    + with ``bind`` the weighted ``BindHeads`` loss on ``image_labels[i]`` ``[n_i, 2]``, one row per image
    token before ``image_keep``): the mean over targets, or with ``balance`` the mean over question
    types of their means.

    ``image_keep[i]`` ``[n_i]`` bool drops image tokens of sequence ``i``; the others keep the position
    ids they have in the whole sequence (as FastV's kept tokens do), so a sparse sequence is laid out
    as inference lays out the full one.

    ``image_embeds[i]`` ``[n_i, D]`` replace the ``n_i`` ``<image>`` placeholders of ``conversations[i]``
    (projected already: LLaVA's merge of image features into the text embeddings). Right-padded.
    """
    language_model = model.model.language_model
    embed = language_model.get_input_embeddings()
    image_token = model.config.image_token_id
    sequences, position_ids, new_index, kept_index, image_at = [], [], [], [], []
    for i, (image, conversation) in enumerate(zip(image_embeds, conversations)):
        ids = conversation.input_ids[0].to(image.device)  # [N]
        is_image = ids == image_token
        tokens = embed(ids.masked_fill(is_image, 0))  # [N, D]
        sequence = tokens.masked_scatter(is_image[:, None], image.to(tokens.dtype))  # [N, D]
        kept = torch.ones_like(is_image)
        if image_keep is not None:
            kept = kept.masked_scatter(is_image, image_keep[i].to(kept.device))  # text is always kept
        index = kept.nonzero().flatten()  # [N'] the kept tokens' places in the whole sequence
        sequences.append(sequence[kept])  # [N', D]
        position_ids.append(index if conversation.position_ids is None
                            else conversation.position_ids.to(index.device)[index])  # [N']
        new_index.append(kept.long().cumsum(0) - 1)  # [N] where each kept token sits in the sparse one
        kept_index.append(index)
        image_at.append(new_index[-1][is_image & kept])  # [n_i'] the kept image tokens in the sparse sequence
    layers = sorted({c.layer for c in (asked, bind) if c is not None})
    last, middle = _forward(language_model, sequences, position_ids, conversations, kept_index, tuple(layers))
    device = last[0].device

    def gather(hidden: list[torch.Tensor], field: str) -> torch.Tensor:  # per sequence [n_i, D] -> [sum, D]
        return torch.cat([h[index[getattr(c, field).to(index.device)].to(device)]
                          for h, index, c in zip(hidden, new_index, conversations)])

    logits = model.lm_head(gather(last, "positions"))  # [A, V]
    targets = torch.cat([c.targets for c in conversations]).to(device)  # [A]
    if balance:
        categories = torch.cat([c.asked[c.target_turns, 0] for c in conversations]).to(device)  # [A]
        answer = category_balanced_mean(F.cross_entropy(logits, targets, reduction="none"), categories)
    else:
        answer = F.cross_entropy(logits, targets)
    parts = {"answer": float(answer.detach())}
    loss = answer
    if asked is not None:
        labels = torch.cat([c.asked for c in conversations]).to(device)  # [Q, len(ASKED)]
        asked_loss = asked.heads.loss(gather(middle[asked.layer], "turn_positions"), labels)
        parts["asked"] = float(asked_loss.detach())
        loss = loss + asked.weight * asked_loss
    if bind is not None:
        if image_labels is None:
            raise ValueError("a bind loss needs image_labels, one [n_i, 2] per conversation")
        hidden = torch.cat([h[at.to(device)] for h, at in zip(middle[bind.layer], image_at)])  # [M, D]
        if image_keep is not None:
            image_labels = [lab[keep.to(lab.device)] for lab, keep in zip(image_labels, image_keep)]
        labels = torch.cat(image_labels).to(device)  # [M, 2]
        bind_loss = bind.heads.loss(hidden, labels)
        parts["bind"] = float(bind_loss.detach())
        loss = loss + bind.weight * bind_loss
    return loss, parts
