"""Accelerator presets: peak dense throughput and memory bandwidth, for "fraction of peak" figures.

Peaks are the vendors' dense (no sparsity) datasheet figures: tensor-core FP16/BF16, and plain FP32
(PyTorch does not use TF32 for float32 matmuls unless asked). ``auto`` recognises the preset from
the CUDA device's name (an H100 PCIe card is not an SXM one); ``none``, a CPU or an unrecognised GPU
has no peak, and figures that need one are left empty.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vtclab.registry import unknown_value_error


@dataclass(frozen=True)
class DevicePreset:
    """One accelerator's datasheet figures."""

    name: str
    label: str
    peak_tflops: dict[str, float]  # dense TFLOP/s by torch dtype name
    bandwidth_gbs: float  # memory bandwidth, GB/s
    memory_gb: float

    def peak(self, dtype: torch.dtype) -> float | None:
        """Peak dense TFLOP/s for ``dtype`` (None if the preset has no figure for it)."""
        return self.peak_tflops.get(str(dtype).removeprefix("torch."))


DEVICE_PRESETS = {
    "a100": DevicePreset("a100", "NVIDIA A100-SXM4-80GB",
                         {"float16": 312.0, "bfloat16": 312.0, "float32": 19.5}, 2039.0, 80.0),
    "h100": DevicePreset("h100", "NVIDIA H100 SXM5 80GB",
                         {"float16": 989.4, "bfloat16": 989.4, "float32": 66.9}, 3350.0, 80.0),
    "h100_pcie": DevicePreset("h100_pcie", "NVIDIA H100 PCIe 80GB",
                              {"float16": 756.5, "bfloat16": 756.5, "float32": 51.2}, 2000.0, 80.0),
    "h200": DevicePreset("h200", "NVIDIA H200 SXM 141GB",
                         {"float16": 989.4, "bfloat16": 989.4, "float32": 66.9}, 4800.0, 141.0),
}
CHOICES = ("auto", "none", *DEVICE_PRESETS)
# ``auto``: the first preset whose every word appears in the CUDA device's name (upper case)
AUTO_MATCH = ((("H200",), "h200"), (("H100", "PCIE"), "h100_pcie"), (("H100",), "h100"), (("A100",), "a100"))


def check_preset_name(name: str) -> str:
    """``name`` if it is a preset, ``auto`` or ``none``; otherwise a clear error naming the allowed ones."""
    if name not in CHOICES:
        raise unknown_value_error("device_preset", str(name), list(CHOICES))
    return name


def resolve_preset(name: str, device: torch.device) -> DevicePreset | None:
    """The preset for ``device``: the named one, the one ``auto`` recognises in the CUDA device's
    name (None if none matches, or on a CPU), or None for ``none``."""
    check_preset_name(name)
    if name == "none":
        return None
    if name != "auto":
        return DEVICE_PRESETS[name]
    if device.type != "cuda":
        return None
    return auto_preset(torch.cuda.get_device_name(device))


def auto_preset(gpu_name: str) -> DevicePreset | None:
    """The preset ``auto`` picks for a CUDA device name (None if none matches)."""
    name = gpu_name.upper()
    for words, preset in AUTO_MATCH:
        if all(word in name for word in words):
            return DEVICE_PRESETS[preset]
    return None
