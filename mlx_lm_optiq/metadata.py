"""Metadata in: what is known about each adapted module's quantization.

Sources, tried in this order for each module (the first that has an entry
wins and is recorded as the module's ``source``):

1. ``optiq/metadata.json`` (OptiQ), then the legacy root ``optiq_metadata.json``:
   ``per_layer`` at top level or under ``optimization``, entries
   ``{"bits": 8, "group_size": 64}`` (bf16 recorded as bits 16, an optional
   ``kl``);
2. ``config.json`` ``quantization``: mlx-lm's per-module entries;
3. the live model: each ``QuantizedLinear.bits``.

KL sensitivity comes from ``optiq/sensitivity.json`` (OptiQ's shape, also
written by our sensitivity command), else from ``kl`` in OptiQ's
``per_layer`` entries. Keys are matched to module paths whatever wrapper
prefix either side carries (``model.``, ``language_model.``, ``backbone.``).
"""

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from .checks import is_finite, is_whole
from .errors import OptiqError

VALID_BITS = (2, 3, 4, 5, 6, 8, 16)
WRAPPER_PREFIXES = ("model", "language_model", "backbone", "transformer")

OPTIQ_METADATA = "optiq/metadata.json"
LEGACY_OPTIQ_METADATA = "optiq_metadata.json"
SENSITIVITY = "optiq/sensitivity.json"
GRADIENT = "optiq/gradient.json"
GRADIENT_VECTORS = "optiq/gradient.safetensors"
MODEL_CONFIG = "config.json"
LIVE_MODEL = "model"


def canonical(key: str) -> str:
    """``language_model.model.layers.3.mlp.up_proj`` -> ``layers.3.mlp.up_proj``."""
    if key.endswith(".weight"):
        key = key[: -len(".weight")]
    parts = key.split(".")
    while len(parts) > 1 and parts[0] in WRAPPER_PREFIXES:
        parts.pop(0)
    return ".".join(parts)


@dataclass
class Source:
    """What one metadata file says, keyed by canonical module path."""

    name: str
    path: Optional[Path] = None
    bits: Dict[str, int] = field(default_factory=dict)
    kl: Dict[str, float] = field(default_factory=dict)
    sha256: Optional[str] = None
    grad: Dict[str, float] = field(default_factory=dict)


@dataclass
class ModuleFacts:
    bits: Optional[int]
    bits_source: Optional[str]
    kl: Optional[float] = None
    kl_source: Optional[str] = None
    grad: Optional[float] = None  # gradient importance, mean |W * G|
    grad_source: Optional[str] = None


def _load_json(path: Path):
    raw = path.read_bytes()
    try:
        return json.loads(raw), hashlib.sha256(raw).hexdigest()
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise OptiqError(f"not valid JSON ({e})", path) from None
    except RecursionError:
        raise OptiqError("not metadata: its JSON is nested too deeply", path) from None


def _check_bits(path, key, bits):
    if not is_finite(bits) or bits not in VALID_BITS:
        raise OptiqError(
            f"{key}: bits must be one of {list(VALID_BITS)}, got {bits!r}", path
        )
    return int(bits)


def _check_kl(path, key, kl):
    if not is_finite(kl) or kl < 0:
        raise OptiqError(f"{key}: KL must be a finite number >= 0, got {kl!r}", path)
    return float(kl)


def read_optiq_metadata(path: Path, name: str) -> Source:
    data, sha = _load_json(path)
    per_layer = data.get("per_layer") if isinstance(data, dict) else None
    if per_layer is None and isinstance(data, dict):
        optimization = data.get("optimization") or {}
        if not isinstance(optimization, dict):
            raise OptiqError("'optimization' must be an object", path)
        per_layer = optimization.get("per_layer")
    if not isinstance(per_layer, dict):
        raise OptiqError(
            "no 'per_layer' mapping (top level or under 'optimization')", path
        )
    source = Source(name, path, sha256=sha)
    for key, entry in per_layer.items():
        if not isinstance(entry, dict) or "bits" not in entry:
            raise OptiqError(f"per_layer[{key!r}] has no 'bits'", path)
        source.bits[canonical(key)] = _check_bits(path, key, entry["bits"])
        if entry.get("kl") is not None:
            source.kl[canonical(key)] = _check_kl(path, key, entry["kl"])
    return source


def read_sensitivity(path: Path) -> Source:
    data, sha = _load_json(path)
    layers = data.get("layers") if isinstance(data, dict) else None
    if not isinstance(layers, list):
        raise OptiqError("no 'layers' list", path)
    candidates = data.get("candidate_bits") or []
    if not isinstance(candidates, list) or not all(is_whole(b) for b in candidates):
        raise OptiqError(
            f"'candidate_bits' must be a list of bit-widths, got {candidates!r}", path
        )
    source = Source(SENSITIVITY, path, sha256=sha)
    for i, layer in enumerate(layers):
        if not isinstance(layer, dict) or "layer_name" not in layer:
            raise OptiqError(f"layers[{i}] has no 'layer_name'", path)
        if not isinstance(layer["layer_name"], str) or not layer["layer_name"]:
            raise OptiqError(
                f"layers[{i}]: 'layer_name' must be a module path, got "
                f"{layer['layer_name']!r}",
                path,
            )
        if layer.get("skipped"):
            continue  # not quantizable: measured nothing (see sensitivity.py)
        sens = layer.get("sensitivities")
        if not isinstance(sens, dict) or not sens:
            raise OptiqError(f"{layer['layer_name']}: no 'sensitivities'", path)
        # KL at the lowest candidate bit-width: the cost of quantizing hardest.
        try:
            lowest = min(int(b) for b in (candidates or sens.keys()))
        except ValueError:
            raise OptiqError(
                f"{layer['layer_name']}: bit-widths must be integers", path
            ) from None
        if str(lowest) not in sens:
            raise OptiqError(f"{layer['layer_name']}: no KL at {lowest} bits", path)
        key = layer["layer_name"]
        source.kl[canonical(key)] = _check_kl(path, key, sens[str(lowest)])
    return source


def read_gradient(path: Path) -> Source:
    """``optiq/gradient.json`` (:mod:`mlx_lm_optiq.gradient`): each module's
    gradient importance."""
    data, sha = _load_json(path)
    modules = data.get("modules") if isinstance(data, dict) else None
    if not isinstance(modules, dict):
        raise OptiqError("no 'modules' object", path)
    source = Source(GRADIENT, path, sha256=sha)
    for key, entry in modules.items():
        value = entry.get("importance") if isinstance(entry, dict) else None
        if not is_finite(value) or value < 0:
            raise OptiqError(
                f"{key}: 'importance' must be a finite number >= 0, got {value!r}", path
            )
        source.grad[canonical(key)] = float(value)
    return source


def read_config_quantization(path: Path) -> Optional[Source]:
    data, sha = _load_json(path)
    quant = data.get("quantization") if isinstance(data, dict) else None
    if not isinstance(quant, dict):
        return None
    source = Source(MODEL_CONFIG, path, sha256=sha)
    for key, entry in quant.items():
        if isinstance(entry, dict) and "bits" in entry:
            source.bits[canonical(key)] = _check_bits(path, key, entry["bits"])
        elif entry is False:
            source.bits[canonical(key)] = 16
    return source if source.bits else None


def read_sources(model_dir: Optional[Path], readers) -> List[Source]:
    """What every metadata file present in ``model_dir`` says, in priority order.

    Args:
        model_dir: the model directory, or ``None`` when there is none locally.
        readers: ``{file name: reader}`` in the order files are tried (the
          registered readers: :func:`mlx_lm_optiq.plugins.metadata_readers`).
    """
    if model_dir is None:
        return []
    sources = []
    for name, reader in readers.items():
        if (model_dir / name).is_file():
            try:
                source = reader(model_dir / name)
            except OptiqError:
                raise
            except (Exception, SystemExit) as e:  # the reader's failure, not ours
                raise OptiqError(
                    f"the metadata reader for {name} failed: {type(e).__name__}: {e}",
                    model_dir / name,
                ) from e
            if source is not None:
                sources.append(source)
    return sources


def _examples(keys, n=3):
    keys = sorted(keys)
    more = f", … ({len(keys)} in all)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def module_facts(targets, all_paths, sources, report=print) -> Dict[str, ModuleFacts]:
    """Bits and KL for every adapted module.

    Args:
        targets: ``[(module path, live bits or None)]`` for the adapted modules.
        all_paths: every module path of the model, to tell a key for a module
          that is merely not adapted from a key that matches nothing.
        sources: from :func:`read_sources`.
        report: called with one line for each thing worth telling the user.

    Returns:
        ``{module path: ModuleFacts}``; ``bits`` is ``None`` only when no source
        knows and the model is not quantized at all.
    """
    known = {canonical(p) for p in all_paths}
    wanted = {canonical(p): p for p, _ in targets}
    for source in sources:
        keys = set(source.bits) | set(source.kl) | set(source.grad)
        stray = keys - known
        if stray:
            report(
                f"warning: {source.path}: {len(stray)} entries match no module of "
                f"the model: {_examples(stray)}"
            )
        if source.name != MODEL_CONFIG:
            missing = set(wanted) - keys
            if missing:
                report(
                    f"note: {source.path} has no entry for {len(missing)} adapted "
                    f"modules: {_examples(wanted[k] for k in missing)}"
                )

    # In a quantized model, a module nobody records as quantized is a kept
    # float module, which OptiQ records as 16 bits.
    any_quantized = any(b is not None for _, b in targets) or any(
        s.bits for s in sources
    )
    facts = {}
    for path, live_bits in targets:
        key = canonical(path)
        fact = ModuleFacts(None, None)
        for source in sources:
            if fact.bits is None and key in source.bits:
                fact.bits, fact.bits_source = source.bits[key], source.name
            if fact.kl is None and key in source.kl:
                fact.kl, fact.kl_source = source.kl[key], source.name
            if fact.grad is None and key in source.grad:
                fact.grad, fact.grad_source = source.grad[key], source.name
        if fact.bits is None and (live_bits is not None or any_quantized):
            fact.bits, fact.bits_source = live_bits or 16, LIVE_MODEL
        elif live_bits is not None and fact.bits != live_bits:
            report(
                f"warning: {path}: {fact.bits_source} says {fact.bits} bits but the "
                f"loaded model has {live_bits}; using {fact.bits_source}"
            )
        facts[path] = fact
    return facts


def resolve_model_dir(model) -> Optional[Path]:
    """The local directory of ``--model``: a path, or mlx-lm's Hugging Face cache."""
    path = Path(model)
    if path.is_dir():
        return path
    from mlx_lm.utils import hf_repo_to_path

    try:
        return hf_repo_to_path(model)
    except (OSError, ValueError):  # not cached: no metadata files to read
        return None
