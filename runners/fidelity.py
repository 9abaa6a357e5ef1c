"""Fidelity to the uncompressed model: does a compressed run still answer as vanilla LLaVA-NeXT does?

Accuracy says nothing on the embedded random-weight model (every method scores 0) and little on a
small benchmark; agreement with the same model run without compression says something on both.
With ``eval.fidelity=true`` every sample record gets three figures against ``compressor=none``:

* ``fidelity_answer_match``: 1.0 when the answer text equals the uncompressed answer exactly;
* ``fidelity_first_token_kl``: KL(P_none || P_method), in nats, of the first answer token's
  distribution (softmax of the raw logits at the prompt's last position, before any processing);
* ``fidelity_first_token_top1``: 1.0 when both distributions rank the same token first.

The uncompressed side (answer and first-token logits) is computed once per
model x benchmark x sample and cached on disk (``eval.fidelity_cache``), in a folder keyed by a hash
of the model and benchmark settings, one file per sample: a sweep of 20 runs computes it once, and
the ``none`` run stores its own result instead of computing it again. ``summary["fidelity"]``
holds the run's means (agreement and top-1 in %) and how many samples have the figures.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

FIDELITY_KEYS = ("fidelity_answer_match", "fidelity_first_token_kl", "fidelity_first_token_top1")
REFERENCE_COMPRESSOR = "none"
KEY_FILE = "key.json"


class Reference(NamedTuple):
    """The uncompressed model's answer to one sample and the raw logits its first token was chosen from."""

    answer: str
    logits: torch.Tensor  # [vocab] float32, as the model produced them


def first_token_divergence(reference_logits: torch.Tensor, logits: torch.Tensor) -> tuple[float, bool]:
    """KL(P_ref || P) in nats and whether both rank the same token first (softmax in float64, so a
    run against its own logits gives exactly 0).

    Args:
        reference_logits: ``[vocab]`` the uncompressed model's raw first-token logits.
        logits: ``[vocab]`` the compressed run's raw first-token logits.
    """
    if reference_logits.shape != logits.shape:
        raise ValueError(f"first-token distributions differ in size: reference {tuple(reference_logits.shape)}, "
                         f"run {tuple(logits.shape)}; the fidelity cache belongs to another model")
    reference = F.log_softmax(reference_logits.double(), dim=-1)
    run = F.log_softmax(logits.double(), dim=-1)
    kl = F.kl_div(run, reference, reduction="sum", log_target=True)  # sum p_ref (log p_ref - log p)
    return float(kl), bool(reference.argmax() == run.argmax())


def compute_reference(pipeline, sample, max_new_tokens: int):
    """The uncompressed model's generation for one sample, first-token logits included."""
    from compressors import build_compressor

    return pipeline.generate(sample.image, sample.question, build_compressor({"name": REFERENCE_COMPRESSOR}),
                             max_new_tokens=max_new_tokens, first_token_logits=True)


def cache_key(model: Mapping[str, Any], benchmark: Mapping[str, Any]) -> str:
    """16 hex digits naming the settings that decide the uncompressed answers (``limit`` aside)."""
    settings = {"model": dict(model), "benchmark": {k: v for k, v in benchmark.items() if k != "limit"}}
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


class FidelityReference:
    """The on-disk cache of uncompressed references for one model x benchmark, and the comparison.

    Args:
        directory: the cache folder of this model x benchmark (created if missing).
        settings: what the key was computed from, written once to ``key.json`` for people.
    Attributes:
        computed: how many references this object computed (the rest came from the cache).
    """

    def __init__(self, directory: str | Path, settings: Mapping[str, Any] | None = None) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        key_file = self.directory / KEY_FILE
        if settings is not None and not key_file.exists():
            _atomic_write(key_file, lambda path: path.write_text(json.dumps(settings, indent=2, default=str)))
        self.computed = 0

    @classmethod
    def from_config(cls, cfg) -> "FidelityReference":
        """The cache of ``cfg``'s model x benchmark under ``cfg.eval.fidelity_cache``."""
        from omegaconf import OmegaConf

        model = OmegaConf.to_container(cfg.model, resolve=True, enum_to_str=True)
        benchmark = OmegaConf.to_container(cfg.benchmark, resolve=True, enum_to_str=True)
        benchmark.pop("limit", None)
        directory = Path(cfg.eval.fidelity_cache) / str(model["name"]) / str(benchmark["name"])
        return cls(directory / cache_key(model, benchmark), {"model": model, "benchmark": benchmark})

    def path(self, sample_id: str) -> Path:
        return self.directory / f"{hashlib.sha256(sample_id.encode()).hexdigest()[:24]}.pt"

    def load(self, sample_id: str) -> Reference | None:
        path = self.path(sample_id)
        if not path.exists():
            return None
        stored = torch.load(path, map_location="cpu", weights_only=True)
        if stored["id"] != sample_id:
            raise RuntimeError(f"{path} holds the reference of sample {stored['id']!r}, not {sample_id!r}")
        return Reference(stored["answer"], stored["logits"])

    def store(self, sample_id: str, answer: str, logits: torch.Tensor) -> Reference:
        """Cache one reference (atomically: concurrent jobs may race, the file is always whole)."""
        reference = Reference(answer, logits.float().cpu())
        payload = {"id": sample_id, "answer": answer, "logits": reference.logits}
        _atomic_write(self.path(sample_id), lambda path: torch.save(payload, path))
        return reference

    def reference(self, pipeline, sample, max_new_tokens: int) -> Reference:
        """The cached reference of ``sample``, computed (and cached) if missing."""
        cached = self.load(sample.id)
        if cached is not None:
            return cached
        result = compute_reference(pipeline, sample, max_new_tokens)
        self.computed += 1
        return self.store(sample.id, result.text, result.first_token_logits)

    def compare(self, pipeline, sample, result, compressor, max_new_tokens: int) -> dict[str, float]:
        """The fidelity record keys of one finished sample (``result`` from ``generate(first_token_logits=True)``)."""
        if result.first_token_logits is None:
            raise ValueError("fidelity needs generate(..., first_token_logits=True)")
        if compressor.name == REFERENCE_COMPRESSOR and self.load(sample.id) is None:
            self.store(sample.id, result.text, result.first_token_logits)  # its own result is the reference
        reference = self.reference(pipeline, sample, max_new_tokens)
        kl, top1 = first_token_divergence(reference.logits, result.first_token_logits)
        return {
            "fidelity_answer_match": float(result.text == reference.answer),
            "fidelity_first_token_kl": kl,
            "fidelity_first_token_top1": float(top1),
        }


def summarise_fidelity(records: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """Means over the records that have fidelity figures (None when none has): agreement and top-1 in %,
    KL in nats, plus ``samples`` (how many records had them: fewer than the run's samples when part
    of it ran without ``eval.fidelity``)."""
    scored = [r for r in records if all(k in r for k in FIDELITY_KEYS)]
    if not scored:
        return None

    def mean(key: str) -> float:
        return statistics.fmean(float(r[key]) for r in scored)

    return {
        "answer_agreement": 100.0 * mean("fidelity_answer_match"),
        "first_token_kl": mean("fidelity_first_token_kl"),
        "first_token_top1": 100.0 * mean("fidelity_first_token_top1"),
        "samples": len(scored),
        "reference": REFERENCE_COMPRESSOR,
    }


def _atomic_write(path: Path, write) -> None:
    """``write(tmp)`` to a unique temporary file beside ``path``, then rename it over ``path``."""
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
