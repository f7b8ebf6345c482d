"""Adapter read back: ranks and facts from an adapter directory.

Reads our adapters, stock mlx-lm adapter directories, mlx-optiq 0.7.7 ones
(``optiq_lora_config.json`` with ``applied_ranks`` keyed
``layer_{i}.{module}``) and PEFT ones (``adapter_model.safetensors``). Ranks
always come from the tensor shapes, which are the truth of what loads; the
configs add the policy, scale and provenance. Only the safetensors header is
read, so this module needs neither mlx nor numpy.
"""

import json
import math
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional

from .adapter_write import SIDECAR

MLX_WEIGHTS = "adapters.safetensors"
PEFT_WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


class AdapterFileError(ValueError):
    """An adapter file is missing, truncated or not what it claims to be."""


def read_safetensors_header(path: Path) -> Dict[str, tuple]:
    """``{tensor name: shape}`` from a safetensors file, without loading it."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise AdapterFileError(f"{path}: too short to be a safetensors file")
            (length,) = struct.unpack("<Q", head)
            size = path.stat().st_size
            if length > size - 8:
                raise AdapterFileError(
                    f"{path}: truncated or not a safetensors file "
                    f"(header claims {length} bytes, file has {size})"
                )
            header = json.loads(f.read(length))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise AdapterFileError(f"{path}: not a safetensors file (bad header)") from None
    except FileNotFoundError:
        raise AdapterFileError(f"{path}: no such file") from None
    shapes = {}
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        shapes[name] = tuple(info["shape"])
        end = max(end, info["data_offsets"][1])
    if 8 + length + end > size:
        raise AdapterFileError(f"{path}: truncated (tensor data ends past the file)")
    return shapes


def mlx_ranks(shapes) -> Dict[str, int]:
    """``{module path: rank}`` from mlx-lm's ``<module>.lora_a`` tensors.

    ``lora_a`` is ``(in, r)`` for linear and embedding layers and
    ``(experts, r, in)`` for switch (MoE) layers.
    """
    ranks = {}
    for name, shape in shapes.items():
        if name.endswith(".lora_a"):
            ranks[name[: -len(".lora_a")]] = shape[1] if len(shape) == 3 else shape[-1]
    return ranks


def mlx_units(shapes) -> Dict[str, int]:
    """``{module path: adapter parameters per unit of rank}``."""
    ranks = mlx_ranks(shapes)
    units = {}
    for path, rank in ranks.items():
        a = _numel(shapes[f"{path}.lora_a"])
        b = _numel(shapes.get(f"{path}.lora_b", ()))
        units[path] = (a + b) // rank
    return units


def _numel(shape):
    n = 1
    for d in shape:
        n *= d
    return n if shape else 0


def peft_ranks(shapes) -> Dict[str, int]:
    """``{module path: rank}`` from PEFT's ``…<module>.lora_A.weight`` ``(r, in)``."""
    prefix = "base_model.model."
    ranks = {}
    for name, shape in shapes.items():
        if name.endswith(".lora_A.weight"):
            path = name[: -len(".lora_A.weight")]
            ranks[path[len(prefix) :] if path.startswith(prefix) else path] = shape[0]
    return ranks


def peft_units(shapes) -> Dict[str, int]:
    prefix = "base_model.model."
    units = {}
    for path, rank in peft_ranks(shapes).items():
        key = prefix + path if f"{prefix}{path}.lora_A.weight" in shapes else path
        a = _numel(shapes[f"{key}.lora_A.weight"])
        b = _numel(shapes.get(f"{key}.lora_B.weight", ()))
        units[path] = (a + b) // rank
    return units


def read_json(path: Path) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise AdapterFileError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise AdapterFileError(f"{path}: expected a JSON object")
    return data


@dataclass
class AdapterSummary:
    path: Path
    kind: str  # "mlx-lm-optiq", "mlx-optiq", "mlx-lm" or "peft"
    base_model: Optional[str]
    base_rank: int
    scaling: Optional[str]
    scale: Optional[float]
    dropout: Optional[float]
    ranks: Dict[str, int]
    units: Dict[str, int]
    modules: Dict[str, dict] = field(default_factory=dict)  # sidecar facts

    @property
    def trainable_parameters(self):
        return sum(self.ranks[p] * self.units[p] for p in self.ranks)

    @property
    def constant_rank_parameters(self):
        return self.base_rank * sum(self.units.values())


def read_adapter(path) -> AdapterSummary:
    """Describe the adapter directory ``path`` (ours, stock mlx-lm, mlx-optiq or PEFT)."""
    path = Path(path)
    if not path.is_dir():
        raise AdapterFileError(f"{path}: not an adapter directory")
    config = read_json(path / CONFIG) if (path / CONFIG).is_file() else {}
    sidecar = read_json(path / SIDECAR) if (path / SIDECAR).is_file() else {}
    if (path / MLX_WEIGHTS).is_file():
        shapes = read_safetensors_header(path / MLX_WEIGHTS)
        ranks, units = mlx_ranks(shapes), mlx_units(shapes)
    elif (path / PEFT_WEIGHTS).is_file():
        shapes = read_safetensors_header(path / PEFT_WEIGHTS)
        ranks, units = peft_ranks(shapes), peft_units(shapes)
    else:
        raise AdapterFileError(f"{path}: no {MLX_WEIGHTS} or {PEFT_WEIGHTS}")
    if not ranks:
        raise AdapterFileError(f"{path}: the weights hold no LoRA tensors")

    lora = config.get("lora_parameters") or {}
    if sidecar.get("format"):
        kind, scaling = "mlx-lm-optiq", sidecar.get("rank_scaling")
    elif "applied_ranks" in sidecar:
        kind, scaling = "mlx-optiq", sidecar.get("rank_scaling")
    elif lora:
        kind, scaling = "mlx-lm", None
    else:
        kind, scaling = "peft", None
    base_rank = sidecar.get("base_rank") or lora.get("rank") or config.get("r")
    if not base_rank:
        base_rank = max(set(ranks.values()), key=list(ranks.values()).count)
    scale = sidecar.get("scale") or lora.get("scale")
    if scale is None and config.get("lora_alpha") and config.get("r"):
        scale = config["lora_alpha"] / config["r"]
    dropout = lora.get("dropout", config.get("lora_dropout"))
    return AdapterSummary(
        path=path,
        kind=kind,
        base_model=sidecar.get("base_model")
        or sidecar.get("source_model")
        or config.get("base_model_name_or_path")
        or config.get("model"),
        base_rank=int(base_rank),
        scaling=scaling,
        scale=scale,
        dropout=dropout,
        ranks=ranks,
        units=units,
        modules=sidecar.get("modules") or {},
    )


def is_peft_dir(adapter_dir) -> bool:
    """A PEFT adapter directory (and not one of ours, which holds both layouts)."""
    adapter_dir = Path(adapter_dir)
    return (adapter_dir / PEFT_WEIGHTS).is_file() and not (
        adapter_dir / MLX_WEIGHTS
    ).is_file()


def peft_pattern_key(patterns, path):
    """The first key of a PEFT ``rank_pattern``/``alpha_pattern`` that names ``path``.

    PEFT treats each key as a regex matched against the end of the module
    path on a dot boundary, first key first.
    """
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", path):
            return key
    return None


# adapter_config.json keys of PEFT LoRA variants that mlx-lm's LoRALinear can't compute.
UNSUPPORTED_PEFT = {
    "use_dora": "DoRA (use_dora)",
    "lora_bias": "lora_bias",
    "fan_in_fan_out": "fan_in_fan_out",
    "modules_to_save": "modules_to_save",
    "trainable_token_indices": "trainable_token_indices",
    "layer_replication": "layer_replication",
}


def peft_import_plan(adapter_dir):
    """How to rebuild a PEFT LoRA adapter in mlx-lm.

    Returns:
        ``({module path: (rank, scale)}, dropout)`` where ``scale`` is what
        PEFT multiplies that module by: ``alpha / r``, or ``alpha / sqrt(r)``
        with ``use_rslora``.
    """
    adapter_dir = Path(adapter_dir)
    config_file, weights = adapter_dir / CONFIG, adapter_dir / PEFT_WEIGHTS
    config = read_json(config_file)
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterFileError(
            f"{config_file}: peft_type {config['peft_type']} is not supported, only LORA"
        )
    for key, feature in UNSUPPORTED_PEFT.items():
        if config.get(key):
            raise AdapterFileError(
                f"{config_file}: {feature} is not supported by mlx-lm LoRA layers"
            )
    if config.get("bias", "none") != "none":
        raise AdapterFileError(
            f"{config_file}: bias={config['bias']!r} is not supported, only 'none'"
        )
    shapes = read_safetensors_header(weights)
    for name, shape in shapes.items():
        if "lora_embedding_" in name:
            raise AdapterFileError(
                f"{weights}: embedding adapters ({name}) are not supported"
            )
        if "lora_magnitude_vector" in name:
            raise AdapterFileError(
                f"{weights}: DoRA tensors ({name}) are not supported"
            )
        if name.endswith((".lora_A.weight", ".lora_B.weight")) and len(shape) != 2:
            raise AdapterFileError(
                f"{weights}: {name} is not a 2-D linear adapter (MoE?)"
            )
    ranks = peft_ranks(shapes)
    if not ranks:
        raise AdapterFileError(f"{weights}: no LoRA tensors (…lora_A.weight)")
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    base_r, base_alpha = config.get("r", 8), config.get("lora_alpha", 8)
    plan = {}
    for path, rank in ranks.items():
        key = peft_pattern_key(rank_pattern, path)
        expected = rank_pattern[key] if key else base_r
        if expected != rank:
            raise AdapterFileError(
                f"{weights}: {path} has rank {rank} but {config_file.name} says {expected}"
            )
        key = peft_pattern_key(alpha_pattern, path)
        alpha = alpha_pattern[key] if key else base_alpha
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        plan[path] = (rank, scale)
    return plan, config.get("lora_dropout", 0.0)


def rank_pattern_for_mlx(adapter_dir: Path) -> Optional[Dict[str, int]]:
    """The per-module ranks mlx-lm must build to load ``adapter_dir``.

    ``None`` when stock loading already gets it right: the config carries
    ``lora_parameters.rank_pattern``, or every tensor has the config's rank.
    """
    config_file = Path(adapter_dir) / CONFIG
    weights = Path(adapter_dir) / MLX_WEIGHTS
    if not config_file.is_file() or not weights.is_file():
        return None  # mlx-lm's own error says what is missing
    lora = read_json(config_file).get("lora_parameters") or {}
    if lora.get("rank_pattern"):
        return None
    ranks = mlx_ranks(read_safetensors_header(weights))
    if all(r == lora.get("rank") for r in ranks.values()):
        return None
    return ranks
