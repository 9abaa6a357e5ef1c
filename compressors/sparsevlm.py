"""``sparsevlm``: SparseVLM (Zhang et al., ICML 2025) and SparseVLM+ (``version=v2``): text-guided
pruning inside the LLM, with recycling of pruned tokens (v1).

As the authors' code (Gumpest/SparseVLMs@26a5f48: ``modelling_sparse_llama.py``
``LlamaDynamicvitModel.forward``, ``score.py``, ``utils.py:cluster_and_merge``), vectorised:

* **raters**, once per prefill from the decoder's input embeddings: ``softmax_over_text(V T^T)``
  averaged over the image tokens V gives one value per text token T after the image; the raters
  are the text tokens above the mean of those values;
* **stages** after decoder layers ``layers`` (their ``pruning_loc``, 2/6/15): that layer's attention
  probabilities (its own q/k; SDPA stays on), mean over heads, the raters' rows and the image
  columns, mean over raters; the top ``min(n_s, V - 1)`` image tokens stay (V: current image
  tokens), in their order, every text token stays. Layers from the next one on run on the result;
* **v1 recycling**: of the pruned image tokens, the ``int(0.3 n) + 1`` with the highest score are
  clustered by DPC-kNN into ``int(m / 10) + 1`` tokens (each the mean of its cluster, with the
  authors' ``1e-6`` in the divisor and their density noise, drawn from a generator seeded with
  ``seed`` per prefill), inserted right after the kept image tokens; position ids are renumbered
  ``0..L'-1`` and decoding continues each layer's own numbering (its cache length);
* **v2** (SparseVLM+): the attention is divided by the RoPE-only map ``rot(1)_q . rot(1)_k / sqrt(d)``
  ("gravity correction"), only the ``heads`` heads with the most rater-to-image mass are averaged,
  nothing is recycled, and position ids stay the original ones.

**Ratio.** The authors' knob ``RETAIN_TOKN`` (192/128/96/64 of LLaVA-1.5's 576 tokens) names a
per-stage count table. ``ratio`` = RETAIN_TOKN / 576 (e.g. 0.3333 for 192) uses that table, scaled
to the prompt's N image tokens (``round(N * n_s / 576)``). Any other ratio scales the version's 192
table by the factor that makes the authors' logged "Equal Tokens" mean equal ``ratio``: layers
before the first pruning layer count N, a pruning layer and the ones after it count that stage's
tokens (``score.py``'s ``2*576 + 4*300 + ...``). vtclab's ``layer_mean`` counts what each layer's
input holds (the pruning layer itself is still full, recycled tokens count), so it reads a little
higher. ``ratio=1`` is not the identity: the authors always drop at least one token per stage.

**Paper vs code** (``variant``). ``authors`` (default): the fixed per-stage tables above, as the
authors' current code (``score.py`` at 26a5f48, no rank computation). ``paper`` (v1 only): the
paper's rank-based adaptive count, as the authors' code released with the paper computes it
(b72c5d6, Oct 2024, ``score.py:attn_postprocess_rank``; the paper's method text is not stored here,
only its abstract naming the rule): at each stage, P = the raters' rows of the head-mean attention
over the current image tokens (``[R, V]``, float32); if ``rank(P) = V`` the stage prunes nothing
(nor recycles); otherwise the top ``min(int(rank(P) * scale + bias), V - 1)`` stay. ``scale``/``bias``
default to the release scripts' settings for 192/128/64 tokens (13.5/0, 9/6, 0.8/0; ``ratio``
0.3333/0.2222/0.1111), any other ratio needs them given. The release code listed a fourth pruning
layer (``pruning_loc = [2, 6, 15, 19]``); ``layers`` stays a separate setting.

On LLaVA-NeXT (the authors' code is LLaVA-1.5 only) the image span is the whole packed segment,
thumbnail, crops and newlines. ``score_dtype``: ``float32``, or ``model`` (the authors' model-dtype
arithmetic).
"""

from __future__ import annotations

import math

import torch

from compressors.base import AttentionRows, Compressor, LLMDecision, LLMInput, PromptEmbeddings
from compressors.fastv import SCORE_DTYPES, check_option
from compressors.pdrop import check_layers
from compressors.registry import register_compressor

VERSIONS = ("v1", "v2")
VARIANTS = ("authors", "paper")
# the paper-release scripts (b72c5d6: scripts/v1_5/eval/{mme,pope,textvqa}.sh): RETAIN_TOKN -> (scale, bias)
PAPER_SCALES = {192: (13.5, 0.0), 128: (9.0, 6.0), 64: (0.8, 0.0)}
# score.py: RETAIN_TOKN -> tokens kept after each pruning layer (of 576), per variant
AUTHORS_SCHEDULES = {
    "v1": {192: (300, 200, 110), 128: (303, 110, 36), 96: (238, 48, 26), 64: (66, 30, 17)},
    "v2": {192: (300, 200, 118), 128: (238, 108, 60), 96: (246, 54, 28), 64: (66, 34, 20)},
}
AUTHORS_TOKENS = 576
RECYCLE_FRACTION = 0.3  # v1: share of the pruned tokens that are recycled (plus one)


def stage_counts(ratio: float, version: str, layers: tuple[int, ...], num_layers: int, num_image_tokens: int) -> list[int]:
    """Image tokens to keep after each stage, before the ``V - 1`` cap (see the module doc):
    ``round(N * n_s / 576)`` with the authors' table ``n_s``, or with the 192 table scaled."""
    retain = ratio * AUTHORS_TOKENS
    table = AUTHORS_SCHEDULES[version]
    nearest = min(table, key=lambda t: abs(t - retain))
    if abs(retain - nearest) <= 0.1 and len(layers) == 3:
        return [round(num_image_tokens * n / AUTHORS_TOKENS) for n in table[nearest]]
    shape = table[192]
    if len(layers) != len(shape):
        raise ValueError(f"sparsevlm: {len(layers)} stages {list(layers)}, but the authors' schedules have "
                         f"{len(shape)}; give three layers")
    bounds = (*layers, num_layers)
    weighted = sum((bounds[s + 1] - bounds[s]) * shape[s] for s in range(len(shape))) / AUTHORS_TOKENS
    scale = (ratio * num_layers - layers[0]) / weighted
    if scale <= 0:
        raise ValueError(f"sparsevlm: ratio {ratio} is at or below the {layers[0]} full layers of {num_layers} "
                         f"({layers[0] / num_layers:.4f}); nothing is left for the stages")
    return [round(num_image_tokens * scale * n / AUTHORS_TOKENS) for n in shape]


def paper_scale_bias(ratio: float) -> tuple[float, float]:
    """The paper-release scripts' ``(scale, bias)`` for ``ratio`` = 192/128/64 of 576 (see the module doc)."""
    retain = ratio * AUTHORS_TOKENS
    nearest = min(PAPER_SCALES, key=lambda t: abs(t - retain))
    if abs(retain - nearest) > 0.1:
        known = ", ".join(f"{t / AUTHORS_TOKENS:.4f} ({t})" for t in PAPER_SCALES)
        raise ValueError(f"sparsevlm variant=paper: ratio {ratio} has no setting in the authors' scripts "
                         f"(ratios {known}); give compressor.scale and compressor.bias")
    return PAPER_SCALES[nearest]


def rank_keep_count(relation: torch.Tensor, scale: float, bias: float) -> int | None:
    """The paper's rank rule for one stage: image tokens kept, or None when ``rank(P) = V`` (no pruning).

    Args:
        relation: ``[R, V]`` P, the raters' head-mean attention over the current image tokens.
    """
    num_image = relation.shape[-1]
    rank = int(torch.linalg.matrix_rank(relation.float()))
    if rank == num_image:
        return None
    return min(int(rank * scale + bias), num_image - 1)


def select_raters(embeddings: torch.Tensor, image_start: int, image_end: int) -> torch.Tensor:
    """Rater offsets among the text tokens after the image (``[R]``, ascending).

    Args:
        embeddings: ``[L0, D]`` the prefill's decoder input.
    """
    image, text = embeddings[image_start:image_end], embeddings[image_end:]  # [N, D], [T, D]
    relation = (image @ text.T).softmax(dim=1).mean(dim=0)  # [T]
    return (relation > relation.mean()).nonzero().flatten()


def rope_ones(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE applied to an all-ones vector at each position, ``[S, d]`` (Llama's rotate_half layout)."""
    half = cos.shape[-1] // 2
    sign = torch.cat([-torch.ones(half, dtype=cos.dtype, device=cos.device),
                      torch.ones(half, dtype=cos.dtype, device=cos.device)])
    return cos + sign * sin


def dpc_knn_merge(tokens: torch.Tensor, clusters: int, generator: torch.Generator | None = None):
    """DPC-kNN clustering and mean merge, as ``cluster_and_merge`` computes it.

    Args:
        tokens: ``[n, D]`` tokens to recycle.
        clusters: number of clusters (also the kNN's k, as the authors).
        generator: source of the ``1e-6`` density noise.
    Returns:
        ``([clusters, D]`` merged tokens, ``[n]`` cluster of each token).
    """
    n, dim = tokens.shape
    wide = tokens.to(torch.promote_types(tokens.dtype, torch.float32))  # distances via a matmul, in float32+
    dist = (torch.cdist(wide[None], wide[None])[0] / dim ** 0.5).to(tokens.dtype)  # [n, n]
    nearest = dist.topk(clusters, dim=-1, largest=False).values  # [n, k]
    density = (-(nearest ** 2).mean(dim=-1)).exp()  # [n]
    density = density + torch.rand(density.shape, generator=generator, dtype=density.dtype,
                                   device=density.device) * 1e-6
    denser = (density[None, :] > density[:, None]).to(tokens.dtype)  # [i, j]: j is denser than i
    dist_max = dist.max()
    delta = (dist * denser + dist_max * (1 - denser)).min(dim=-1).values  # [n]
    centers = (delta * density).topk(clusters).indices  # [k]
    assign = dist[centers].argmin(dim=0)  # [n] nearest center
    assign[centers] = torch.arange(clusters, device=tokens.device)
    counts = torch.zeros(clusters, 1, dtype=tokens.dtype, device=tokens.device).index_add_(
        0, assign, torch.ones(n, 1, dtype=tokens.dtype, device=tokens.device)) + 1e-6
    merged = torch.zeros(clusters, dim, dtype=tokens.dtype, device=tokens.device).index_add_(
        0, assign, tokens * (1 / counts[assign]))
    return merged, assign


@register_compressor("sparsevlm")
class SparseVLM(Compressor):
    """Rater-guided multi-stage pruning (v1: with DPC-kNN recycling; v2: SparseVLM+); counts from the
    authors' tables or, ``variant=paper``, from the rank of the raters' attention."""

    identity_at_full_ratio = False
    llm_layer_key = "layers"  # the setting named by the depth check

    def __init__(self, ratio: float = 0.3333, layers: tuple[int, ...] = (2, 6, 15), version: str = "v1",
                 variant: str = "authors", scale: float | None = None, bias: float | None = None, heads: int = 14,
                 score_dtype: str = "float32", seed: int = 0) -> None:
        super().__init__(ratio)
        self.layers = check_layers("layers", layers, minimum=0)
        if variant in VERSIONS:  # the spelling before version and variant were separate settings
            raise ValueError(f"compressor.variant must be one of {', '.join(VARIANTS)}, got {variant!r}; "
                             f"SparseVLM's version is compressor.version={variant}")
        check_option("version", version, VERSIONS)
        check_option("variant", variant, VARIANTS)
        check_option("score_dtype", score_dtype, SCORE_DTYPES)
        if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
            raise ValueError(f"compressor.heads (v2's attention heads kept) must be an integer >= 1, got {heads!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"compressor.seed must be an integer, got {seed!r}")
        if variant == "paper" and version != "v1":
            raise ValueError("sparsevlm variant=paper (the SparseVLM paper's rank rule) needs compressor.version=v1; "
                             f"got version {version!r}, which has only the authors' code (variant=authors)")
        if variant == "authors" and (scale is not None or bias is not None):
            raise ValueError(f"compressor.scale/bias set the rank rule of variant=paper; got scale={scale!r}, "
                             f"bias={bias!r} with variant=authors (leave them null)")
        if variant == "paper":
            if scale is None and bias is None:
                scale, bias = paper_scale_bias(self.ratio)
            for key, value in (("scale", scale), ("bias", bias)):
                if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                    raise ValueError(f"compressor.{key} (variant=paper) must be a number >= 0, got {value!r}")
            scale, bias = float(scale), float(bias)
        self.version, self.variant, self.scale, self.bias = version, variant, scale, bias
        self.heads, self.score_dtype, self.seed = heads, score_dtype, seed
        self.llm_layers = tuple(k + 1 for k in self.layers)  # a stage prunes the output of its layer
        self.llm_positions = "contiguous" if version == "v1" else "original"

    @property
    def llm_signals(self):
        return (PromptEmbeddings(), AttentionRows(layer="previous", queries="mask", dtype=self.score_dtype))

    # -- raters -----------------------------------------------------------------------------------
    def _rater_offsets(self, inp: LLMInput) -> torch.Tensor:
        """Raters as offsets after the image (text after the image is never pruned, so they hold)."""
        raters = inp.state.get("sparsevlm_raters")
        if raters is None:
            embeddings = inp.signals[PromptEmbeddings()][0]  # [L0, D]
            image = (inp.original_positions[inp.image_mask[0]] if inp.stage == 0 else None)
            if image is None or image.numel() == 0:
                raise ValueError("sparsevlm: the first stage sees no image tokens")
            if self.score_dtype == "float32":
                embeddings = embeddings.to(torch.promote_types(embeddings.dtype, torch.float32))
            raters = select_raters(embeddings, int(image[0]), int(image[-1]) + 1)
            inp.state["sparsevlm_raters"] = raters
        return raters

    def llm_query_mask(self, inp: LLMInput) -> torch.Tensor:
        _, end = inp.image_span()
        mask = torch.zeros(inp.image_mask.shape[1], dtype=torch.bool, device=inp.image_mask.device)
        mask[end + self._rater_offsets(inp).to(mask.device)] = True
        return mask

    # -- scores -----------------------------------------------------------------------------------
    def relation(self, inp: LLMInput) -> torch.Tensor:
        """``[R, V]`` every rater's (head-mean) attention over the current image tokens."""
        start, end = inp.image_span()
        attention = inp.signals[self.llm_signals[1]][0, :, :, start:end]  # [H, R, V]
        if self.version == "v2":
            cos, sin = (t[0] for t in inp.position_embeddings)  # [L, d]
            cos, sin = cos.to(attention.dtype), sin.to(attention.dtype)  # float32 scores: float32 (or wider)
            ones = rope_ones(cos, sin)  # [L, d]
            rater_rows = self.llm_query_mask(inp).nonzero().flatten()
            rope = (ones[rater_rows] @ ones[start:end].T) / math.sqrt(ones.shape[-1])  # [R, V]
            attention = attention / rope.to(attention.device)
            if self.heads > attention.shape[0]:
                raise ValueError(f"sparsevlm v2 keeps {self.heads} attention heads but the model has "
                                 f"{attention.shape[0]}; set compressor.heads <= {attention.shape[0]}")
            top = attention.sum(dim=(1, 2)).topk(self.heads).indices
            attention = attention[top]
        return attention.mean(dim=0)  # heads: [R, V]

    def keep_count(self, inp: LLMInput) -> int:
        """Image tokens this stage keeps, variant ``authors`` (the tables)."""
        counts = inp.state.get("sparsevlm_counts")
        if counts is None:
            counts = stage_counts(self.ratio, self.version, self.layers, inp.num_layers, inp.prefill_image_tokens)
            inp.state["sparsevlm_counts"] = counts
        return min(counts[inp.stage], inp.num_image_tokens - 1)

    def select_llm_tokens(self, inp: LLMInput) -> torch.Tensor | LLMDecision:
        if inp.num_image_tokens == 0:  # nothing left to score (the authors' s_flag = False)
            return torch.arange(inp.image_mask.shape[1], device=inp.image_mask.device)
        start, end = inp.image_span()
        rows = self.relation(inp)  # [R, V]
        relation = rows.mean(dim=0)  # [V] rater relevance of every current image token
        length = inp.image_mask.shape[1]
        if self.variant == "paper":
            count = rank_keep_count(rows, self.scale, self.bias)
            if count is None:  # full rank: this stage keeps everything (the release code's s_flag = False)
                return torch.arange(length, device=relation.device)
        else:
            count = self.keep_count(inp)
        kept = torch.zeros(end - start, dtype=torch.bool, device=relation.device)
        kept[relation.topk(count).indices] = True
        span_keep = torch.arange(start, end, device=relation.device)[kept]
        keep = torch.cat([torch.arange(start, device=relation.device), span_keep,
                          torch.arange(end, length, device=relation.device)])
        pruned = (~kept).nonzero().flatten()  # [n] span offsets, ascending
        if self.version == "v2" or pruned.numel() == 0:
            return keep
        recycled = relation[pruned].topk(int(pruned.numel() * RECYCLE_FRACTION) + 1).indices  # authors' order
        members = start + pruned[recycled]  # [m] current positions
        generator = inp.state.get("sparsevlm_generator")
        if generator is None:
            generator = torch.Generator(device=inp.hidden_states.device).manual_seed(self.seed)
            inp.state["sparsevlm_generator"] = generator
        merged, cluster = dpc_knn_merge(inp.hidden_states[0, members], int(members.numel() / 10) + 1, generator)
        return LLMDecision(keep=keep, merged=merged, merged_at=start + int(kept.sum()),
                           merged_token=cluster, merged_member=members)

    def describe(self) -> dict:
        return {**super().describe(), "layers": list(self.layers), "version": self.version, "variant": self.variant,
                "scale": self.scale, "bias": self.bias, "heads": self.heads, "score_dtype": self.score_dtype,
                "seed": self.seed}
