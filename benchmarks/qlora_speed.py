"""QLoRA speed and memory on one GPU: the quantized base, the dequantized fast
path, and PyTorch + PEFT on the bf16 base, with and without checkpointing.

Every measurement is its own process (``ceiling.py --probe``): random-init
weights of real Llama shapes, a 4/8-bit mixed base (``v_proj`` and
``down_proj`` at 8 bits), LoRA ``by_bits`` rank 8/16 on all 7 projections of
the last 16 layers, batch 1, the same for PyTorch + PEFT (bf16 base: no 4-bit
kernel there). Measurements run in the order given, most important first,
until ``--budget-seconds``; what did not run is listed as not run.

- ``--plan compare``: every shape at ``--length`` for the three variants, with
  gradient checkpointing, and without it for the smaller shapes;
- ``--plan memory``: one shape's peak memory per doubling of length, model
  input a multiple of 128 tokens (``exact``) and as mlx-lm truncates it
  (``max_seq_length`` tokens, one fewer into the model);
- ``--plan longest``: the 8B shape at long lengths on the fast path.

    python benchmarks/qlora_speed.py --tokenizer SMOLLM2 --plans compare,memory,longest

Writes ``benchmarks/results/qlora_speed.json`` and ``.png``.
"""

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from ceiling import ARCHITECTURE, environment_of_children, probe  # noqa: E402
from common import print_table, write_result  # noqa: E402

VARIANTS = {
    "mlx_quantized": dict(kind="mlx", quantized=True),
    "mlx_dequantized": dict(kind="mlx", quantized=True, base_compute="dequantized"),
    "torch_peft_bf16": dict(kind="torch"),
}


def plan(args):
    """``[(group, variant, spec)]`` in the order they run."""
    specs = []
    common = dict(batch=1, iters=args.iters, tokenizer=args.tokenizer, exact=True)
    if "compare" in args.plans:
        for size in filter(None, args.sizes.split(",")):
            for variant in VARIANTS:
                specs.append(("compare", variant, {**VARIANTS[variant], **common,
                              "size": size, "length": args.length}))  # fmt: skip
        for size in filter(None, args.no_checkpoint_sizes.split(",")):
            for variant in VARIANTS:
                specs.append(("no_checkpoint", variant, {**VARIANTS[variant], **common,
                              "size": size, "length": args.length, "grad_checkpoint": False}))  # fmt: skip
    if "memory" in args.plans:
        for length in [args.length * 2**i for i in range(args.doublings)]:
            for exact in (True, False):
                specs.append(("memory", "mlx_dequantized", {**VARIANTS["mlx_dequantized"],
                              **common, "size": args.memory_size, "length": length, "exact": exact}))  # fmt: skip
    if "longest" in args.plans:
        for length in args.longest.split(","):
            specs.append(("longest", "mlx_dequantized", {**VARIANTS["mlx_dequantized"],
                          **common, "size": "8B", "length": int(length), "iters": 2}))  # fmt: skip
    return specs


def table(results):
    rows = []
    for r in results:
        s, m = r["spec"], r["measured"]
        rows.append((
            r["group"], ARCHITECTURE.get(s["size"], s["size"]), s["length"], r["variant"],
            "on" if s.get("grad_checkpoint", True) else "off",
            "exact" if s.get("exact") else "-1",
            f"{m['tokens_per_second']:,.0f}" if "tokens_per_second" in m else "-",
            f"{m['peak_memory_gb']:.1f}" if m.get("peak_memory_gb") else "-",
            m.get("error", "")[:50],
        ))  # fmt: skip
    return rows


def ratios(results):
    """MLX / PyTorch+PEFT tokens/s per shape and checkpointing, both MLX variants."""
    out = {}
    by = {(r["group"], r["spec"]["size"], r["variant"]): r["measured"] for r in results}
    for (group, size, variant), m in by.items():
        torch = by.get((group, size, "torch_peft_bf16"), {})
        if (
            variant != "torch_peft_bf16"
            and "tokens_per_second" in m
            and "tokens_per_second" in torch
        ):
            out[f"{group}/{size}/{variant}"] = (
                m["tokens_per_second"] / torch["tokens_per_second"]
            )
    return out


def memory_growth(results):
    """Peak memory ratio per doubling of length, per input kind."""
    out = {}
    for exact in (True, False):
        points = sorted(
            (r["spec"]["length"], r["measured"]["peak_memory_gb"])
            for r in results
            if r["group"] == "memory"
            and r["spec"]["exact"] == exact
            and r["measured"].get("peak_memory_gb")
        )
        out["exact" if exact else "truncated"] = {
            f"{a}->{b}": pb / pa for (a, pa), (b, pb) in zip(points, points[1:])
        }
    return out


def plot(results, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    compare = [
        r
        for r in results
        if r["group"] == "compare" and "tokens_per_second" in r["measured"]
    ]
    sizes = list(dict.fromkeys(r["spec"]["size"] for r in compare))
    for i, variant in enumerate(VARIANTS):
        values = [next((r["measured"]["tokens_per_second"] for r in compare
                        if r["spec"]["size"] == s and r["variant"] == variant), 0) for s in sizes]  # fmt: skip
        left.bar([x + 0.27 * i for x in range(len(sizes))], values, 0.27, label=variant)
    left.set_xticks([x + 0.27 for x in range(len(sizes))], sizes)
    left.set_ylabel("tokens/s (batch 1)")
    left.set_yscale("log")
    left.legend(fontsize=7)
    left.set_title("QLoRA training speed, gradient checkpointing", fontsize=9)
    for exact in (True, False):
        points = sorted((r["spec"]["length"], r["measured"]["peak_memory_gb"]) for r in results
                        if r["group"] == "memory" and r["spec"]["exact"] == exact
                        and r["measured"].get("peak_memory_gb"))  # fmt: skip
        if points:
            right.plot(*zip(*points), "o-", label="input a multiple of 128" if exact
                       else "input = max_seq_length - 1")  # fmt: skip
    right.set_xscale("log", base=2)
    right.set_yscale("log", base=2)
    right.set_xlabel("sequence length")
    right.set_ylabel("peak GB")
    right.legend(fontsize=7)
    right.set_title("peak memory per length (fast path)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--tokenizer", required=True, help="a model dir with tokenizer files"
    )
    parser.add_argument("--plans", default="compare,memory,longest")
    parser.add_argument("--sizes", default="135M,1B,3B,8B")
    parser.add_argument("--no-checkpoint-sizes", default="135M,1B")
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--memory-size", default="1B")
    parser.add_argument("--doublings", type=int, default=4)
    parser.add_argument("--longest", default="65536")
    parser.add_argument(
        "--iters", type=int, default=4, help="per measurement; the first is not timed"
    )
    parser.add_argument("--probe-seconds", type=float, default=240)
    parser.add_argument("--budget-seconds", type=float, default=1e9)
    parser.add_argument("--out", default=str(HERE / "results" / "qlora_speed.json"))
    args = parser.parse_args()
    start = time.monotonic()
    results, not_run = [], []
    for group, variant, spec in plan(args):
        left = start + args.budget_seconds - time.monotonic()
        if left < 30:
            not_run.append({"group": group, "variant": variant, "spec": spec})
            continue
        measured = probe(spec, min(args.probe_seconds, left))
        results.append(
            {"group": group, "variant": variant, "spec": spec, "measured": measured}
        )
        print(f"[{time.monotonic() - start:5.0f} s] {group} {spec['size']} {spec['length']} "
              f"{variant} ckpt={spec.get('grad_checkpoint', True)} exact={spec.get('exact')}: "
              f"{measured.get('tokens_per_second', 0):,.0f} tok/s, "
              f"{measured.get('peak_memory_gb') or 0:.1f} GB {measured.get('error', '')}", flush=True)  # fmt: skip
    print_table(["group", "shape", "length", "variant", "ckpt", "input", "tokens/s", "peak GB", ""],
                table(results))  # fmt: skip
    for key, ratio in ratios(results).items():
        print(f"{key}: {ratio:.2f}x PyTorch + PEFT")
    growth = memory_growth(results)
    print("peak memory per doubling:", growth)
    write_result(args.out, {
        "benchmark": "qlora_speed", "command": " ".join(sys.argv),
        "environment": environment_of_children(), "results": results,
        "mlx_over_torch_peft": ratios(results), "memory_per_doubling": growth,
        "not_run": not_run, "elapsed_seconds": time.monotonic() - start,
    })  # fmt: skip
    plot(results, Path(args.out).with_suffix(".png"))


if __name__ == "__main__":
    main()
