"""The shipped checkpoint's ``metrics.json`` and model card, from its training log and evaluation runs.

    python -m runners.evaluate model=tiny_trained benchmark=hires_detail benchmark.num_samples=100
    python -m runners.evaluate -m model=tiny_trained benchmark=hires_detail \\
        compressor=random,pooling,fastv,globalcom2 compressor.ratio=0.5,0.25,0.1    # optional sweep (40 samples)
    python -m models.training.card outputs/runs/tiny_trained/hires_detail --sweep-samples 40

Every number in the card comes from ``training.json`` (written by ``runners.train_tiny``) or from
the runs' ``summary.json`` / ``samples.jsonl`` (written by ``runners.evaluate``); the test suite
re-scores the first ``SUBSET`` test samples with the shipped weights against ``metrics.json``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.hires_detail import CHANCE
from runners.report import collect_summaries
from runners.store import SAMPLES_FILE, write_json_atomic

WEIGHTS = Path(__file__).resolve().parents[1] / "weights" / "tiny_trained"
TARGET = 85.0  # uncompressed test accuracy (%) that makes the model useful for ranking compressors
SUBSET = 8  # the first test samples the test suite re-scores with the shipped weights
TRAINING_LOG, METRICS, CARD = "training.json", "metrics.json", "README.md"
FIGURE = "score_vs_ratio.png"  # copied from `python -m runners.report <runs> --out <dir>` when present


def _is_uncompressed_test_run(summary: dict) -> bool:
    benchmark = summary.get("config", {}).get("benchmark", {})
    return (summary.get("model") == "tiny_trained" and summary.get("benchmark") == "hires_detail"
            and benchmark.get("split") == "test" and summary.get("compressor", {}).get("name") == "none")


def test_metrics(runs: Path) -> dict[str, Any]:
    """Accuracy of the largest uncompressed test-split run below ``runs``, per category and on the
    first ``SUBSET`` samples (ids and correct count)."""
    candidates = [s for s in collect_summaries(runs) if _is_uncompressed_test_run(s)]
    if not candidates:
        raise FileNotFoundError(f"no uncompressed tiny_trained run on the hires_detail test split below {runs}")
    summary = max(candidates, key=lambda s: s["num_samples"])
    lines = (Path(summary["run_dir"]) / SAMPLES_FILE).read_text().splitlines()
    records = sorted((json.loads(line) for line in lines), key=lambda r: r["meta"]["index"])
    subset = records[:SUBSET]
    metrics = summary["metrics"]
    return {
        "split": "test",
        "num_samples": summary["num_samples"],
        "accuracy": metrics["accuracy"],
        "per_category": {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith("accuracy/")},
        "chance": {category: 100 * p for category, p in CHANCE.items()},
        "mean_chance": 100 * sum(CHANCE.values()) / len(CHANCE),
        "subset": {"ids": [r["id"] for r in subset], "correct": int(sum(r["score"] for r in subset))},
        "run_dir": summary["run_dir"],
    }


def sweep_table(runs: Path, num_samples: int) -> list[dict[str, Any]]:
    """Accuracy and retention of every test-split run of ``num_samples`` below ``runs``."""
    rows = []
    for summary in collect_summaries(runs):
        benchmark = summary.get("config", {}).get("benchmark", {})
        if summary.get("model") != "tiny_trained" or benchmark.get("split") != "test":
            continue
        if summary["num_samples"] != num_samples:
            continue
        compressor = summary["compressor"]
        rows.append({"compressor": compressor["name"], "ratio": compressor["ratio"],
                     "accuracy": summary["metrics"]["accuracy"],
                     "retention_layer_mean": summary["retention_layer_mean"],
                     **{k: v for k, v in summary["metrics"].items() if k.startswith("accuracy/")}})
    return rows


def _sparse(start: int, ramp: float, subject: str = "the image segment") -> str:
    return (f"{subject} shows its object tokens, the newlines and {start} background tokens at their own"
            " position ids, growing geometrically" + (f" to the whole image after {ramp:.0%} of the steps"
                                                      if ramp <= 1 else f" (the whole image would come after"
                                                      f" {ramp:g}x the steps)"))


def _stage2_phases(language: dict[str, Any]) -> list[str]:
    """The card's lines for stage 2's phases that ran (``symbolic``, ``align``, ``crops``, whole images)."""
    phases = []
    crops, images = language.get("symbolic_crop_steps", 0), language.get("symbolic_steps", 0)
    if crops or images:
        runs = " then ".join(text for text, steps in ((f"{crops} steps of {language['symbolic_batch']} single crops", crops),
                                                       (f"{images} steps of {language['symbolic_batch']} whole images",
                                                        images)) if steps)
        phases.append(f"{runs}, with *symbolic* image tokens (each patch's token is the sum of the word embeddings"
                      " of the object it belongs to: kind, colour and, on a digit box, its digit; `<unk>` for"
                      f" background; `models/training/symbolic.py`), lr {language['symbolic_lr']};"
                      f" {_sparse(language['symbolic_start'], language['symbolic_ramp'], subject='each')};")
    if language.get("align_steps"):
        phases.append(f"{language['align_steps']} steps of {language['align_batch']} images, the projector alone:"
                      " relative MSE of the projected cached features (every view) onto their symbolic tokens,"
                      f" lr {language['align_lr']};")
    aligned = (f"; plus {language['align_weight']:g} x the projector's alignment loss"
               if language.get("align_weight") else "")
    if language.get("bind_weight"):
        aligned += (f"; plus {language['bind_weight']:g} x BindHeads' cross-entropy (from the hidden state"
                    f" {language['bind_layer']} at every crop token of a digit box: the box's frame colour and"
                    " digit, labels of the image, never of a question)")
    if language.get("crop_steps"):
        phases.append(f"{language['crop_steps']} steps of {language['crop_batch']} single-crop conversations, lr"
                      f" {language['crop_lr']}: a crop's object patches plus {language['distractors_start']} random"
                      " background patches, growing geometrically to the whole crop over the first"
                      f" {language['distractor_ramp']:.0%} of the steps"
                      + (f"; in {language['paste_boxes']:.0%} of them the image's other digit boxes moved into the"
                         " crop's empty cells (`models/training/crops.py`)" if language.get("paste_boxes") else "")
                      + f"{aligned};")
    whole = (f"{language['steps']} steps of {language.get('batch', 1)} whole image(s) (thumbnail + crops, packed"
             f" as at inference), lr {language['lr']}")
    if language.get("sparse_start") is not None:
        whole += f"; {_sparse(language['sparse_start'], language['sparse_ramp'])}"
    phases.append(whole + aligned + ".")
    return [f"   {letter}. {text}" for letter, text in zip("abcd", phases)]


def render_card(training: dict[str, Any], metrics: dict[str, Any], sweep: Sequence[dict[str, Any]],
                sweep_samples: int | None = None) -> str:
    """The model card (markdown)."""
    config = training["config"]
    vision, language = config["vision"], config["language"]
    seconds = training["seconds"]
    categories = list(metrics["chance"])
    check = training["vision_check"]
    lines = [
        "# tiny_trained: the embedded LLaVA-NeXT trained on `hires_detail`",
        "",
        "The architecture of `model=tiny` (CLIP tower h64 x 3 layers on 336 px tiles, patch 14; Llama",
        "decoder h128 x 4 layers, GQA 4q/2kv; LLaVA-NeXT's AnyRes with grids 1x2, 2x1, 2x2, 1x3, 3x1) with",
        "a tokenizer of the task" + (f" and RoPE theta {training['rope_theta']:,.0f} (`model=tiny`: 10,000)"
                                     if training.get("rope_theta", 10000.0) != 10000.0 else "")
        + ", trained from scratch on the `hires_detail` train split, so that",
        "compressors can be compared on a CPU with accuracies that mean something.",
        "Load it with `model=tiny_trained` (nothing is downloaded).",
        "",
        "## Accuracy",
        "",
        f"Test split, first {metrics['num_samples']} samples, uncompressed (`compressor=none`):"
        f" **{metrics['accuracy']:.1f}%** (chance {metrics['mean_chance']:.1f}%)."
        + (f" The target is {TARGET:.0f}%: reached." if metrics["accuracy"] >= TARGET else
           f" The target is {TARGET:.0f}%: **not reached** (see the weakest question types below)."),
        "",
        "| | " + " | ".join(categories) + " | all |",
        "|---|" + "---:|" * (len(categories) + 1),
        "| accuracy (%) | " + " | ".join(f"{metrics['per_category'][c]:.1f}" for c in categories)
        + f" | {metrics['accuracy']:.1f} |",
        "| chance (%) | " + " | ".join(f"{metrics['chance'][c]:.1f}" for c in categories)
        + f" | {metrics['mean_chance']:.1f} |",
        "",
        f"Validation split (first {config['val_samples']} samples, used only to monitor training):"
        f" {training['val']['accuracy']:.1f}% uncompressed, {training['val_thumbnail_only']['accuracy']:.1f}%"
        " with every crop token dropped (thumbnail only).",
        "",
        f"Signals: the last CLIP layer's [CLS] attention (GlobalCom2's score) puts"
        f" {100 * check['cls_attention_on_object_patches']:.1f}% of its mass on the"
        f" {100 * check['object_patch_share']:.1f}% of patches that show an object"
        f" ({config['diagnostic_images']} val images, every view).",
    ]
    if sweep:
        lines += ["", "![accuracy against ratio](score_vs_ratio.png)"] if (WEIGHTS / FIGURE).exists() else []
        lines += ["", f"Compression on the test split (first {sweep_samples or metrics['num_samples']} samples; accuracy %, "
                  "retention = layer-mean visual tokens / vanilla):", "",
                  "| compressor | ratio | retention | accuracy | " + " | ".join(categories) + " |",
                  "|---|---:|---:|---:|" + "---:|" * len(categories)]
        for row in sorted(sweep, key=lambda r: (r["compressor"] != "none", r["compressor"], -(r["ratio"] or 0))):
            ratio = "adaptive" if row["ratio"] is None else f"{row['ratio']:g}"
            lines.append(f"| {row['compressor']} | {ratio} | {row['retention_layer_mean']:.3f} | "
                         f"{row['accuracy']:.1f} | "
                         + " | ".join(f"{row.get(f'accuracy/{c}', float('nan')):.1f}" for c in categories) + " |")
    lines += [
        "",
        "## Data",
        "",
        "`benchmarks/hires_detail.py`: images of exactly a canvas size, textured backgrounds, 18-26 px",
        "shapes in 7 colours and 34-38 px framed digit boxes, centred on the crops' 14 px patch grid.",
        f"Stage 1 drew {vision['images']} train images with {3}x the objects; stage 2 used the next",
        f"{language['images']} train images with up to {language['max_turns']} questions each. The val split",
        "only monitored training; the test split was never used for training or tuning.",
        "",
        "## Training (`python -m runners.train_tiny`, seed " f"{config['seed']})",
        "",
        f"1. Vision tower, {vision['images'] // vision['images_per_step']} steps of {vision['images_per_step']}"
        f" images (all their views), AdamW lr {vision['lr']}: BCE of object presence on the pooled [CLS]",
        "   (last layer) and, per patch of the feature layer (-2), cross-entropies of kind, colour and digit",
        "   and a BCE of object centres.",
        f"2. Projector (its first layer whitened from the cached features), `image_newline` and language"
        " model on cached tower features, AdamW, with the cross-entropy of the answers of "
        + ("several questions per image, each turn exactly the inference prompt of its own question (it sees"
           " the system prompt, the image and itself, never another turn's answer)"
           if language.get("independent_turns") else
           "multi-turn LLaVA conversations (the first turn exactly the inference prompt)")
        + (f" plus {language['asked_weight']:g} x AskedHeads' cross-entropy (from the"
           f" hidden state {language['asked_layer']} at each answer position: the"
           " question's type, shape and colour words; never the answer, never the image)"
           if language.get("asked_weight") else "") + ", in phases:",
        *_stage2_phases(language),
        "",
        f"Time: {sum(seconds.values()) / 60:.1f} min of training work ("
        + ", ".join(f"{k} {v / 60:.1f}" for k, v in seconds.items()) + f") on {training['machine']['cpus']}"
        f" CPU cores, {training['machine']['torch_threads']} torch threads, load average"
        f" {training['load_start'][1]:.1f} at the start and {training['load_end'][1]:.1f} at the end."
        + (f" {training['note']}" if training.get("note") else ""),
        "",
        "## Rebuild",
        "",
        "```bash",
        "python -m runners.train_tiny export_dir=models/weights/tiny_trained   # resumable: rerun after a kill",
        "python -m runners.evaluate -m experiment=tiny_trained_sweep   # none + every method at .5/.25/.1 (README)",
        *([f"python -m runners.evaluate model=tiny_trained benchmark=hires_detail benchmark.num_samples="
           f"{metrics['num_samples']}   # the accuracy above, uncompressed"]
          if sweep_samples and sweep_samples != metrics["num_samples"] else []),
        "python -m runners.report outputs/runs/tiny_trained --out report/ && cp report/score_vs_ratio.png"
        " models/weights/tiny_trained/",
        f"python -m models.training.card outputs/runs/tiny_trained/hires_detail --sweep-samples {sweep_samples or metrics['num_samples']}",
        "```",
        "",
        "Files: `model.safetensors`, `config.json`, `generation_config.json`, the processor and tokenizer",
        "(`processor_config.json`, `tokenizer.json`, `tokenizer_config.json`), `training.json` (recipe, losses,",
        "timings), `metrics.json` (the numbers above).",
        "",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write metrics.json and the model card of tiny_trained.")
    parser.add_argument("runs", help="folder with the test-split runs of model=tiny_trained")
    parser.add_argument("--weights", default=str(WEIGHTS))
    parser.add_argument("--sweep-samples", type=int, help="test samples of the sweep runs (default: as the "
                        "uncompressed run)")
    args = parser.parse_args(argv)
    weights = Path(args.weights)
    training = json.loads((weights / TRAINING_LOG).read_text())
    metrics = test_metrics(Path(args.runs))
    sweep_samples = args.sweep_samples or metrics["num_samples"]
    sweep = sweep_table(Path(args.runs), sweep_samples)
    write_json_atomic(weights / METRICS, {**metrics, "sweep_samples": sweep_samples, "sweep": sweep})
    (weights / CARD).write_text(render_card(training, metrics, sweep, sweep_samples))
    print(f"wrote {weights / METRICS} and {weights / CARD}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
