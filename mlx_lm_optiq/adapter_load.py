"""Adapter loaded: any adapter directory applied to an mlx-lm model, checked first.

What ``mlx_lm.load(..., adapter_path=...)``, ``generate``, ``fuse``,
``server`` and ``--resume-adapter-file`` get from the plugin: our adapters
and stock mlx-lm's at every module's own rank (from ``rank_pattern``, or
from the tensor shapes when a config lacks it), and PEFT LoRA adapters.
Every module and tensor shape is checked before the model changes, so an
adapter for another base model is refused with the model untouched.
"""

from pathlib import Path
from typing import Optional

import mlx.nn as nn

from . import adapter_read, lora_layers, shim
from .adapter_write import check_peft_architecture
from .errors import OptiqError
from .layout import CONFIG, MLX_WEIGHTS, PEFT_WEIGHTS


def load_adapter(model: nn.Module, adapter_dir) -> Optional[nn.Module]:
    """Apply the adapter in ``adapter_dir`` to ``model``; ``None`` when mlx-lm
    loads it as well by itself (a full fine-tune, missing files: its own
    error says what is missing)."""
    adapter_dir = Path(adapter_dir)
    if adapter_read.is_peft_dir(adapter_dir):
        return load_peft_adapter(model, adapter_dir)
    config_file = adapter_dir / CONFIG
    weights_file = adapter_dir / MLX_WEIGHTS
    if not config_file.is_file() or not weights_file.is_file():
        return None
    config = adapter_read.read_json(config_file)
    fine_tune_type = config.get("fine_tune_type", "lora")
    if fine_tune_type == "full":
        return None
    shapes = adapter_read.read_safetensors_header(weights_file)
    lora = config.get("lora_parameters") or {}
    inferred = adapter_read.mlx_rank_pattern(config, shapes)
    pattern = inferred or lora.get("rank_pattern")
    use_dora = fine_tune_type == "dora"
    targets = shim.conversion_targets(model, config["num_layers"], lora, use_dora)
    expected = lora_layers.expected_tensors(targets, lora, pattern, use_dora)
    scales = adapter_read.mlx_scale_pattern(lora, config_file)
    stray = sorted((set(pattern or {}) | set(scales)) - {p for p, _ in targets})
    if stray:
        raise OptiqError(
            f"rank_pattern or scale_pattern names {len(stray)} module(s) that are "
            "not adapted (e.g. "
            f"{stray[0]}); check num_layers and keys",
            config_file,
        )
    adapter_read.check_tensors_fit(weights_file, shapes, expected, pattern)
    tensors = adapter_read.load_tensors(weights_file)
    adapter_read.check_finite(tensors, weights_file)
    params = {**lora, "rank_pattern": pattern} if pattern else lora
    lora_layers.convert(model, config["num_layers"], params, use_dora)
    return lora_layers.load_weights(model, tensors)


def load_peft_adapter(model: nn.Module, adapter_dir) -> nn.Module:
    """Build and load a PEFT LoRA adapter directory into an mlx-lm model."""
    adapter_dir = Path(adapter_dir)
    check_peft_architecture(getattr(model, "model_type", None))
    modules, dropout = adapter_read.load_modules(adapter_dir)  # finite, checked
    adapter_read.check_modules_fit(
        adapter_dir / PEFT_WEIGHTS,
        modules,
        lora_layers.model_linear_dims(model),
    )
    return lora_layers.swap_in(model, lora_layers.lora_layers(model, modules, dropout))
