"""How long listing a GQA-sized benchmark (12,578 questions) and resuming it take, in both layouts.

    python tests/measure_listing.py            # writes a full-size synthetic GQA folder in a temp dir

A measurement, not a test. For each layout it times, after imports: building the benchmark from its
config, listing every id, opening a run directory that already holds half the samples (resume),
and loading the first sample still to do (the one image it decodes), in wall and CPU time (the
second does not grow with the machine's load). It also counts image decodes, which must be one.
"""

from __future__ import annotations

import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

from bench_layouts import image_bytes, write_gqa  # noqa: E402

import benchmarks.data  # noqa: E402
from benchmarks import build_benchmark  # noqa: E402
from runners.store import RunStore  # noqa: E402

QUESTIONS, IMAGES = 12_578, 398  # GQA testdev-balanced


def gqa_items(rng: random.Random) -> list[dict]:
    return [{"qid": str(20_000_000 + i), "image": f"n{rng.randrange(IMAGES):06d}",
             "question": f"Is the {rng.choice(['man', 'cup', 'sky'])} to the left of the table number {i}?",
             "answer": rng.choice(["yes", "no", "left", "red"]), "structural": rng.choice(["query", "verify"])}
            for i in range(QUESTIONS)]


def pad_gold(root: Path) -> None:
    """Give each gold question the size of the official file's entries (programs, annotations)."""
    path = root / "data/testdev_balanced_questions.json"
    gold = json.loads(path.read_text())
    for question in gold.values():
        question["semantic"] = [{"operation": "select", "dependencies": [], "argument": "table (1234567)"}] * 4
        question["annotations"] = {"answer": {}, "question": {"2": "1234567"}, "fullAnswer": {"1": "1234567"}}
        question["fullAnswer"] = "The table is to the left of the man."
    path.write_text(json.dumps(gold))


def big_images(root: Path, layout: str) -> None:
    """Replace the tiny test images with camera-sized ones (640x480 JPEG)."""
    if layout == "llava":
        for path in (root / "data/images").iterdir():
            path.write_bytes(image_bytes(hash(path.name) % 1000, (640, 480)))


def measure(root: Path, layout: str, run_dir: Path) -> dict[str, float]:
    decodes = []
    original = benchmarks.data.decode_image
    benchmarks.data.decode_image = lambda *a, **k: decodes.append(1) or original(*a, **k)
    times = {}
    start, cpu = time.perf_counter(), time.process_time()
    bench = build_benchmark({"name": "gqa", "root": str(root), "layout": layout})
    ids = bench.sample_ids()
    times["list ids"] = time.perf_counter() - start
    with RunStore(run_dir, identity={"benchmark": layout}) as store:
        done = store.completed_ids()
        todo = [i for i, sample_id in enumerate(ids) if sample_id not in done]
        times["resume (list + read done records)"] = time.perf_counter() - start
        sample = bench[todo[0]]
    times["first sample ready"] = time.perf_counter() - start
    times["CPU time until then"] = time.process_time() - cpu  # what a quiet machine's wall time would be
    benchmarks.data.decode_image = original
    assert len(ids) == QUESTIONS and len(todo) == QUESTIONS - QUESTIONS // 2 and sample.image.size == (640, 480)
    times["images decoded"] = len(decodes)
    return times


def main() -> None:
    rng = random.Random(0)
    items = gqa_items(rng)
    with tempfile.TemporaryDirectory() as tmp:
        for layout in ("llava", "lmms_lab"):
            root = Path(tmp) / layout
            if layout == "llava":
                write_gqa(root, layout, items)
                pad_gold(root)
                big_images(root, layout)
            else:
                write_gqa(root, layout, items)
                import pyarrow as pa
                import pyarrow.parquet as pq

                shard = next((root / "testdev_balanced_images").glob("*.parquet"))
                table = pq.read_table(shard)
                images = [{"bytes": image_bytes(i, (640, 480)), "path": "x.jpg"} for i in range(table.num_rows)]
                pq.write_table(table.set_column(1, "image", pa.array(images)), shard)
            run_dir = Path(tmp) / f"run-{layout}"
            run_dir.mkdir()
            with open(run_dir / "samples.jsonl", "w") as handle:  # half the run done, records of realistic size
                for item in items[: QUESTIONS // 2]:
                    handle.write(json.dumps({"id": item["qid"], "prompt": item["question"] * 3, "prediction": "yes",
                                             "reference": [item["answer"]], "score": 1.0, "meta": {"x": "y" * 600}})
                                 + "\n")
            (run_dir / "run.json").write_text(json.dumps({"benchmark": layout}))
            times = measure(root, layout, run_dir)
            print(f"{layout:9s} " + " | ".join(f"{k}: {v:.3f} s" if isinstance(v, float) else f"{k}: {v}"
                                               for k, v in times.items()))


if __name__ == "__main__":
    main()
