"""The gradient signal: ``mlx_lm_optiq.sensitivity MODEL --data DIR --signal gradient``.

For each linear module of each transformer block, the gradient ``G`` of the
next-token loss on rows of the training data with respect to the module's
weight (dequantized, for a quantized module: the base on disk never
changes), averaged over the batches, and from it:

- ``grad_norm``: ``||G||_F``;
- ``importance``: ``mean |W * G|``, the first-order estimate of how much the
  loss depends on the module's weights (GoRA's), which ``--rank-scaling
  by_grad`` spreads the budget by;
- the top ``--signal-rank`` singular values of ``G`` (in the JSON) and its
  right singular vectors (``optiq/gradient.safetensors``, ``PATH.right``:
  ``k x in``), the directions a first step of full fine-tuning would move
  the module's inputs along.

The gradients of a group of blocks are taken together, as many blocks as fit
in ``--cache-gb`` of float32 gradients, each group over all the rows; both
files are rewritten (atomically) after every group, so Ctrl-C leaves files
the same command resumes.
"""

import argparse
import hashlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Dict, List, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from . import __version__, measuring
from .atomic import atomic_write, atomic_write_json
from .errors import OptiqError
from .metadata import GRADIENT, resolve_model_dir

SIGNAL = "gradient of the next-token loss w.r.t. each module's weight"


class _Probe(nn.Module):
    """A frozen linear layer plus a zero weight offset whose gradient is the
    gradient with respect to the layer's own (dequantized) weight."""

    def __init__(self, base: nn.Module, shape: Tuple[int, int]):
        super().__init__()
        self.base = base
        self.delta = mx.zeros(shape)

    def __call__(self, x):
        return self.base(x) + (x @ self.delta.T).astype(x.dtype)


def next_token_loss(model, tokens, mask):
    """Mean cross-entropy of each next token where ``mask`` is 1."""
    logits = model(tokens[:, :-1]).astype(mx.float32)
    ce = nn.losses.cross_entropy(logits, tokens[:, 1:], reduction="none")
    weights = mask[:, 1:]
    return (ce * weights).sum() / weights.sum()


def group_gradients(model, group, batches) -> Dict[str, mx.array]:
    """``{module path: G}`` for the targets in ``group``, averaged over ``batches``."""
    placed = []
    for target in group:
        weight = measuring.as_float(target.module).weight
        probe = _Probe(target.module, weight.shape)
        measuring.put(model.layers[target.block], target.inside, probe)
        placed.append((target, probe))
    try:
        model.freeze()
        for _, probe in placed:
            probe.unfreeze(keys=["delta"], recurse=False)
        grad_fn = nn.value_and_grad(model, next_token_loss)
        total = None
        for tokens, mask in batches:
            _, grads = grad_fn(model, tokens, mask)
            flat = dict(tree_flatten(grads))
            grads = {t.path: flat[f"{t.path}.delta"] for t, _ in placed}
            total = (
                grads if total is None else {p: total[p] + g for p, g in grads.items()}
            )
            mx.eval(total)
        return {p: g / len(batches) for p, g in total.items()}
    finally:
        for target, _ in placed:
            measuring.put(model.layers[target.block], target.inside, target.module)
        model.unfreeze()


def top_right_singular(g: mx.array, k: int) -> Tuple[mx.array, mx.array]:
    """The ``k`` largest singular values of ``g`` (out x in) and its right
    singular vectors (``k x in``), each vector's largest entry positive.

    From the smaller Gram matrix, made on the device; its ``eigh`` by numpy
    (LAPACK on the CPU, several times faster than MLX's CPU ``eigh``; MLX has
    no GPU one): the vectors a full SVD would give for distinct singular values.
    """
    import numpy as np

    g = g.astype(mx.float32)
    out_dims, in_dims = g.shape
    k = min(k, out_dims, in_dims)
    gram = g.T @ g if in_dims <= out_dims else g @ g.T
    values, vectors = np.linalg.eigh(np.array(gram))  # ascending
    sigma = mx.array(np.sqrt(np.maximum(values[::-1][:k], 0.0)))
    vectors = mx.array(np.ascontiguousarray(vectors[:, ::-1][:, :k]))
    if in_dims > out_dims:  # left vectors: v = g^T u / sigma
        vectors = (g.T @ vectors) / mx.maximum(sigma, 1e-30)
    right = vectors.T
    peak = mx.take_along_axis(right, mx.argmax(mx.abs(right), axis=1)[:, None], 1)
    return sigma, right * mx.where(peak < 0, -1.0, 1.0)


def _module_stats(target, g, k):
    weight = measuring.as_float(target.module).weight.astype(mx.float32)
    sigma, right = top_right_singular(g, k)
    stats = {
        "grad_norm": mx.sqrt((g * g).sum()).item(),
        "importance": mx.abs(weight * g).mean().item(),
        "sigma": [round(s, 8) for s in sigma.tolist()],
    }
    for name, value in stats.items():
        if not all(math.isfinite(v) for v in (value if isinstance(value, list) else [value])):  # fmt: skip
            raise OptiqError(f"{target.path}: the gradient's {name} is not finite")
    return stats, right


def groups(targets, budget_bytes: float) -> List[list]:
    """Consecutive whole blocks of ``targets`` whose float32 gradients (and
    offsets) fit in ``budget_bytes``; at least one block each."""
    found, current, size, block = [], [], 0, None
    for target in targets:
        out_dims, in_dims = measuring.as_float(target.module).weight.shape
        cost = 3 * 4 * out_dims * in_dims  # offset, gradient, running sum
        if current and target.block != block and size + cost > budget_bytes:
            found.append(current)
            current, size = [], 0
        current.append(target)
        size, block = size + cost, target.block
    return found + ([current] if current else [])


def settings_of(args, sequences, model_path) -> dict:
    fingerprint = hashlib.sha256(json.dumps(sequences).encode()).hexdigest()[:16]
    return {
        "model": str(model_path),
        "samples": len(sequences),
        "max_seq_length": args.max_seq_length,
        "batch_size": args.batch_size,
        "signal_rank": args.signal_rank,
        "data_fingerprint": fingerprint,
    }


def _resume(out, vectors, settings):
    """``(modules, right vectors)`` of an earlier run with the same settings."""
    if not out.is_file():
        return {}, {}
    from .adapter_read import load_tensors

    doc = measuring.earlier_pass(out, settings)
    right = load_tensors(vectors) if vectors.is_file() else {}
    modules = {p: m for p, m in doc.get("modules", {}).items() if f"{p}.right" in right}
    return modules, {f"{p}.right": right[f"{p}.right"] for p in modules}


def _write(out, vectors, settings, modules, right, complete):
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(vectors, lambda tmp: mx.save_safetensors(tmp, right))
    atomic_write_json(out, {
        "signal": SIGNAL, **settings, "modules": modules, "complete": complete,
        "tool": f"mlx_lm_optiq.sensitivity --signal gradient {__version__}",
    })  # fmt: skip


def measure(args: argparse.Namespace) -> Path:
    import mlx_lm
    from tqdm import tqdm

    model, tokenizer = mlx_lm.load(args.model)
    model_path = resolve_model_dir(args.model) or Path(args.model)
    out = Path(args.output) if args.output else model_path / GRADIENT
    vectors = out.with_suffix(".safetensors")  # GRADIENT_VECTORS by default
    sequences = measuring.token_sequences(
        tokenizer, args.data, args.samples, args.max_seq_length
    )
    settings = settings_of(args, sequences, model_path)
    modules, right = ({}, {}) if args.restart else _resume(out, vectors, settings)
    selected = (measuring.layer_set(args.layers), measuring.module_set(args.modules))
    targets = [
        t for t in measuring.block_targets(model) if measuring.selected(t, *selected)
    ]
    todo = [t for t in targets if t.path not in modules]
    if not targets:
        raise OptiqError("--layers and --modules leave no module to measure")
    batches = list(measuring.batches(sequences, args.batch_size))
    parts = groups(todo, args.cache_gb * 1e9)
    if modules:
        print(f"resuming: {len(modules)} modules already measured in {out}")
    print(
        f"gradient signal: {len(todo)} modules in {len(parts)} group(s) of blocks, "
        f"{len(batches)} batches each (forward and backward)"
    )
    order = {t.path: i for i, t in enumerate(measuring.block_targets(model))}
    bar = tqdm(total=len(todo), desc="gradient", unit="module")
    tic = time.perf_counter()
    try:
        for n, group in enumerate(parts, 1):
            for target, g in zip(
                group, group_gradients(model, group, batches).values()
            ):
                modules[target.path], right[f"{target.path}.right"] = _module_stats(
                    target, g, args.signal_rank
                )
            modules = dict(sorted(modules.items(), key=lambda kv: order.get(kv[0], 0)))
            _write(out, vectors, settings, modules, right, complete=False)
            bar.update(len(group))
            if n == 1 and len(parts) > 1:
                each = time.perf_counter() - tic
                bar.write(f"gradient: {each:.1f} s per group; about "
                          f"{measuring.duration(each * (len(parts) - 1))} for the other {len(parts) - 1}")  # fmt: skip
    except KeyboardInterrupt:
        print(f"\ninterrupted: {len(modules)} of {len(targets)} modules are in {out}; "
              "the same command resumes from there", file=sys.stderr)  # fmt: skip
        raise SystemExit(130) from None
    bar.close()
    _write(out, vectors, settings, modules, right, complete=True)
    top = max(modules, key=lambda p: modules[p]["importance"])
    print(f"wrote {out} and {vectors.name}: {len(modules)} modules; the most "
          f"important: {top} (mean |W*G| {modules[top]['importance']:.3g})")  # fmt: skip
    return out


def init_lora_a(model, model_dir, report=print) -> int:
    """Set each LoRA layer's ``lora_a`` (``in x r``) from the top ``r`` right
    singular vectors of its weight's gradient (``optiq/gradient.safetensors``
    of ``model_dir``), scaled to mlx-lm's initial column norm (``1/sqrt(3)``,
    that of its uniform draw); ``lora_b`` stays zero, so the model starts
    as the base. Columns beyond the vectors measured keep mlx-lm's draw.
    Returns how many layers were set.
    """
    from .adapter_read import load_tensors
    from .metadata import GRADIENT_VECTORS

    path = Path(model_dir) / GRADIENT_VECTORS if model_dir else None
    if path is None or not path.is_file():
        raise OptiqError(
            "--lora-init gradient needs the gradient signal, and there is no "
            f"{GRADIENT_VECTORS}: run mlx_lm_optiq.sensitivity MODEL --data DATA "
            "--signal gradient first",
            path,
        )
    vectors = load_tensors(path)
    layers = [(p, m) for p, m in model.named_modules() if "lora_a" in m and m["lora_a"].ndim == 2]  # fmt: skip
    missing = [p for p, _ in layers if f"{p}.right" not in vectors]
    if missing:
        raise OptiqError(
            f"no gradient vectors for {len(missing)} adapted modules (e.g. "
            f"{missing[0]}); measure them with --signal gradient", path
        )  # fmt: skip
    for module_path, layer in layers:
        right = vectors[f"{module_path}.right"]
        in_dims, rank = layer.lora_a.shape
        if right.shape[1] != in_dims:
            raise OptiqError(
                f"{module_path}: gradient vectors of {right.shape[1]} inputs for a "
                f"layer of {in_dims}: measured on another model?", path
            )  # fmt: skip
        k = min(rank, right.shape[0])
        top = right[:k].T.astype(layer.lora_a.dtype) / math.sqrt(3)
        layer.lora_a = mx.concatenate([top, layer.lora_a[:, k:]], axis=1)
    mx.eval(model.trainable_parameters())
    report(f"lora_a of {len(layers)} modules from the gradient's top right singular vectors ({path})")  # fmt: skip
    return len(layers)
