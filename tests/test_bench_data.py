"""Benchmark loaders on tiny folders in the real layouts: both sources agree, listing decodes no image,
a missing root fails with the files and their source, bad records become failed samples, paths cannot
leave the data root, submission files have the official formats."""

from __future__ import annotations

import json
import os

import pandas as pd
import pytest
from bench_layouts import (
    MMBENCH_ITEMS,
    POPE_ITEMS,
    VQAV2_ITEMS,
    WRITERS,
    image_bytes,
    write_gqa,
    write_mme,
    write_pope,
    write_scienceqa,
    write_seed,
    write_textvqa,
    write_vizwiz,
    write_vqav2,
)

import benchmarks.data
from benchmarks import build_benchmark
from benchmarks.base import DataRootError, SampleError

BENCHMARKS = sorted(WRITERS)
PREDICTIONS = ["Yes", "no", "A", "B.", "Dakota", "girl", "The answer is B.", "2", ""]


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    """Every benchmark written in both layouts from the same items."""
    base = tmp_path_factory.mktemp("bench")
    return {(name, layout): WRITERS[name](base / name / layout, layout)
            for name in BENCHMARKS for layout in ("llava", "lmms_lab")}


def build(name, root, layout="llava", **kw):
    return build_benchmark({"name": name, "root": str(root), "layout": layout, **kw})


@pytest.mark.parametrize("name", BENCHMARKS)
def test_both_layouts_give_the_same_ids_and_scores(roots, name):
    llava, lmms = (build(name, roots[name, layout], layout) for layout in ("llava", "lmms_lab"))
    assert llava.sample_ids() == lmms.sample_ids() and len(llava) >= 2
    for index in range(len(llava)):
        a, b = llava[index], lmms[index]
        assert (a.id, a.answers, a.image.tobytes()) == (b.id, b.answers, b.image.tobytes())
        for prediction in PREDICTIONS:
            assert llava.score(prediction, a) == lmms.score(prediction, b)


def test_prompts_follow_llavas_files(roots):
    """LLaVA's files are used verbatim; the lmms-lab prompts are rebuilt in the same form."""
    for name in BENCHMARKS:
        llava, lmms = (build(name, roots[name, layout], layout) for layout in ("llava", "lmms_lab"))
        assert [llava[i].question for i in range(len(llava))] == [lmms[i].question for i in range(len(lmms))], name
    textvqa = build("textvqa", roots["textvqa", "lmms_lab"], "lmms_lab")
    assert textvqa[0].question == ("What is the brand of this camera?\nReference OCR token: dakota, digital\n"
                                   "Answer the question using a single word or phrase.")
    assert textvqa[1].question.split("\n")[1] == "Reference OCR token: "  # present even without tokens
    no_ocr = build("textvqa", roots["textvqa", "llava"], ocr_tokens=False)
    assert no_ocr[0].question == "What is the brand of this camera?\nAnswer the question using a single word or phrase."
    mmb = build("mmbench", roots["mmbench", "llava"])
    assert mmb[0].question == ("What is the main object?\nA. cat\nB. dog\nC. bird\n"
                               "Answer with the option's letter from the given choices directly.")
    assert mmb[1].question.startswith("Look at the face.\nWhich emotion is shown?\nA. happy")
    assert build("mmbench_cn", roots["mmbench_cn", "llava"])[0].question.endswith("\n请直接回答选项字母。")


def test_listing_and_resuming_decode_no_image(roots, monkeypatch):
    def no_decoding(*args, **kwargs):
        raise AssertionError("an image was decoded")

    monkeypatch.setattr(benchmarks.data, "decode_image", no_decoding)
    for (name, layout), root in roots.items():
        bench = build(name, root, layout)
        assert len(bench.sample_ids()) == len(bench) >= 2
    with pytest.raises(AssertionError, match="decoded"):
        build("gqa", roots["gqa", "llava"])[0]


def test_construction_reads_nothing_and_limit_takes_the_first(roots):
    bench = build("gqa", "/nonexistent/gqa")  # a config check needs no data
    assert bench.limit is None and bench.max_new_tokens == 128
    limited = build("gqa", roots["gqa", "llava"], limit=2)
    assert limited.sample_ids() == ["20968379", "201640614"]


@pytest.mark.parametrize("layout", ["llava", "lmms_lab"])
@pytest.mark.parametrize("name", BENCHMARKS)
def test_missing_root_names_every_expected_file_and_its_source(tmp_path, name, layout):
    bench = build(name, tmp_path / "nothing", layout)
    with pytest.raises(DataRootError) as error:
        bench.sample_ids()
    message = str(error.value)
    assert str(tmp_path / "nothing") in message and "https://" in message and "benchmark.root=" in message
    assert message.count("\n  - ") >= 1


def test_incomplete_root_names_only_what_is_missing(tmp_path):
    root = write_gqa(tmp_path / "gqa", "llava")
    (root / "data/testdev_balanced_questions.json").unlink()
    with pytest.raises(DataRootError, match=r"(?s)missing or incomplete.*data/testdev_balanced_questions\.json") as e:
        build("gqa", root).sample_ids()
    assert "llava_gqa_testdev_balanced.jsonl" not in str(e.value)
    (root / "data/testdev_balanced_questions.json").write_text("{not json")
    with pytest.raises(DataRootError, match="cannot read"):
        build("gqa", root).sample_ids()


def test_bad_config_values_name_the_allowed_ones(tmp_path):
    with pytest.raises(ValueError, match=r"benchmark.layout must be one of llava, lmms_lab, got 'hf'"):
        build("gqa", tmp_path, "hf")
    with pytest.raises(ValueError, match=r"benchmark.split must be one of testdev, got 'validation'"):
        build("vqav2", tmp_path, split="validation")
    with pytest.raises(ValueError, match=r"benchmark.split must be one of test, val, got 'train'"):
        build("vizwiz", tmp_path, "lmms_lab", split="train")
    with pytest.raises(ValueError, match="benchmark.root must be a folder path"):
        build("pope", "")
    with pytest.raises(ValueError, match="ocr_tokens must be true or false"):
        build("textvqa", tmp_path, ocr_tokens="yes")


# ---------------------------------------------------------------------------------------------
# Bad records
# ---------------------------------------------------------------------------------------------


def test_malformed_records_and_bad_images_become_failed_samples(tmp_path):
    root = write_gqa(tmp_path / "gqa", "llava")
    outside = tmp_path / "secret.jpg"
    outside.write_bytes(image_bytes(1))
    (root / "data/images/link.jpg").symlink_to(outside)
    (root / "data/images/n288870.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    lines = (root / "llava_gqa_testdev_balanced.jsonl").read_text().splitlines()
    extra = [
        '{"question_id": "broken", "image": ',                                            # not JSON
        json.dumps({"question_id": "201640614", "image": "n166008.jpg", "text": "again"}),  # duplicate id
        json.dumps({"question_id": "up", "image": "../../../secret.jpg", "text": "q"}),
        json.dumps({"question_id": "abs", "image": str(outside), "text": "q"}),
        json.dumps({"question_id": "link", "image": "link.jpg", "text": "q"}),
        json.dumps({"question_id": "gone", "image": "missing.jpg", "text": "q"}),
        json.dumps({"question_id": "nogold", "image": "n166008.jpg", "text": "q"}),
        json.dumps({"question_id": "noimage", "text": "q"}),
    ]
    (root / "llava_gqa_testdev_balanced.jsonl").write_text("\n".join(lines + extra) + "\n")
    gold = json.loads((root / "data/testdev_balanced_questions.json").read_text())
    for qid in ("up", "abs", "link", "gone", "noimage"):
        gold[qid] = {"answer": "x", "isBalanced": True}
    (root / "data/testdev_balanced_questions.json").write_text(json.dumps(gold))

    bench = build("gqa", root)
    ids = bench.sample_ids()
    assert ids == ["20968379", "201640614", "20507580", "line-3", "201640614~1", "up", "abs", "link", "gone",
                   "nogold", "noimage"]
    expected = {0: "cannot decode image", 2: "cannot decode image", 3: "not valid JSON", 4: "duplicate id",
                5: "leads outside the data root", 6: "is absolute", 7: "leads outside the data root",
                8: "does not exist", 9: "no gold answer", 10: "lacks 'text' or 'image'"}
    for index, reason in expected.items():
        with pytest.raises(SampleError, match=reason):
            bench[index]
    assert bench[1].id == "201640614"  # the good sample still loads


def test_pope_files_of_different_versions_fail_instead_of_shifting_labels(tmp_path):
    root = write_pope(tmp_path / "pope", "llava")
    labels = [json.loads(x) for x in (root / "coco/coco_pope_random.json").read_text().splitlines()]
    (root / "coco/coco_pope_random.json").write_text(json.dumps(labels[1]) + "\n")  # one label dropped
    bench = build("pope", root)
    random_ids = [i for i, item in enumerate(POPE_ITEMS) if item["split"] == "random"]
    with pytest.raises(SampleError, match="disagree at random position 0.*2,910"):
        bench[random_ids[0]]
    with pytest.raises(SampleError, match="no label at position 1"):
        bench[random_ids[1]]
    assert bench[0].answers == ("yes",)


def test_textvqa_joins_on_image_id_and_question_like_eval_textvqa(tmp_path):
    root = write_textvqa(tmp_path / "textvqa", "llava")
    bench = build("textvqa", root)
    assert bench.sample_ids() == ["34602", "34603"]
    annotations = json.loads((root / "TextVQA_0.5.1_val.json").read_text())
    annotations["data"][0]["answers"] = annotations["data"][0]["answers"][:9]
    (root / "TextVQA_0.5.1_val.json").write_text(json.dumps(annotations))
    with pytest.raises(SampleError, match="9 answers; TextVQA's evaluator needs exactly 10"):
        build("textvqa", root)[0]


def test_mme_gold_lookup_restores_the_yes_no_suffix_and_its_double_space_variant(tmp_path):
    bench = build("mme", write_mme(tmp_path / "mme", "llava"))
    assert bench.sample_ids()[:4] == ["count/000000006040.jpg#0", "count/000000006040.jpg#1", "artwork/10002.jpg#0",
                                      "artwork/10002.jpg#1"]
    assert [bench[i].answers for i in range(4)] == [("Yes",), ("No",), ("Yes",), ("No",)]  # #3: double space
    assert bench[2].meta == {"category": "artwork", "image": "artwork/10002.jpg"}


def test_only_image_questions_are_listed(tmp_path):
    sqa = build("scienceqa_img", write_scienceqa(tmp_path / "sqa", "llava"))
    assert len(sqa) == 3 and [sqa[i].meta["pid"] for i in range(3)] == ["4", "5", "7"]  # "6" has no image
    assert sqa[1].question.startswith("Context: The passage below describes an experiment.\nIdentify")
    assert sqa[1].answers == ("B",)
    seed = build("seed_bench", write_seed(tmp_path / "seed", "llava"))
    assert seed.sample_ids() == ["101669", "102130"]  # the video question is not listed


def test_scienceqa_content_ids_number_repeats(tmp_path):
    from bench_layouts import SQA_ITEMS

    items = SQA_ITEMS + [{**SQA_ITEMS[0], "pid": "9"}]
    ids = build("scienceqa_img", write_scienceqa(tmp_path / "sqa", "llava", items)).sample_ids()
    assert ids[3] == f"{ids[0]}-1" and len(set(ids)) == 4


# ---------------------------------------------------------------------------------------------
# Submission files
# ---------------------------------------------------------------------------------------------


def records_for(bench, predictions):
    return [{"id": bench[i].id, "prediction": p, "reference": list(bench[i].answers), "meta": bench[i].meta}
            for i, p in zip(range(len(bench)), predictions)]


def test_submission_files_have_the_official_formats(tmp_path, roots):
    vqav2 = build("vqav2", roots["vqav2", "llava"])
    records = records_for(vqav2, ["Yes.", "Baseball!"])
    path, = vqav2.write_submission(records[:1] + [{"id": "262144001", "failed": True}], tmp_path)
    rows = json.loads(path.read_text())
    assert rows == [{"question_id": VQAV2_ITEMS[0]["qid"], "answer": "yes"},
                    {"question_id": VQAV2_ITEMS[1]["qid"], "answer": ""}, {"question_id": 999, "answer": ""}]
    vizwiz = build("vizwiz", roots["vizwiz", "llava"])
    path, = vizwiz.write_submission(records_for(vizwiz, ["Tomato soup.", "Navy Blue"]), tmp_path)
    assert json.loads(path.read_text()) == [{"image": "VizWiz_test_00000000.jpg", "answer": "tomato soup"},
                                            {"image": "VizWiz_test_00000001.jpg", "answer": "navy blue"}]
    gqa = build("gqa", roots["gqa", "llava"])
    path, = gqa.write_submission(records_for(gqa, ["No.", "Girl", "racket"]), tmp_path)
    assert json.loads(path.read_text())[:2] == [{"questionId": "20968379", "prediction": "no"},
                                                {"questionId": "201640614", "prediction": "girl"}]
    seed = build("seed_bench", roots["seed_bench", "llava"])
    path, = seed.write_submission(records_for(seed, ["A", "C"]), tmp_path)
    assert [json.loads(x) for x in path.read_text().splitlines()] == [
        {"question_id": "101669", "prediction": "A"}, {"question_id": "102130", "prediction": "C"}]
    mmb = build("mmbench", roots["mmbench", "llava"])
    path, = mmb.write_submission(records_for(mmb, ["B", "D", "A", "C"]), tmp_path)
    sheet = pd.read_excel(path)
    assert list(sheet.columns) == ["index", "question", "A", "B", "C", "D", "prediction", "answer", "split"]
    assert sheet["index"].tolist() == [0, 1, 1_000_000, 1_000_001]
    assert sheet["prediction"].tolist() == ["B", "D", "A", "C"]
    assert sheet.loc[0, "question"] == MMBENCH_ITEMS[0]["question"] and pd.isna(sheet.loc[0, "D"])


def test_vqav2_and_vizwiz_val_splits_carry_answers(tmp_path):
    vqav2 = build("vqav2", write_vqav2(tmp_path / "vqav2", "lmms_lab", split="validation"), "lmms_lab",
                  split="validation")
    assert vqav2[1].answers[-1] == "Baseball!" and vqav2.score("baseball", vqav2[1])["score"] == 1.0
    vizwiz = build("vizwiz", write_vizwiz(tmp_path / "vizwiz", "lmms_lab", split="val"), "lmms_lab", split="val")
    assert vizwiz.sample_ids() == ["VizWiz_test_00000000", "VizWiz_test_00000001"]
    assert vizwiz.score("Soup", vizwiz[0])["score"] == 1.0
    test_split = build("vizwiz", write_vizwiz(tmp_path / "vizwiz_test", "llava"))
    assert test_split[0].answers == () and test_split.score("soup", test_split[0])["score"] is None


def test_parquet_images_are_read_one_row_group_at_a_time(tmp_path, monkeypatch):
    root = write_gqa(tmp_path / "gqa", "lmms_lab", row_group_size=1)
    bench = build("gqa", root, "lmms_lab")
    reads = []
    original = benchmarks.data.pq.ParquetFile.read_row_group

    def counting(self, group, *args, **kwargs):
        reads.append(group)
        return original(self, group, *args, **kwargs)

    monkeypatch.setattr(benchmarks.data.pq.ParquetFile, "read_row_group", counting)
    for index in range(len(bench)):
        assert bench[index].image.size == (48, 32)
    assert reads == [0, 1]  # two images, one row group each; the third question reuses the first image
    assert os.path.getsize(next(root.glob("testdev_balanced_images/*.parquet"))) > 0
