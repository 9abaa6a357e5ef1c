"""Training the tiny model: labels that follow the processor's tiles, conversations that start with
exactly the inference prompt, a training run that resumes to the same weights, and the shipped
checkpoint that loads with model=tiny_trained and scores as its model card states."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf
from safetensors.torch import load_file

import runners.schema  # noqa: F401  (registers the model schemas)
import runners.train_tiny as train_tiny
from benchmarks import build_benchmark
from benchmarks.hires_detail import (
    ANSWERS,
    CATEGORIES,
    SHAPE_COLORS,
    DigitBox,
    Question,
    Scene,
    all_questions,
    make_split_item,
    render,
)
from benchmarks.synthetic import COLORS, SHAPES, SHORT_ANSWER_SUFFIX, Shape
from compressors import build_compressor
from models import build_pipeline
from models.pipeline import LlavaNextPipeline
from models.training.card import CARD, METRICS, SUBSET, render_card
from models.tiny import GRID_PINPOINTS
from models.training.conversation import IGNORE, asked_labels, build_conversation, training_turns
from models.training.labels import COLORS as COLORS_ORDER
from models.training.labels import KINDS, PRESENCE_CLASSES, view_labels, view_transforms
from models.training.symbolic import PatchSymbols, SymbolIds, alignment_loss, symbolic_views
from models.training.model import build_untrained, task_corpus
from compressors.packing import pack_spatial, spatial_source_order
from models.training.crops import crop_example, crop_scene, distractors_at, paste_boxes, sparse_image_keep
from models.training.data import language_example, training_item
from models.training.diagnostics import ThumbnailOnly, benchmark_accuracy
from compressors.base import VisionInput
from compressors.geometry import AnyResLayout
from models.training.stages import (
    BindConfig,
    BindHeads,
    VisionTargets,
    box_token_labels,
    category_balanced_mean,
    conversation_loss,
    whiten_projector,
)
from tests.conftest import masked_reference_logits
from runners.store import RunMismatchError

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "models" / "weights" / "tiny_trained"


@pytest.fixture(scope="module")
def untrained():
    return build_untrained(seed=0)


def scene_objects(scene, config) -> torch.Tensor:
    """Per view, which patches show an object (``[V, P]`` bool), as the trainer's curricula take them."""
    return PatchSymbols.of(view_labels(scene, config.image_grid_pinpoints)).objects


def compose_train(*overrides: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train_tiny", overrides=list(overrides))
    GlobalHydra.instance().clear()
    return cfg


# -- labels -------------------------------------------------------------------------------------------


def test_view_transforms_follow_the_processors_tiles(untrained):
    """Each object's centre, mapped into every view that shows it, has the object's colour in the
    processor's (de-normalised) tile: exactly in a crop, approximately in the squeezed thumbnail."""
    _, processor = untrained
    scene, _, _ = make_split_item("train", 0, 2)  # a 2x2 image: thumbnail + 4 crops
    tiles = processor.image_processor(render(scene), return_tensors="pt")["pixel_values"][0]  # [5, 3, 336, 336]
    mean = torch.tensor(processor.image_processor.image_mean)[:, None, None]
    std = torch.tensor(processor.image_processor.image_std)[:, None, None]
    rgb = ((tiles * std + mean) * 255).round()  # [5, 3, 336, 336]
    transforms = view_transforms(scene, GRID_PINPOINTS)
    assert transforms.shape == (5, 4)
    checked = 0
    for shape in scene.shapes:
        cx, cy = (shape.box[0] + shape.box[2] - 1) / 2, (shape.box[1] + shape.box[3] - 1) / 2
        for view, (sx, sy, ox, oy) in enumerate(transforms.tolist()):
            x, y = cx * sx - ox, cy * sy - oy
            if not (0 <= x < 336 and 0 <= y < 336):
                continue
            pixel = rgb[view, :, int(y), int(x)]
            tolerance = 0 if view else 60
            assert (pixel - torch.tensor(COLORS[shape.color])).abs().max() <= tolerance, (shape, view)
            checked += 1
    assert checked >= 2 * len(scene.shapes) > 0  # each shape in the thumbnail and in a crop


def test_patch_and_presence_labels_from_the_definition():
    """A hand-placed square and digit box on a 1x2 image; coverage worked out by hand."""
    square = Shape("square", "red", (20, 30, 40, 50))  # crop 0: cols 1-2, rows 2-3
    box = DigitBox("7", "green", (350, 100, 386, 136))  # crop 1 (x - 336): x 14..50 -> cols 1-3, rows 7-9
    scene = Scene("1x2", (336, 672), (square,), (box,), (230, 230, 230), 0)
    labels = view_labels(scene, GRID_PINPOINTS)
    names = [{PRESENCE_CLASSES[i] for i in row.nonzero().flatten()} for row in labels.presence]
    assert names == [{"red square", "digit 7", "green box"}, {"red square"}, {"digit 7", "green box"}]

    def patches(mask: torch.Tensor) -> set[tuple[int, int]]:
        return {divmod(p, 24) for p in mask.nonzero().flatten().tolist()}

    assert patches(labels.patch_object[1] == 0) == {(2, 1), (2, 2), (3, 1), (3, 2)}  # each >= 0.2 * 196 px
    # thumbnail (x halved): x 10..20, y 30..50; (row 3, col 0) holds 4 x 8 = 32 px < 39.2: left out
    assert patches(labels.patch_object[0] == 0) == {(2, 0), (2, 1), (3, 1)}
    # box: x 14..50 (cols 1, 2, 3 take 14, 14, 8 px), y 100..136 (rows 7, 8, 9 take 12, 14, 10 px)
    assert patches(labels.patch_object[2] == 1) == {(r, c) for r in (7, 8, 9) for c in (1, 2, 3)}
    assert patches(labels.patch_object[2] >= 0) == patches(labels.patch_object[2] == 1)
    # glyph "7": the font's box (-8, -8, 7, 10) about the centre (368, 118) -> x 24..39, y 110..128 in crop 1;
    # only row 8 holds >= 39.2 px of it (cols 1, 2: 56 and 154 px)
    assert patches(labels.patch_glyph[2] == 0) == {(8, 1), (8, 2)}
    # centres: square (30, 40), thumbnail (15, 40); box (32, 118) in crop 1, thumbnail (184, 118)
    assert [patches(c) for c in labels.centre] == [{(2, 1), (8, 13)}, {(2, 2)}, {(8, 2)}]

    targets = VisionTargets.of(labels)
    assert targets.kind[2, 8 * 24 + 2] == KINDS.index("box") and targets.digit[2, 8 * 24 + 2] == 7
    assert targets.digit[2, 7 * 24 + 2] == -1  # in the box, off the glyph
    assert targets.kind[1, 2 * 24 + 1] == KINDS.index("square") and targets.digit[1, 2 * 24 + 1] == -1
    assert targets.kind[1, 0] == 0 and targets.color[1, 0] == -1


# -- conversations ------------------------------------------------------------------------------------


def test_every_answer_is_one_token(untrained):
    tokenizer = untrained[1].tokenizer
    for answers in ANSWERS.values():
        for answer in answers:
            assert len(tokenizer(" " + answer, add_special_tokens=False).input_ids) == 1, answer


def test_first_turn_is_the_inference_prompt_and_targets_are_the_answers(untrained):
    model, processor = untrained
    scene, primary, rng = make_split_item("train", 0, 1)
    turns = training_turns(rng, primary, all_questions(rng, scene), max_turns=6)
    assert turns[0] == primary and len(turns) == 6 and len({q.text for q in turns}) == 6
    inputs = LlavaNextPipeline(model, processor).processor_inputs(render(scene), primary.text + SHORT_ANSWER_SUFFIX)
    image_tokens = int((inputs["input_ids"] == model.config.image_token_id).sum())
    conversation = build_conversation(processor.tokenizer, turns, model.config.image_token_id, image_tokens)
    prompt_length = inputs["input_ids"].shape[1]
    assert torch.equal(conversation.input_ids[:, :prompt_length], inputs["input_ids"])
    assert conversation.positions[0] == prompt_length - 1  # the first answer follows the inference prompt
    assert torch.equal(conversation.input_ids[0, conversation.positions + 1], conversation.targets)
    tokenizer = processor.tokenizer
    assert tokenizer.decode(conversation.targets) == "".join(f" {q.answer}</s>" for q in turns).lstrip()
    # each turn's answer token is predicted at its turn position
    answers = [tokenizer(" " + q.answer, add_special_tokens=False).input_ids[0] for q in turns]
    assert conversation.input_ids[0, conversation.turn_positions + 1].tolist() == answers
    assert conversation.asked.tolist() == [asked_labels(q) for q in turns]


@pytest.mark.parametrize("text, category, named", [
    ("What color is the circle?", "color", ("circle", None)),
    ("Which digit is in the red box?", "digit", (None, "red")),
    ("Is there an orange triangle?", "presence", ("triangle", "orange")),
    ("How many squares are there?", "count", ("square", None)),
])
def test_asked_labels_name_what_the_question_says_and_never_the_answer(text, category, named):
    answer = {"color": "red", "digit": "7", "presence": "yes", "count": "2"}[category]
    labels = asked_labels(Question(category, text, answer, {}))
    expected = [CATEGORIES.index(category), SHAPES.index(named[0]) if named[0] else IGNORE,
                SHAPE_COLORS.index(named[1]) if named[1] else IGNORE]
    assert labels == expected


# -- stage 2a: crops ----------------------------------------------------------------------------------


def test_crop_scene_keeps_the_objects_inside_that_crop():
    scene = Scene(grid="1x3", image_hw=(336, 1008), tint=(230, 230, 230), texture_seed=0,
                  shapes=(Shape("circle", "red", (10, 10, 30, 30)), Shape("square", "blue", (400, 300, 420, 320)),
                          Shape("circle", "green", (700, 100, 724, 124))),
                  boxes=(DigitBox("7", "orange", (350, 20, 386, 56)),))
    middle = crop_scene(scene, 0, 1)
    assert [s.color for s in middle.shapes] == ["blue"] and [b.digit for b in middle.boxes] == ["7"]
    assert [s.color for s in crop_scene(scene, 0, 2).shapes] == ["green"] and not crop_scene(scene, 0, 2).boxes
    questions = all_questions(random.Random(0), middle)
    counts = {q.target["kind"]: q.answer for q in questions["count"]}
    assert counts == {"circle": "0", "square": "1", "triangle": "0"}  # the other crops' circles are not counted


def test_distractors_grow_geometrically_to_the_whole_crop():
    assert distractors_at(0, 100, 16, 0.5, 576) == 16
    assert distractors_at(25, 100, 16, 0.5, 576) == 96  # halfway up the ramp: sqrt(16 * 576)
    assert distractors_at(50, 100, 16, 0.5, 576) == 576 == distractors_at(99, 100, 16, 0.5, 576)
    counts = [distractors_at(step, 100, 16, 0.5, 576) for step in range(100)]
    assert counts == sorted(counts)


def test_a_crop_example_shows_all_object_patches_and_that_many_background_ones(untrained):
    model, processor = untrained
    scene, _, _ = make_split_item("train", 0, 7)
    objects = scene_objects(scene, model.config)  # [V, P]
    example = crop_example(processor.tokenizer, model.config, random.Random(3), 0, scene, objects,
                           distractors=20, max_turns=12)
    shown = objects[example.view]
    assert example.view >= 1 and bool(example.keep[shown].all())
    assert int((example.keep & ~shown).sum()) == 20
    ids = example.conversation.input_ids[0]
    assert int((ids == model.config.image_token_id).sum()) == int(example.keep.sum())
    # every answer is about this crop's objects alone
    cols = scene.image_hw[1] // 336
    crop = crop_scene(scene, *divmod(example.view - 1, cols))
    text = processor.tokenizer.decode(ids[ids != model.config.image_token_id])
    for kind in ("circle", "square", "triangle"):
        if f"How many {kind}s are there?" in text:
            answer = text.split(f"How many {kind}s are there?")[1].split("ASSISTANT:")[1].split("</s>")[0].strip()
            assert answer == str(crop.count(kind))


def test_pasting_moves_another_crops_digit_box_cell_by_cell_and_its_questions_follow(untrained):
    """A 1x2 image: a red circle and a red box holding 3 in the left crop, a blue box holding 8 in the
    right one. Pasted into the left crop, the blue box takes an empty cell there: its 4 x 4 patch tokens
    come from its own cell of the right crop in the same order (the box sits where it sat in its cell),
    the crop now asks for both digits, and its object mask marks the moved box's patches."""
    model, processor = untrained
    circle = Shape("circle", "red", (17, 17, 39, 39))  # cell (0, 0) of the left crop
    red = DigitBox("3", "red", (122, 122, 158, 158))  # cell (2, 2)
    blue = DigitBox("8", "blue", (570, 66, 606, 102))  # right crop, cell (1, 4): 10 px into it both ways
    scene = Scene("1x2", (336, 672), (circle,), (red, blue), (236, 230, 218), 0)
    objects = scene_objects(scene, model.config)  # [V, P]
    local, patches, shown = paste_boxes(random.Random(5), scene, 0, 2, objects, 336, 14)

    assert local.shapes == (circle,) and local.boxes[0] == red and len(local.boxes) == 2
    moved = local.boxes[1]
    assert (moved.digit, moved.color) == ("8", "blue")
    row, col = (moved.box[1] - 10) // 56, (moved.box[0] - 10) // 56
    assert moved.box == (col * 56 + 10, row * 56 + 10, col * 56 + 46, row * 56 + 46)
    assert (row, col) not in {(0, 0), (2, 2)} and 0 <= row < 6 and 0 <= col < 6
    per_view = 24 * 24
    source = [2 * per_view + (4 + a) * 24 + 16 + b for a in range(4) for b in range(4)]  # view 2, cell (1, 4)
    target = [(4 * row + a) * 24 + 4 * col + b for a in range(4) for b in range(4)]
    assert patches[target].tolist() == source
    untouched = torch.ones(per_view, dtype=torch.bool)
    untouched[target] = False
    assert torch.equal(patches[untouched], per_view + torch.arange(per_view)[untouched])  # view 1 itself
    assert torch.equal(shown[target], objects[2][[s - 2 * per_view for s in source]])
    assert torch.equal(shown[untouched], objects[1][untouched]) and int(shown[target].sum()) >= 9
    digits = {q.text: q.answer for q in all_questions(random.Random(0), local)["digit"]}
    assert digits == {"Which digit is in the red box?": "3", "Which digit is in the blue box?": "8"}

    example = crop_example(processor.tokenizer, model.config, random.Random(1), 0, scene, objects, distractors=7,
                           max_turns=12, paste_boxes_share=1.0)
    image_tokens = int((example.conversation.input_ids[0] == model.config.image_token_id).sum())
    circle_patches = int(objects[1][[a * 24 + b for a in range(4) for b in range(4)]].sum())
    both_boxes = int(objects[1].sum() + objects[2].sum()) - (circle_patches if example.view == 2 else 0)
    assert image_tokens == int(example.keep.sum()) == both_boxes + 7
    plain = crop_example(processor.tokenizer, model.config, random.Random(1), 0, scene, objects, distractors=7,
                         max_turns=12)
    assert torch.equal(plain.patches, plain.view * per_view + torch.arange(per_view))


def test_whitening_folds_a_standardisation_into_the_projector():
    torch.manual_seed(0)
    model = build_untrained(seed=0)[0]
    projector = model.model.multi_modal_projector
    features = torch.randn(500, projector.linear_1.in_features) * 3 + torch.linspace(-5, 5, projector.linear_1.in_features)
    before = projector(((features - features.mean(0)) / features.std(0)))
    whiten_projector(projector, features)
    assert torch.allclose(projector(features), before, atol=1e-4)


def test_symbolic_tokens_spell_each_patchs_object_in_word_embeddings(untrained):
    """By the definition: a red circle's patch is E[" circle?"] + E[" red"], any patch of a blue box
    holding 7 (frame or glyph) is E[" box?"] + E[" blue"] + E[" 7"], background is E[<unk>]."""
    model, processor = untrained
    tokenizer = processor.tokenizer
    embed = model.model.language_model.get_input_embeddings()
    ids = SymbolIds.of(tokenizer)
    assert tokenizer.convert_ids_to_tokens(ids.kind.tolist()) == [tokenizer.unk_token, "▁circle?", "▁square?",
                                                                   "▁triangle?", "▁box?"]
    kind = torch.tensor([[0, KINDS.index("circle"), KINDS.index("box")]])  # [V=1, P=3]
    color = torch.tensor([[-1, COLORS_ORDER.index("red"), COLORS_ORDER.index("blue")]])
    tokens = symbolic_views(embed, ids, PatchSymbols(kind, color, torch.tensor([[-1, -1, 7]])))  # [1, 3, D]

    def word(text: str) -> torch.Tensor:
        (token,) = tokenizer(text, add_special_tokens=False).input_ids
        return embed.weight[token]

    expected = torch.stack([embed.weight[tokenizer.unk_token_id], word(" circle?") + word(" red"),
                            word(" box?") + word(" blue") + word(" 7")])
    assert torch.allclose(tokens[0], expected)


def test_patch_symbols_give_every_patch_of_a_box_its_digit():
    """A crop with one red circle and one blue box holding 7: the circle's 2 x 2 patches say circle/red,
    every patch the box covers most of (its frame too) says box/blue/7, the rest is background."""
    circle = Shape("circle", "red", (14, 14, 36, 36))  # centred on the corner (28, 28): patches (1..2, 1..2)
    box = DigitBox("7", "blue", (98, 98, 134, 134))  # 36 px centred on (116, 116)
    scene = Scene("1x2", (336, 672), (circle,), (box,), (236, 230, 218), 0)
    labels = view_labels(scene, GRID_PINPOINTS)
    symbols = PatchSymbols.of(labels)
    crop = 1  # the left crop: the image's own pixels
    circle_patches = labels.patch_object[crop] == 0
    box_patches = labels.patch_object[crop] == 1
    assert int(circle_patches.sum()) == 4 and int(box_patches.sum()) >= 9
    assert bool((symbols.kind[crop][circle_patches] == KINDS.index("circle")).all())
    assert bool((symbols.color[crop][circle_patches] == COLORS_ORDER.index("red")).all())
    assert bool((symbols.digit[crop][circle_patches] == -1).all())
    assert bool((symbols.kind[crop][box_patches] == KINDS.index("box")).all())
    assert bool((symbols.color[crop][box_patches] == COLORS_ORDER.index("blue")).all())
    assert bool((symbols.digit[crop][box_patches] == 7).all())  # not only the glyph's patches
    glyph = labels.patch_glyph[crop] >= 0
    assert int(glyph.sum()) < int(box_patches.sum())
    background = ~(circle_patches | box_patches)
    assert bool((symbols.kind[crop][background] == 0).all()) and bool((symbols.color[crop][background] == -1).all())
    assert bool((symbols.digit[crop][background] == -1).all())


def test_box_token_labels_give_a_crops_box_tokens_their_box_and_nothing_else():
    """The scene above: in the whole image's token order, exactly the left crop's patches of the box say
    (blue, 7); the thumbnail's box patches, the circle, the background and the newlines are ignored."""
    circle = Shape("circle", "red", (14, 14, 36, 36))
    box = DigitBox("7", "blue", (98, 98, 134, 134))
    scene = Scene("1x2", (336, 672), (circle,), (box,), (236, 230, 218), 0)
    labels = view_labels(scene, GRID_PINPOINTS)
    symbols = PatchSymbols.of(labels)
    patches = symbols.kind.shape[1]
    sources = torch.cat([torch.arange(3 * patches), torch.tensor([-1])])  # every token of every view, a newline
    out = box_token_labels(symbols, sources)  # [n, 2]
    in_crop_box = torch.zeros(3 * patches, dtype=torch.bool)
    in_crop_box[patches:2 * patches] = labels.patch_object[1] == 1  # crop 1 is the left crop
    assert int(in_crop_box.sum()) >= 9 and bool((labels.patch_object[0] == 1).any())  # the thumbnail shows it too
    expected = torch.full((3 * patches + 1, 2), IGNORE)
    expected[:-1][in_crop_box] = torch.tensor([COLORS_ORDER.index("blue"), 7])
    assert torch.equal(out, expected)
    shuffled = torch.randperm(len(sources), generator=torch.Generator().manual_seed(0))
    assert torch.equal(box_token_labels(symbols, sources[shuffled]), expected[shuffled])  # per token, any order


def test_the_bind_loss_is_its_heads_cross_entropy_at_the_kept_image_tokens(untrained):
    """With ``bind``, the loss grows by ``weight`` x the mean of the colour and digit cross-entropies of
    ``BindHeads`` on hidden state ``layer`` at the kept, labelled image tokens, computed here by one
    plain forward of the sparse sequence at its own position ids."""
    model, processor = untrained
    layout, conversation = language_example(processor.tokenizer, model.config, 0, 1700, 4)
    scene = training_item(0, 1700, 1)[0]
    symbols = PatchSymbols.of(view_labels(scene, model.config.image_grid_pinpoints))
    torch.manual_seed(0)
    projected = model.model.multi_modal_projector(torch.randn(layout.num_tiles, 576, 64))  # [T, P, D]
    segment = pack_spatial(projected, layout, model.model.image_newline).embeds.detach()  # [N_img, D]
    keep = sparse_image_keep(layout, symbols.objects, 40, torch.Generator().manual_seed(1))
    labels = box_token_labels(symbols, spatial_source_order(layout))  # [N_img, 2]
    assert int((labels[keep, 0] != IGNORE).sum()) >= 9
    heads = BindHeads(model.config.text_config.hidden_size)
    with torch.no_grad():
        plain = conversation_loss(model, [segment], [conversation], image_keep=[keep])[0]
        bound, parts = conversation_loss(model, [segment], [conversation], image_keep=[keep],
                                         bind=BindConfig(heads, 2, 0.5), image_labels=[labels])
        ids = conversation.input_ids[0]
        is_image = ids == model.config.image_token_id
        embeds = model.model.language_model.get_input_embeddings()(ids.masked_fill(is_image, 0))
        embeds[is_image] = segment
        visible = torch.ones(len(ids), dtype=torch.bool)
        visible[is_image] = keep
        out = model.model.language_model(inputs_embeds=embeds[visible][None],
                                         position_ids=visible.nonzero().flatten()[None], output_hidden_states=True)
        hidden = out.hidden_states[2][0][is_image[visible].nonzero().flatten()]  # [kept image tokens, D]
        scored = labels[keep, 0] != IGNORE
        wanted = labels[keep][scored]
        expected = (torch.nn.functional.cross_entropy(hidden[scored] @ heads.color.weight.T + heads.color.bias, wanted[:, 0])
                    + torch.nn.functional.cross_entropy(hidden[scored] @ heads.digit.weight.T + heads.digit.bias,
                                                        wanted[:, 1])) / 2
    assert torch.allclose(torch.tensor(parts["bind"]), expected, atol=1e-5)
    assert torch.allclose(bound, plain + 0.5 * expected, atol=1e-5)


def answer_logits(model, images: list[torch.Tensor], conversations: list, image_keep=None) -> torch.Tensor:
    """The ``[A, V]`` logits ``conversation_loss`` scores (captured at ``lm_head``)."""
    captured = []
    hook = model.lm_head.register_forward_hook(lambda module, args, output: captured.append(output))
    try:
        with torch.no_grad():
            conversation_loss(model, images, conversations, image_keep=image_keep)
    finally:
        hook.remove()
    return captured[0]


def test_independent_turns_score_each_question_as_its_own_single_turn_prompt(untrained):
    """By the definition: every turn of an independent conversation gets the logits of the inference
    prompt of its question alone (whole image and sparse, alone and in a padded batch); an ordinary
    conversation's later turns do not (they see the earlier turns)."""
    model, processor = untrained
    tokenizer, config = processor.tokenizer, model.config
    _, turns = training_item(0, 3000, 12)
    assert len(turns) >= 6
    torch.manual_seed(0)
    image = torch.randn(200, config.text_config.hidden_size) * 0.5  # [n_img, D]
    keep = torch.rand(200) < 0.3
    packed = build_conversation(tokenizer, turns, config.image_token_id, 200, independent=True)
    short = build_conversation(tokenizer, turns[:3], config.image_token_id, 200, independent=True)
    for image_keep in (None, [keep]):
        alone = answer_logits(model, [image], [packed], image_keep)
        batched = answer_logits(model, [image, image], [short, packed], None if image_keep is None else [keep, keep])
        assert torch.allclose(batched[len(short.targets):], alone, atol=1e-5)
        for turn, question in enumerate(turns):
            single = build_conversation(tokenizer, [question], config.image_token_id, 200)
            assert torch.equal(packed.targets[packed.target_turns == turn], single.targets)
            assert torch.allclose(alone[packed.target_turns == turn], answer_logits(model, [image], [single], image_keep),
                                  atol=1e-4)
    dependent = build_conversation(tokenizer, turns, config.image_token_id, 200)
    last = len(turns) - 1
    single = build_conversation(tokenizer, [turns[last]], config.image_token_id, 200)
    assert not torch.allclose(answer_logits(model, [image], [dependent])[dependent.target_turns == last],
                              answer_logits(model, [image], [single]), atol=1e-4)


def test_alignment_loss_is_relative_and_pulls_only_the_projection():
    torch.manual_seed(0)
    symbolic = torch.randn(3, 5, 8, requires_grad=True)
    assert float(alignment_loss(symbolic.detach().clone(), symbolic)) == 0.0
    assert torch.isclose(alignment_loss(torch.zeros(3, 5, 8), symbolic), torch.tensor(1.0))
    projected = torch.randn(3, 5, 8, requires_grad=True)
    expected = ((projected - symbolic) ** 2).mean() / (symbolic ** 2).mean()
    loss = alignment_loss(projected, symbolic)
    assert torch.isclose(loss, expected)
    loss.backward()
    assert projected.grad is not None and symbolic.grad is None


def test_a_padded_crop_batch_scores_like_each_sequence_alone(untrained):
    model, processor = untrained
    scene, _, _ = make_split_item("train", 0, 3)
    objects = scene_objects(scene, model.config)
    rng = random.Random(0)
    examples = [crop_example(processor.tokenizer, model.config, rng, 0, scene, objects, d, 4) for d in (5, 40)]
    features = torch.randn(len(objects), objects.shape[1], model.config.vision_config.hidden_size)  # [T, P, C]
    rows = [model.model.multi_modal_projector(features[e.view][e.keep]) for e in examples]  # [n_i, D]
    with torch.no_grad():
        batch = conversation_loss(model, rows, [e.conversation for e in examples])[0]
        alone = [conversation_loss(model, [r], [e.conversation])[0] for r, e in zip(rows, examples)]
    answers = torch.tensor([len(e.conversation.targets) for e in examples], dtype=torch.float32)
    assert torch.allclose(batch, (torch.stack(alone) * answers).sum() / answers.sum(), atol=1e-5)


def test_thumbnail_only_keeps_the_thumbnail_and_the_newlines_and_no_crop_token():
    """The card's and the README's thumbnail-only accuracy: by definition the segment is the thumbnail's
    576 tokens in order, then every newline the whole segment has; no crop token."""
    layout = AnyResLayout(2, 2, 24, (480, 640))  # a padded canvas: fewer newline rows than 48
    features = torch.randn(layout.num_tiles, 576, 8, generator=torch.Generator().manual_seed(0))  # [T, P, D]
    newline = torch.full((8,), 7.0)
    out = ThumbnailOnly().compress_vision(VisionInput(features=features, layout=layout, newline=newline))
    newlines = int((spatial_source_order(layout) < 0).sum())
    assert out.num_newlines == newlines and out.embeds.shape == (576 + newlines, 8)
    assert torch.equal(out.embeds[:576], features[0])
    assert bool((out.embeds[576:] == newline).all())


def test_benchmark_accuracy_scores_every_answer_per_type():
    """A stand-in pipeline answers the first three of eight val questions right and the rest "no
    idea": the accuracy and each type's are counted here from the samples' own answers."""
    benchmark = build_benchmark({"name": "hires_detail", "split": "val", "num_samples": 8})
    samples = list(benchmark)
    right = {sample.id for sample in samples[:3]}

    class Answers:
        def generate(self, image, question, compressor, max_new_tokens):
            sample = next(s for s in samples if s.question == question and s.image == image)
            return type("Result", (), {"text": sample.answers[0] if sample.id in right else "no idea"})()

    seen = []
    accuracy = benchmark_accuracy(Answers(), benchmark, ThumbnailOnly(), seen.append)
    assert accuracy["accuracy"] == pytest.approx(100 * 3 / 8) and seen[-1] == pytest.approx(100 * 3 / 8)
    assert len(seen) == 8
    for category in {s.meta["category"] for s in samples}:
        mine = [s for s in samples if s.meta["category"] == category]
        expected = 100 * sum(s.id in right for s in mine) / len(mine)
        assert accuracy[f"accuracy/{category}"] == pytest.approx(expected)


# -- training ------------------------------------------------------------------------------------------

SMOKE = ("vision.images=2", "vision.images_per_step=1", "language.images=1", "language.steps=2",
         "language.cache_chunk=1", "language.crop_steps=2", "language.crop_batch=2", "val_samples=1",
         "diagnostic_images=1", "checkpoint_every=1", "progress=false", "language.symbolic_crop_steps=2",
         "language.symbolic_steps=2", "language.symbolic_batch=1", "language.align_steps=2", "language.align_batch=1",
         "num_threads=null")  # the test process keeps its threads
PHASES = ("vision", "symbolic_crops", "symbolic", "align", "crops", "language")


class Killed(Exception):
    """Stands for a kill right after a checkpoint was written."""


def test_training_runs_and_resumes_to_the_same_weights(tmp_path, monkeypatch):
    straight = train_tiny.train(compose_train(f"run_dir={tmp_path / 'a'}", *SMOKE))
    assert [len(straight["losses"][k]) for k in PHASES] == [2] * len(PHASES)
    assert set(straight["val"]) >= {"accuracy"} and 0 <= straight["vision_check"]["object_patch_share"] <= 1

    # the same run, killed after the first checkpoint of each stage and rerun (no validation: it
    # changes no weight, and the straight run covers it)
    cfg = compose_train(f"run_dir={tmp_path / 'b'}", *(o for o in SMOKE if not o.startswith("val_samples")),
                        "val_samples=0")
    real_save = train_tiny.save_atomic
    for kill_at in (f"{phase}.pt" for phase in PHASES):  # die after the first checkpoint of each stage
        def save_then_die(payload, path, kill_at=kill_at):
            real_save(payload, path)
            if path.name == kill_at and payload["step"] == 1:
                raise Killed(path)

        monkeypatch.setattr(train_tiny, "save_atomic", save_then_die)
        with pytest.raises(Killed):
            train_tiny.train(cfg)
    monkeypatch.setattr(train_tiny, "save_atomic", real_save)
    resumed = train_tiny.train(cfg)

    assert resumed["losses"] == straight["losses"]
    a = load_file(tmp_path / "a" / "tiny_trained" / "model.safetensors")
    b = load_file(tmp_path / "b" / "tiny_trained" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    untrained = build_untrained(seed=0)[0].state_dict()
    assert not torch.equal(a["vision_tower.encoder.layers.0.mlp.fc1.weight"],  # llava-hf key names
                           untrained["model.vision_tower.encoder.layers.0.mlp.fc1.weight"])

    with pytest.raises(RunMismatchError, match="language.steps: 2 -> 3"):
        train_tiny.train(compose_train(f"run_dir={tmp_path / 'a'}", *SMOKE[:3], "language.steps=3", *SMOKE[4:]))


# -- the shipped checkpoint ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shipped():
    """The pipeline ``model=tiny_trained`` builds, from the composed config (as a run does)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["model=tiny_trained", "benchmark=hires_detail"])
    GlobalHydra.instance().clear()
    assert Path(cfg.model.path) == SHIPPED
    return build_pipeline(OmegaConf.to_container(cfg.model, resolve=True, enum_to_str=True))


def test_shipped_tokenizer_is_the_one_training_builds(shipped, untrained):
    """Token ids cannot drift: the shipped tokenizer has the vocabulary the code builds and encodes
    every line of the task identically."""
    shipped_tokenizer, built = shipped.processor.tokenizer, untrained[1].tokenizer
    assert shipped_tokenizer.get_vocab() == built.get_vocab()
    for line in task_corpus():
        assert shipped_tokenizer(line).input_ids == built(line).input_ids
    assert shipped.model.config.image_token_id == untrained[0].config.image_token_id


def test_shipped_weights_score_as_the_model_card_states(shipped):
    """The first SUBSET test questions, answered with the shipped weights through the pipeline, score
    what the evaluation run recorded in metrics.json (one answer of slack for float differences across
    machines); the card states the run's test accuracy beside chance."""
    metrics = json.loads((SHIPPED / METRICS).read_text())
    assert metrics["split"] == "test" and metrics["num_samples"] >= 100
    benchmark = build_benchmark({"name": "hires_detail", "split": "test", "num_samples": SUBSET})
    assert benchmark.sample_ids() == metrics["subset"]["ids"]
    none = build_compressor({"name": "none"})
    correct = sum(benchmark.score(shipped.generate(s.image, s.question, none, benchmark.max_new_tokens).text, s)["score"]
                  for s in benchmark)
    assert abs(correct - metrics["subset"]["correct"]) <= 1, (correct, metrics["subset"])
    card = (SHIPPED / CARD).read_text()
    assert f"**{metrics['accuracy']:.1f}%** (chance {metrics['mean_chance']:.1f}%)" in card


def test_category_balanced_mean_weighs_each_question_type_equally():
    losses = torch.tensor([1.0, 2.0, 3.0, 10.0])
    assert torch.isclose(category_balanced_mean(losses, torch.tensor([0, 0, 1, 3])), torch.tensor((1.5 + 3 + 10) / 3))
    assert torch.isclose(category_balanced_mean(losses, torch.zeros(4, dtype=torch.long)), losses.mean())


def test_a_sparse_image_shows_objects_newlines_and_that_many_background_tokens(untrained):
    model, processor = untrained
    layout, _ = language_example(processor.tokenizer, model.config, 0, 1700, 1)
    scene = training_item(0, 1700, 1)[0]
    objects = scene_objects(scene, model.config)  # [V, P]
    keep = sparse_image_keep(layout, objects, 30, torch.Generator().manual_seed(0))
    order = spatial_source_order(layout)
    on_object = (order >= 0) & objects.flatten()[order.clamp(min=0)]
    assert bool(keep[on_object].all()) and bool(keep[order < 0].all())
    assert int((keep & (order >= 0) & ~on_object).sum()) == 30
    assert int(on_object.sum()) == int(objects.sum())  # the thumbnail's and every crop's object patches


def test_a_sparse_sequence_equals_the_whole_one_with_the_dropped_tokens_masked(untrained):
    """Dropping image tokens while the others keep their position ids is, by definition, the whole
    sequence with the dropped tokens hidden from every attention (RoPE depends on positions only)."""
    model, processor = untrained
    layout, conversation = language_example(processor.tokenizer, model.config, 0, 1700, 4)
    torch.manual_seed(0)
    projected = model.model.multi_modal_projector(torch.randn(layout.num_tiles, 576, 64))  # [T, P, D]
    segment = pack_spatial(projected, layout, model.model.image_newline).embeds  # [N_img, D]
    scene = training_item(0, 1700, 1)[0]
    objects = scene_objects(scene, model.config)  # [V, P]
    keep = sparse_image_keep(layout, objects, 50, torch.Generator().manual_seed(1))
    ids = conversation.input_ids  # [1, N]
    is_image = ids[0] == model.config.image_token_id
    with torch.no_grad():
        loss = conversation_loss(model, [segment], [conversation], image_keep=[keep])[0]
        embeds = model.model.language_model.get_input_embeddings()(ids.masked_fill(ids == model.config.image_token_id, 0))
        embeds[0, is_image] = segment
        visible = torch.ones(ids.shape[1], dtype=torch.bool)
        visible[is_image] = keep
        logits = masked_reference_logits(model, embeds, visible.nonzero().flatten(), ids.shape[1], 0)
        reference = torch.nn.functional.cross_entropy(logits[0, conversation.positions], conversation.targets)
    assert int(keep.sum()) < len(keep)
    assert torch.allclose(loss, reference, atol=1e-5)


def test_the_shipped_card_is_rendered_from_its_training_log_and_metrics():
    """Every number of the card comes from training.json and metrics.json (written from the runs'
    summaries); a sweep row shows its compressor, ratio ("adaptive" when the method sets its own
    count), retention and accuracies."""
    training = json.loads((SHIPPED / "training.json").read_text())
    metrics = json.loads((SHIPPED / METRICS).read_text())
    card = (SHIPPED / CARD).read_text()
    assert render_card(training, metrics, metrics["sweep"], metrics["sweep_samples"]) == card
    assert ("BindHeads" in card) == bool(training["config"]["language"].get("bind_weight"))
    row = {"compressor": "prumerge_plus", "ratio": None, "accuracy": 46.0, "retention_layer_mean": 0.2631,
           "accuracy/color": 32.0, "accuracy/digit": 48.0, "accuracy/presence": 64.0, "accuracy/count": 40.0}
    rendered = render_card(training, metrics, [row], 100)
    assert "| prumerge_plus | adaptive | 0.263 | 46.0 | 32.0 | 48.0 | 64.0 | 40.0 |" in rendered


def test_a_run_resumes_only_with_its_own_thread_count():
    """Another thread count sums floats in another order (other weights); the progress bar changes nothing."""
    identity = train_tiny.run_identity
    assert identity(compose_train("num_threads=1")) != identity(compose_train("num_threads=2"))
    assert identity(compose_train("progress=true")) == identity(compose_train("progress=false"))


def test_the_shipped_weights_were_trained_with_the_recipe_in_conf():
    """``python -m runners.train_tiny`` rebuilds the shipped checkpoint: its logged config is
    ``conf/train_tiny.yaml`` up to where it ran and wrote (and the progress bar)."""
    shipped = json.loads((SHIPPED / "training.json").read_text())["config"]
    recipe = OmegaConf.to_container(compose_train(), resolve=True)
    ignored = {"run_dir", "export_dir", *train_tiny.VOLATILE_KEYS}
    assert {k: v for k, v in shipped.items() if k not in ignored} == {k: v for k, v in recipe.items() if k not in ignored}
    assert json.loads((SHIPPED / "config.json").read_text())["text_config"]["rope_parameters"]["rope_theta"] == \
        build_untrained(seed=0)[0].config.text_config.rope_parameters["rope_theta"]
