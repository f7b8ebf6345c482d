"""Measure quantization sensitivity: ``python -m mlx_lm_optiq.sensitivity MODEL --data DIR``.

For each linear module of each transformer block and each candidate
bit-width, quantize that module alone, run the model on text from the
training data, and record the KL divergence of its next-token distribution
from the model as loaded. The result is OptiQ's ``optiq/sensitivity.json``
shape, which ``--rank-scaling by_kl`` and ``mlx_lm_optiq.quantize`` read.

The file is rewritten (atomically) after every module, so an interrupted run
resumes where it stopped when started again with the same settings.
"""

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from . import __version__
from ._cli import run_command
from .atomic import atomic_write_json
from .errors import OptiqError
from .metadata import SENSITIVITY

METRIC = "kl_divergence_vs_reference"


def block_linears(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """``[(module path, module)]`` for every linear layer inside ``model.layers``."""
    paths = {id(m): p for p, m in model.named_modules()}
    found = []
    for block in model.layers:
        for _, module in block.named_modules():
            if isinstance(module, (nn.Linear, nn.QuantizedLinear)):
                found.append((paths[id(module)], module))
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


def quantized(module: nn.Module, bits: int, group_size: int) -> nn.QuantizedLinear:
    return nn.QuantizedLinear.from_linear(as_float(module), group_size, bits)


def _set_module(model, path, module):
    model.update_modules(tree_unflatten([(path, module)]))


def _batches(sequences, batch_size):
    for i in range(0, len(sequences), batch_size):
        chunk = sequences[i : i + batch_size]
        length = max(len(s) for s in chunk)
        tokens = mx.array([s + [0] * (length - len(s)) for s in chunk])
        mask = mx.array([[1.0] * len(s) + [0.0] * (length - len(s)) for s in chunk])
        yield tokens, mask


def _log_probs(model, tokens):
    logits = model(tokens).astype(mx.float32)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def mean_kl(model: nn.Module, batches, reference) -> float:
    """Mean over real tokens of KL(reference || model)."""
    total, count = 0.0, 0.0
    for (tokens, mask), ref in zip(batches, reference):
        logq = _log_probs(model, tokens)
        kl = (mx.exp(ref) * (ref - logq)).sum(axis=-1)
        total += (kl * mask).sum().item()
        count += mask.sum().item()
    return max(total / count, 0.0)


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
    with open(path) as f:
        rows = [json.loads(line) for line, _ in zip(f, range(count)) if line.strip()]
    if not rows:
        raise OptiqError("no rows", path)
    dataset = create_dataset(rows, tokenizer, types.SimpleNamespace())
    sequences = []
    for i in range(len(dataset)):
        tokens = dataset.process(dataset[i])
        tokens = tokens[0] if isinstance(tokens, tuple) else tokens
        sequences.append(list(tokens)[:max_length])
    return sequences


def settings_of(args: argparse.Namespace, sequences, model_path) -> dict:
    fingerprint = hashlib.sha256(json.dumps(sequences).encode()).hexdigest()[:16]
    return {
        "model": str(model_path),
        "candidate_bits": args.bits,
        "group_size": args.group_size,
        "samples": len(sequences),
        "max_seq_length": args.max_seq_length,
        "data_fingerprint": fingerprint,
    }


def _resume(out, settings):
    if not out.is_file():
        return {}
    doc = json.loads(out.read_text())
    previous = {k: doc.get(k) for k in settings}
    if previous != settings:
        changed = [k for k in settings if previous[k] != settings[k]]
        raise OptiqError(
            f"was measured with other settings ({', '.join(changed)}); "
            "pass -o to write elsewhere, or --restart to measure again",
            out,
        )
    return {layer["layer_name"]: layer for layer in doc.get("layers", [])}


def measure(args: argparse.Namespace) -> Path:
    import mlx_lm
    from tqdm import tqdm

    model_path = Path(args.model)
    out = Path(args.output) if args.output else model_path / SENSITIVITY
    model, tokenizer = mlx_lm.load(str(model_path))
    sequences = token_sequences(tokenizer, args.data, args.samples, args.max_seq_length)
    settings = settings_of(args, sequences, model_path)
    done = {} if args.restart else _resume(out, settings)
    targets = block_linears(model)
    if any(isinstance(m, nn.QuantizedLinear) for _, m in targets):
        print(
            "note: the model is already quantized: measuring re-quantization of each "
            f"module at the candidate bits ({args.bits}) that are below its own, "
            "against the model as loaded (0 for the others)"
        )
    if done:
        print(
            f"resuming: {len(done)} of {len(targets)} modules already measured in {out}"
        )
    batches = list(_batches(sequences, args.batch_size))
    reference = [_log_probs(model, tokens) for tokens, _ in batches]
    mx.eval(reference)

    layers = []
    skipped = {p: why for p, m in targets if (why := unquantizable(m, args.group_size))}
    if skipped:
        print(
            f"note: {len(skipped)} modules can't be quantized at group size "
            f"{args.group_size} and stay unquantized, as mlx-lm leaves them: "
            f"{_names(skipped)}"
        )
    todo = [(p, m) for p, m in targets if p not in done and p not in skipped]
    bar = tqdm(total=len(todo) * len(args.bits), desc="sensitivity", unit="quant")
    out.parent.mkdir(parents=True, exist_ok=True)
    for path, module in targets:
        if path in done:
            layers.append(done[path])
            continue
        if path in skipped:
            layers.append(_layer(path, module, {}, skipped=skipped[path]))
            continue
        sensitivities = {}
        for bits in args.bits:
            if getattr(module, "bits", 16) > bits:
                _set_module(model, path, quantized(module, bits, args.group_size))
                sensitivities[str(bits)] = mean_kl(model, batches, reference)
                _set_module(model, path, module)
            else:
                sensitivities[str(bits)] = 0.0
            bar.update(1)
        layers.append(_layer(path, module, sensitivities))
        _write(out, settings, layers, complete=False)
    bar.close()
    _write(out, settings, layers, complete=True)
    print(_summary(out, layers, skipped, min(args.bits)))
    return out


def _layer(path, module, sensitivities, skipped=None):
    """One entry of the ``layers`` list of ``optiq/sensitivity.json``."""
    in_dims, out_dims = as_float(module).weight.shape[::-1]
    entry = {"layer_name": path, "sensitivities": sensitivities}
    if skipped:
        entry["skipped"] = skipped
    return {**entry, "param_count": in_dims * out_dims}


def _summary(out, layers, skipped, lowest):
    measured = [l for l in layers if not l.get("skipped")]
    line = f"wrote {out}: {len(measured)} modules measured"
    if skipped:
        line += f", {len(skipped)} skipped (not quantizable)"
    if measured:
        worst = max(measured, key=lambda l: l["sensitivities"][str(lowest)])
        line += (
            f"; most sensitive at {lowest} bits: {worst['layer_name']} "
            f"(KL {worst['sensitivities'][str(lowest)]:.4g})"
        )
    return line


def unquantizable(module: nn.Module, group_size: int) -> Optional[str]:
    """Why mlx-lm would leave ``module`` unquantized at ``group_size``, or ``None``."""
    in_dims = as_float(module).weight.shape[-1]
    if in_dims % group_size:
        return f"input dimension {in_dims} is not a multiple of the group size {group_size}"
    return None


def _names(modules, n=3):
    names = sorted(modules)
    return ", ".join(names[:n]) + (
        f", … ({len(names)} in all)" if len(names) > n else ""
    )


def _write(out, settings, layers, complete):
    atomic_write_json(
        out,
        {
            "metric": METRIC,
            **settings,
            "layers": layers,
            "complete": complete,
            "tool": f"mlx_lm_optiq.sensitivity {__version__}",
        },
    )


def _bits(text):
    try:
        bits = sorted({int(b) for b in text.split(",")})
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        )
    if any(b not in (2, 3, 4, 5, 6, 8) for b in bits):
        raise argparse.ArgumentTypeError("bits must be among 2, 3, 4, 5, 6, 8")
    return bits


def add_quantization_arguments(parser: argparse.ArgumentParser) -> None:
    """``--bits`` and ``--group-size``, the same for sensitivity and quantize."""
    parser.add_argument(
        "--bits", type=_bits, default=[4, 8], help="candidate bit-widths (default 4,8)"
    )
    parser.add_argument(
        "--group-size",
        type=int,
        default=64,
        help="quantization group size (default 64)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mlx_lm_optiq.sensitivity",
        description="Measure, per linear module, the KL divergence caused by "
        "quantizing that module alone, on text from the training data. Writes "
        "MODEL/optiq/sensitivity.json (OptiQ's format).",
    )
    parser.add_argument("model", help="local mlx-lm model directory")
    parser.add_argument(
        "--data", required=True, help="directory with train.jsonl (mlx-lm formats)"
    )
    add_quantization_arguments(parser)
    parser.add_argument(
        "--samples",
        type=int,
        default=16,
        help="training rows to measure on (default 16)",
    )
    parser.add_argument(
        "--max-seq-length", type=int, default=128, help="tokens per row (default 128)"
    )
    parser.add_argument(
        "--batch-size", type=int, default=8, help="rows per forward pass (default 8)"
    )
    parser.add_argument(
        "-o", "--output", help="where to write (default MODEL/optiq/sensitivity.json)"
    )
    parser.add_argument(
        "--restart", action="store_true", help="ignore a previous partial file"
    )
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    return run_command(measure, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
