"""Measure quantization sensitivity: ``mlx_lm_optiq.sensitivity MODEL --data DIR``.

For each linear module of each transformer block and each candidate
bit-width, quantize that module alone, run the model on rows of the
training data, and record the KL divergence of its next-token distribution
from the model as loaded. The result is OptiQ's ``optiq/sensitivity.json``
shape, which ``--rank-scaling by_kl`` and ``mlx_lm_optiq.quantize`` read.

A trial changes nothing before its own block, so the reference pass keeps
every block's input (every k-th block's when they would take more than
``--cache-gb``), and a block's trials (its modules at every candidate
bit-width) run from there stacked into one batch that stops at the final
hidden states; each trial's logits are then made one at a time (without a
head that can be applied alone, a module's bit-widths are stacked and the
model's own logits used). Before the first trial the command prints how
many there are, and after the first pass the measured seconds per trial and
an estimate. ``--layers`` and ``--modules`` limit what is measured. The
file is rewritten (atomically) after every pass, so Ctrl-C leaves a file
the same command resumes, never an empty folder.
"""

import argparse
import hashlib
import json
import math
import re
import sys
import time
from pathlib import Path
from typing import List, Optional

import mlx.core as mx
import mlx.nn as nn

from . import __version__, measuring
from ._cli import add_version, run_command
from .atomic import atomic_write_json
from .errors import OptiqError
from .metadata import SENSITIVITY, resolve_model_dir

METRIC = "kl_divergence_vs_reference"
GROUP_SIZES = (32, 64, 128)


def quantized(module: nn.Module, bits: int, group_size: int) -> nn.QuantizedLinear:
    return nn.QuantizedLinear.from_linear(measuring.as_float(module), group_size, bits)


# -- the reference pass and the trials ------------------------------------------


class _StandIn:
    """Stands in for a block in the model's own loop over ``model.layers``;
    anything else asked of it is the block's."""

    def __init__(self, block, call):
        self._block, self._call = block, call

    def __call__(self, x, *args, **kwargs):
        return self._call(x, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._block, name)


STACKED_TOKENS = 65536  # at most this many tokens in one stacked pass


class Reference:
    """The model as loaded, on every batch: each block's input (every
    ``stride``-th block's) and the next-token distribution. Trials run from
    the cached input at or before their block, many stacked in one pass: with
    a head it can apply alone (``train_step.find_head``) the pass stops at the
    final hidden states and each trial's logits exist one at a time."""

    def __init__(self, model, batches, cache_bytes):
        from .train_step import find_head

        self.model, self.batches = model, batches
        self.head, _ = find_head(model)
        tokens = sum(t.size for t, _ in batches)
        per_block = tokens * _hidden_bytes(model)
        self.stride = max(1, math.ceil(len(model.layers) * per_block / cache_bytes))
        self.inputs, self.log_probs = [], []
        self.cached = True
        for tokens, _ in batches:
            seen = {}
            logits = self._run(tokens, {i: self._recorder(i, seen) for i in range(len(model.layers))}).astype(mx.float32)  # fmt: skip
            if len(seen) != len(model.layers):
                self.cached = False  # the model doesn't loop over model.layers
            keep = {i: h for i, h in seen.items() if i % self.stride == 0}
            log_probs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            mx.eval(keep, log_probs)
            if not mx.all(mx.isfinite(log_probs)).item():
                raise OptiqError(
                    "the model's own next-token distribution holds NaN or inf: its "
                    "weights are broken, and there is nothing to measure against"
                )
            self.inputs.append(keep)
            self.log_probs.append(log_probs)

    def _recorder(self, i, seen):
        block = self.model.layers[i]

        def record(x, *args, **kwargs):
            seen[i] = x
            return block(x, *args, **kwargs)

        return _StandIn(block, record)

    def _run(self, tokens, stand_ins, hidden=False):
        """The model on ``tokens`` with some blocks stood in for: float32
        logits, or (``hidden``) the backbone's final hidden states."""
        blocks = self.model.layers
        saved = list(blocks)
        try:
            for i, stand_in in stand_ins.items():
                blocks[i] = stand_in
            return (self.model.model if hidden else self.model)(tokens)
        finally:
            blocks[:] = saved

    def stack_size(self) -> int:
        """How many trials of one block run in one pass: as many as fit in
        :data:`STACKED_TOKENS` with a head, else the versions of one module
        (the stacked logits of more would take the memory)."""
        if self.head is None or not self.cached:
            return 0
        tokens = max(t.size for t, _ in self.batches)
        return max(2, STACKED_TOKENS // tokens)

    def _outputs(self, b, tokens, trials):
        """Every trial's output stacked (``(target, version)`` pairs, one block):
        one pass from the cached input at or before the block."""
        use_head = self.head is not None
        if not self.cached:
            outs = []
            for target, version in trials:
                measuring.put(self.model.layers[target.block], target.inside, version)
                outs.append(self._run(tokens, {}, use_head))
                measuring.put(self.model.layers[target.block], target.inside, target.module)  # fmt: skip
            return mx.concatenate(outs, axis=0)
        index = trials[0][0].block
        block = self.model.layers[index]
        start = index // self.stride * self.stride
        hidden = self.inputs[b][start]

        def stacked(x, *args, **kwargs):
            outs = []
            for target, version in trials:
                measuring.put(block, target.inside, version)
                outs.append(block(x, *args, **kwargs))
                measuring.put(block, target.inside, target.module)
            return mx.concatenate(outs, axis=0)

        stand_ins = {i: _StandIn(self.model.layers[i], lambda x, *a, **k: hidden) for i in range(start)}  # fmt: skip
        stand_ins[index] = _StandIn(block, stacked)
        return self._run(tokens, stand_ins, use_head)

    def kl(self, target, versions) -> List[float]:
        """One KL per version of ``target``'s module (:meth:`kl_trials`)."""
        return self.kl_trials([(target, v) for v in versions])

    def kl_trials(self, trials) -> List[float]:
        """Mean KL(reference || model) over real tokens for each ``(target,
        version)`` (all in one block): every trial in one pass per batch."""
        totals = [mx.array(0.0) for _ in trials]
        count = 0.0
        try:
            for b, (tokens, mask) in enumerate(self.batches):
                out = self._outputs(b, tokens, trials)
                n, ref = tokens.shape[0], self.log_probs[b]
                for k in range(len(trials)):
                    z = out[k * n : (k + 1) * n]
                    z = (self.head(z) if self.head is not None else z).astype(
                        mx.float32
                    )
                    logq = z - mx.logsumexp(z, axis=-1, keepdims=True)
                    kl = (mx.exp(ref) * (ref - logq)).sum(axis=-1)
                    totals[k] = totals[k] + (kl * mask).sum()
                    mx.eval(totals[k])  # one trial's logits at a time
                count += mask.sum().item()
        finally:
            for target, _ in trials:
                measuring.put(self.model.layers[target.block], target.inside, target.module)  # fmt: skip
        return [max(t.item() / count, 0.0) for t in totals]

    def check(self, target):
        """Trials from the cache reproduce the reference (a model that does
        more between its blocks than the loop would not): else full passes."""
        if not self.cached:
            return
        try:
            drift = max(self.kl(target, [target.module, target.module]))
        except Exception:  # noqa: BLE001 - any failure: measure the slow way
            drift = math.inf
        if drift > 1e-6:
            self.cached = False
            print(
                "note: this model's blocks can't be run from their cached inputs; "
                "every trial runs the whole model"
            )


def _hidden_bytes(model):
    """Bytes of one token's hidden state in the blocks (for the cache budget)."""
    args = getattr(model, "args", None)
    hidden = getattr(args, "hidden_size", None) or 4096
    dtype = next(
        (v.dtype for _, v in _leaves(model) if mx.issubdtype(v.dtype, mx.floating)),
        mx.float32,
    )
    return hidden * dtype.size


def _leaves(model):
    from mlx.utils import tree_flatten

    return tree_flatten(model.parameters())


# -- data, settings, the file -----------------------------------------------------


def settings_of(args: argparse.Namespace, sequences, model_path) -> dict:
    fingerprint = hashlib.sha256(json.dumps(sequences).encode()).hexdigest()[:16]
    settings = {
        "model": str(model_path),
        "candidate_bits": args.bits,
        "group_size": args.group_size,
        "samples": len(sequences),
        "max_seq_length": args.max_seq_length,
        "data_fingerprint": fingerprint,
    }
    if args.layers or args.modules:  # a subset: quantize knows the rest is not measured
        settings["measured"] = {"layers": args.layers, "modules": args.modules}
    return settings


def _resume(out, settings):
    if not out.is_file():
        return {}
    doc = measuring.earlier_pass(out, settings)
    return {layer["layer_name"]: layer for layer in doc.get("layers", [])}


def _write(out, settings, layers, complete):
    out.parent.mkdir(parents=True, exist_ok=True)
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


def _layer(path, module, sensitivities, skipped=None):
    """One entry of the ``layers`` list of ``optiq/sensitivity.json``."""
    in_dims, out_dims = measuring.as_float(module).weight.shape[::-1]
    entry = {"layer_name": path, "sensitivities": sensitivities}
    if skipped:
        entry["skipped"] = skipped
    return {**entry, "param_count": in_dims * out_dims}


def unquantizable(module: nn.Module, group_size: int) -> Optional[str]:
    """Why mlx-lm would leave ``module`` unquantized at ``group_size``, or ``None``."""
    in_dims = measuring.as_float(module).weight.shape[-1]
    if in_dims % group_size:
        return f"input dimension {in_dims} is not a multiple of the group size {group_size}"
    return None


def _names(modules, n=3):
    names = sorted(modules)
    return ", ".join(names[:n]) + (
        f", … ({len(names)} in all)" if len(names) > n else ""
    )


# -- the command ------------------------------------------------------------------


def measure(args: argparse.Namespace) -> Path:
    if args.signal == "gradient":
        from . import gradient

        return gradient.measure(args)
    import mlx_lm

    model, tokenizer = mlx_lm.load(args.model)  # a Hugging Face id downloads first
    model_path = resolve_model_dir(args.model) or Path(args.model)
    out = Path(args.output) if args.output else model_path / SENSITIVITY
    sequences = measuring.token_sequences(
        tokenizer, args.data, args.samples, args.max_seq_length
    )
    settings = settings_of(args, sequences, model_path)
    done = {} if args.restart else _resume(out, settings)
    layer_set, module_set = measuring.layer_set(args.layers), measuring.module_set(
        args.modules
    )
    targets = [
        t
        for t in measuring.block_targets(model)
        if measuring.selected(t, layer_set, module_set)
    ]
    if not targets:
        raise OptiqError("--layers and --modules leave no module to measure")
    if any(isinstance(t.module, nn.QuantizedLinear) for t in targets):
        print(
            "note: the model is already quantized: measuring re-quantization of each "
            f"module at the candidate bits ({args.bits}) that are below its own, "
            "against the model as loaded (0 for the others)"
        )
    skipped = {
        t.path: why
        for t in targets
        if (why := unquantizable(t.module, args.group_size))
    }
    if skipped:
        print(
            f"note: {len(skipped)} modules can't be quantized at group size "
            f"{args.group_size} and stay unquantized, as mlx-lm leaves them: "
            f"{_names(skipped)}"
        )
    layers = [done[t.path] for t in targets if t.path in done]
    layers += [
        _layer(t.path, t.module, {}, skipped=skipped[t.path])
        for t in targets
        if t.path in skipped and t.path not in done
    ]
    todo = [t for t in targets if t.path not in done and t.path not in skipped]
    trials = sum(len(_versions_bits(t.module, args.bits)) for t in todo)
    if done:
        print(
            f"resuming: {len(done)} of {len(targets)} modules already measured in {out}"
        )
    print(
        f"sensitivity: {len(todo)} modules to measure, {trials} trials; each runs "
        "from its own block"
    )
    try:
        reference = Reference(
            model,
            list(measuring.batches(sequences, args.batch_size)),
            args.cache_gb * 1e9,
        )
        _write(out, settings, layers, complete=not todo)  # resumable from here on
        order = {t.path: i for i, t in enumerate(targets)}
        _measure_all(reference, todo, args, out, settings, layers, trials, order)
    except KeyboardInterrupt:
        print(
            f"\ninterrupted: {len(layers)} of {len(targets)} modules are in {out}; "
            "the same command resumes from there",
            file=sys.stderr,
        )
        raise SystemExit(130) from None
    _write(out, settings, layers, complete=True)
    print(_summary(out, layers, skipped, min(args.bits)))
    return out


def _versions_bits(module, candidates):
    return [b for b in candidates if getattr(module, "bits", 16) > b]


def trial_groups(reference, todo, candidates, group_size):
    """``[[(target, bits, version)]]``: the trials that run in one pass each,
    every module's versions together, a block's modules together as far as
    :meth:`Reference.stack_size` allows."""
    limit = reference.stack_size()
    groups, current = [], []
    for target in todo:
        trials = [(target, b, quantized(target.module, b, group_size))
                  for b in _versions_bits(target.module, candidates)]  # fmt: skip
        same_block = current and current[0][0].block == target.block
        if current and not (same_block and len(current) + len(trials) <= limit):
            groups.append(current)
            current = []
        current += trials
    return groups + ([current] if current else [])


def _measure_all(reference, todo, args, out, settings, layers, trials, order):
    from tqdm import tqdm

    if todo:
        reference.check(todo[len(todo) // 2])
    bar = tqdm(total=trials, desc="sensitivity", unit="trial")
    tic, timed = time.perf_counter(), 0
    measured = {t.path: {} for t in todo}
    for group in trial_groups(reference, todo, args.bits, args.group_size):
        kls = reference.kl_trials([(target, version) for target, _, version in group])
        for (target, b, _), kl in zip(group, kls):
            if not math.isfinite(kl):
                raise OptiqError(f"{target.path}: the KL at {b} bits is {kl}")
            measured[target.path][b] = kl
        for target in dict.fromkeys(target for target, _, _ in group):
            found = {str(b): measured[target.path].get(b, 0.0) for b in args.bits}
            layers.append(_layer(target.path, target.module, found))
        layers.sort(key=lambda l: order.get(l["layer_name"], len(order)))
        _write(out, settings, layers, complete=False)
        bar.update(len(group))
        timed += len(group)
        if timed == len(group) and timed < trials:  # after the first pass: an estimate
            each = (time.perf_counter() - tic) / timed
            bar.write(
                f"sensitivity: {each:.2f} s per trial; about "
                f"{measuring.duration(each * (trials - timed))} for the other {trials - timed}"
            )
    for target in todo:  # modules with no bits below their own: 0 at every bit-width
        if not measured[target.path] and target.path not in {l["layer_name"] for l in layers}:  # fmt: skip
            layers.append(_layer(target.path, target.module, {str(b): 0.0 for b in args.bits}))  # fmt: skip
    layers.sort(key=lambda l: order.get(l["layer_name"], len(order)))
    bar.close()


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


def _layers_arg(text):
    if not re.fullmatch(r"\d+(-\d+)?(,\d+(-\d+)?)*", text):
        raise argparse.ArgumentTypeError(
            f"expected block indices like 0-3,10, got {text!r}"
        )
    return text


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


def positive(kind):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or value <= 0:
            raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")  # fmt: skip
        return value

    return parse


def _group_size(text):
    if text not in {str(g) for g in GROUP_SIZES}:
        raise argparse.ArgumentTypeError(
            f"MLX quantizes in groups of {', '.join(map(str, GROUP_SIZES))}, got {text!r}"
        )
    return int(text)


def add_quantization_arguments(parser: argparse.ArgumentParser) -> None:
    """``--bits`` and ``--group-size``, the same for sensitivity and quantize."""
    parser.add_argument(
        "--bits", type=_bits, default=[4, 8], help="candidate bit-widths (default 4,8)"
    )
    parser.add_argument(
        "--group-size",
        type=_group_size,
        default=64,
        help="quantization group size: 32, 64 or 128 (default 64)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlx_lm_optiq.sensitivity",
        description="Measure, per linear module, the KL divergence caused by "
        "quantizing that module alone, on text from the training data. Writes "
        "MODEL/optiq/sensitivity.json (OptiQ's format). A block's trials run "
        "together from its cached input; the command says how many trials there "
        "are and, after the first pass, how long they will take. --signal "
        "gradient measures each module's weight gradient instead.",
    )
    parser.add_argument(
        "model",
        help="an mlx-lm model: a local directory, or a Hugging Face id (mlx-lm "
        "downloads it; the result goes in its directory in the Hugging Face cache, "
        "where --rank-scaling by_kl finds it)",
    )
    parser.add_argument(
        "--data", required=True, help="directory with train.jsonl (mlx-lm formats)"
    )
    add_quantization_arguments(parser)
    positive_int = positive(int)
    parser.add_argument("--samples", type=positive_int, default=16,
                        help="training rows to measure on (default 16)")  # fmt: skip
    parser.add_argument("--max-seq-length", type=positive_int, default=128,
                        help="tokens per row (default 128)")  # fmt: skip
    parser.add_argument("--batch-size", type=positive_int, default=8,
                        help="rows per forward pass (default 8)")  # fmt: skip
    parser.add_argument("--layers", type=_layers_arg, metavar="0-3,10",
                        help="measure only these blocks (the others get no KL: by_kl "
                        "keeps the base rank for them, quantize the highest bits)")  # fmt: skip
    parser.add_argument("--modules", metavar="q_proj,v_proj",
                        help="measure only these module kinds (the rest as for --layers)")  # fmt: skip
    parser.add_argument("--cache-gb", type=positive(float), default=4.0,
                        help="memory for the blocks' cached inputs (default 4); past it "
                        "every k-th block's input is kept and trials start there")  # fmt: skip
    parser.add_argument("--signal", choices=("kl", "gradient"), default="kl",
                        help="kl (default): the KL of quantizing each module alone; "
                        "gradient: the gradient of the training loss w.r.t. each "
                        "module's weight (its norm, importance and top singular "
                        "vectors, in optiq/gradient.json and gradient.safetensors; "
                        "--cache-gb then bounds the gradients' memory), for "
                        "--rank-scaling by_grad")  # fmt: skip
    parser.add_argument("--signal-rank", type=positive_int, default=32, metavar="K",
                        help="with --signal gradient: singular vectors kept per "
                        "module (default 32)")  # fmt: skip
    parser.add_argument(
        "-o", "--output", help="where to write (default MODEL/optiq/sensitivity.json)"
    )
    parser.add_argument(
        "--restart", action="store_true", help="ignore a previous partial file"
    )
    add_version(parser)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    return run_command(measure, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
