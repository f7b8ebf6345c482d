"""Which piece of a long-context training step runs out of memory first?

The step-speed map's plugin variant ran Llama-3.2-1B shapes to 65,536 tokens
and Llama-3.1-8B shapes to 32,768 at batch 1, then both failed with
``cudaMallocAsync ... out of memory`` at the same 2^28 hidden-state elements
(1B x 131,072, 8B x 65,536), far below the GPU's memory by their own trend.
This takes the step apart, MLX alone, each piece forward and backward in its
own process at each length (an out-of-memory abort loses one row):

- ``sdpa``: causal ``mx.fast.scaled_dot_product_attention``, bf16, the
  model's query and key/value heads, gradient w.r.t. q, k, v;
- ``rope``, ``norm``: ``mx.fast.rope`` and ``mx.fast.rms_norm`` and their
  gradients on the layer's activations;
- ``layer``: one decoder layer with rank-8 LoRA on its seven projections,
  checkpointed as mlx-lm's ``--grad-checkpoint`` does, gradient w.r.t. LoRA;
- ``attn``, ``mlp``: the layer's two halves alone (its attention with
  q/k/v/o LoRA, its MLP with gate/up/down LoRA), to say which half;
- ``loss``: the plugin's chunked cross-entropy from final hidden states, the
  tied 128k-vocabulary head, gradient w.r.t. the hidden states.

    python benchmarks/long_probe.py --size 1B --lengths 65536,98304,131072
    python benchmarks/long_probe.py --size 8B --lengths 32768,49152,65536

A row is the peak above the inputs (``mx.get_peak_memory``), the seconds,
and for a piece that failed the error with MLX's memory counters when it
was raised (active, cache, peak): a peak far below the GPU's memory means
one allocation asked for more than was left. Writes ``results/long_probe_SIZE.json``.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from ceiling import SIZES, config_of  # noqa: E402
from common import environment, print_table, write_result  # noqa: E402

PIECES = ("sdpa", "rope", "norm", "attn", "mlp", "layer", "loss")


def inputs_of(piece, size, length):
    """``(function, arguments)``: ``function(*arguments)`` is a scalar to differentiate."""
    import mlx.core as mx
    import mlx.nn as nn

    shape = SIZES[size]
    heads, kv_heads = shape["num_attention_heads"], shape["num_key_value_heads"]
    hidden = shape["hidden_size"]
    dim = hidden // heads

    def normal(*s):
        return (0.02 * mx.random.normal(s)).astype(mx.bfloat16)

    if piece == "sdpa":

        def f(q, k, v):
            out = mx.fast.scaled_dot_product_attention(q, k, v, scale=dim**-0.5, mask="causal")  # fmt: skip
            return out.astype(mx.float32).sum()

        return f, [normal(1, heads, length, dim), normal(1, kv_heads, length, dim), normal(1, kv_heads, length, dim)]  # fmt: skip
    if piece == "rope":
        return (lambda x: mx.fast.rope(x, dim, traditional=False, base=10000.0, scale=1.0, offset=0)
                .astype(mx.float32).sum()), [normal(1, heads, length, dim)]  # fmt: skip
    if piece == "norm":
        weight = mx.ones((hidden,), mx.bfloat16)
        return (lambda x: mx.fast.rms_norm(x, weight, 1e-5).astype(mx.float32).sum()), [normal(1, length, hidden)]  # fmt: skip
    if piece in ("layer", "attn", "mlp"):
        from mlx.utils import tree_flatten, tree_unflatten
        from mlx_lm.models import llama
        from mlx_lm.tuner.utils import linear_to_lora_layers

        model = llama.Model(llama.ModelArgs.from_dict({**config_of(size), "num_hidden_layers": 1}))  # fmt: skip
        model.set_dtype(mx.bfloat16)
        model.freeze()
        linear_to_lora_layers(model, 1, {"rank": 8, "scale": 20.0, "dropout": 0.0})
        layer = model.layers[0]
        x = normal(1, length, hidden)
        if piece != "layer":
            part = layer.self_attn if piece == "attn" else layer.mlp
            call = (lambda y: part(y, mask="causal")) if piece == "attn" else part
        else:
            part, call = layer, (lambda y: layer(y, mask="causal"))

        def f(params):  # the LoRA parameters, flat: {path: array}
            part.update(tree_unflatten(list(params.items())))
            return call(x).astype(mx.float32).sum()

        return mx.checkpoint(f), [dict(tree_flatten(part.trainable_parameters()))]
    if piece == "loss":
        from mlx_lm_optiq import settings, train_step

        embed = nn.Embedding(shape["vocab_size"], hidden)
        embed.set_dtype(mx.bfloat16)
        with_grad = train_step.chunked_cross_entropy(
            embed.as_linear, settings.auto_chunk(shape["vocab_size"])
        )
        targets = mx.random.randint(0, shape["vocab_size"], (1, length))
        mask = mx.ones((1, length), mx.bool_)
        return (lambda h: with_grad(h, targets, mask)[0]), [normal(1, length, hidden)]
    raise ValueError(piece)


def measure(piece, size, length):
    """One piece at one length, in this process."""
    import mlx.core as mx

    f, args = inputs_of(piece, size, length)
    grad = mx.grad(f, argnums=tuple(range(len(args))))
    mx.eval(args)
    mx.clear_cache()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    tic = time.perf_counter()
    try:
        mx.eval(grad(*args))
    except RuntimeError as e:  # out of memory: what MLX held when it was raised
        return {"error": str(e)[:300], "memory_at_error_gb": memory_counters()}
    return {"peak_above_inputs_gb": (mx.get_peak_memory() - base) / 1e9,
            "seconds": time.perf_counter() - tic}  # fmt: skip


def memory_counters():
    """MLX's allocator counters now, in GB: ``active``, ``cache``, ``peak``."""
    import mlx.core as mx

    return {"active": mx.get_active_memory() / 1e9, "cache": mx.get_cache_memory() / 1e9,
            "peak": mx.get_peak_memory() / 1e9}  # fmt: skip


def run(piece, size, length, timeout):
    cmd = [sys.executable, __file__, "--child", json.dumps([piece, size, length])]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"over {timeout} s"}
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    tail = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
    return {"error": tail[:300]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1B", choices=sorted(SIZES))
    parser.add_argument("--lengths", default="65536,98304,131072")
    parser.add_argument("--pieces", default=",".join(PIECES))
    parser.add_argument("--timeout", type=int, default=300, help="seconds per row")
    parser.add_argument("--out", help="default: results/long_probe_SIZE.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(measure(*json.loads(args.child))), flush=True)
        return
    rows, results = [], []
    for length in [int(x) for x in args.lengths.split(",")]:
        for piece in args.pieces.split(","):
            r = {"piece": piece, "length": length, **run(piece, args.size, length, args.timeout)}  # fmt: skip
            results.append(r)
            held = r.get("memory_at_error_gb")
            rows.append((piece, length, f"{r['peak_above_inputs_gb']:.2f}" if "error" not in r else "-",
                         f"{r['seconds']:.3f}" if "error" not in r else "-",
                         (f"(peak {held['peak']:.1f} GB) " if held else "") + r.get("error", "")))  # fmt: skip
            print(f"{piece} {length}: {rows[-1][2]} GB {rows[-1][4]}", flush=True)
    print_table(["piece", "length", "peak GB above inputs", "s", "error"], rows)
    out = args.out or HERE / "results" / f"long_probe_{args.size}.json"
    write_result(out, {"benchmark": "long_probe", "command": " ".join(sys.argv), "size": args.size,
                       "environment": environment(), "results": results})  # fmt: skip


if __name__ == "__main__":
    main()
