"""Does the plugin cost anything? Stock mlx-lm vs the plugin in ``constant`` mode.

Both run mlx-lm's own ``train_model`` in this one process, interleaved
(stock, plugin, plugin, stock, ...), on the same model, data and seed: the
plugin variant has the shim installed and ``--rank-scaling constant``, the
stock variant has the shim uninstalled. Reported: median tokens/s and peak
memory of each, their ratios, whether losses and saved weights are identical,
and Python start-up time with and without the package installed.

    python benchmarks/overhead.py [--model DIR --data DIR] [--repeats 5] [--iters 30]

Without ``--model`` it builds the tiny example model. Writes
``benchmarks/results/overhead.json``.
"""

import argparse
import hashlib
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "examples"))
sys.path.insert(0, str(HERE))

from common import (  # noqa: E402
    environment,
    print_table,
    train_in_process,
    write_result,
)


def train_once(variant, args, workdir):
    adapter_path = Path(workdir) / f"{variant}-{time.monotonic_ns()}"
    result = train_in_process(
        variant == "plugin",
        model=str(args.model),
        data=str(args.data),
        iters=args.iters,
        batch_size=args.batch_size,
        num_layers=args.num_layers,
        max_seq_length=args.max_seq_length,
        steps_per_report=1,
        steps_per_eval=10**9,
        val_batches=1,
        save_every=10**9,
        adapter_path=str(adapter_path),
        learning_rate=1e-4,
        mask_prompt=args.mask_prompt,
        rank_scaling="constant" if variant == "plugin" else None,
        lora_parameters={"rank": args.rank, "dropout": 0.0, "scale": 20.0},
    )
    weights = (adapter_path / "adapters.safetensors").read_bytes()
    steady = result["train"][2:] or result["train"]  # skip compile warm-up
    return {
        "variant": variant,
        "tokens_per_second": statistics.median(r["tokens_per_second"] for r in steady),
        "peak_memory_gb": result["peak_memory_gb"],
        "wall_seconds": result["wall_seconds"],
        "losses": [r["train_loss"] for r in result["train"]],
        "weights_sha256": hashlib.sha256(weights).hexdigest(),
    }


def startup_times(repeats):
    """Median ``python -c pass`` seconds in a bare venv, without and with the package."""
    root = Path(tempfile.mkdtemp())
    results = {}
    pythons = {}
    for name in ("without", "with"):
        venv = root / name
        subprocess.run(
            [sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True
        )
        pythons[name] = venv / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(pythons["with"]), "install", "-q",
         "--no-deps", str(HERE.parent)],
        check=True,
    )  # fmt: skip
    samples = {name: [] for name in pythons}
    for _ in range(repeats):
        for name, python in pythons.items():
            tic = time.perf_counter()
            subprocess.run([str(python), "-c", "pass"], check=True)
            samples[name].append(time.perf_counter() - tic)
    for name, values in samples.items():
        results[name] = statistics.median(values)
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", help="mlx-lm model directory (default: tiny example)"
    )
    parser.add_argument("--data", help="data directory (default: tiny example)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--num-layers", type=int, default=16)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--max-seq-length", type=int, default=512)
    parser.add_argument("--mask-prompt", action="store_true")
    parser.add_argument("--startup-repeats", type=int, default=30)
    parser.add_argument("--out", default=str(HERE / "results" / "overhead.json"))
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp())
    if args.model is None:
        import tiny_model

        args.model = tiny_model.build_model(
            workdir / "model", quantize="mixed", layers=4
        )
        args.data = tiny_model.build_dataset(workdir / "data", n_train=256, n_valid=16)
        args.num_layers = min(args.num_layers, 4)

    runs = []
    for i in range(args.repeats):
        order = ("stock", "plugin") if i % 2 == 0 else ("plugin", "stock")
        for variant in order:
            runs.append(train_once(variant, args, workdir))
            print(f"repeat {i + 1}/{args.repeats} {variant}: "
                  f"{runs[-1]['tokens_per_second']:.1f} tok/s", flush=True)  # fmt: skip

    def median(variant, key):
        return statistics.median(r[key] for r in runs if r["variant"] == variant)

    stock_losses = {tuple(r["losses"]) for r in runs if r["variant"] == "stock"}
    plugin_losses = {tuple(r["losses"]) for r in runs if r["variant"] == "plugin"}
    identical = stock_losses == plugin_losses and len(stock_losses) == 1
    same_weights = len({r["weights_sha256"] for r in runs}) == 1
    startup = startup_times(args.startup_repeats)
    summary = {
        "tokens_per_second": {
            v: median(v, "tokens_per_second") for v in ("stock", "plugin")
        },
        "peak_memory_gb": {v: median(v, "peak_memory_gb") for v in ("stock", "plugin")},
        "wall_seconds": {v: median(v, "wall_seconds") for v in ("stock", "plugin")},
        "tokens_per_second_ratio": median("plugin", "tokens_per_second")
        / median("stock", "tokens_per_second"),
        "peak_memory_ratio": median("plugin", "peak_memory_gb")
        / median("stock", "peak_memory_gb"),
        "wall_ratio": median("plugin", "wall_seconds")
        / median("stock", "wall_seconds"),
        "losses_identical": identical,
        "weights_identical": same_weights,
        "startup_seconds": startup,
        "startup_ratio": startup["with"] / startup["without"],
    }
    rows = [
        ("tokens/s (median)", f"{summary['tokens_per_second']['stock']:.1f}",
         f"{summary['tokens_per_second']['plugin']:.1f}", f"{summary['tokens_per_second_ratio']:.3f}"),
        ("peak memory GB", f"{summary['peak_memory_gb']['stock']:.3f}",
         f"{summary['peak_memory_gb']['plugin']:.3f}", f"{summary['peak_memory_ratio']:.3f}"),
        ("train_model wall s", f"{summary['wall_seconds']['stock']:.2f}",
         f"{summary['wall_seconds']['plugin']:.2f}", f"{summary['wall_ratio']:.3f}"),
        ("python -c pass, ms", f"{startup['without'] * 1e3:.1f}",
         f"{startup['with'] * 1e3:.1f}", f"{summary['startup_ratio']:.3f}"),
    ]  # fmt: skip
    print_table(["measure", "stock", "plugin (constant)", "plugin / stock"], rows)
    print(f"losses identical: {identical}; saved weights identical: {same_weights}")
    write_result(args.out, {
        "benchmark": "overhead",
        "command": " ".join(sys.argv),
        "environment": environment(),
        "settings": {k: str(v) for k, v in vars(args).items()},
        "summary": summary,
        "runs": runs,
    })  # fmt: skip


if __name__ == "__main__":
    main()
