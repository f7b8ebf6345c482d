"""Adapter written: the config keys, the sidecar, and checks on the weights.

mlx-lm writes ``adapter_config.json`` and ``adapters.safetensors`` itself; this
module adds what makes the directory self-describing:

- ``adapter_config.json``: mlx-lm's own keys (with
  ``lora_parameters.rank_pattern``) plus the PEFT keys (``peft_type``, ``r``,
  ``lora_alpha``, ``rank_pattern``, ``alpha_pattern``, ``target_modules``, …);
- ``optiq_lora_config.json``: the sidecar (per-module rank, bits, KL and their
  source, the policy, parameter counts, metadata files and hashes, versions).

Every file is written to a temporary file in the same directory and renamed
into place, so an interrupted write leaves the previous file intact.
"""

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from . import __version__
from .ranks import distribution, parameter_count

SIDECAR = "optiq_lora_config.json"
SIDECAR_FORMAT = 1


def atomic_write(path: Path, write):
    """Call ``write(tmp_path)``, then rename ``tmp_path`` over ``path``."""
    path = Path(path)
    # The real suffix last: mx.save_safetensors appends one when it is missing.
    fd, tmp = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}"
    )
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_dir(out: Path, write):
    """Call ``write(tmp_dir)``, then rename ``tmp_dir`` to ``out``.

    ``out`` must not exist or be empty; a failure leaves nothing behind.
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(
            f"{out} exists and is not empty; remove it or pick another path"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        write(tmp)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_json(path: Path, obj):
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=4)
            f.write("\n")

    atomic_write(path, write)


# Architectures whose mlx-lm module paths are the transformers ones, so a
# PEFT adapter can name the same modules. PEFT silently skips a path that
# matches nothing, so an architecture is listed only once checked.
PEFT_SAME_PATHS = ("llama", "mistral", "qwen2", "qwen3")
PEFT_PREFIX = "base_model.model."


class PeftExportError(ValueError):
    pass


def check_peft_architecture(model_type):
    if model_type not in PEFT_SAME_PATHS:
        raise PeftExportError(
            f"model_type {model_type!r}: its mlx-lm module paths are not verified to "
            f"match transformers' (verified: {', '.join(PEFT_SAME_PATHS)}); "
            "no PEFT files are written for it"
        )


def peft_config(ranks, base_rank, scale, dropout=0.0, base_model=None):
    """PEFT ``LoraConfig`` keys for per-module ``ranks`` trained with mlx-lm ``scale``.

    PEFT scales each module by ``lora_alpha / r`` while mlx-lm multiplies by
    ``scale`` whatever the rank, so the alpha for module ``i`` is
    ``scale * r_i``. Patterns use exact full module paths, never regexes that
    could overlap.
    """
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": base_rank,
        "lora_alpha": scale * base_rank,
        "lora_dropout": dropout,
        "bias": "none",
        "fan_in_fan_out": False,
        "target_modules": sorted(ranks),
        "rank_pattern": {p: r for p, r in ranks.items() if r != base_rank},
        "alpha_pattern": {p: scale * r for p, r in ranks.items() if r != base_rank},
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
    leaves = {"lora_a": "lora_A.weight", "lora_b": "lora_B.weight"}
    out = {}
    for name, w in tensors.items():
        module, leaf = name.rsplit(".", 1)
        if leaf not in leaves:
            raise PeftExportError(f"{name}: only plain LoRA exports to PEFT (not DoRA)")
        if w.ndim != 2:
            raise PeftExportError(f"{name}: switch (MoE) adapters have no PEFT layout")
        out[f"{PEFT_PREFIX}{module}.{leaves[leaf]}"] = w.T
    return out


def write_peft_weights(mlx_weights: Path, out: Path):
    """Write ``adapter_model.safetensors`` (PEFT layout) from ``adapters.safetensors``."""
    import mlx.core as mx

    tensors = {
        k: mx.contiguous(v)
        for k, v in to_peft_tensors(mx.load(str(mlx_weights))).items()
    }
    atomic_write(
        out, lambda tmp: mx.save_safetensors(tmp, tensors, metadata={"format": "pt"})
    )


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
        "base_rank": run.base_rank,
        "scale": run.lora_parameters["scale"],
        "dropout": run.lora_parameters.get("dropout", 0.0),
        "rank_distribution": {str(k): v for k, v in distribution(run.ranks).items()},
        "trainable_parameters": parameter_count(run.ranks, run.units),
        "constant_rank_parameters": run.base_rank * sum(run.units.values()),
        "metadata_files": [
            {"file": s.name, "sha256": s.sha256} for s in run.sources if s.path
        ],
        "modules": modules,
        "versions": {
            "mlx_lm_optiq": __version__,
            "mlx_lm": mlx_lm.__version__,
            "mlx": mx.__version__,
        },
    }


def check_finite(adapter_file: Path):
    """Refuse to call an adapter trained if any tensor in it is NaN or inf."""
    import mlx.core as mx

    bad = [
        name
        for name, w in mx.load(str(adapter_file)).items()
        if not mx.all(mx.isfinite(w)).item()
    ]
    if bad:
        raise ValueError(
            f"{adapter_file}: {len(bad)} tensors hold NaN or inf (e.g. {bad[0]}); "
            "training diverged — lower the learning rate or the scale"
        )
