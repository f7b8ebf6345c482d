"""Where does MLX's fused attention stop at long lengths, and does splitting it help?

``long_probe.py`` found the out-of-memory of long training steps in causal
``mx.fast.scaled_dot_product_attention`` alone: at Llama-3.1-8B's heads
(32 query, 8 key/value, dim 128) 65,536 tokens fail with 2.7 GB in use.
This reproduces it, MLX alone, one row per process (bf16, batch 1):

- ``forward`` or ``backward`` (forward and the gradient w.r.t. q, k, v);
- ``whole``, ``heads:G`` (G calls, each on 1/G of the query heads and their
  key/value heads, concatenated) or ``queries:N`` (N calls, each on 1/N of
  the queries against the keys up to its last one; MLX's causal mask is
  aligned bottom-right, so each call is exact).

    python benchmarks/sdpa_long.py --heads 32 --kv-heads 8 --dim 128 \\
        --rows backward:whole:65536,backward:heads:4:65536

A row is the peak above the inputs, the seconds (after one warm-up call),
the largest difference from ``whole`` at a length both ran, and the error
with MLX's counters for one that failed. Writes ``results/sdpa_long.json``.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import environment, print_table, write_result  # noqa: E402


def attention(q, k, v, split):
    """Causal fused attention, whole or in ``split`` pieces."""
    import mlx.core as mx

    scale = q.shape[-1] ** -0.5
    sdpa = mx.fast.scaled_dot_product_attention
    kind, _, n = split.partition(":")
    if kind == "whole":
        return sdpa(q, k, v, scale=scale, mask="causal")
    n = int(n)
    if kind in ("heads", "heads-copied"):
        if kind == "heads-copied":  # each piece its own buffer
            sdpa = lambda q, k, v, **kw: mx.fast.scaled_dot_product_attention(  # noqa: E731
                mx.contiguous(q), mx.contiguous(k), mx.contiguous(v), **kw
            )
        qh, kh = q.shape[1] // n, k.shape[1] // n
        parts = [sdpa(q[:, i * qh : (i + 1) * qh], k[:, i * kh : (i + 1) * kh],
                      v[:, i * kh : (i + 1) * kh], scale=scale, mask="causal") for i in range(n)]  # fmt: skip
        return mx.concatenate(parts, axis=1)
    if kind == "queries":
        step = q.shape[2] // n
        parts = [sdpa(q[:, :, i * step : (i + 1) * step], k[:, :, : (i + 1) * step],
                      v[:, :, : (i + 1) * step], scale=scale, mask="causal") for i in range(n)]  # fmt: skip
        return mx.concatenate(parts, axis=2)
    raise ValueError(split)


def measure(mode, split, length, heads, kv_heads, dim, check, layout="contiguous"):
    import mlx.core as mx

    mx.random.seed(0)

    def made(h):  # "model": (batch, length, heads, dim) transposed, as mlx-lm's models
        if layout == "model":
            return mx.random.normal((1, length, h, dim)).astype(mx.bfloat16).transpose(0, 2, 1, 3)  # fmt: skip
        return mx.random.normal((1, h, length, dim)).astype(mx.bfloat16)

    q, k, v = made(heads), made(kv_heads), made(kv_heads)
    mx.eval(q, k, v)

    def loss(q, k, v):
        return attention(q, k, v, split).astype(mx.float32).sum()

    if mode == "forward":
        step = lambda: attention(q, k, v, split)  # noqa: E731
    else:
        step = lambda: mx.grad(loss, argnums=(0, 1, 2))(q, k, v)  # noqa: E731
    try:
        mx.eval(step())  # warm-up: kernels compiled, graphs built
        mx.clear_cache()
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        tic = time.perf_counter()
        out = step()
        mx.eval(out)
        seconds = time.perf_counter() - tic
    except RuntimeError as e:
        return {"error": str(e)[:300], "memory_at_error_gb": {
            "active": mx.get_active_memory() / 1e9, "cache": mx.get_cache_memory() / 1e9,
            "peak": mx.get_peak_memory() / 1e9}}  # fmt: skip
    row = {"peak_above_inputs_gb": (mx.get_peak_memory() - base) / 1e9, "seconds": seconds}  # fmt: skip
    if check and split != "whole":
        # the same split against whole attention, on a prefix short enough
        # to run whole
        n = min(length, check)
        ref_q, ref_k, ref_v = q[:, :, :n], k[:, :, :n], v[:, :, :n]
        got = attention(ref_q, ref_k, ref_v, split).astype(mx.float32)
        want = attention(ref_q, ref_k, ref_v, "whole").astype(mx.float32)
        row["max_abs_difference"] = mx.abs(got - want).max().item()
    return row


def run(spec, timeout):
    cmd = [sys.executable, __file__, "--child", json.dumps(spec)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"over {timeout} s"}
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    tail = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
    return {"error": tail[:300]}


def parse_row(text):
    """``mode:split:length``, the split ``whole``, ``heads:G`` or ``queries:N``."""
    mode, rest = text.split(":", 1)
    split, _, length = rest.rpartition(":")
    if mode not in ("forward", "backward") or not split:
        raise SystemExit(f"sdpa_long: bad row {text!r}: want mode:split:length")
    return mode, split, int(length)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--rows", default="backward:whole:32768,backward:whole:65536,backward:heads:4:65536")  # fmt: skip
    parser.add_argument("--layout", default="contiguous", choices=("contiguous", "model"),
                        help="model: q, k, v transposed views of (batch, length, heads, dim)")  # fmt: skip
    parser.add_argument("--check", type=int, default=8192, help="prefix compared with whole attention")  # fmt: skip
    parser.add_argument("--timeout", type=int, default=300, help="seconds per row")
    parser.add_argument("--out", default=str(HERE / "results" / "sdpa_long.json"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(measure(*json.loads(args.child))), flush=True)
        return
    shape = (args.heads, args.kv_heads, args.dim)
    rows, results = [], []
    for text in args.rows.split(","):
        mode, split, length = parse_row(text)
        r = {"mode": mode, "split": split, "length": length,
             **run([mode, split, length, *shape, args.check, args.layout], args.timeout)}  # fmt: skip
        results.append(r)
        held = r.get("memory_at_error_gb")
        rows.append((mode, split, length,
                     f"{r['peak_above_inputs_gb']:.2f}" if "error" not in r else "-",
                     f"{r['seconds'] * 1e3:.1f}" if "error" not in r else "-",
                     f"{r['max_abs_difference']:.1e}" if "max_abs_difference" in r else "",
                     (f"(peak {held['peak']:.1f} GB) " if held else "") + r.get("error", "")))  # fmt: skip
        print(" ".join(str(x) for x in rows[-1]), flush=True)
    print_table(["mode", "split", "length", "peak GB", "ms", "max |diff|", "error"], rows)  # fmt: skip
    write_result(args.out, {"benchmark": "sdpa_long", "command": " ".join(sys.argv),
                            "heads": args.heads, "kv_heads": args.kv_heads, "dim": args.dim, "layout": args.layout,
                            "environment": environment(), "results": results})  # fmt: skip


if __name__ == "__main__":
    main()
