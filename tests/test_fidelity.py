"""Fidelity to the uncompressed model: the definition by hand, the cache computed once per sweep, and the
recorded figures equal to a direct computation."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

import runners.evaluate
import runners.fidelity
from benchmarks import build_benchmark
from compressors import build_compressor
from runners.evaluate import evaluate, sample_seed
from runners.fidelity import first_token_divergence

CONF = Path(__file__).resolve().parents[1] / "conf"


def test_divergence_is_kl_of_the_softmaxes_by_hand():
    reference = torch.tensor([2.0, 1.0, 0.0, -1.0])
    logits = torch.tensor([1.0, 2.0, 0.5, -3.0])
    p = [math.exp(v) for v in reference.tolist()]
    q = [math.exp(v) for v in logits.tolist()]
    p, q = [v / sum(p) for v in p], [v / sum(q) for v in q]
    kl, top1 = first_token_divergence(reference, logits)
    assert kl == pytest.approx(sum(a * math.log(a / b) for a, b in zip(p, q)), rel=1e-12)
    assert top1 is False  # argmax 0 vs 1
    assert first_token_divergence(reference, reference + 3.0) == (0.0, True)  # a shift leaves the softmax
    with pytest.raises(ValueError, match="another model"):
        first_token_divergence(reference, torch.zeros(5))


def test_compare_against_a_cached_reference(tmp_path):
    """The cache and the per-sample figures without a model: answers that differ, a cache hit, the none run's
    own result stored as the reference."""
    cache = runners.fidelity.FidelityReference(tmp_path / "cache", {"model": "m"})
    sample = SimpleNamespace(id="s/1")
    none, other = SimpleNamespace(name="none"), SimpleNamespace(name="random")
    reference = torch.tensor([3.0, 1.0, 0.0])
    stored = cache.compare(None, sample, SimpleNamespace(text="red", first_token_logits=reference), none, 4)
    assert stored == {"fidelity_answer_match": 1.0, "fidelity_first_token_kl": 0.0, "fidelity_first_token_top1": 1.0}
    assert cache.computed == 0 and cache.load("s/1").answer == "red"
    logits = torch.tensor([0.0, 2.0, 0.0])
    figures = cache.compare(None, sample, SimpleNamespace(text="blue", first_token_logits=logits), other, 4)
    assert figures["fidelity_answer_match"] == 0.0 and figures["fidelity_first_token_top1"] == 0.0
    assert figures["fidelity_first_token_kl"] == pytest.approx(first_token_divergence(reference, logits)[0])
    assert json.loads((tmp_path / "cache" / "key.json").read_text()) == {"model": "m"}
    cache.path("s/2").write_bytes(cache.path("s/1").read_bytes())  # a file under another sample's name
    with pytest.raises(RuntimeError, match="not 's/2'"):
        cache.load("s/2")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, tiny):
    """``evaluate`` in-process, fidelity on, on the session's tiny model: a sweep of ``fastv`` and ``none`` on
    one sample, counting the uncompressed references computed."""
    root = tmp_path_factory.mktemp("fidelity")
    computed = []
    original = runners.fidelity.compute_reference

    def counting(pipeline, sample, max_new_tokens):
        computed.append(sample.id)
        return original(pipeline, sample, max_new_tokens)

    summaries = {}
    GlobalHydra.instance().clear()
    with pytest.MonkeyPatch.context() as patch, initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        patch.setattr(runners.evaluate, "build_pipeline", lambda cfg: tiny)
        patch.setattr(runners.fidelity, "compute_reference", counting)
        for compressor in ("fastv", "none"):
            cfg = compose(config_name="config", overrides=[
                f"compressor={compressor}", "benchmark.limit=1", "benchmark.max_new_tokens=2", "eval.fidelity=true",
                f"paths.output_dir={root}", "progress=false"])
            summaries[compressor] = evaluate(cfg, root / "runs" / compressor)
    GlobalHydra.instance().clear()
    return computed, summaries, root


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]


def test_the_reference_is_computed_once_per_sweep(sweep):
    computed, summaries, root = sweep
    assert computed == ["synthetic-s0-0000"]  # by the first run of the sweep; the next one reads the cache
    cache = root / "cache" / "fidelity" / "tiny" / "synthetic"
    assert len(list(cache.glob("*/*.pt"))) == 1 and len(list(cache.glob("*/key.json"))) == 1
    none = summaries["none"]["fidelity"]  # the uncompressed run against the cached answers
    assert none["answer_agreement"] == 100.0 and none["first_token_kl"] == 0.0 and none["first_token_top1"] == 100.0
    # the run directories are those of runs without fidelity: it is not part of a run's identity
    assert "eval" not in json.loads((root / "runs" / "fastv" / "run.json").read_text())


def test_recorded_figures_equal_a_direct_computation(sweep, tiny):
    """FastV's record against KL and top-1 computed from two prefills, and the answer against the none
    run's own generation; the summaries hold the means of the records."""
    _, summaries, root = sweep
    uncompressed = {r["id"]: r["prediction"] for r in _records(root / "runs" / "none")}
    for name in ("fastv", "none"):
        records = _records(root / "runs" / name)
        for record in records:
            assert record["fidelity_answer_match"] == float(record["prediction"] == uncompressed[record["id"]])
        fidelity = summaries[name]["fidelity"]
        assert fidelity["samples"] == len(records) == 1 and fidelity["reference"] == "none"
        assert fidelity["first_token_kl"] == records[0]["fidelity_first_token_kl"]
        assert fidelity["answer_agreement"] == 100 * records[0]["fidelity_answer_match"]
        assert fidelity["first_token_top1"] == 100 * records[0]["fidelity_first_token_top1"]
    record = _records(root / "runs" / "fastv")[0]
    sample = build_benchmark({"name": "synthetic", "limit": 1})[0]
    fastv = build_compressor({"name": "fastv"})
    reference = tiny.prefill_logits(sample.image, sample.question, build_compressor({"name": "none"}))[0, -1].double()
    compressed = tiny.prefill_logits(sample.image, sample.question, fastv, sample_seed(sample.id))[0, -1].double()
    p, log_p, log_q = reference.softmax(-1), reference.log_softmax(-1), compressed.log_softmax(-1)
    assert record["fidelity_first_token_kl"] == pytest.approx(float((p * (log_p - log_q)).sum()), rel=1e-4, abs=1e-10)
    assert record["fidelity_first_token_kl"] > 0
    assert record["fidelity_first_token_top1"] == float(reference.argmax() == compressed.argmax())
