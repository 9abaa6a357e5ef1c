"""What a timing depends on, and how much the timings spread.

A mean latency says little without the machine it came from and how noisy it was: every launch
that computes samples records its environment in ``run.json`` (device, threads, date, host load),
and the summary gives each timing's spread next to its mean.
"""

from __future__ import annotations

import os
import platform
import socket
import statistics
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any


def timing_environment(device) -> dict[str, Any]:
    """Device, threads, date, host and its load average (the cheap facts a timing depends on).

    ``device``: the ``torch.device`` the model runs on.
    """
    import torch  # here: the spread below is used by tools that never load torch
    environment: dict[str, Any] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
        or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }
    try:
        environment["load_average_1m"] = round(os.getloadavg()[0], 2)
    except OSError:  # not available on this platform
        environment["load_average_1m"] = None
    return environment


def spread(values: Sequence[float]) -> dict[str, float | None]:
    """Mean, sample standard deviation, 10th/50th/90th percentiles (linear interpolation) and count."""
    values = sorted(float(v) for v in values)
    if not values:
        return {"mean": None, "std": None, "p10": None, "median": None, "p90": None, "n": 0}
    if len(values) == 1:
        deciles = values * 9
    else:
        deciles = statistics.quantiles(values, n=10, method="inclusive")  # p10 .. p90
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else None,
        "p10": deciles[0],
        "median": deciles[4],
        "p90": deciles[8],
        "n": len(values),
    }


def timing_spread(records: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> dict[str, dict]:
    """``spread`` of every timing key over the records that have it."""
    return {key: spread([r[key] for r in records if r.get(key) is not None]) for key in keys}
