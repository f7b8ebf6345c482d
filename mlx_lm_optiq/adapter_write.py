"""Adapter written: the config keys, the sidecar, the PEFT layout, checks on the weights.

mlx-lm writes ``adapter_config.json`` and ``adapters.safetensors`` itself; this
module adds what makes the directory self-describing:

- ``adapter_config.json``: mlx-lm's own keys (with
  ``lora_parameters.rank_pattern``) plus the PEFT keys (``peft_type``, ``r``,
  ``lora_alpha``, ``rank_pattern``, ``alpha_pattern``, ``target_modules``, …);
- ``optiq_lora_config.json``: the sidecar (per-module rank, bits, KL and their
  source, the policy, parameter counts, metadata files and hashes, versions);
- ``adapter_model.safetensors``: the same tensors in PEFT's layout.

Every file goes through :mod:`mlx_lm_optiq.atomic`.
"""

from pathlib import Path

from . import __version__
from .adapter_read import PEFT_LEAVES
from .adapter_read import check_finite as check_tensors_finite
from .adapter_read import load_tensors, peft_key
from .atomic import atomic_write
from .errors import OptiqError
from .ranks import constant_parameters, distribution, parameter_count

SIDECAR_FORMAT = 1

# Architectures whose mlx-lm module paths are the transformers ones, so a
# PEFT adapter can name the same modules. PEFT silently skips a path that
# matches nothing, so an architecture is listed only once checked.
PEFT_SAME_PATHS = ("llama", "mistral", "qwen2", "qwen3")


def check_peft_architecture(model_type):
    if model_type not in PEFT_SAME_PATHS:
        raise OptiqError(
            f"model_type {model_type!r}: its mlx-lm module paths are not verified to "
            f"match transformers' (verified: {', '.join(PEFT_SAME_PATHS)}); "
            "no PEFT files are written for it"
        )


def peft_config(ranks, base_rank, scale, dropout=0.0, base_model=None):
    """PEFT ``LoraConfig`` keys for per-module ``ranks`` trained with mlx-lm ``scale``.

    PEFT scales each module by ``lora_alpha / r`` while mlx-lm multiplies by
    ``scale`` whatever the rank, so the alpha for module ``i`` is
    ``scale * r_i``. Patterns use exact full module paths, never regexes that
    could overlap. Modules at rank 0 are left out of ``target_modules``.
    """
    adapted = {p: r for p, r in ranks.items() if r > 0}  # rank 0: not targeted
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
        "alpha_pattern": {p: scale * r for p, r in adapted.items() if r != base_rank},
    }


def peft_config_keys(run):
    """The PEFT keys that go into a run's ``adapter_config.json``."""
    return peft_config(
        run.ranks,
        run.base_rank,
        run.lora_parameters["scale"],
        run.lora_parameters.get("dropout", 0.0),
        run.base_model,
    )


def to_peft_tensors(tensors):
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


def save_peft_tensors(path, tensors):
    """Write mlx-lm LoRA ``tensors`` to ``path`` in PEFT's layout."""
    import mlx.core as mx

    peft = {k: mx.contiguous(v) for k, v in to_peft_tensors(tensors).items()}
    mx.save_safetensors(str(path), peft, metadata={"format": "pt"})


def write_peft_weights(mlx_weights: Path, out: Path):
    """Write ``adapter_model.safetensors`` (PEFT layout) from ``adapters.safetensors``."""
    import mlx.core as mx

    tensors = mx.load(str(mlx_weights))
    atomic_write(out, lambda tmp: save_peft_tensors(tmp, tensors))


def sidecar(run):
    """The ``optiq_lora_config.json`` document for a run."""
    import mlx.core as mx
    import mlx_lm

    modules = {}
    for path, rank in run.ranks.items():
        fact = run.facts[path]
        modules[path] = {
            "rank": rank,
            "bits": fact.bits,
            "bits_source": fact.bits_source,
            "kl": fact.kl,
            "kl_source": fact.kl_source,
        }
    return {
        "format": SIDECAR_FORMAT,
        "base_model": run.base_model,
        "model_type": run.model_type,
        "rank_scaling": run.scaling,
        "rank_budget": run.budget,
        "budget_parameters": run.budget_parameters,
        "base_rank": run.base_rank,
        "scale": run.lora_parameters["scale"],
        "dropout": run.lora_parameters.get("dropout", 0.0),
        "rank_distribution": {str(k): v for k, v in distribution(run.ranks).items()},
        "trainable_parameters": parameter_count(run.ranks, run.units),
        "constant_rank_parameters": constant_parameters(run.units, run.base_rank),
        "metadata_files": [
            {"file": s.name, "sha256": s.sha256} for s in run.sources if s.path
        ],
        "modules": modules,
        "units": dict(run.units),
        "versions": {
            "mlx_lm_optiq": __version__,
            "mlx_lm": mlx_lm.__version__,
            "mlx": mx.__version__,
        },
    }


def check_finite(adapter_file: Path):
    """Refuse to call an adapter trained if any tensor in it is NaN or inf."""
    check_tensors_finite(
        load_tensors(adapter_file),
        adapter_file,
        "; training diverged — lower the learning rate or the scale",
    )
