"""Does MLX's fused attention backward run at the sequence lengths mlx-lm trains?

A minimal reproduction, MLX alone: the gradient of causal
``mx.fast.scaled_dot_product_attention`` in bf16, peak memory per sequence
length, at multiples of 128 and one token fewer (mlx-lm truncates a batch to
``--max-seq-length`` tokens and feeds one fewer to the model). A fused
backward keeps memory linear in length; a materialized one grows with its
square (the scores, batch x heads x L x L).

    python benchmarks/sdpa_memory.py [--lengths 4096,8192,16384] [--heads 32] [--dim 64]

Writes ``benchmarks/results/sdpa_memory.json``.
"""

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import environment, print_table, write_result  # noqa: E402


def measure(length, heads, dim):
    import mlx.core as mx

    q, k, v = (
        mx.random.normal((1, heads, length, dim)).astype(mx.bfloat16) for _ in range(3)
    )
    mx.eval(q, k, v)

    def loss(q, k, v):
        out = mx.fast.scaled_dot_product_attention(
            q, k, v, scale=dim**-0.5, mask="causal"
        )
        return out.astype(mx.float32).sum()

    grad = mx.grad(loss, argnums=(0, 1, 2))
    mx.eval(grad(q, k, v))  # compile
    mx.clear_cache()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    tic = time.perf_counter()
    mx.eval(grad(q, k, v))
    seconds = time.perf_counter() - tic
    return {
        "length": length,
        "peak_above_inputs_gb": (mx.get_peak_memory() - base) / 1e9,
        "seconds": seconds,
        "scores_gb_if_materialized": heads * length * length * 2 / 1e9,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="4096,8192,16384")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--out", default=str(HERE / "results" / "sdpa_memory.json"))
    args = parser.parse_args()
    rows, results = [], []
    for length in [int(x) for x in args.lengths.split(",")]:
        for n in (length, length - 1):
            r = measure(n, args.heads, args.dim)
            results.append(r)
            rows.append((n, f"{r['peak_above_inputs_gb']:.2f}",
                         f"{r['scores_gb_if_materialized']:.2f}", f"{1e3 * r['seconds']:.1f}"))  # fmt: skip
    print_table(["length", "backward peak GB", "scores would take GB", "ms"], rows)
    write_result(args.out, {
        "benchmark": "sdpa_memory", "command": " ".join(sys.argv),
        "environment": environment(), "heads": args.heads, "head_dim": args.dim,
        "results": results,
    })  # fmt: skip


if __name__ == "__main__":
    main()
