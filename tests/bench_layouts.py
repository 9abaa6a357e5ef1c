"""Writers for tiny benchmark folders in the real layouts (LLaVA's eval files, lmms-lab parquet).

Field and file names follow ``../shared/notes/framework_anchors.md`` section 1.2, LLaVA's eval
scripts (which read them) and lmms-eval's task utils (which read the lmms-lab columns). Each
``write_<benchmark>(root, layout, items)`` writes the same canonical items in either layout, so
tests can check that both sources give the same ids and scores. Used by the tests and by
``tests/measure_listing.py``.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

SHORT = "\nAnswer the question using a single word or phrase."
LETTER = "\nAnswer with the option's letter from the given choices directly."
YES_NO = " Please answer yes or no."


def image_bytes(seed: int, size: tuple[int, int] = (48, 32), fmt: str = "JPEG") -> bytes:
    """A small random image, encoded."""
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buffer, format=fmt)
    return buffer.getvalue()


def _put(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.write_bytes if isinstance(data, bytes) else path.write_text)(data)
    return path


def _jsonl(path: Path, rows: list[dict]) -> Path:
    return _put(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _parquet(path: Path, columns: dict[str, list[Any]], row_group_size: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return path


def _cell(data: bytes, name: str = "image.jpg") -> dict:
    """A ``datasets`` Image cell."""
    return {"bytes": data, "path": name}


# ---------------------------------------------------------------------------------------------
# GQA
# ---------------------------------------------------------------------------------------------

GQA_ITEMS = [
    {"qid": "20968379", "image": "n288870", "question": "Do the shorts and the shirt have the same color?",
     "answer": "no", "structural": "compare"},
    {"qid": "201640614", "image": "n166008", "question": "Who is wearing the shirt?", "answer": "girl",
     "structural": "query"},
    {"qid": "20507580", "image": "n288870", "question": "What is the man holding?", "answer": "racket",
     "structural": "query"},
]


def write_gqa(root: Path, layout: str, items: list[dict] = GQA_ITEMS, row_group_size: int | None = None) -> Path:
    images = {item["image"]: image_bytes(i) for i, item in enumerate(items)}
    if layout == "llava":
        _jsonl(root / "llava_gqa_testdev_balanced.jsonl",
               [{"question_id": it["qid"], "image": f"{it['image']}.jpg", "text": it["question"] + SHORT}
                for it in items])
        gold = {it["qid"]: {"imageId": it["image"], "question": it["question"], "answer": it["answer"],
                            "isBalanced": True, "types": {"structural": it["structural"], "semantic": "obj",
                                                           "detailed": "x"}} for it in items}
        _put(root / "data/testdev_balanced_questions.json", json.dumps(gold))
        for name, data in images.items():
            _put(root / f"data/images/{name}.jpg", data)
    else:
        _parquet(root / "testdev_balanced_instructions/testdev-00000-of-00001.parquet", {
            "id": [it["qid"] for it in items], "imageId": [it["image"] for it in items],
            "question": [it["question"] for it in items], "answer": [it["answer"] for it in items],
            "isBalanced": [True] * len(items),
            "types": [{"structural": it["structural"], "semantic": "obj", "detailed": "x"} for it in items]},
            row_group_size)
        _parquet(root / "testdev_balanced_images/testdev-00000-of-00001.parquet",
                 {"id": list(images), "image": [_cell(d) for d in images.values()]}, row_group_size)
    return root


# ---------------------------------------------------------------------------------------------
# TextVQA
# ---------------------------------------------------------------------------------------------

TEXTVQA_ITEMS = [
    {"qid": 34602, "image_id": "0054c91397f2fe05", "question": "what is the brand of this camera?",
     "answers": ["nous les gosses", "dakota", "clos culombu", "dakota digital", "dakota", "dakota", "dakota digital",
                 "dakota digital", "dakota", "dakota"], "ocr": ["dakota", "digital"]},
    {"qid": 34603, "image_id": "005635e119b9f32f", "question": "what does the small white text spell?",
     "answers": ["copenhagen"] * 3 + ["thursday"] * 2 + ["copenhagen."] + ["cph"] * 4, "ocr": []},
]


def textvqa_prompt(item: dict) -> str:
    """LLaVA's file: capitalised question, the OCR line (also when empty), the suffix."""
    return f"{item['question'].capitalize()}\nReference OCR token: {', '.join(item['ocr'])}{SHORT}"


def write_textvqa(root: Path, layout: str, items: list[dict] = TEXTVQA_ITEMS) -> Path:
    if layout == "llava":
        _jsonl(root / "llava_textvqa_val_v051_ocr.jsonl",
               [{"question_id": it["image_id"], "image": f"{it['image_id']}.jpg", "text": textvqa_prompt(it)}
                for it in items])
        _put(root / "TextVQA_0.5.1_val.json", json.dumps({"dataset_name": "textvqa", "data": [
            {"question_id": it["qid"], "image_id": it["image_id"], "question": it["question"],
             "answers": it["answers"]} for it in items]}))
        for i, it in enumerate(items):
            _put(root / f"train_images/{it['image_id']}.jpg", image_bytes(10 + i))
    else:
        _parquet(root / "data/validation-00000-of-00001.parquet", {
            "image_id": [it["image_id"] for it in items], "question_id": [it["qid"] for it in items],
            "question": [it["question"] for it in items], "answers": [it["answers"] for it in items],
            "ocr_tokens": [it["ocr"] for it in items],
            "image": [_cell(image_bytes(10 + i)) for i in range(len(items))]})
    return root


# ---------------------------------------------------------------------------------------------
# MME
# ---------------------------------------------------------------------------------------------

MME_ITEMS = [
    {"subtask": "count", "file": "000000006040.jpg", "nested": False,
     "questions": [("Is there a train in the picture?" + YES_NO, "Yes"),
                   ("Are there a total of two trains in the picture?" + YES_NO, "No")]},
    {"subtask": "artwork", "file": "10002.jpg", "nested": True,
     "questions": [("Does this artwork belong to the type of religious?" + YES_NO, "Yes"),
                   ("Does this artwork belong to the type of genre?" + " " + YES_NO, "No")]},
    {"subtask": "code_reasoning", "file": "0020.png", "nested": False,
     "questions": [("Is a python code shown in the picture?" + YES_NO, "Yes"),
                   ("Is a c++ code shown in the picture?" + YES_NO, "No")]},
]


def write_mme(root: Path, layout: str, items: list[dict] = MME_ITEMS) -> Path:
    if layout == "llava":
        lines = []
        release = root / "MME_Benchmark_release_version"
        for i, it in enumerate(items):
            stem = it["file"].rsplit(".", 1)[0]
            image_rel = f"{it['subtask']}/images/{it['file']}" if it["nested"] else f"{it['subtask']}/{it['file']}"
            qa_rel = (f"{it['subtask']}/questions_answers_YN/{stem}.txt" if it["nested"]
                      else f"{it['subtask']}/{stem}.txt")
            _put(release / image_rel, image_bytes(20 + i))
            _put(release / qa_rel, "".join(f"{q}\t{a}\n" for q, a in it["questions"]))
            for question, _ in it["questions"]:
                text = question.replace("  Please answer yes or no.", "").replace(YES_NO, "") + SHORT
                lines.append({"question_id": f"{it['subtask']}/{it['file']}", "image": image_rel, "text": text,
                              "category": it["subtask"]})
        _jsonl(root / "llava_mme.jsonl", lines)
    else:
        rows = [(it, q, a, i) for i, it in enumerate(items) for q, a in it["questions"]]
        _parquet(root / "data/test-00000-of-00001.parquet", {
            "question_id": [f"{it['subtask']}/{it['file']}" for it, _, _, _ in rows],
            "image": [_cell(image_bytes(20 + i)) for _, _, _, i in rows],
            "question": [q for _, q, _, _ in rows], "answer": [a for _, _, a, _ in rows],
            "category": [it["subtask"] for it, _, _, _ in rows]})
    return root


# ---------------------------------------------------------------------------------------------
# POPE
# ---------------------------------------------------------------------------------------------

POPE_ITEMS = [
    {"split": "adversarial", "qid": 1, "image": "COCO_val2014_000000310196.jpg",
     "question": "Is there a snowboard in the image?", "label": "yes"},
    {"split": "adversarial", "qid": 2, "image": "COCO_val2014_000000310196.jpg",
     "question": "Is there a dining table in the image?", "label": "no"},
    {"split": "popular", "qid": 1, "image": "COCO_val2014_000000210789.jpg",
     "question": "Is there a car in the image?", "label": "yes"},
    {"split": "random", "qid": 1, "image": "COCO_val2014_000000210789.jpg",
     "question": "Is there a giraffe in the image?", "label": "no"},
    {"split": "random", "qid": 2, "image": "COCO_val2014_000000131089.jpg",
     "question": "Is there a person in the image?", "label": "yes"},
]


def write_pope(root: Path, layout: str, items: list[dict] = POPE_ITEMS) -> Path:
    images = {it["image"]: image_bytes(30 + i) for i, it in enumerate(items)}
    if layout == "llava":
        _jsonl(root / "llava_pope_test.jsonl", [
            {"question_id": n, "image": it["image"], "text": it["question"] + SHORT, "category": it["split"]}
            for n, it in enumerate(items)])
        for split in ("adversarial", "popular", "random"):
            _jsonl(root / f"coco/coco_pope_{split}.json", [
                {"question_id": it["qid"], "image": it["image"], "text": it["question"], "label": it["label"]}
                for it in items if it["split"] == split])
        for name, data in images.items():
            _put(root / f"val2014/{name}", data)
    else:
        _parquet(root / "data/test-00000-of-00001.parquet", {
            "id": [str(n) for n in range(len(items))], "question_id": [str(it["qid"]) for it in items],
            "question": [it["question"] for it in items], "answer": [it["label"] for it in items],
            "image_source": [it["image"].removesuffix(".jpg") for it in items],
            "image": [_cell(images[it["image"]]) for it in items], "category": [it["split"] for it in items]})
    return root


# ---------------------------------------------------------------------------------------------
# ScienceQA-IMG
# ---------------------------------------------------------------------------------------------

SQA_ITEMS = [
    {"pid": "4", "question": "Which of these states is farthest north?",
     "choices": ["West Virginia", "Louisiana", "Arizona", "Oklahoma"], "answer": 0, "hint": ""},
    {"pid": "5", "question": "Identify the question that Tom and Justin's experiment can best answer.",
     "choices": ["Do ping pong balls stop rolling along the ground sooner?", "Do ping pong balls travel farther?"],
     "answer": 1, "hint": "The passage below describes an experiment."},
    {"pid": "7", "question": "Which animal's feet are also adapted for grabbing prey?",
     "choices": ["bald eagle", "Hermann's tortoise", "hippopotamus"], "answer": 0, "hint": "Ospreys catch fish."},
]


def sqa_prompt(item: dict) -> str:
    context = f"Context: {item['hint']}\n" if item["hint"] else ""
    lines = "\n".join(f"{'ABCDE'[i]}. {c}" for i, c in enumerate(item["choices"]))
    return f"{context}{item['question']}\n{lines}"


def write_scienceqa(root: Path, layout: str, items: list[dict] = SQA_ITEMS) -> Path:
    if layout == "llava":
        questions = [{"id": it["pid"], "image": f"{it['pid']}/image.png", "conversations": [
            {"from": "human", "value": f"<image>\n{sqa_prompt(it)}"}, {"from": "gpt", "value": "ABCDE"[it["answer"]]}]}
            for it in items]
        questions.insert(1, {"id": "6", "conversations": [{"from": "human", "value": "Text only?\nA. a\nB. b"},
                                                          {"from": "gpt", "value": "A"}]})
        _put(root / "llava_test_CQM-A.json", json.dumps(questions))
        problems = {it["pid"]: {"question": it["question"], "choices": it["choices"], "answer": it["answer"],
                                "hint": it["hint"], "image": "image.png", "split": "test"} for it in items}
        problems["6"] = {"question": "Text only?", "choices": ["a", "b"], "answer": 0, "hint": "", "image": None,
                         "split": "test"}
        _put(root / "problems.json", json.dumps(problems))
        _put(root / "pid_splits.json", json.dumps({"test": [it["pid"] for it in items] + ["6"]}))
        for i, it in enumerate(items):
            _put(root / f"images/test/{it['pid']}/image.png", image_bytes(40 + i, fmt="PNG"))
    else:
        _parquet(root / "ScienceQA-IMG/test-00000-of-00001.parquet", {
            "image": [_cell(image_bytes(40 + i, fmt="PNG"), "image.png") for i in range(len(items))],
            "question": [it["question"] for it in items], "choices": [it["choices"] for it in items],
            "answer": pa.array([it["answer"] for it in items], pa.int8()), "hint": [it["hint"] for it in items],
            "task": ["closed choice"] * len(items), "grade": ["grade2"] * len(items)})
    return root


# ---------------------------------------------------------------------------------------------
# MMBench
# ---------------------------------------------------------------------------------------------

MMBENCH_ITEMS = [
    {"index": 0, "question": "What is the main object?", "hint": None, "options": ["cat", "dog", "bird", None],
     "answer": "B", "category": "image_topic"},
    {"index": 1, "question": "Which emotion is shown?", "hint": "Look at the face.",
     "options": ["happy", "sad", "angry", "surprised"], "answer": "D", "category": "image_emotion"},
]


def mmbench_rows(items: list[dict]) -> list[dict]:
    """Each question plus one circular shift (``index + 1e6``, options rotated by one)."""
    rows = []
    for shift in (0, 1):
        for it in items:
            options = [o for o in it["options"] if o is not None]
            rotated = options[shift:] + options[:shift]
            answer = "ABCD"[(options.index(it["options"]["ABCD".index(it["answer"])]) - shift) % len(options)]
            padded = rotated + [None] * (4 - len(rotated))
            rows.append({"index": it["index"] + shift * 1_000_000, "question": it["question"], "hint": it["hint"],
                         **dict(zip("ABCD", padded)), "answer": answer, "category": it["category"],
                         "l2-category": "perception", "split": "dev", "source": "x", "comment": None,
                         "seed": 50 + it["index"]})
    return rows


def write_mmbench(root: Path, layout: str, items: list[dict] = MMBENCH_ITEMS, language: str = "en") -> Path:
    import base64

    import pandas as pd

    rows = mmbench_rows(items)
    if layout == "llava":
        name = "mmbench_dev_20230712.tsv" if language == "en" else "mmbench_dev_cn_20231003.tsv"
        frame = pd.DataFrame([{**{k: v for k, v in r.items() if k != "seed"},
                               "image": base64.b64encode(image_bytes(r["seed"])).decode()} for r in rows],
                             columns=["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image",
                                      "source", "l2-category", "comment", "split"])
        root.mkdir(parents=True, exist_ok=True)
        frame.to_csv(root / name, sep="\t", index=False)
    else:
        columns = ["index", "question", "hint", "answer", "A", "B", "C", "D", "category", "source", "comment", "split"]
        data = {c: [r[c] for r in rows] for c in columns}
        data["L2-category"] = [r["l2-category"] for r in rows]
        data["image"] = [_cell(image_bytes(r["seed"])) for r in rows]
        _parquet(root / f"{language}/dev-00000-of-00001.parquet", data)
    return root


# ---------------------------------------------------------------------------------------------
# SEED-Bench
# ---------------------------------------------------------------------------------------------

SEED_ITEMS = [
    {"qid": "101669", "question": "How many towels are in the image?", "choices": ["One", "Two", "Three", "Four"],
     "answer": "A", "type": 5, "data_type": "image", "data_id": "1454426_2591111986.jpg"},
    {"qid": "102130", "question": "What is the man doing?", "choices": ["Running", "Sitting", "Eating", "Reading"],
     "answer": "B", "type": 1, "data_type": "image", "data_id": "1547394_4025779397.jpg"},
    {"qid": "v1", "question": "What happens next?", "choices": ["a", "b", "c", "d"], "answer": "C", "type": 10,
     "data_type": "video", "data_id": "v_123.mp4"},
]


def seed_prompt(item: dict) -> str:
    a, b, c, d = item["choices"]
    return f"{item['question']}\nA. {a}\nB. {b}\nC. {c}\nD. {d}{LETTER}"


def write_seed(root: Path, layout: str, items: list[dict] = SEED_ITEMS) -> Path:
    if layout == "llava":
        questions = [{"question_id": it["qid"], "data_type": it["data_type"], "question_type_id": it["type"],
                      "question": it["question"], "answer": it["answer"], "data_id": it["data_id"],
                      **{f"choice_{k}": c for k, c in zip("abcd", it["choices"])}} for it in items]
        _put(root / "SEED-Bench.json", json.dumps({"questions": questions, "question_type": {
            "Scene Understanding": 1, "Instances Counting": 5, "Action Recognition": 10}}))
        lines = []
        for i, it in enumerate(items):
            folder = "SEED-Bench-image" if it["data_type"] == "image" else "SEED-Bench-video-image"
            image = f"{folder}/{it['data_id'].rsplit('.', 1)[0]}.jpg"
            _put(root / image, image_bytes(60 + i))
            lines.append({"question_id": it["qid"], "image": image, "text": seed_prompt(it)})
        _jsonl(root / "llava-seed-bench.jsonl", lines)
    else:
        _parquet(root / "data/test-00000-of-00001.parquet", {
            "answer": [it["answer"] for it in items],
            **{f"choice_{k}": [it["choices"][j] for it in items] for j, k in enumerate("abcd")},
            "data_id": [it["data_id"] for it in items], "data_type": [it["data_type"] for it in items],
            "question": [it["question"] for it in items], "question_id": [it["qid"] for it in items],
            "question_type_id": [it["type"] for it in items],
            "image": [[_cell(image_bytes(60 + i))] for i in range(len(items))]})
    return root


# ---------------------------------------------------------------------------------------------
# VQAv2 and VizWiz
# ---------------------------------------------------------------------------------------------

VQAV2_ITEMS = [
    {"qid": 262144000, "image": "COCO_test2015_000000262144.jpg", "question": "Is the ball flying towards the batter?",
     "answers": ["yes"] * 9 + ["no"]},
    {"qid": 262144001, "image": "COCO_test2015_000000262144.jpg", "question": "What sport is this?",
     "answers": ["baseball"] * 8 + ["softball", "Baseball!"]},
]


def write_vqav2(root: Path, layout: str, items: list[dict] = VQAV2_ITEMS, split: str = "testdev") -> Path:
    images = {it["image"]: image_bytes(70 + i) for i, it in enumerate(items)}
    if layout == "llava":
        lines = [{"question_id": it["qid"], "image": it["image"], "text": it["question"] + SHORT,
                  "category": "default"} for it in items]
        _jsonl(root / "llava_vqav2_mscoco_test-dev2015.jsonl", lines)
        extra = {"question_id": 999, "image": "COCO_test2015_000000000999.jpg", "text": "Extra?" + SHORT}
        _jsonl(root / "llava_vqav2_mscoco_test2015.jsonl", lines + [extra])
        for name, data in images.items():
            _put(root / f"test2015/{name}", data)
    else:
        answers = ([[{"answer": a, "answer_confidence": "yes", "answer_id": k + 1} for k, a in enumerate(it["answers"])]
                    for it in items] if split == "validation" else [None] * len(items))
        _parquet(root / f"data/{split}-00000-of-00001.parquet", {
            "question_id": [it["qid"] for it in items], "question": [it["question"] for it in items],
            "answers": pa.array(answers, pa.list_(pa.struct([("answer", pa.string()),
                                                             ("answer_confidence", pa.string()),
                                                             ("answer_id", pa.int64())]))),
            "image": [_cell(images[it["image"]]) for it in items]})
    return root


VIZWIZ_ITEMS = [
    {"image": "VizWiz_test_00000000.jpg", "question": "What is this?",
     "answers": ["soup", "soup", "tomato soup", "soup", "unanswerable", "soup", "soup", "soup", "soup", "soup"]},
    {"image": "VizWiz_test_00000001.jpg", "question": "What color is this shirt?",
     "answers": ["blue"] * 6 + ["navy blue"] * 4},
]
VIZWIZ_SUFFIX = "\nWhen the provided information is insufficient, respond with 'Unanswerable'." + SHORT


def write_vizwiz(root: Path, layout: str, items: list[dict] = VIZWIZ_ITEMS, split: str = "test") -> Path:
    if layout == "llava":
        _jsonl(root / "llava_test.jsonl", [{"question_id": n, "image": it["image"], "text": it["question"] +
                                            VIZWIZ_SUFFIX} for n, it in enumerate(items)])
        for i, it in enumerate(items):
            _put(root / f"test/{it['image']}", image_bytes(80 + i))
    else:
        _parquet(root / f"data/{split}-00000-of-00001.parquet", {
            "question_id": [it["image"].removesuffix(".jpg") for it in items],
            "question": [it["question"] for it in items],
            "answers": [it["answers"] if split == "val" else [] for it in items],
            "image": [_cell(image_bytes(80 + i)) for i in range(len(items))]})
    return root


WRITERS = {"gqa": write_gqa, "textvqa": write_textvqa, "mme": write_mme, "pope": write_pope,
           "scienceqa_img": write_scienceqa, "mmbench": write_mmbench, "seed_bench": write_seed,
           "vqav2": write_vqav2, "vizwiz": write_vizwiz,
           "mmbench_cn": lambda root, layout: write_mmbench(root, layout, language="cn")}
