"""What the plugin must know of mlx-lm's LoRA layers.

Which modules a run adapts and what a unit of rank costs on each, the tensor
shapes an adapter must have, building LoRA layers at given ranks and loading
weights into them. Plain functions on models; they raise nothing of their
own for bad input, so the callers say what is wrong with which file. Imports
nothing from this package.
"""

import contextlib
import sys

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten


def _tuner_utils():
    return sys.modules["mlx_lm.tuner.utils"]


def _lora_classes(tuner_utils):
    """The LoRA/DoRA layer classes ``linear_to_lora_layers`` looks up by name."""
    return [
        name
        for name, value in vars(tuner_utils).items()
        if isinstance(value, type) and hasattr(value, "from_base")
    ]


@contextlib.contextmanager
def _probing(seen, paths):
    """Make ``linear_to_lora_layers`` record the layers it would convert, and
    hand each back unchanged."""

    class Probe:
        @staticmethod
        def from_base(layer, **kwargs):
            seen.append((paths[id(layer)], layer))
            return layer

    tuner_utils = _tuner_utils()
    saved = {name: getattr(tuner_utils, name) for name in _lora_classes(tuner_utils)}
    try:
        for name in saved:
            setattr(tuner_utils, name, Probe)
        yield
    finally:
        for name, cls in saved.items():
            setattr(tuner_utils, name, cls)


def own_lora_builders(model):
    """Module paths of layers that build their own LoRA layer (``to_lora``)."""
    return [p for p, m in model.named_modules() if hasattr(m, "to_lora")]


def adapted_modules(model, num_layers, lora_parameters, use_dora=False):
    """Return ``[(module path, module)]`` that ``linear_to_lora_layers`` would adapt.

    Runs mlx-lm's own selection with stand-in layer classes that hand the
    base layer back unchanged, so the answer follows mlx-lm's rules exactly
    and the model, and the random stream, are left untouched.
    """
    import mlx_lm.tuner.utils  # noqa: F401 - the module the probe patches

    paths = {id(m): p for p, m in model.named_modules()}
    seen = []
    convert_fn = _tuner_utils().linear_to_lora_layers
    convert_fn = getattr(convert_fn, "__optiq_original__", convert_fn)
    params = {k: v for k, v in lora_parameters.items() if k != "rank_pattern"}
    with _probing(seen, paths):
        convert_fn(model, num_layers, params, use_dora=use_dora)
    return seen


def linear_dims(module):
    """``(in, out)`` of a linear layer, quantized or not."""
    out_dims, in_dims = module.weight.shape
    if isinstance(module, nn.QuantizedLinear):
        in_dims = in_dims * 32 // module.bits
    return in_dims, out_dims


def model_linear_dims(model):
    """``{module path: (in, out)}`` of every linear layer (quantized or not)."""
    return {
        path: linear_dims(module)
        for path, module in model.named_modules()
        if isinstance(module, (nn.Linear, nn.QuantizedLinear))
    }


def base_layer(module):
    """The layer a LoRA layer wraps (``module`` itself when it is not one)."""
    return getattr(module, "linear", module)


def describe_module(module):
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


def adapter_shapes(module, rank, use_dora=False):
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


def expected_tensors(model, num_layers, lora_parameters, rank_pattern, use_dora):
    """``{tensor name: shape}`` an adapter with these settings holds for ``model``,
    and the module paths it adapts."""
    rank_pattern = rank_pattern or {}
    targets = adapted_modules(model, num_layers, lora_parameters, use_dora)
    expected = {}
    for path, module in targets:
        rank = rank_pattern.get(path, lora_parameters["rank"])
        if rank == 0:
            continue  # left out: no tensors
        for leaf, shape in adapter_shapes(module, rank, use_dora).items():
            expected[f"{path}.{leaf}"] = shape
    return expected, [path for path, _ in targets]


def convert(model, num_layers, lora_parameters, use_dora=False):
    """mlx-lm's ``linear_to_lora_layers`` (with ``rank_pattern``: patched or shimmed)."""
    _tuner_utils().linear_to_lora_layers(
        model, num_layers, lora_parameters, use_dora=use_dora
    )
    return model


def load_weights(model, tensors):
    """Load adapter tensors (``{name: array}``) into a converted model."""
    model.load_weights(list(tensors.items()), strict=False)
    return model


def lora_layers(model, modules, dropout=0.0):
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


def dequantized_copies(model):
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


def dequantized_size(model):
    """Bytes the weights of :func:`dequantized_copies` would take."""
    size = 0
    for _, module in model.named_modules():
        if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            rows, packed = module.weight.shape
            size += rows * packed * 32 // module.bits * module.scales.dtype.size
    return size


def swap_in(model, layers):
    """Put ``[(module path, layer)]`` into ``model`` in place of what is there."""
    model.update_modules(tree_unflatten(layers))
    return model
