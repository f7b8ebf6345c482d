"""What an adapter directory says about itself: one record, written and read here.

:class:`AdapterRecord` is that record: per module its rank, the adapter
parameters one unit of rank costs there and what the metadata said (bits,
KL and where each came from); the policy, base rank, scale and dropout; the
budget and what it allowed; the metadata files and their hashes; versions.

- :func:`to_sidecar` writes it as the ``optiq_lora_config.json`` document,
  :func:`from_sidecar` reads that document back, checked field by field;
- :func:`from_adapter_dir` builds it for any adapter directory: ours, stock
  mlx-lm's, mlx-optiq 0.7.7's (``applied_ranks``) or PEFT's. Ranks always
  come from the tensor shapes, the truth of what loads; the configs add the
  policy, scale, provenance and the modules a run left out (rank 0). It
  reads safetensors headers only, so it needs no mlx.
"""

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from . import __version__
from .adapter_read import (
    mlx_ranks,
    mlx_units,
    peft_ranks,
    peft_units,
    read_json,
    read_safetensors_header,
)
from .atomic import atomic_write_json
from .checks import is_finite, is_whole
from .errors import OptiqError
from .layout import CONFIG, MLX_WEIGHTS, PEFT_WEIGHTS, SIDECAR
from .metadata import ModuleFacts
from .ranks import constant_parameters, distribution, parameter_count

SIDECAR_FORMAT = 1

# what wrote an adapter directory
OURS, MLX_OPTIQ, MLX_LM, PEFT = "mlx-lm-optiq", "mlx-optiq", "mlx-lm", "peft"


@dataclass
class ModuleRecord:
    """One adapted module: its rank (0: left out), the adapter parameters one
    unit of rank costs on it (``in + out``), and its metadata facts."""

    rank: int
    units: int
    facts: ModuleFacts = field(default_factory=lambda: ModuleFacts(None, None))
    scale: Optional[float] = None  # its own LoRA scale; None: the adapter's


@dataclass
class AdapterRecord:
    """What an adapter directory says about itself (see the module's docstring)."""

    modules: Dict[str, ModuleRecord]
    base_rank: int
    scale: Optional[float] = None
    dropout: Optional[float] = None
    kind: str = OURS
    scaling: Optional[str] = None  # the rank policy
    budget: Optional[str] = None  # as given: free, match, default, 250k, ...
    budget_parameters: Optional[int] = None  # what the budget allowed
    base_model: Optional[str] = None
    model_type: Optional[str] = None
    metadata_files: Dict[str, Optional[str]] = field(default_factory=dict)  # sha256
    settings: Dict[str, object] = field(default_factory=dict)  # the training step
    versions: Dict[str, str] = field(default_factory=dict)
    path: Optional[Path] = None

    @property
    def ranks(self) -> Dict[str, int]:
        return {p: m.rank for p, m in self.modules.items()}

    @property
    def scales(self) -> Dict[str, Optional[float]]:
        """Each module's LoRA scale (its own, else the adapter's)."""
        return {
            p: self.scale if m.scale is None else m.scale
            for p, m in self.modules.items()
        }

    @property
    def units(self) -> Dict[str, int]:
        return {p: m.units for p, m in self.modules.items()}

    @property
    def facts(self) -> Dict[str, ModuleFacts]:
        return {p: m.facts for p, m in self.modules.items()}

    @property
    def trainable_parameters(self) -> int:
        return parameter_count(self.ranks, self.units)

    @property
    def constant_rank_parameters(self) -> int:
        """What constant ``base_rank`` would train on the same modules."""
        return constant_parameters(self.units, self.base_rank)

    @property
    def left_out(self) -> List[str]:
        return sorted(p for p, m in self.modules.items() if not m.rank)


def current_versions() -> Dict[str, str]:
    """The versions a record written now carries."""
    import mlx.core as mx
    import mlx_lm

    return {"mlx_lm_optiq": __version__, "mlx_lm": mlx_lm.__version__, "mlx": mx.__version__}  # fmt: skip


def to_sidecar(record: AdapterRecord) -> dict:
    """The ``optiq_lora_config.json`` document of ``record``."""
    return {
        "format": SIDECAR_FORMAT,
        "base_model": record.base_model,
        "model_type": record.model_type,
        "rank_scaling": record.scaling,
        "rank_budget": record.budget,
        "budget_parameters": record.budget_parameters,
        "base_rank": record.base_rank,
        "scale": record.scale,
        "dropout": record.dropout,
        "rank_distribution": {str(k): v for k, v in distribution(record.ranks).items()},
        "trainable_parameters": record.trainable_parameters,
        "constant_rank_parameters": record.constant_rank_parameters,
        "metadata_files": [
            {"file": name, "sha256": sha} for name, sha in record.metadata_files.items()
        ],
        "modules": {
            path: {
                "rank": m.rank,
                "bits": m.facts.bits,
                "bits_source": m.facts.bits_source,
                "kl": m.facts.kl,
                "kl_source": m.facts.kl_source,
                "grad": m.facts.grad,
                "grad_source": m.facts.grad_source,
                **({"scale": m.scale} if m.scale is not None else {}),
            }
            for path, m in record.modules.items()
        },
        "units": record.units,
        "settings": dict(record.settings),
        "versions": dict(record.versions),
    }


def write_sidecar(record: AdapterRecord, adapter_dir: Path) -> None:
    """Write ``record`` as ``adapter_dir/optiq_lora_config.json`` (atomically)."""
    atomic_write_json(Path(adapter_dir) / SIDECAR, to_sidecar(record))


def _optional(check):
    return lambda v: v is None or check(v)


def _text(v):
    return isinstance(v, str)


_SIDECAR_FIELDS = {  # key: (what it must be, the check)
    "base_rank": ("a positive whole number", lambda v: is_whole(v) and v > 0),
    "scale": ("a finite number", _optional(is_finite)),
    "dropout": ("a finite number", _optional(is_finite)),
    "rank_scaling": ("a policy name", _optional(_text)),
    "rank_budget": ("a budget as given", _optional(_text)),
    "budget_parameters": ("a whole number", _optional(is_whole)),
    "base_model": ("a model path or name", _optional(_text)),
    "model_type": ("a model type", _optional(_text)),
    "modules": ("an object", lambda v: isinstance(v, dict)),
    "units": ("an object", lambda v: isinstance(v, dict)),
    "metadata_files": ("a list", lambda v: isinstance(v, list)),
    "settings": ("an object", lambda v: isinstance(v, dict)),
    "versions": ("an object", lambda v: isinstance(v, dict)),
}
_MODULE_FIELDS = {
    "rank": ("a whole number >= 0", lambda v: is_whole(v) and v >= 0),
    "bits": ("a whole number", _optional(is_whole)),
    "bits_source": ("a source name", _optional(_text)),
    "kl": ("a finite number", _optional(is_finite)),
    "kl_source": ("a source name", _optional(_text)),
    "grad": ("a finite number", _optional(is_finite)),
    "grad_source": ("a source name", _optional(_text)),
    "scale": ("a finite number", _optional(is_finite)),
}


def from_sidecar(doc: dict, source: Optional[Path] = None) -> AdapterRecord:
    """The record in an ``optiq_lora_config.json`` document, every field checked.

    Raises one :class:`OptiqError` naming ``source`` and every problem found.
    """
    problems = []
    if doc.get("format") != SIDECAR_FORMAT:
        problems.append(f"format {doc.get('format')!r} is not {SIDECAR_FORMAT}")
    for key, (what, ok) in _SIDECAR_FIELDS.items():
        missing = key in ("base_rank", "modules") and key not in doc
        if missing or key in doc and not ok(doc[key]):
            problems.append(f"{key!r} must be {what}, got {doc.get(key)!r}")
    if problems:
        raise OptiqError("; ".join(problems), source)
    units = doc.get("units") or {}
    modules = {}
    for path, entry in doc["modules"].items():
        if not isinstance(entry, dict):
            problems.append(f"modules[{path!r}] must be an object")
            continue
        for key, (what, ok) in _MODULE_FIELDS.items():
            if not ok(entry.get(key)):
                problems.append(f"modules[{path!r}].{key} must be {what}")
        unit = units.get(path, 0)
        if not is_whole(unit) or unit < 0:
            problems.append(f"units[{path!r}] must be a whole number >= 0")
        if not problems:
            facts = ModuleFacts(
                entry.get("bits"),
                entry.get("bits_source"),
                entry.get("kl"),
                entry.get("kl_source"),
                entry.get("grad"),
                entry.get("grad_source"),
            )
            modules[path] = ModuleRecord(entry["rank"], unit, facts, entry.get("scale"))
    files = {}
    for i, entry in enumerate(doc.get("metadata_files") or []):
        if not isinstance(entry, dict) or not _text(entry.get("file")):
            problems.append(f"metadata_files[{i}] must name a file")
        else:
            files[entry["file"]] = entry.get("sha256")
    if problems:
        more = f"; … ({len(problems)} problems in all)" if len(problems) > 5 else ""
        raise OptiqError("; ".join(problems[:5]) + more, source)
    return AdapterRecord(
        modules=modules,
        base_rank=doc["base_rank"],
        scale=doc.get("scale"),
        dropout=doc.get("dropout"),
        scaling=doc.get("rank_scaling"),
        budget=doc.get("rank_budget"),
        budget_parameters=doc.get("budget_parameters"),
        base_model=doc.get("base_model"),
        model_type=doc.get("model_type"),
        metadata_files=files,
        settings=doc.get("settings") or {},
        versions=doc.get("versions") or {},
    )


def _weights(path):
    """``(ranks, units)`` from the tensor shapes of an adapter directory."""
    if (path / MLX_WEIGHTS).is_file():
        shapes = read_safetensors_header(path / MLX_WEIGHTS)
        ranks, units = mlx_ranks(shapes), mlx_units(shapes)
    elif (path / PEFT_WEIGHTS).is_file():
        shapes = read_safetensors_header(path / PEFT_WEIGHTS)
        ranks, units = peft_ranks(shapes), peft_units(shapes)
    else:
        raise OptiqError(f"no {MLX_WEIGHTS} or {PEFT_WEIGHTS}", path)
    if not ranks:
        raise OptiqError("the weights hold no LoRA tensors", path)
    return ranks, units


def _config_value(config, key, ok, what, source):
    value = config.get(key)
    if value is not None and not ok(value):
        raise OptiqError(f"{key!r} must be {what}, got {value!r}", source)
    return value


def from_adapter_dir(path) -> AdapterRecord:
    """The record of the adapter directory ``path``, whoever wrote it."""
    path = Path(path)
    if not path.is_dir():
        raise OptiqError("not an adapter directory", path)
    config_file, sidecar_file = path / CONFIG, path / SIDECAR
    config = read_json(config_file) if config_file.is_file() else {}
    doc = read_json(sidecar_file) if sidecar_file.is_file() else {}
    ranks, units = _weights(path)
    lora = _config_value(config, "lora_parameters", lambda v: isinstance(v, dict), "an object", config_file) or {}  # fmt: skip
    pattern = _config_value(lora, "rank_pattern", lambda v: isinstance(v, dict), "an object", config_file) or {}  # fmt: skip
    scales = _config_value(lora, "scale_pattern", lambda v: isinstance(v, dict) and all(map(is_finite, v.values())), "an object of numbers", config_file) or {}  # fmt: skip

    if "format" in doc:
        record = from_sidecar(doc, sidecar_file)
    else:
        record = _foreign_record(config, doc, lora, ranks, config_file)
    # the tensors decide; modules a run left out (rank 0) have none
    known = record.modules
    left_out = {p for p, r in pattern.items() if r == 0}
    left_out |= {p for p, m in known.items() if not m.rank}
    modules = {}
    for p in list(ranks) + sorted(left_out - set(ranks)):
        facts = known[p].facts if p in known else ModuleFacts(None, None)
        unit = units[p] if p in ranks else (known[p].units if p in known else 0)
        scale = known[p].scale if p in known and known[p].scale is not None else scales.get(p)  # fmt: skip
        modules[p] = ModuleRecord(ranks.get(p, 0), unit, facts, scale)
    record.modules = modules
    record.path = path
    return record


def _foreign_record(config, doc, lora, ranks, source):
    """The record of an adapter this plugin did not write."""
    if "applied_ranks" in doc:
        kind = MLX_OPTIQ
    else:
        kind = MLX_LM if lora else PEFT
    whole, number = (is_whole, "a whole number"), (is_finite, "a finite number")
    base_rank = _config_value(lora, "rank", *whole, source)
    peft_r = _config_value(config, "r", *whole, source)
    if not (base_rank or peft_r):
        base_rank = Counter(r for r in ranks.values() if r).most_common(1)[0][0]
    scale = _config_value(lora, "scale", *number, source)
    alpha = _config_value(config, "lora_alpha", *number, source)
    if scale is None and alpha and peft_r:
        scale = alpha / peft_r
    dropout = _config_value(lora, "dropout", *number, source)
    if dropout is None:
        dropout = _config_value(config, "lora_dropout", *number, source)
    base = doc.get("source_model") or config.get("base_model_name_or_path")
    base = base or config.get("model")
    return AdapterRecord(
        modules={},
        base_rank=int(base_rank or peft_r),
        scale=scale,
        dropout=dropout,
        kind=kind,
        scaling=doc.get("rank_scaling") if kind == MLX_OPTIQ else None,
        base_model=base if isinstance(base, str) else None,
    )
