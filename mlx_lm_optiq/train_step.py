"""The training step of a run: what the base computes on, the batches, the loss.

mlx-lm's loop, optimizers, schedules and checkpoints do the training; this
module only chooses what its ``train()`` computes with:

- the base: with ``--base-compute dequantized`` frozen float copies of the
  quantized layers stand in for them (:func:`apply_base_compute`).
"""

import os

import mlx.nn as nn

from . import lora_layers
from .settings import RunSettings


def device_kind() -> str:
    """``cuda``, ``metal`` or ``cpu``: the backend MLX computes on."""
    import mlx.core as mx

    if mx.default_device() == mx.cpu:
        return "cpu"
    return "cuda" if mx.cuda.is_available() else "metal"


def _size(n):
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def choose_base_compute(settings: RunSettings, model, report=print) -> str:
    """``quantized`` or ``dequantized``, from ``--base-compute`` (``auto``: the
    float copies when they take at most a quarter of the device's memory)."""
    import mlx.core as mx

    choice = settings.base_compute
    if choice != "auto":
        return choice
    size = lora_layers.dequantized_size(model)
    if size == 0:
        return "quantized"
    info = mx.device_info()
    memory = info.get("memory_size") or info.get("total_memory")
    if memory is None:  # the CPU backend: the machine's memory
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    choice = "dequantized" if size <= memory / 4 else "quantized"
    report(
        f"base compute (auto): {choice}: float copies of the quantized layers "
        f"would take {_size(size)} of {_size(memory)}"
    )
    return choice


def apply_base_compute(settings: RunSettings, model: nn.Module, report=print) -> None:
    """Swap frozen float copies in for the quantized layers, if asked."""
    if choose_base_compute(settings, model, report) != "dequantized":
        return
    layers, size = lora_layers.dequantized_copies(model)
    lora_layers.swap_in(model, layers)
    report(
        f"base compute: dequantized: {len(layers)} quantized layers run as "
        f"{_size(size)} of float copies; the adapter is for the quantized model"
    )
