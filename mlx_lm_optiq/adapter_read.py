"""Adapter read back: the files of an adapter directory, checked.

Safetensors headers (through ``safetensors``, no mlx needed) and the ranks
they imply in mlx-lm's and PEFT's layouts; JSON configs of bounded size;
PEFT's ``rank_pattern``/``alpha_pattern`` resolved the way PEFT does; LoRA
tensors of our adapters, stock mlx-lm's and PEFT's, refused with the file
named when they can't be an adapter or don't fit the model. What a
directory says about itself as a whole is :mod:`mlx_lm_optiq.adapter_record`.
"""

import contextlib
import json
import math
import os
import stat
import time
from pathlib import Path
from typing import Dict, Optional, Tuple

import regex

from .checks import is_finite, is_whole
from .errors import OptiqError
from .layout import (
    CONFIG,
    MLX_WEIGHTS,
    PEFT_LEAVES,
    PEFT_PREFIX,
    PEFT_WEIGHTS,
    peft_key,
)


def _safetensors_problem(error):
    """What safetensors' header error means, in the words of a user."""
    detail = str(error).removeprefix("Error while deserializing header: ")
    if "header too small" in detail:
        return "too short to be a safetensors file"
    if "invalid JSON" in detail:
        return f"not a safetensors file (bad header: {detail})"
    if "header too large" in detail or "invalid header length" in detail:
        return f"truncated or not a safetensors file ({detail})"
    return f"truncated or damaged safetensors file ({detail})"


def read_safetensors_header(path: Path) -> Dict[str, tuple]:
    """``{tensor name: shape}`` from a safetensors file, without loading it."""
    from safetensors import SafetensorError, safe_open

    with opened(path) as f:
        try:
            with safe_open(_fd_path(f), framework="numpy") as st:
                return {n: tuple(st.get_slice(n).get_shape()) for n in st.keys()}
        except SafetensorError as e:
            raise OptiqError(_safetensors_problem(e), path) from None


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


def _units(ranks, shapes, key):
    """``{module path: adapter parameters per unit of rank}``."""
    return {
        path: (
            math.prod(shapes[key(path, "lora_a")])
            + math.prod(shapes.get(key(path, "lora_b"), (0,)))
        )
        // rank
        for path, rank in ranks.items()
        if rank
    }


def mlx_units(shapes) -> Dict[str, int]:
    return _units(mlx_ranks(shapes), shapes, lambda path, leaf: f"{path}.{leaf}")


def peft_ranks(shapes) -> Dict[str, int]:
    """``{module path: rank}`` from PEFT's ``…<module>.lora_A.weight`` ``(r, in)``."""
    suffix = "." + PEFT_LEAVES["lora_a"]
    return {
        name[: -len(suffix)].removeprefix(PEFT_PREFIX): shape[0]
        for name, shape in shapes.items()
        if name.endswith(suffix)
    }


def _peft_name(shapes, path, leaf):
    name = peft_key(path, leaf)
    return name if name in shapes else f"{path}.{PEFT_LEAVES[leaf]}"


def peft_units(shapes) -> Dict[str, int]:
    return _units(
        peft_ranks(shapes), shapes, lambda path, leaf: _peft_name(shapes, path, leaf)
    )


MAX_JSON_BYTES = 16 * 1024 * 1024


@contextlib.contextmanager
def opened(path: Path):
    """``path`` open for reading, if it is a regular file (after links).

    Checked on the open file, never a name checked before: a FIFO or a device
    swapped in for the file can't make a reader wait forever.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise OptiqError("no such file", path) from None
    except OSError as e:
        raise OptiqError(f"can't be read ({e.strerror})", path) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OptiqError("not a regular file", path)
        os.set_blocking(fd, True)
        f = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with f:
        yield f


def _fd_path(f) -> str:
    """A path that opens the very file ``f`` is open on."""
    proc = f"/proc/self/fd/{f.fileno()}"
    return proc if os.path.exists(proc) else f"/dev/fd/{f.fileno()}"


def read_json(path: Path) -> dict:
    """A JSON object from a regular file of at most 16 MiB."""
    with opened(path) as f:
        raw = f.read(MAX_JSON_BYTES + 1)
    if len(raw) > MAX_JSON_BYTES:
        raise OptiqError(f"larger than {MAX_JSON_BYTES >> 20} MiB: not a config", path)
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise OptiqError(f"not valid JSON ({e})", path) from None
    except RecursionError:
        raise OptiqError("not a config: its JSON is nested too deeply", path) from None
    if not isinstance(data, dict):
        raise OptiqError("expected a JSON object", path)
    return data


def is_peft_dir(adapter_dir) -> bool:
    """A PEFT adapter directory (and not one of ours, which holds both layouts)."""
    adapter_dir = Path(adapter_dir)
    return (adapter_dir / PEFT_WEIGHTS).is_file() and not (
        adapter_dir / MLX_WEIGHTS
    ).is_file()


PATTERN_SECONDS = 2.0  # matching one config's patterns, all of them together


class _Deadline:
    """The time left for matching one config's patterns."""

    def __init__(self, seconds=PATTERN_SECONDS):
        self.end = time.monotonic() + seconds

    def left(self):
        return self.end - time.monotonic()


def peft_pattern_key(
    patterns: dict, path: str, source=None, deadline: Optional[_Deadline] = None
) -> Optional[str]:
    """The first key of a PEFT ``rank_pattern``/``alpha_pattern`` that names ``path``.

    PEFT treats each key as a regex matched against the end of the module
    path on a dot boundary, first key first. Matched with ``regex``, which
    backtracks sanely and takes a time limit, so a hostile key can't freeze
    the process (``re`` holds the GIL while it backtracks): 0.25 s a key, and
    ``deadline`` for all the keys of a config together.
    """
    deadline = deadline or _Deadline()
    too_slow = OptiqError(
        f"its {len(patterns)} patterns take over {PATTERN_SECONDS:.0f} s to match: "
        "not a LoRA config",
        source,
    )
    for key in patterns:
        left = min(0.25, deadline.left())
        if left <= 0:
            raise too_slow
        try:
            found = regex.match(rf"(.*\.)?({key})$", path, timeout=left)
        except TimeoutError:
            if left < 0.25:  # the config's time ran out, not this key's
                raise too_slow from None
            raise OptiqError(
                f"pattern {key!r} takes too long to match", source
            ) from None
        except (regex.error, TypeError) as e:
            raise OptiqError(f"pattern {key!r} is not a regex ({e})", source) from None
        if found:
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


def peft_import_plan(
    adapter_dir, config: Optional[dict] = None, shapes: Optional[dict] = None
) -> Tuple[Dict[str, Tuple[int, float]], float]:
    """How to rebuild a PEFT LoRA adapter in mlx-lm.

    Args:
        adapter_dir: the PEFT adapter directory.
        config, shapes: its ``adapter_config.json`` and weight shapes, when
          already read.

    Returns:
        ``({module path: (rank, scale)}, dropout)`` where ``scale`` is what
        PEFT multiplies that module by: ``alpha / r``, or ``alpha / sqrt(r)``
        with ``use_rslora``.
    """
    adapter_dir = Path(adapter_dir)
    config_file, weights = adapter_dir / CONFIG, adapter_dir / PEFT_WEIGHTS
    config = read_json(config_file) if config is None else config
    if config.get("peft_type", "LORA") != "LORA":
        raise OptiqError(
            f"peft_type {config['peft_type']} is not supported, only LORA", config_file
        )
    for key, feature in UNSUPPORTED_PEFT.items():
        if config.get(key):
            raise OptiqError(
                f"{feature} is not supported by mlx-lm LoRA layers", config_file
            )
    if config.get("bias", "none") != "none":
        raise OptiqError(
            f"bias={config['bias']!r} is not supported, only 'none'", config_file
        )
    shapes = read_safetensors_header(weights) if shapes is None else shapes
    for name, shape in shapes.items():  # what is known to be unsupported, first
        if "lora_embedding_" in name:
            raise OptiqError(f"embedding adapters ({name}) are not supported", weights)
        if "lora_magnitude_vector" in name:
            raise OptiqError(f"DoRA tensors ({name}) are not supported", weights)
    for name, shape in shapes.items():
        if not name.endswith(tuple(PEFT_LEAVES.values())):
            raise OptiqError(f"{name} is not a LoRA tensor mlx-lm can load", weights)
        if len(shape) != 2:
            raise OptiqError(f"{name} is not a 2-D linear adapter (MoE?)", weights)
    ranks = peft_ranks(shapes)
    if not ranks:
        raise OptiqError("no LoRA tensors (…lora_A.weight)", weights)
    rank_pattern = _mapping(config, "rank_pattern", config_file)
    alpha_pattern = _mapping(config, "alpha_pattern", config_file)
    base_r = _whole(config.get("r", 8), "r", config_file)
    base_alpha = config.get("lora_alpha", 8)
    deadline, plan = _Deadline(), {}
    for path, rank in ranks.items():
        key = peft_pattern_key(rank_pattern, path, config_file, deadline)
        expected = _whole(rank_pattern[key], f"rank_pattern[{key!r}]", config_file) if key else base_r  # fmt: skip
        if expected != rank:
            raise OptiqError(
                f"{path} has rank {rank} but {config_file.name} says {expected}",
                weights,
            )
        key = peft_pattern_key(alpha_pattern, path, config_file, deadline)
        alpha = _number(
            alpha_pattern[key] if key else base_alpha, "lora_alpha", config_file
        )
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        plan[path] = (rank, scale)
    return plan, _number(config.get("lora_dropout", 0.0), "lora_dropout", config_file)


def _mapping(config, key, source):
    value = config.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise OptiqError(f"{key!r} must be an object, got {value!r}", source)
    return value


MAX_SCALE = 1e6


def _whole(value, what, source):
    """A rank: a whole number >= 1."""
    if not is_whole(value) or value < 1:
        raise OptiqError(f"{what} must be a whole number >= 1, got {value!r}", source)
    return value


def _number(value, what, source):
    """A finite number of sane size (a LoRA scale, alpha or dropout)."""
    if not is_finite(value) or abs(value) > MAX_SCALE:
        raise OptiqError(f"{what} must be a finite number, got {value!r}", source)
    return float(value)


def check_lora_tensors(modules: dict, source) -> None:
    """Refuse LoRA matrices that can't be one adapter: 2-D, ``lora_a`` (in, r)
    and ``lora_b`` (r, out) with the same rank, floating point."""
    import mlx.core as mx

    for path, (lora_a, lora_b, _) in modules.items():
        if lora_a.ndim != 2 or lora_b.ndim != 2:
            raise OptiqError(
                f"{path}: lora_a and lora_b must be matrices, got shapes "
                f"{tuple(lora_a.shape)} and {tuple(lora_b.shape)}",
                source,
            )
        if lora_a.shape[1] != lora_b.shape[0] or lora_a.shape[1] == 0:
            raise OptiqError(
                f"{path}: the ranks of lora_a {tuple(lora_a.shape)} and lora_b "
                f"{tuple(lora_b.shape)} disagree",
                source,
            )
        for w in (lora_a, lora_b):
            if w.dtype not in (mx.float32, mx.float16, mx.bfloat16):
                raise OptiqError(
                    f"{path}: tensors must be float32, float16 or bfloat16, got "
                    f"{w.dtype}",
                    source,
                )


def mlx_scale_pattern(lora: dict, config_file) -> Dict[str, float]:
    """``lora_parameters.scale_pattern`` (module path -> its LoRA scale), checked."""
    pattern = _mapping(lora, "scale_pattern", config_file)
    return {
        path: _number(scale, f"scale_pattern[{path!r}]", config_file)
        for path, scale in pattern.items()
    }


def mlx_rank_pattern(config, shapes) -> Optional[Dict[str, int]]:
    """The per-module ranks mlx-lm must build to load an mlx-lm adapter.

    ``None`` when stock loading already gets it right: the config carries
    ``lora_parameters.rank_pattern``, or every tensor has the config's rank.
    """
    lora = config.get("lora_parameters") or {}
    if lora.get("rank_pattern"):
        return None
    ranks = mlx_ranks(shapes)
    if all(r == lora.get("rank") for r in ranks.values()):
        return None
    return ranks


def check_tensors_fit(
    weights_file: Path,
    shapes: dict,
    expected: dict,
    rank_pattern: Optional[dict],
    ranks_from: str = "adapter_config.json's",
) -> None:
    """Refuse adapter tensors that don't fit the model, before anything changes.

    Args:
        weights_file: the adapter's ``adapters.safetensors``.
        shapes: its ``{tensor name: shape}``.
        expected: ``{tensor name: shape}`` the model builds with these settings
          (:func:`mlx_lm_optiq.lora_layers.expected_tensors`).
        rank_pattern: the per-module ranks it is built with (or ``None``).
        ranks_from: where those ranks come from, for the message.
    """
    rank_pattern = rank_pattern or {}
    for name, shape in shapes.items():
        if name not in expected:
            raise OptiqError(
                f"{name} is not an adapter parameter of this model "
                "(check num_layers and keys in adapter_config.json)",
                weights_file,
            )
        if tuple(shape) != tuple(expected[name]):
            what = "rank_pattern" if name.rsplit(".", 1)[0] in rank_pattern else "rank"
            raise OptiqError(
                f"{name} has shape {tuple(shape)} but this model with {ranks_from} "
                f"{what} needs {tuple(expected[name])}; is the adapter for another "
                "base model, or its config for other weights?",
                weights_file,
            )


def check_modules_fit(source, modules: dict, dims: Dict[str, tuple]) -> None:
    """Refuse ``modules`` (from :func:`load_modules`) that don't fit a model.

    Args:
        source: the file or directory they came from, for the message.
        modules: ``{module path: (lora_a, lora_b, scale)}``.
        dims: ``{module path: (in, out)}`` of the model's linear layers.
    """
    for path, (lora_a, lora_b, _) in modules.items():
        if path not in dims:
            raise OptiqError(f"{path} is not a linear layer of this model", source)
        in_dims, out_dims = dims[path]
        if lora_a.shape[1] > min(in_dims, out_dims):
            raise OptiqError(
                f"{path} has rank {lora_a.shape[1]}, wider than its {in_dims}->"
                f"{out_dims} layer: not a LoRA adapter of this model",
                source,
            )
        if lora_a.shape[0] != in_dims or lora_b.shape[1] != out_dims:
            raise OptiqError(
                f"{path} adapts a {in_dims}->{out_dims} layer of this model but its "
                f"tensors are {tuple(lora_a.shape)} and {tuple(lora_b.shape)}; is "
                "this adapter for another base model?",
                source,
            )


ADAPTER_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def load_tensors(path: Path) -> dict:
    """``{tensor name: mx.array}`` of an adapter's safetensors file, its header
    checked first: float32, float16 or bfloat16 tensors only."""
    import mlx.core as mx
    from safetensors import safe_open

    read_safetensors_header(path)
    with opened(path) as f:
        with safe_open(_fd_path(f), framework="numpy") as st:
            for name in st.keys():
                dtype = st.get_slice(name).get_dtype()
                if dtype not in ADAPTER_DTYPES:
                    raise OptiqError(
                        f"{name}: tensors must be float32, float16 or bfloat16, "
                        f"got {dtype}",
                        path,
                    )
        f.seek(0)
        return mx.load(f, format="safetensors")


def check_finite(tensors: dict, source, hint: str = "") -> None:
    """Refuse adapter tensors that hold NaN or inf."""
    import mlx.core as mx

    bad = [name for name, w in tensors.items() if not mx.all(mx.isfinite(w)).item()]
    if bad:
        raise OptiqError(
            f"{len(bad)} tensors hold NaN or inf (e.g. {bad[0]}){hint}", source
        )


def load_modules(adapter_dir) -> Tuple[dict, float]:
    """``{module path: (lora_a (in, r), lora_b (r, out), scale)}`` and the dropout.

    Reads our adapters, stock mlx-lm ones and PEFT ones alike; tensors that
    can't be one LoRA adapter, or hold NaN or inf, are refused.
    """
    adapter_dir = Path(adapter_dir)
    if is_peft_dir(adapter_dir):
        plan, dropout = peft_import_plan(adapter_dir)
        weights = load_tensors(adapter_dir / PEFT_WEIGHTS)
        modules = {}
        for path, (_, scale) in plan.items():
            a, b = (_peft_name(weights, path, leaf) for leaf in ("lora_a", "lora_b"))
            if b not in weights:
                raise OptiqError(f"{path} has no lora_B", adapter_dir / PEFT_WEIGHTS)
            modules[path] = (weights[a].T, weights[b].T, scale)
        check_lora_tensors(modules, adapter_dir / PEFT_WEIGHTS)
        check_finite(weights, adapter_dir / PEFT_WEIGHTS)
        return modules, dropout
    config_file = adapter_dir / CONFIG
    config = read_json(config_file)
    lora = _mapping(config, "lora_parameters", config_file)
    if config.get("fine_tune_type", "lora") != "lora":
        raise OptiqError(
            f"only plain LoRA adapters can be read here (not "
            f"{config['fine_tune_type']!r})",
            config_file,
        )
    weights_file = adapter_dir / MLX_WEIGHTS
    weights = load_tensors(weights_file)
    scale = _number(lora.get("scale"), "lora_parameters.scale", config_file)
    scales = mlx_scale_pattern(lora, config_file)
    modules = {}
    for name in weights:
        if not name.endswith((".lora_a", ".lora_b")):
            raise OptiqError(
                f"{name} is not a LoRA tensor (lora_a, lora_b): DoRA and other "
                "variants can't be read here",
                weights_file,
            )
        if name.endswith(".lora_a"):
            other = name[: -len("a")] + "b"
            if other not in weights:
                raise OptiqError(f"{name} has no {other}", weights_file)
            path = name[: -len(".lora_a")]
            modules[path] = (weights[name], weights[other], scales.get(path, scale))
    if not modules:
        raise OptiqError("the weights hold no LoRA tensors", weights_file)
    check_lora_tensors(modules, weights_file)
    check_finite(weights, weights_file)
    return modules, _number(lora.get("dropout", 0.0), "dropout", config_file)
