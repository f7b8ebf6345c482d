"""What the plugin must know of mlx-lm's LoRA layers.

Which of the modules mlx-lm would convert a run adapts, and what a unit of
rank costs on each; the tensor shapes an adapter must have; building LoRA
layers at given ranks and loading weights into them; float copies of
quantized layers. Plain functions on models, through mlx-lm's public names
only; they raise nothing of their own for bad input, so the callers say
what is wrong with which file. Imports nothing from this package.
"""

from typing import Dict, List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

# [(module path, module)]: what mlx-lm converts, or the layers put in its place
Targets = List[Tuple[str, nn.Module]]


def own_lora_builders(model: nn.Module) -> List[str]:
    """Module paths of layers that build their own LoRA layer (``to_lora``)."""
    return [p for p, m in model.named_modules() if hasattr(m, "to_lora")]


def in_window(targets: Targets, model: nn.Module, num_layers: int) -> Targets:
    """The ``targets`` (``[(module path, module)]``, all blocks) that mlx-lm
    adapts with ``--num-layers num_layers``: those in the last ``num_layers``
    blocks (every block for 0 or less), and any outside the blocks."""
    blocks = model.layers
    first = 0 if num_layers <= 0 else max(0, len(blocks) - num_layers)
    block_of = {
        id(m): i for i, block in enumerate(blocks) for _, m in block.named_modules()
    }
    return [(p, m) for p, m in targets if block_of.get(id(m), first) >= first]


def linear_dims(module: nn.Module) -> Tuple[int, int]:
    """``(in, out)`` of a linear layer, quantized or not."""
    out_dims, in_dims = module.weight.shape
    if isinstance(module, nn.QuantizedLinear):
        in_dims = in_dims * 32 // module.bits
    return in_dims, out_dims


def model_linear_dims(model: nn.Module) -> Dict[str, Tuple[int, int]]:
    """``{module path: (in, out)}`` of every linear layer (quantized or not)."""
    return {
        path: linear_dims(module)
        for path, module in model.named_modules()
        if isinstance(module, (nn.Linear, nn.QuantizedLinear))
    }


def model_ranks(model: nn.Module) -> Dict[str, int]:
    """``{module path: rank}`` of the LoRA layers in ``model``."""
    return {
        path: module["lora_a"].shape[1 if module["lora_a"].ndim == 3 else -1]
        for path, module in model.named_modules()
        if "lora_a" in module
    }


def base_layer(module: nn.Module) -> nn.Module:
    """The layer a LoRA layer wraps (``module`` itself when it is not one)."""
    return getattr(module, "linear", module)


def describe_module(module: nn.Module) -> Tuple[Optional[int], int]:
    """Plain facts about a base layer: its live bits (``None`` if not
    quantized) and the adapter parameters one unit of rank costs on it."""
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

    bits = getattr(module, "bits", None)
    if isinstance(module, (nn.Linear, nn.QuantizedLinear)):
        return bits, sum(linear_dims(module))
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
    raise TypeError(f"can't size a LoRA adapter for {type(module).__name__}")


def rank_limit(module: nn.Module) -> int:
    """The largest LoRA rank that means anything on ``module``: its smaller
    dimension."""
    shapes = adapter_shapes(module, 1)
    a, b = shapes["lora_a"], shapes["lora_b"]
    if len(a) == 3:  # switch (MoE): (experts, r, in) and (experts, out, r)
        return min(a[2], b[1])
    return min(a[0], b[1])  # (in, r) and (r, out)


def adapter_shapes(
    module: nn.Module, rank: int, use_dora: bool = False
) -> Dict[str, tuple]:
    """``{leaf: shape}`` of the LoRA layer mlx-lm builds on ``module`` at ``rank``."""
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

    if isinstance(module, (nn.Linear, nn.QuantizedLinear)):
        in_dims, out_dims = linear_dims(module)
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


def expected_tensors(
    targets: Targets,
    lora_parameters: dict,
    rank_pattern: Optional[dict],
    use_dora: bool,
) -> Dict[str, tuple]:
    """``{tensor name: shape}`` an adapter with these settings holds for the
    adapted ``targets`` (``[(module path, module)]``)."""
    rank_pattern = rank_pattern or {}
    expected = {}
    for path, module in targets:
        rank = rank_pattern.get(path, lora_parameters["rank"])
        if rank == 0:
            continue  # left out: no tensors
        for leaf, shape in adapter_shapes(module, rank, use_dora).items():
            expected[f"{path}.{leaf}"] = shape
    return expected


def convert(
    model: nn.Module, num_layers: int, lora_parameters: dict, use_dora: bool = False
) -> nn.Module:
    """mlx-lm's ``linear_to_lora_layers`` (with ``rank_pattern``: patched or shimmed)."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    linear_to_lora_layers(model, num_layers, lora_parameters, use_dora=use_dora)
    return model


def load_weights(model: nn.Module, tensors: Dict[str, mx.array]) -> nn.Module:
    """Load adapter tensors (``{name: array}``) into a converted model."""
    model.load_weights(list(tensors.items()), strict=False)
    return model


def lora_layers(model: nn.Module, modules: dict, dropout: float = 0.0) -> Targets:
    """``[(module path, LoRALinear)]`` around the model's own base layers.

    Args:
        model: the base model (its linear layers are shared, not copied).
        modules: ``{module path: (lora_a (in, r), lora_b (r, out), scale)}``.
        dropout: the LoRA dropout.
    """
    from mlx_lm.tuner.lora import LoRALinear

    base = dict(model.named_modules())
    layers = []
    for path, (lora_a, lora_b, scale) in modules.items():
        # from_base draws a random lora_a that is replaced right away, as
        # mlx-lm's own adapter loading does
        # around the base layer, also while another adapter's layer wraps it
        layer = LoRALinear.from_base(
            base_layer(base[path]), r=lora_a.shape[1], scale=scale, dropout=dropout
        )
        layer.lora_a, layer.lora_b = lora_a, lora_b
        layers.append((path, layer))
    # Each unused draw chains a lazy split onto MLX's global random key, which
    # nothing evaluates while a server decodes greedily: collapse the chain,
    # or every switch leaves it longer (~4 KB a layer).
    mx.eval(mx.random.state)
    return layers


def _dequantized_weight(module):
    return mx.dequantize(
        module.weight,
        module.scales,
        getattr(module, "biases", None),
        group_size=module.group_size,
        bits=module.bits,
        mode=getattr(module, "mode", "affine"),
    ).astype(module.scales.dtype)


def dequantized_copies(model: nn.Module) -> Tuple[Targets, int]:
    """``[(module path, float layer)]`` for every quantized linear and embedding
    layer: the same function up to rounding, in the dtype of its scales,
    frozen. Returns the layers and the bytes their weights take."""
    layers, size = [], 0
    for path, module in model.named_modules():
        if isinstance(module, nn.QuantizedLinear):
            weight = _dequantized_weight(module)
            out_dims, in_dims = weight.shape
            layer = nn.Linear(in_dims, out_dims, bias="bias" in module)
            if "bias" in module:
                layer.bias = module.bias
        elif isinstance(module, nn.QuantizedEmbedding):
            weight = _dequantized_weight(module)
            layer = nn.Embedding(*weight.shape)
        else:
            continue
        layer.weight = weight
        mx.eval(layer.parameters())  # one layer at a time: a low peak
        layer.freeze()
        layers.append((path, layer))
        size += weight.nbytes
    return layers, size


def dequantized_size(model: nn.Module) -> int:
    """Bytes the weights of :func:`dequantized_copies` would take."""
    size = 0
    for _, module in model.named_modules():
        if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            rows, packed = module.weight.shape
            size += rows * packed * 32 // module.bits * module.scales.dtype.size
    return size


def swap_in(model: nn.Module, layers: Targets) -> nn.Module:
    """Put ``[(module path, layer)]`` into ``model`` in place of what is there."""
    model.update_modules(tree_unflatten(layers))
    return model


def nonfinite_base(model: nn.Module) -> Optional[str]:
    """The name of a frozen (base) parameter holding NaN or inf, if one does."""
    from mlx.utils import tree_flatten

    trainable = {n for n, _ in tree_flatten(model.trainable_parameters())}
    for name, value in tree_flatten(model.parameters()):
        if name in trainable or not mx.issubdtype(value.dtype, mx.floating):
            continue
        if not mx.all(mx.isfinite(value)).item():
            return name
    return None
