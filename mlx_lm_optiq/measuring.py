"""What the measuring passes share (``sensitivity``'s KL and gradient signals).

The model's block linear modules, a module as float, rows of the training
data as token batches, the ``--layers``/``--modules`` selection.
"""

import json
from pathlib import Path
from typing import List, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from .errors import OptiqError


def block_linears(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """``[(module path, module)]`` for every linear layer inside ``model.layers``."""
    return [(t.path, t.module) for t in block_targets(model)]


class Target:
    """A module to measure: its block, its path in the model and in the block."""

    def __init__(self, block, path, inside, module):
        self.block, self.path, self.inside, self.module = block, path, inside, module


def block_targets(model):
    paths = {id(m): p for p, m in model.named_modules()}
    found = []
    for i, block in enumerate(model.layers):
        for inside, module in block.named_modules():
            if isinstance(module, (nn.Linear, nn.QuantizedLinear)):
                found.append(Target(i, paths[id(module)], inside, module))
    return found


def as_float(module: nn.Module) -> nn.Module:
    """The module as an ``nn.Linear`` (dequantized if it is quantized)."""
    if not isinstance(module, nn.QuantizedLinear):
        return module
    weight = mx.dequantize(
        module.weight,
        module.scales,
        module.biases,
        group_size=module.group_size,
        bits=module.bits,
        mode=module.mode,
    )
    out_dims, in_dims = weight.shape
    linear = nn.Linear(in_dims, out_dims, bias="bias" in module)
    linear.weight = weight
    if "bias" in module:
        linear.bias = module.bias
    return linear


def batches(sequences, batch_size):
    for i in range(0, len(sequences), batch_size):
        chunk = sequences[i : i + batch_size]
        length = max(len(s) for s in chunk)
        tokens = mx.array([s + [0] * (length - len(s)) for s in chunk])
        mask = mx.array([[1.0] * len(s) + [0.0] * (length - len(s)) for s in chunk])
        yield tokens, mask


def put(block, inside, module):
    block.update_modules(tree_unflatten([(inside, module)]))


def token_sequences(
    tokenizer, data_dir, count: int, max_length: int
) -> List[List[int]]:
    """The first ``count`` rows of ``train.jsonl`` (else ``valid.jsonl``) as
    token lists, through mlx-lm's own dataset classes (text, chat, completions)."""
    import types

    from mlx_lm.tuner.datasets import create_dataset

    for name in ("train.jsonl", "valid.jsonl"):
        path = Path(data_dir) / name
        if path.is_file():
            break
    else:
        raise OptiqError("no train.jsonl or valid.jsonl", data_dir)
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if len(rows) == count:
                    break
                if line.strip():
                    rows.append(json.loads(line))
    except UnicodeDecodeError as e:
        raise OptiqError(f"not UTF-8 text ({e})", path) from None
    except (json.JSONDecodeError, RecursionError) as e:
        raise OptiqError(f"line {number}: not a JSON row ({e})", path) from None
    if not rows:
        raise OptiqError("no rows", path)
    try:
        dataset = create_dataset(rows, tokenizer, types.SimpleNamespace())
        sequences = []
        for i in range(len(dataset)):
            tokens = dataset.process(dataset[i])
            tokens = tokens[0] if isinstance(tokens, tuple) else tokens
            sequences.append(list(tokens)[:max_length])
    except (ValueError, KeyError, TypeError) as e:
        raise OptiqError(f"rows mlx-lm can't read ({type(e).__name__}: {e})", path) from e  # fmt: skip
    if not any(len(s) > 1 for s in sequences):
        raise OptiqError("no row has two tokens or more to measure on", path)
    return sequences


def selected(target, layers, modules):
    if layers is not None and target.block not in layers:
        return False
    return modules is None or target.path.rsplit(".", 1)[-1] in modules


def duration(seconds):
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def layer_set(text):
    if text is None:
        return None
    found = set()
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        found.update(range(int(lo), int(hi or lo) + 1))
    return found


def module_set(text):
    return None if text is None else {m.strip() for m in text.split(",")}


def earlier_pass(out: Path, settings: dict) -> dict:
    """The document an earlier run of a measuring pass left in ``out``, if it
    was measured with the same ``settings`` (else the command stops)."""
    from .adapter_read import read_json

    doc = read_json(out)
    previous = {k: doc.get(k) for k in settings}
    if previous != settings:
        changed = [k for k in settings if previous[k] != settings[k]]
        raise OptiqError(
            f"was measured with other settings ({', '.join(changed)}); "
            "pass -o to write elsewhere, or --restart to measure again",
            out,
        )
    return doc
