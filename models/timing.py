"""Wall-clock timing that is correct on a GPU (synchronise before reading the clock, or CUDA events)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

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


class DeviceClock:
    """Marks on one device's timeline: CUDA events on a GPU (recorded without stalling the stream),
    a synchronised ``perf_counter`` otherwise. ``seconds(a, b)`` reads the time between two marks."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record(torch.cuda.current_stream(self.device))
            return event
        synchronize(self.device)
        return time.perf_counter()

    def seconds(self, start, end) -> float:
        if self.cuda:
            end.synchronize()
            return start.elapsed_time(end) / 1000.0
        return end - start

    def time(self, fn: Callable[[], object]) -> float:
        """Seconds ``fn`` takes on the device."""
        start = self.mark()
        fn()
        return self.seconds(start, self.mark())
