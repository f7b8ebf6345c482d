"""Adapter written: the PEFT keys and layout, checks on the weights.

mlx-lm writes ``adapter_config.json`` and ``adapters.safetensors`` itself, and
the sidecar is :mod:`mlx_lm_optiq.adapter_record`'s; this module adds what
makes the directory load in PEFT too:

- ``adapter_config.json``: mlx-lm's own keys (with
  ``lora_parameters.rank_pattern``) plus the PEFT keys (``peft_type``, ``r``,
  ``lora_alpha``, ``rank_pattern``, ``alpha_pattern``, ``target_modules``, …);
- ``adapter_model.safetensors``: the same tensors in PEFT's layout.

Its callers write through :mod:`mlx_lm_optiq.atomic`.
"""

from typing import Dict, Optional

from .errors import OptiqError
from .layout import PEFT_LEAVES, peft_key

# Architectures whose mlx-lm module paths are the transformers ones, so a
# PEFT adapter can name the same modules. PEFT silently skips a path that
# matches nothing, so an architecture is listed only once checked.
PEFT_SAME_PATHS = ("llama", "mistral", "qwen2", "qwen3")


def check_peft_architecture(model_type: Optional[str]) -> None:
    if model_type not in PEFT_SAME_PATHS:
        raise OptiqError(
            f"model_type {model_type!r}: its mlx-lm module paths are not verified to "
            f"match transformers' (verified: {', '.join(PEFT_SAME_PATHS)}); "
            "no PEFT files are written for it"
        )


def peft_config(
    ranks: Dict[str, int],
    base_rank: int,
    scale: float,
    dropout: float = 0.0,
    base_model: Optional[str] = None,
    scales: Optional[Dict[str, float]] = None,
) -> dict:
    """PEFT ``LoraConfig`` keys for per-module ``ranks`` trained with mlx-lm ``scale``.

    PEFT scales each module by ``lora_alpha / r`` while mlx-lm multiplies by
    ``scale`` whatever the rank, so the alpha for module ``i`` is
    ``scale_i * r_i`` (``scales``: a module's own scale, else ``scale``).
    Patterns use exact full module paths, never regexes that could overlap.
    Modules at rank 0 are left out of ``target_modules``.
    """
    adapted = {p: r for p, r in ranks.items() if r > 0}  # rank 0: not targeted
    scales = {p: (scales or {}).get(p) or scale for p in adapted}
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": base_rank,
        "lora_alpha": scale * base_rank,
        "lora_dropout": dropout,
        "bias": "none",
        "fan_in_fan_out": False,
        "target_modules": sorted(adapted),
        "rank_pattern": {p: r for p, r in adapted.items() if r != base_rank},
        "alpha_pattern": {
            p: scales[p] * r
            for p, r in adapted.items()
            if r != base_rank or scales[p] != scale
        },
    }


def peft_config_keys(record) -> dict:
    """The PEFT keys that go into the ``adapter_config.json`` of a run's
    :class:`~mlx_lm_optiq.adapter_record.AdapterRecord`."""
    return peft_config(
        record.ranks,
        record.base_rank,
        record.scale,
        record.dropout or 0.0,
        record.base_model,
        record.scales,
    )


def to_peft_tensors(tensors: dict) -> dict:
    """mlx-lm LoRA tensors -> PEFT's: ``lora_a (in, r)`` -> ``lora_A.weight (r, in)``."""
    out = {}
    for name, w in tensors.items():
        module, leaf = name.rsplit(".", 1)
        if leaf not in PEFT_LEAVES:
            raise OptiqError(f"{name}: only plain LoRA exports to PEFT (not DoRA)")
        if w.ndim != 2:
            raise OptiqError(f"{name}: switch (MoE) adapters have no PEFT layout")
        out[peft_key(module, leaf)] = w.T
    return out


def save_peft_tensors(path, tensors: dict) -> None:
    """Write mlx-lm LoRA ``tensors`` to ``path`` in PEFT's layout."""
    import mlx.core as mx

    peft = {k: mx.contiguous(v) for k, v in to_peft_tensors(tensors).items()}
    mx.save_safetensors(str(path), peft, metadata={"format": "pt"})
