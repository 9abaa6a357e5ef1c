"""Train the embedded LLaVA-NeXT on ``hires_detail`` and export it as a llava-hf directory.

    python -m runners.train_tiny                                           # the shipped recipe, CPU
    python -m runners.train_tiny export_dir=models/weights/tiny_trained    # rebuild the shipped weights
    python -m runners.train_tiny device=cuda                               # same recipe on a GPU

Phases (see ``models.training``): stage 1 trains the vision tower on single views; its features
of the stage-2 images are cached; stage 2 trains projector + ``image_newline`` + language model on
several questions per image (symbolic image tokens, the projector's alignment to them, then the real
features: ``models.training.symbolic``); the model is then scored on the val split and exported. Everything is a
function of ``seed`` and ``data_seed``. Each phase checkpoints into ``run_dir`` (atomically, every
``checkpoint_every`` steps), so rerunning the same command after a kill resumes where it stopped
and ends with the same weights as an uninterrupted run; other settings in the same ``run_dir``
are refused.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import platform
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import hydra
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

import runners.resolvers  # noqa: F401  (registers OmegaConf resolvers)
from benchmarks import build_benchmark
from benchmarks.hires_detail import make_split_item
from compressors import build_compressor
from compressors.packing import pack_spatial, spatial_source_order
from models.pipeline import LlavaNextPipeline
from models.training.crops import crop_example, distractors_at, sparse_image_keep
from models.training.data import image_tiles, language_example, training_item, vision_example
from models.training.diagnostics import ThumbnailOnly, benchmark_accuracy, cls_attention_share
from models.training.labels import view_labels
from models.training.model import build_untrained, save_pretrained
from models.training.symbolic import PatchSymbols, SymbolIds, alignment_loss, symbolic_views
from models.training.stages import (
    AskedConfig,
    AskedHeads,
    BindConfig,
    BindHeads,
    VisionHeads,
    VisionTargets,
    box_token_labels,
    conversation_loss,
    tower_features,
    vision_loss,
    whiten_projector,
)
from runners.store import RunMismatchError, flatten, write_json_atomic

log = logging.getLogger(__name__)

# These do not change the weights. num_threads does (it changes the order of float sums), so a run resumes
# only with the threads it started with, and the same command on the same CPU build rebuilds the same bits.
VOLATILE_KEYS = ("export_dir", "progress", "checkpoint_every")
CONFIG_FILE, VISION_CKPT, FEATURES_DIR, LOG_FILE = "train_config.json", "vision.pt", "features", "training.json"
SYMBOLIC_CROPS_CKPT, SYMBOLIC_CKPT, ALIGN_CKPT = "symbolic_crops.pt", "symbolic.pt", "align.pt"
CROPS_CKPT, LANGUAGE_CKPT = "crops.pt", "language.pt"


@dataclass
class VisionStageConfig:
    """Stage 1: the CLIP tower on single views (train images ``0 .. images - 1``)."""

    images: int = 1600
    images_per_step: int = 2  # a step sees every view (thumbnail + crops) of these images
    lr: float = 3e-3
    warmup_steps: int = 30
    weight_decay: float = 0.05
    patch_weight: float = 1.0  # per-patch losses (kind, colour, digit) beside the [CLS] presence loss
    background_weight: float = 0.02  # background patches in the kind loss (objects cover ~2%)


@dataclass
class LanguageStageConfig:
    """Stage 2: projector + newline + LM on cached features (the next ``images`` train images): a warm-up
    on symbolic image tokens and the projector's alignment to them (``symbolic_*``, ``align_*``), then
    single crops with a growing number of background tokens (2a, ``crop_*``), then full images (2b)."""

    images: int = 600
    whiten_projector: bool = True  # fold the features' per-channel standardisation into the projector first
    symbolic_crop_steps: int = 0  # warm-up on single crops with symbolic image tokens (models.training.symbolic)
    symbolic_steps: int = 0  # then on whole images with symbolic image tokens
    symbolic_batch: int = 8  # crops or images per symbolic step
    symbolic_lr: float = 2e-3
    symbolic_start: int = 8  # background tokens beside the object tokens (and newlines) at a phase's first step
    symbolic_ramp: float = 2.0  # fraction of a phase's steps after which every token is shown (> 1: never)
    align_steps: int = 0  # then the projector alone, onto the symbolic tokens of the cached features
    align_batch: int = 4  # images per alignment step
    align_lr: float = 3e-3
    align_weight: float = 0.0  # 2a/2b: weight of that alignment loss beside the answer loss
    asked_layer: int = 2  # hidden state (0 = embeddings) on which AskedHeads predict what a question names
    asked_weight: float = 1.0  # 0: no AskedHeads
    bind_layer: int = 2  # hidden state on which BindHeads predict each crop box token's colour and digit
    bind_weight: float = 0.0  # 2a/2b: weight of the BindHeads loss (0: no BindHeads)
    balance_categories: bool = True  # weigh the four question types equally in the answer loss
    independent_turns: bool = False  # each turn sees the image and itself only (no answer read off another)
    crop_steps: int = 1500
    paste_boxes: float = 0.0  # 2a: share of crops that get the image's other digit boxes (models.training.crops)
    crop_batch: int = 8  # crop conversations per step
    crop_lr: float = 2e-3
    distractors_start: int = 16  # background patches beside a crop's object patches at the first step
    distractor_ramp: float = 0.5  # fraction of crop_steps after which the whole crop is shown
    steps: int = 200  # 2b: full images (all their turns); images are revisited in seeded epochs
    batch: int = 1  # 2b: images per step
    sparse_start: Optional[int] = None  # 2b: background tokens at its first step (None: whole images throughout)
    sparse_ramp: float = 0.75  # 2b: fraction of steps after which the whole image is shown
    lr: float = 1.5e-3
    warmup_steps: int = 30
    weight_decay: float = 0.01
    max_turns: int = 12  # questions per conversation
    cache_chunk: int = 100  # images per feature-cache file


@dataclass
class TrainTinyConfig:
    seed: int = 0  # weight init and data order
    data_seed: int = 0  # the hires_detail seed (the benchmark's)
    run_dir: str = "outputs/train_tiny"
    export_dir: str = "${run_dir}/tiny_trained"
    device: str = "cpu"
    num_threads: Optional[int] = None  # torch CPU threads (part of the run: sums in another order); None = as set
    progress: bool = True
    checkpoint_every: int = 50
    val_samples: int = 25  # val-split questions scored at the end (uncompressed and thumbnail only); 0: skip
    diagnostic_images: int = 10  # val images for the [CLS]-attention check after stage 1
    vision: VisionStageConfig = field(default_factory=VisionStageConfig)
    language: LanguageStageConfig = field(default_factory=LanguageStageConfig)


ConfigStore.instance().store(name="train_tiny_schema", node=TrainTinyConfig)


# -- small utilities ----------------------------------------------------------------------------------


def warmup_cosine(warmup: int, total: int, floor: float = 0.1) -> Callable[[int], float]:
    """LR factor: linear warm-up to 1, then cosine down to ``floor`` at ``total``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min((step - warmup) / max(total - warmup, 1), 1.0)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def save_atomic(payload: Any, path: Path) -> None:
    """``torch.save`` to a temp file, then rename: a kill never leaves a torn checkpoint."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict | None:
    return torch.load(path, map_location="cpu", weights_only=False) if path.exists() else None


def check_run_dir(run_dir: Path, identity: dict) -> None:
    """Refuse to resume in a directory trained with other settings (naming the keys that differ)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / CONFIG_FILE
    if path.exists():
        old, new = flatten(json.loads(path.read_text())), flatten(identity)
        differing = sorted(k for k in old.keys() | new.keys() if old.get(k, "<unset>") != new.get(k, "<unset>"))
        if differing:
            details = "; ".join(f"{k}: {old.get(k, '<unset>')!r} -> {new.get(k, '<unset>')!r}" for k in differing)
            raise RunMismatchError(f"{run_dir} holds a training run with other settings ({details}); "
                                   "use another run_dir or delete it")
    write_json_atomic(path, identity)


def progress_bar(enabled: bool) -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                    disable=not enabled)


def take_step(loss: torch.Tensor, params: list[torch.nn.Parameter], optimizer, scheduler,
              losses: list[float]) -> None:
    """One optimiser step on ``loss`` (gradients clipped to norm 1), its value logged in ``losses``."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    scheduler.step()
    losses.append(round(loss.item(), 5))


def restore(path: Path, modules: dict[str, torch.nn.Module], optimizer, scheduler) -> tuple[int, list[float]]:
    """Load a stage's last checkpoint into its modules, optimizer and scheduler: (next step, losses so far).

    Nothing there yet gives (0, []).
    """
    state = load_checkpoint(path)
    if state is None:
        return 0, []
    for key, module in modules.items():
        module.load_state_dict(state[key])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return state["step"], list(state["losses"])


def optimizer_for(params: list[torch.nn.Parameter], lr: float, weight_decay: float, warmup: int, steps: int):
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(warmup, steps))


# -- the trainer --------------------------------------------------------------------------------------


class TinyTrainer:
    """The phases of one training run, each resumable from its checkpoint in ``run_dir``."""

    def __init__(self, cfg: DictConfig, progress: Progress) -> None:
        self.cfg = cfg
        self.progress = progress
        self.run_dir = Path(cfg.run_dir)
        self.device = torch.device(cfg.device)
        self.model, self.processor = build_untrained(cfg.seed)
        self.model.to(self.device)
        self.config = self.model.config
        self.log: dict[str, Any] = {"losses": {}, "seconds": {}}
        log_path = self.run_dir / LOG_FILE
        if log_path.exists():
            self.log = json.loads(log_path.read_text())

    def _save_log(self) -> None:
        write_json_atomic(self.run_dir / LOG_FILE, self.log)

    def _task(self, description: str, total: int, done: int):
        return self.progress.add_task(description, total=total, completed=done, status="")

    def _timed(self, phase: str, start: float) -> None:
        self.log["seconds"][phase] = self.log["seconds"].get(phase, 0.0) + time.perf_counter() - start

    # -- stage 1 ------------------------------------------------------------------------------------
    def vision_stage(self) -> None:
        cfg = self.cfg.vision
        tower = self.model.model.vision_tower
        steps = math.ceil(cfg.images / cfg.images_per_step)
        fork = torch.random.fork_rng(devices=[])
        with fork:
            torch.manual_seed(self.cfg.seed + 1)
            heads = VisionHeads(self.config.vision_config.hidden_size).to(self.device)
        params = [*tower.parameters(), *heads.parameters()]
        optimizer, scheduler = optimizer_for(params, cfg.lr, cfg.weight_decay, cfg.warmup_steps, steps)
        path = self.run_dir / VISION_CKPT
        start, losses = restore(path, {"tower": tower, "heads": heads}, optimizer, scheduler)
        self.log["losses"]["vision"] = losses
        task = self._task("stage 1: vision tower", steps, start)
        began = time.perf_counter()
        tower.train()
        for step in range(start, steps):
            indices = range(step * cfg.images_per_step, min((step + 1) * cfg.images_per_step, cfg.images))
            examples = [vision_example(self.processor, self.config, self.cfg.data_seed, i) for i in indices]
            pixel_values = torch.cat([tiles for tiles, _ in examples]).to(self.device)
            targets = VisionTargets.cat([t for _, t in examples]).to(self.device)
            loss, parts = vision_loss(tower, heads, pixel_values, targets, self.config.vision_feature_layer,
                                      cfg.patch_weight, cfg.background_weight)
            take_step(loss, params, optimizer, scheduler, losses)
            self.progress.update(task, advance=1, status=" ".join(f"{k} {v:.3f}" for k, v in parts.items()))
            if (step + 1) % self.cfg.checkpoint_every == 0 or step + 1 == steps:
                self._timed("vision", began)
                began = time.perf_counter()
                save_atomic({"step": step + 1, "tower": tower.state_dict(), "heads": heads.state_dict(),
                             "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                             "losses": losses}, path)
                self._save_log()
        tower.eval().requires_grad_(False)

    # -- feature cache ------------------------------------------------------------------------------
    def cached_features(self) -> list[torch.Tensor]:
        """Tower features ``[T, P, C]`` (float16) of every stage-2 image, computed once, in chunks."""
        cfg = self.cfg.language
        directory = self.run_dir / FEATURES_DIR
        directory.mkdir(exist_ok=True)
        chunks = math.ceil(cfg.images / cfg.cache_chunk)
        done = sum((directory / f"{k:05d}.pt").exists() for k in range(chunks))
        task = self._task("caching tower features", chunks, done)
        features: list[torch.Tensor] = []
        began = time.perf_counter()
        for k in range(chunks):
            path = directory / f"{k:05d}.pt"
            if not path.exists():
                chunk = []
                for j in range(k * cfg.cache_chunk, min((k + 1) * cfg.cache_chunk, cfg.images)):
                    scene, _ = training_item(self.cfg.data_seed, self.cfg.vision.images + j, 1)
                    tiles = image_tiles(self.processor, scene).to(self.device)
                    chunk.append(tower_features(self.model, tiles).to("cpu", torch.float16))
                save_atomic(chunk, path)
                self.progress.update(task, advance=1)
            features += torch.load(path)
        self._timed("cache", began)
        return features

    # -- stage 2 ------------------------------------------------------------------------------------
    def _language_params(self, real: bool) -> list[torch.nn.Parameter]:
        """What a phase trains: the model but its tower, AskedHeads and, on real features (``real``), BindHeads."""
        return [p for module in self._language_modules(real).values() for name, p in module.named_parameters()
                if not name.startswith("model.vision_tower.")]

    def _language_modules(self, real: bool) -> dict[str, torch.nn.Module]:
        return {"model": self.model, **({"asked": self.asked.heads} if self.asked else {}),
                **({"bind": self.bind.heads} if self.bind and real else {})}

    def _seeded_heads(self, heads: type[torch.nn.Module], offset: int) -> torch.nn.Module:
        """Scaffolding heads on the decoder width, initialised from ``seed + offset`` without moving the global RNG."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.seed + offset)
            return heads(self.config.text_config.hidden_size).to(self.device)

    def prepare_language(self, features: list[torch.Tensor]) -> None:
        """The seeded ``AskedHeads`` and ``BindHeads`` and the whitened projector (from the first, at most, 100
        cached images); a restored checkpoint overwrites them."""
        cfg = self.cfg.language
        self.asked = AskedConfig(self._seeded_heads(AskedHeads, 2), cfg.asked_layer, cfg.asked_weight) \
            if cfg.asked_weight else None
        self.bind = BindConfig(self._seeded_heads(BindHeads, 3), cfg.bind_layer, cfg.bind_weight) \
            if cfg.bind_weight else None
        if cfg.whiten_projector:
            sample = torch.cat([f.flatten(0, 1) for f in features[:100]]).to(self.device, torch.float32)  # [M, C]
            whiten_projector(self.model.model.multi_modal_projector, sample)

    def _language_phase(self, phase: str, description: str, path: Path, steps: int, lr: float,
                        step_loss: Callable[[int], tuple[torch.Tensor, str]], projector_only: bool = False,
                        real: bool = True) -> None:
        """Train projector + newline + LM (+ AskedHeads, + BindHeads on ``real`` features), or with
        ``projector_only`` the projector alone, for ``steps`` steps of ``step_loss(step)``, resumable from
        ``path``; losses and time are logged under ``phase``."""
        cfg = self.cfg.language
        projector = self.model.model.multi_modal_projector
        params = [*projector.parameters()] if projector_only else self._language_params(real)
        modules = {"projector": projector} if projector_only else self._language_modules(real)
        optimizer, scheduler = optimizer_for(params, lr, 0.0 if projector_only else cfg.weight_decay,
                                             cfg.warmup_steps, steps)
        start, losses = restore(path, modules, optimizer, scheduler)
        self.log["losses"][phase] = losses
        task = self._task(description, steps, start)
        began = time.perf_counter()
        self.model.train()
        self.model.model.vision_tower.eval()
        for step in range(start, steps):
            loss, status = step_loss(step)
            take_step(loss, params, optimizer, scheduler, losses)
            recent = losses[-50:]
            self.progress.update(task, advance=1, status=f"loss {sum(recent) / len(recent):.4f} {status}")
            if (step + 1) % self.cfg.checkpoint_every == 0 or step + 1 == steps:
                self._timed(phase, began)
                began = time.perf_counter()
                save_atomic({"step": step + 1, **{k: m.state_dict() for k, m in modules.items()},
                             "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                             "losses": losses}, path)
                self._save_log()

    @functools.cached_property
    def stage2_scenes(self) -> list:
        """The scenes of the stage-2 images (the train images after stage 1's)."""
        first = self.cfg.vision.images
        return [training_item(self.cfg.data_seed, first + j, 1)[0] for j in range(self.cfg.language.images)]

    @functools.cached_property
    def stage2_symbols(self) -> list[PatchSymbols]:
        """Per stage-2 image, what each patch of every view belongs to (``models.training.symbolic``)."""
        vision = self.config.vision_config
        return [PatchSymbols.of(view_labels(scene, self.config.image_grid_pinpoints, vision.image_size,
                                            vision.patch_size)) for scene in self.stage2_scenes]

    @functools.cached_property
    def stage2_objects(self) -> list[torch.Tensor]:
        """Per stage-2 image, which patches of each view show an object: ``[V, P]`` bool."""
        return [symbols.objects for symbols in self.stage2_symbols]

    @functools.cached_property
    def symbol_ids(self) -> SymbolIds:
        return SymbolIds.of(self.processor.tokenizer)

    def symbolic(self, j: int) -> torch.Tensor:
        """Stage-2 image ``j``'s symbolic tokens, ``[V, P, D]`` (``models.training.symbolic``)."""
        embed = self.model.model.language_model.get_input_embeddings()
        return symbolic_views(embed, self.symbol_ids, self.stage2_symbols[j])

    def _alignment(self, features: list[torch.Tensor], images: list[int],
                   projected: Optional[list[torch.Tensor]] = None) -> torch.Tensor:
        """The projector's alignment loss on every view of ``images`` (stage-2 indices), from their
        ``projected`` views ``[V, P, D]`` where the step has them already; the symbolic tokens are its fixed
        target, so no graph is built through the embeddings for them."""
        if projected is None:
            projector = self.model.model.multi_modal_projector
            projected = [projector(features[j].to(self.device, torch.float32)) for j in images]
        projected = torch.cat(projected)
        with torch.no_grad():
            target = torch.cat([self.symbolic(j) for j in images])
        return alignment_loss(projected, target)

    def _plus_alignment(self, loss: torch.Tensor, parts: dict[str, float], features: Optional[list[torch.Tensor]],
                        images: list[int], projected: Optional[list[torch.Tensor]] = None) -> torch.Tensor:
        """``loss`` plus ``align_weight`` x the alignment loss on ``images`` (logged in ``parts``); unchanged
        without ``features`` or weight."""
        weight = self.cfg.language.align_weight
        if features is None or not weight:
            return loss
        align = self._alignment(features, images, projected)
        parts["align"] = round(float(align.detach()), 4)
        return loss + weight * align

    def _crop_loss(self, salt: str, steps: int, batch: int, start: int, ramp: float,
                   tokens_of: Callable[[int, torch.Tensor], torch.Tensor], paste: float,
                   align_to: Optional[list[torch.Tensor]], real: bool) -> Callable[[int], tuple[torch.Tensor, str]]:
        """A step loss over ``batch`` single-crop conversations (``models.training.crops``): a crop's object
        patches plus ``start`` background ones growing to the whole crop after ``ramp`` of the steps; image
        tokens ``tokens_of(j, sources)`` ``[n, D]`` (``sources`` index the image's ``V * P`` tokens); a ``paste``
        share of the crops gets the image's other digit boxes; with ``align_to``, plus the alignment loss;
        on ``real`` (not symbolic) tokens, plus the BindHeads loss where configured."""
        cfg = self.cfg.language
        tokenizer, scenes, objects = self.processor.tokenizer, self.stage2_scenes, self.stage2_objects
        patches = objects[0].shape[1]
        bind = self.bind if real else None

        def step_loss(step: int) -> tuple[torch.Tensor, str]:
            rng = random.Random(f"{salt}:{self.cfg.seed}:{step}")  # each step's batch depends on its index only
            distractors = distractors_at(step, steps, start, ramp, patches)
            examples = [crop_example(tokenizer, self.config, rng, j, scenes[j], objects[j], distractors,
                                     cfg.max_turns, cfg.independent_turns, paste)
                        for j in (rng.randrange(cfg.images) for _ in range(batch))]
            images = [tokens_of(e.image, e.patches[e.keep]) for e in examples]
            labels = None if bind is None else [box_token_labels(self.stage2_symbols[e.image], e.patches[e.keep])
                                                for e in examples]
            loss, parts = conversation_loss(self.model, images, [e.conversation for e in examples], self.asked,
                                            cfg.balance_categories, bind=bind, image_labels=labels)
            loss = self._plus_alignment(loss, parts, align_to, sorted({e.image for e in examples}))
            return loss, f"{parts} background {distractors}"

        return step_loss

    def crop_stage(self, features: list[torch.Tensor]) -> None:
        """Stage 2a (``models.training.crops``): batches of single-crop conversations on projected features."""
        cfg = self.cfg.language
        if cfg.crop_steps == 0:
            return
        projector = self.model.model.multi_modal_projector

        def tokens_of(j: int, sources: torch.Tensor) -> torch.Tensor:
            return projector(features[j].flatten(0, 1)[sources].to(self.device, torch.float32))

        step_loss = self._crop_loss("crops", cfg.crop_steps, cfg.crop_batch, cfg.distractors_start,
                                    cfg.distractor_ramp, tokens_of, cfg.paste_boxes, features, real=True)
        self._language_phase("crops", "stage 2a: crops", self.run_dir / CROPS_CKPT, cfg.crop_steps, cfg.crop_lr,
                             step_loss)

    def _whole_image_loss(self, salt: int, steps: int, batch: int, start: Optional[int], ramp: float,
                          views_of: Callable[[int], torch.Tensor], align_to: Optional[list[torch.Tensor]],
                          real: bool) -> Callable[[int], tuple[torch.Tensor, str]]:
        """A step loss over ``batch`` whole stage-2 images per step (seeded epochs; ``salt`` tells phases
        apart): each image's conversation with its image tokens ``views_of(j)`` ``[V, P, D]`` packed as
        inference packs them (``image_newline`` included);
        with ``start``, only its object tokens, newlines and a growing number of background tokens at
        their own position ids (``models.training.crops.sparse_image_keep``); with ``align_to`` (the
        cached features), plus ``align_weight`` x the projector's alignment loss on the step's images
        (on the same projected views the conversations see); on ``real`` tokens, plus the BindHeads loss
        where configured."""
        cfg = self.cfg.language
        tokenizer, first = self.processor.tokenizer, self.cfg.vision.images
        newline = self.model.model.image_newline
        bind = self.bind if real else None

        @functools.lru_cache(maxsize=2)
        def epoch_order(epoch: int) -> torch.Tensor:  # [images] the seeded order of one pass
            seed = self.cfg.seed * 100_003 + epoch + salt * 7_919
            return torch.randperm(cfg.images, generator=torch.Generator().manual_seed(seed))

        def example(index: int, step: int, generator: torch.Generator):
            epoch, position = divmod(index, cfg.images)
            j = int(epoch_order(epoch)[position])
            layout, conversation = language_example(tokenizer, self.config, self.cfg.data_seed, first + j,
                                                    cfg.max_turns, cfg.independent_turns)
            views = views_of(j)  # [V, P, D]
            segment = pack_spatial(views, layout, newline).embeds  # [N_img, D]
            labels = None if bind is None else box_token_labels(self.stage2_symbols[j], spatial_source_order(layout))
            if start is None:
                return j, views, segment, conversation, None, labels
            objects = self.stage2_objects[j]  # [V, P]
            distractors = distractors_at(step, steps, start, ramp, int((~objects).sum()))
            keep = sparse_image_keep(layout, objects, distractors, generator)
            return j, views, segment, conversation, keep, labels

        def step_loss(step: int) -> tuple[torch.Tensor, str]:
            generator = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + step + salt * 7_919)
            images, views, segments, conversations, keeps, labels = zip(*(example(step * batch + b, step, generator)
                                                                          for b in range(batch)))
            loss, parts = conversation_loss(self.model, list(segments), list(conversations), self.asked,
                                            cfg.balance_categories, None if keeps[0] is None else list(keeps),
                                            bind, None if bind is None else list(labels))
            loss = self._plus_alignment(loss, parts, align_to, list(images), list(views))
            shown = "" if keeps[0] is None else f" image tokens {sum(int(k.sum()) for k in keeps) / len(keeps):.0f}"
            return loss, f"{parts}{shown}"

        return step_loss

    def symbolic_stage(self) -> None:
        """The warm-up on symbolic image tokens (``models.training.symbolic``): single crops, then whole
        images, each from a few background tokens up."""
        cfg = self.cfg.language
        if cfg.symbolic_crop_steps:
            step_loss = self._crop_loss("symbolic_crops", cfg.symbolic_crop_steps, cfg.symbolic_batch,
                                        cfg.symbolic_start, cfg.symbolic_ramp,
                                        lambda j, sources: self.symbolic(j).flatten(0, 1)[sources], 0.0, None,
                                        real=False)
            self._language_phase("symbolic_crops", "stage 2: symbolic crops", self.run_dir / SYMBOLIC_CROPS_CKPT,
                                 cfg.symbolic_crop_steps, cfg.symbolic_lr, step_loss, real=False)
        if cfg.symbolic_steps == 0:
            return
        step_loss = self._whole_image_loss(1, cfg.symbolic_steps, cfg.symbolic_batch, cfg.symbolic_start,
                                           cfg.symbolic_ramp, self.symbolic, None, real=False)
        self._language_phase("symbolic", "stage 2: symbolic tokens", self.run_dir / SYMBOLIC_CKPT,
                             cfg.symbolic_steps, cfg.symbolic_lr, step_loss, real=False)

    def align_stage(self, features: list[torch.Tensor]) -> None:
        """The projector alone, onto the symbolic tokens of the cached features (every view, seeded batches)."""
        cfg = self.cfg.language
        if cfg.align_steps == 0:
            return

        def step_loss(step: int) -> tuple[torch.Tensor, str]:
            rng = random.Random(f"align:{self.cfg.seed}:{step}")
            return self._alignment(features, [rng.randrange(cfg.images) for _ in range(cfg.align_batch)]), ""

        self._language_phase("align", "stage 2: projector alignment", self.run_dir / ALIGN_CKPT, cfg.align_steps,
                             cfg.align_lr, step_loss, projector_only=True)

    def language_stage(self, features: list[torch.Tensor]) -> None:
        """Stage 2b: whole images packed as inference packs them; with ``sparse_start``, the image segment
        first shows its object tokens and a growing number of background tokens at their own positions
        (``models.training.crops.sparse_image_keep``)."""
        cfg = self.cfg.language
        model = self.model
        projector = model.model.multi_modal_projector

        def views_of(j: int) -> torch.Tensor:  # [T, P, D]: the projector, once per image and step
            return projector(features[j].to(self.device, torch.float32))

        step_loss = self._whole_image_loss(0, cfg.steps, cfg.batch, cfg.sparse_start, cfg.sparse_ramp, views_of,
                                           features, real=True)
        self._language_phase("language", "stage 2b: full images", self.run_dir / LANGUAGE_CKPT, cfg.steps, cfg.lr,
                             step_loss)
        model.eval()

    # -- validation ---------------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self, compressor, label: str) -> dict[str, float]:
        """Accuracy on the first ``val_samples`` val questions through the real pipeline."""
        benchmark = build_benchmark({"name": "hires_detail", "split": "val", "seed": self.cfg.data_seed,
                                     "num_samples": self.cfg.val_samples})
        pipeline = LlavaNextPipeline(self.model.eval(), self.processor)
        task = self._task(f"validation: {label}", len(benchmark), 0)
        began = time.perf_counter()
        accuracy = benchmark_accuracy(pipeline, benchmark, compressor, lambda acc: self.progress.update(
            task, advance=1, status=f"acc {acc:.1f}%"))
        self._timed("validation", began)
        return accuracy

    # -- all of it ----------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        start = time.perf_counter()
        self.log["load_start"] = os.getloadavg()
        self.log["rope_theta"] = self.config.text_config.rope_parameters["rope_theta"]
        self.vision_stage()
        scenes = [make_split_item("val", self.cfg.data_seed, i)[0] for i in range(self.cfg.diagnostic_images)]
        self.log["vision_check"] = cls_attention_share(self.model, self.processor, scenes)
        features = self.cached_features()
        self.prepare_language(features)
        self.symbolic_stage()
        self.align_stage(features)
        self.crop_stage(features)
        self.language_stage(features)
        if self.cfg.val_samples:
            self.log["val"] = self.validate(build_compressor({"name": "none"}), "uncompressed")
            self.log["val_thumbnail_only"] = self.validate(ThumbnailOnly(), "thumbnail only")
        self.log["load_end"] = os.getloadavg()
        self.log["machine"] = {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                               "device": str(self.device), "torch": torch.__version__,
                               "platform": platform.platform()}
        self.log["last_invocation_s"] = time.perf_counter() - start
        self._save_log()
        export = save_pretrained(self.model, self.processor, self.cfg.export_dir)
        write_json_atomic(export / LOG_FILE, {"config": OmegaConf.to_container(self.cfg, resolve=True), **self.log})
        return self.log


def run_identity(cfg: DictConfig) -> dict[str, Any]:
    """The settings that decide the weights (all but ``VOLATILE_KEYS``): a run resumes only with these."""
    identity = OmegaConf.to_container(cfg, resolve=True)
    for key in VOLATILE_KEYS:
        identity.pop(key, None)
    return identity


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run (or resume) the training described by ``cfg``; returns the training log."""
    if cfg.get("num_threads"):
        torch.set_num_threads(int(cfg.num_threads))
    check_run_dir(Path(cfg.run_dir), run_identity(cfg))
    with progress_bar(cfg.progress) as progress:
        return TinyTrainer(cfg, progress).run()


@hydra.main(version_base="1.3", config_path="../conf", config_name="train_tiny")
def main(cfg: DictConfig) -> None:
    result = train(cfg)
    log.info("val accuracy %s; exported to %s", result.get("val"), cfg.export_dir)


if __name__ == "__main__":
    main()
