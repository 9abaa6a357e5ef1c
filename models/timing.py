"""Wall-clock timing that is correct on a GPU (synchronise before reading the clock)."""

from __future__ import annotations

import contextlib
import time

import torch


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels on ``device`` (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def stopwatch(timings: dict[str, float] | None, key: str, device: torch.device):
    """Add the block's synchronised wall time to ``timings[key]``; a no-op when ``timings`` is None.

    Synchronising stalls the GPU pipeline, so hot paths pass ``None`` unless a benchmark asks.
    """
    if timings is None:
        yield
        return
    synchronize(device)
    start = time.perf_counter()
    yield
    synchronize(device)
    timings[key] = timings.get(key, 0.0) + time.perf_counter() - start
