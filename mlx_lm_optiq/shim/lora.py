"""The shim's LoRA helpers: rank_pattern in conversion, which modules LoRA
adapts, and building adapters mlx-lm can't build by itself (mixed ranks
without a rank_pattern, PEFT)."""

import contextlib
import sys
import threading
from pathlib import Path

import mlx.nn as nn

# Guards every swap of mlx-lm module attributes (here and in the package).
_lock = threading.RLock()


_LORA_FACTORIES = (
    "LoRALinear",
    "DoRALinear",
    "LoRASwitchLinear",
    "LoRAEmbedding",
    "DoRAEmbedding",
)


class _RankedFactory:
    """Stands in for a LoRA layer class inside ``linear_to_lora_layers``.

    mlx-lm's inner ``to_lora`` calls ``LoRALayer.from_base(layer, r=rank, ...)``
    in a fixed module order; picking ``r`` per base layer here keeps that
    order, and so the random stream, identical to stock.
    """

    def __init__(self, cls, choose_rank):
        self.cls = cls
        self.choose_rank = choose_rank

    def from_base(self, layer, r=8, **kwargs):
        return self.cls.from_base(layer, r=self.choose_rank(layer, r), **kwargs)


@contextlib.contextmanager
def _lora_factories(stand_in):
    """Swap the LoRA layer classes that ``to_lora`` looks up for ``stand_in(cls)``."""
    tuner_utils = sys.modules["mlx_lm.tuner.utils"]
    with _lock:
        saved = {name: getattr(tuner_utils, name) for name in _LORA_FACTORIES}
        try:
            for name, cls in saved.items():
                setattr(tuner_utils, name, stand_in(cls))
            yield
        finally:
            for name, cls in saved.items():
                setattr(tuner_utils, name, cls)


def _linear_to_lora_layers(original, model, num_layers, config, use_dora=False):
    pattern = (config or {}).get("rank_pattern")
    if not pattern:
        return original(model, num_layers, config, use_dora=use_dora)
    by_id = {}
    for path, module in model.named_modules():
        if path in pattern:
            if hasattr(module, "to_lora"):
                raise ValueError(
                    f"{path} ({type(module).__name__}) builds its own LoRA layer; "
                    "per-module ranks are not supported for it"
                )
            by_id[id(module)] = (path, pattern[path])
    used = set()

    def choose_rank(layer, r):
        if id(layer) not in by_id:
            return r
        path, rank = by_id[id(layer)]
        used.add(path)
        return rank

    with _lora_factories(lambda cls: _RankedFactory(cls, choose_rank)):
        result = original(model, num_layers, config, use_dora=use_dora)
    unused = sorted(set(pattern) - used)
    if unused:
        raise ValueError(
            f"rank_pattern names {len(unused)} module(s) that were not converted "
            f"to LoRA (e.g. {', '.join(unused[:3])}); check num_layers and keys"
        )
    return result


def adapted_modules(model, num_layers, lora_parameters, use_dora=False):
    """Return ``[(module path, module)]`` that ``linear_to_lora_layers`` would adapt.

    Runs mlx-lm's own selection with factories that hand back the base layer
    unchanged, so the answer follows mlx-lm's rules exactly and the model,
    and the random stream, are left untouched.
    """
    paths = {id(m): p for p, m in model.named_modules()}
    custom = [p for p, m in model.named_modules() if hasattr(m, "to_lora")]
    if custom:
        raise ValueError(
            f"{custom[0]} builds its own LoRA layer; per-module ranks are not "
            "supported for this architecture"
        )
    seen = []

    class _Probe:
        @staticmethod
        def from_base(layer, **kwargs):
            seen.append((paths[id(layer)], layer))
            return layer

    original = sys.modules["mlx_lm.tuner.utils"].linear_to_lora_layers
    original = getattr(original, "__optiq_original__", original)
    with _lora_factories(lambda cls: _Probe):
        original(model, num_layers, dict(lora_parameters), use_dora=use_dora)
    return seen


def _linear_dims(module):
    out_dims, in_dims = module.weight.shape
    if isinstance(module, nn.QuantizedLinear):
        in_dims = in_dims * 32 // module.bits
    return in_dims, out_dims


def describe_module(module):
    """Plain facts about a base layer: live bits (None if not quantized) and
    the number of adapter parameters one unit of rank costs on it."""
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

    bits = getattr(module, "bits", None)
    if isinstance(module, (nn.Linear, nn.QuantizedLinear)):
        return bits, sum(_linear_dims(module))
    if isinstance(module, (SwitchLinear, QuantizedSwitchLinear)):
        experts, out_dims, in_dims = module.weight.shape
        if bits is not None:
            in_dims = in_dims * 32 // bits
        return bits, experts * (in_dims + out_dims)
    if isinstance(module, (nn.Embedding, nn.QuantizedEmbedding)):
        num, dims = module.weight.shape
        if bits is not None:
            dims = dims * 32 // bits
        return bits, num + dims
    raise ValueError(f"can't size a LoRA adapter for {type(module).__name__}")


def _adapter_shapes(module, rank, use_dora):
    """``{leaf: shape}`` of the LoRA layer mlx-lm builds on ``module`` at ``rank``."""
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

    if isinstance(module, (nn.Linear, nn.QuantizedLinear)):
        in_dims, out_dims = _linear_dims(module)
        shapes = {"lora_a": (in_dims, rank), "lora_b": (rank, out_dims)}
        return {**shapes, "m": (out_dims,)} if use_dora else shapes
    if isinstance(module, (SwitchLinear, QuantizedSwitchLinear)):
        experts, out_dims, in_dims = module.weight.shape
        if isinstance(module, QuantizedSwitchLinear):
            in_dims = in_dims * 32 // module.bits
        return {"lora_a": (experts, rank, in_dims), "lora_b": (experts, out_dims, rank)}
    num, dims = module.weight.shape
    if isinstance(module, nn.QuantizedEmbedding):
        dims = dims * 32 // module.bits
    shapes = {"lora_a": (num, rank), "lora_b": (rank, dims)}
    return {**shapes, "m": (num,)} if use_dora else shapes


def check_mlx_adapter(model, weights_file, config, rank_pattern):
    """Refuse an mlx-lm adapter that doesn't fit ``model``, before anything changes.

    Args:
        model: the model the adapter is for, not yet converted.
        weights_file: its ``adapters.safetensors``.
        config: its ``adapter_config.json``.
        rank_pattern: the per-module ranks it will be built with (or ``None``).
    """
    from ..adapter_read import read_safetensors_header

    lora = config.get("lora_parameters") or {}
    use_dora = config.get("fine_tune_type", "lora") == "dora"
    rank_pattern = rank_pattern or {}
    expected = {}
    targets = adapted_modules(model, config["num_layers"], lora, use_dora)
    stray = sorted(set(rank_pattern) - {path for path, _ in targets})
    if stray:
        raise ValueError(
            f"{weights_file.parent / 'adapter_config.json'}: rank_pattern names "
            f"{len(stray)} module(s) that are not adapted (e.g. {stray[0]}); check "
            "num_layers and keys"
        )
    for path, module in targets:
        rank = rank_pattern.get(path, lora["rank"])
        for leaf, shape in _adapter_shapes(module, rank, use_dora).items():
            expected[f"{path}.{leaf}"] = shape
    for name, shape in read_safetensors_header(weights_file).items():
        if name not in expected:
            raise ValueError(
                f"{weights_file}: {name} is not an adapter parameter of this model "
                "(check num_layers and keys in adapter_config.json)"
            )
        if tuple(shape) != tuple(expected[name]):
            what = "rank_pattern" if name.rsplit(".", 1)[0] in rank_pattern else "rank"
            raise ValueError(
                f"{weights_file}: {name} has shape {tuple(shape)} but this model with "
                f"adapter_config.json's {what} needs {tuple(expected[name])}; is the "
                "adapter for another base model, or its config for other weights?"
            )


def load_mlx_adapter(model, adapter_dir, rank_pattern):
    """Load an mlx-lm adapter directory whose config lacks the ranks it holds
    (checked first with :func:`check_mlx_adapter`)."""
    import json

    import mlx.core as mx

    with open(adapter_dir / "adapter_config.json") as f:
        config = json.load(f)
    tuner_utils = sys.modules["mlx_lm.tuner.utils"]
    tuner_utils.linear_to_lora_layers(
        model,
        config["num_layers"],
        {**config["lora_parameters"], "rank_pattern": rank_pattern},
        use_dora=config.get("fine_tune_type", "lora") == "dora",
    )
    tensors = list(mx.load(str(adapter_dir / "adapters.safetensors")).items())
    model.load_weights(tensors, strict=False)
    return model


def load_peft_adapter(model, adapter_dir):
    """Build and load a PEFT LoRA adapter directory into an mlx-lm model.

    Every module and tensor shape is checked before the model is changed, so
    an adapter for another base model is refused with the model untouched.
    """
    import mlx.core as mx
    from mlx.utils import tree_unflatten
    from mlx_lm.tuner.lora import LoRALinear

    from ..adapter_read import peft_import_plan
    from ..adapter_write import check_peft_architecture

    plan, dropout = peft_import_plan(adapter_dir)
    check_peft_architecture(getattr(model, "model_type", None))
    weights_file = adapter_dir / "adapter_model.safetensors"
    weights = mx.load(str(weights_file))
    modules = dict(model.named_modules())
    layers, tensors = [], []
    for path, (rank, scale) in plan.items():
        module = modules.get(path)
        if module is None:
            raise ValueError(f"{weights_file}: {path} is not a module of this model")
        if not isinstance(module, (nn.Linear, nn.QuantizedLinear)):
            raise ValueError(
                f"{weights_file}: {path} is a {type(module).__name__}; only linear "
                "layers take PEFT LoRA adapters here (no embedding or MoE adapters)"
            )
        prefix = f"base_model.model.{path}"
        lora_a = weights[f"{prefix}.lora_A.weight"].T
        lora_b = weights[f"{prefix}.lora_B.weight"].T
        in_dims, out_dims = _linear_dims(module)
        if lora_a.shape != (in_dims, rank) or lora_b.shape != (rank, out_dims):
            raise ValueError(
                f"{weights_file}: {path} adapts a {in_dims}->{out_dims} layer but its "
                f"tensors are {tuple(lora_a.shape)} and {tuple(lora_b.shape)}; "
                "is this adapter for another base model?"
            )
        layers.append(
            (path, LoRALinear.from_base(module, r=rank, scale=scale, dropout=dropout))
        )
        tensors += [(f"{path}.lora_a", lora_a), (f"{path}.lora_b", lora_b)]
    model.update_modules(tree_unflatten(layers))
    model.load_weights(tensors, strict=False)
    return model


def token_sequences(tokenizer, data_dir, count, max_length):
    """The first ``count`` rows of ``train.jsonl`` (else ``valid.jsonl``) as
    token lists, through mlx-lm's own dataset classes (text, chat, completions)."""
    import json
    import types

    from mlx_lm.tuner.datasets import create_dataset

    for name in ("train.jsonl", "valid.jsonl"):
        path = Path(data_dir) / name
        if path.is_file():
            break
    else:
        raise FileNotFoundError(f"{data_dir}: no train.jsonl or valid.jsonl")
    with open(path) as f:
        rows = [json.loads(line) for line, _ in zip(f, range(count)) if line.strip()]
    if not rows:
        raise ValueError(f"{path}: no rows")
    dataset = create_dataset(rows, tokenizer, types.SimpleNamespace())
    sequences = []
    for i in range(len(dataset)):
        tokens = dataset.process(dataset[i])
        tokens = tokens[0] if isinstance(tokens, tuple) else tokens
        sequences.append(list(tokens)[:max_length])
    return sequences
