"""Adapter quality at equal budget, on a real model and real data.

Quantizes the model two ways — OptiQ-style with our sensitivity + quantize
commands, and with mlx-lm's own ``mixed_4_6`` recipe — then trains every
policy with several seeds, all in this one process (one kernel compile):
``constant``, ``by_bits``, ``by_bits --rank-budget match``, ``by_kl``,
``by_kl --rank-budget match``. Reports validation loss at an early iteration
and at the end (mean and spread per policy), trainable parameters, and GSM8K
exact-match accuracy for the best policy's and constant's adapters.

    python benchmarks/quality.py --model SMOLLM2_DIR --data GSM8K_DIR [--seeds 3] [--iters 200] [--jobs 6]

``--jobs N`` trains N runs at a time in worker processes (a small model
leaves a GPU mostly idle); every run seeds itself, so the losses are those
of a serial run, but tokens/s then measure nothing.

Get the model and data with ``../shared/tools/get-real-data.sh DEST`` (see
``benchmarks/README.md``). Writes ``benchmarks/results/quality.json``.
"""

import argparse
import shutil
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import (  # noqa: E402
    environment,
    gsm8k_answers,
    print_table,
    run_all,
    train_in_process,
    write_result,
)

POLICIES = [
    ("constant", "free"),
    ("by_bits", "free"),
    ("by_bits", "match"),
    ("by_kl", "free"),
    ("by_kl", "match"),
]


def label(scaling, budget):
    return scaling if budget == "free" else f"{scaling}+match"


def prepare_models(args, work):
    from mlx_lm import convert

    from mlx_lm_optiq import quantize, sensitivity

    sens = work / "sensitivity.json"
    optiq, mixed = work / "optiq", work / "mixed_4_6"
    if optiq.is_dir() and mixed.is_dir():  # prepared by an earlier run in --work
        return {"optiq": optiq, "mixed_4_6": mixed}
    sensitivity.measure(types.SimpleNamespace(
        model=args.model, data=args.data, bits=args.bits, group_size=args.group_size,
        samples=args.sensitivity_samples, max_seq_length=args.sensitivity_length,
        batch_size=8, output=str(sens), restart=False,
    ))  # fmt: skip
    quantize.quantize(types.SimpleNamespace(
        model=args.model, output=str(optiq), target_bpw=args.target_bpw, bits=args.bits,
        group_size=args.group_size, sensitivity=str(sens),
    ))  # fmt: skip
    convert(str(args.model), str(mixed), quantize=True, q_group_size=args.group_size,
            quant_predicate="mixed_4_6")  # fmt: skip
    (mixed / "optiq").mkdir(exist_ok=True)
    shutil.copyfile(sens, mixed / "optiq" / "sensitivity.json")  # by_kl reads it
    return {"optiq": optiq, "mixed_4_6": mixed}


def train(args, model_dir, scaling, budget, seed, adapter_path):
    result = train_in_process(
        True,
        model=str(model_dir), data=str(args.data), adapter_path=str(adapter_path),
        iters=args.iters, batch_size=args.batch_size, num_layers=args.num_layers,
        learning_rate=args.learning_rate, steps_per_eval=args.eval_at,
        steps_per_report=args.eval_at, val_batches=args.val_batches, save_every=10**9,
        max_seq_length=args.max_seq_length, mask_prompt=True, seed=seed,
        rank_scaling=scaling, rank_budget=budget,
        lora_parameters={"rank": args.rank, "dropout": 0.0, "scale": args.scale},
    )  # fmt: skip
    val = {r["iteration"] + 1: r["val_loss"] for r in result["val"]}
    return {
        "val_loss_early": val.get(args.eval_at),
        "val_loss_final": val.get(args.iters),
        "trainable_parameters": result["trainable_parameters"],
        "tokens_per_second": statistics.median(
            r["tokens_per_second"] for r in result["train"]
        ),
        "wall_seconds": result["wall_seconds"],
    }


def gsm8k_accuracy(model_dir, adapter_path, data, limit, max_tokens, batch_size):
    answers = gsm8k_answers(
        model_dir, adapter_path, data, limit, max_tokens, batch_size
    )
    return sum(answers) / len(answers), len(answers)


def task(kind, *a):
    """One unit of work for a worker process (or this one): a run or an evaluation."""
    return {"train": train, "gsm8k": gsm8k_accuracy}[kind](*a)


def report(name, result):
    if "val_loss_final" in result:
        print(f"{name}: val {result['val_loss_early']:.4f} @ early, "
              f"{result['val_loss_final']:.4f} @ end", flush=True)  # fmt: skip
    else:
        print(f"{name}: GSM8K {result[0]:.3f} on {result[1]}", flush=True)


def summarize(runs, bases):
    """Per base and policy: mean and spread, and the change from constant seed by seed."""
    table, summary = [], {}
    for base in bases:
        const = {
            r["seed"]: r
            for r in runs
            if r["base"] == base and r["policy"] == "constant"
        }
        for scaling, budget in POLICIES:
            policy = label(scaling, budget)
            mine = [r for r in runs if r["base"] == base and r["policy"] == policy]
            if not mine:
                continue
            early = [r["val_loss_early"] for r in mine]
            final = [r["val_loss_final"] for r in mine]
            paired = [r["val_loss_final"] - const[r["seed"]]["val_loss_final"]
                      for r in mine if r["seed"] in const]  # fmt: skip
            paired_early = [r["val_loss_early"] - const[r["seed"]]["val_loss_early"]
                            for r in mine if r["seed"] in const]  # fmt: skip
            stats = {
                "runs": len(mine),
                "seeds": sorted(r["seed"] for r in mine),
                "val_early_mean": statistics.mean(early),
                "val_early_std": statistics.pstdev(early),
                "val_final_mean": statistics.mean(final),
                "val_final_std": statistics.pstdev(final),
                "trainable_parameters": mine[0]["trainable_parameters"],
            }
            if policy != "constant" and paired:
                stats.update(
                    delta_early_vs_constant=statistics.mean(paired_early),
                    delta_final_vs_constant=statistics.mean(paired),
                    seeds_better_final=sum(d < 0 for d in paired),
                    seeds_better_early=sum(d < 0 for d in paired_early),
                )
            summary[f"{base}/{policy}"] = stats
            delta = (f"{stats['delta_final_vs_constant']:+.4f} ({stats['seeds_better_final']}/{len(paired)} better)"
                     if "delta_final_vs_constant" in stats else "-")  # fmt: skip
            table.append((base, policy, len(mine), f"{stats['trainable_parameters']:,}",
                          f"{stats['val_early_mean']:.4f} ± {stats['val_early_std']:.4f}",
                          f"{stats['val_final_mean']:.4f} ± {stats['val_final_std']:.4f}", delta))  # fmt: skip
    return table, summary


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", required=True, help="float mlx-lm model (SmolLM2-135M-Instruct)"
    )
    parser.add_argument(
        "--data", required=True, help="GSM8K directory (train/valid/test.jsonl)"
    )
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--eval-at", type=int, default=50)
    parser.add_argument("--val-batches", type=int, default=25)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--num-layers", type=int, default=16)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--scale", type=float, default=20.0)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--max-seq-length", type=int, default=512)
    parser.add_argument(
        "--bits", type=lambda t: [int(b) for b in t.split(",")], default=[4, 8]
    )
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--target-bpw", type=float, default=5.0)
    parser.add_argument("--sensitivity-samples", type=int, default=32)
    parser.add_argument("--sensitivity-length", type=int, default=256)
    parser.add_argument("--bases", default="optiq,mixed_4_6")
    parser.add_argument(
        "--gsm8k", type=int, default=219, help="test questions (0: skip)"
    )
    parser.add_argument("--gsm8k-seeds", type=int, default=3,
                        help="seeds whose adapters are evaluated on GSM8K")  # fmt: skip
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time")
    parser.add_argument("--budget-seconds", type=float, default=float("inf"),
                        help="start no new training run after this many seconds")  # fmt: skip
    parser.add_argument("--work", help="working directory (default: a temporary one)")
    parser.add_argument("--out", default=str(HERE / "results" / "quality.json"))
    args = parser.parse_args()
    start = time.monotonic()
    work = Path(args.work or tempfile.mkdtemp())
    work.mkdir(parents=True, exist_ok=True)
    bases = args.bases.split(",")

    models = prepare_models(args, work)
    print(f"models ready after {time.monotonic() - start:.0f} s", flush=True)
    tasks = {}
    for seed in range(args.seeds):
        for base in bases:
            for scaling, budget in POLICIES:
                name = f"{base}/{label(scaling, budget)}/seed{seed}"
                adapter = work / "adapters" / name
                shutil.rmtree(adapter, ignore_errors=True)
                tasks[name] = (
                    "train",
                    args,
                    models[base],
                    scaling,
                    budget,
                    seed,
                    adapter,
                )
    done, failed = run_all(tasks, args.jobs, start + args.budget_seconds, task, report)
    runs = []
    for name, result in done.items():
        base, policy, seed = name.split("/")
        runs.append({"base": base, "policy": policy, "seed": int(seed[4:]), **result})
    skipped = [n for n in tasks if n not in done]
    table, summary = summarize(runs, bases)

    def save(accuracy):
        write_result(args.out, {
            "benchmark": "quality",
            "command": " ".join(sys.argv),
            "environment": environment(),
            "settings": {k: str(v) for k, v in vars(args).items()},
            "summary": summary,
            "gsm8k": accuracy,
            "skipped_runs": skipped,
            "failed_runs": failed,
            "runs": runs,
            "elapsed_seconds": time.monotonic() - start,
        })  # fmt: skip

    print_table(["base", "policy", "seeds", "trainable", f"val loss @{args.eval_at}",
                 f"val loss @{args.iters}", "Δ end vs constant"], table)  # fmt: skip
    save({})  # the training results are safe before the (long) evaluation
    optiq = {k: v for k, v in summary.items() if k.startswith("optiq/")}
    if not (args.gsm8k and optiq):
        return
    best = min(optiq, key=lambda k: optiq[k]["val_final_mean"])
    evals = {}
    for key in dict.fromkeys([best, "optiq/constant"]):
        for seed in range(args.gsm8k_seeds):
            adapter = work / "adapters" / f"{key}/seed{seed}"
            if key in optiq and (adapter / "adapters.safetensors").exists():
                evals[f"{key}/seed{seed}"] = ("gsm8k", models["optiq"], adapter, args.data,
                                              args.gsm8k, args.max_tokens, 32)  # fmt: skip
    results, eval_failed = run_all(evals, args.jobs, float("inf"), task, report)
    failed.update(eval_failed)
    accuracy = {}
    for key in dict.fromkeys([best, "optiq/constant"]):
        per_seed = {
            n.rsplit("/", 1)[1]: r[0]
            for n, r in results.items()
            if n.rsplit("/", 1)[0] == key
        }
        if per_seed:
            n = next(r[1] for r in results.values())
            accuracy[key] = {"exact_match_mean": statistics.mean(per_seed.values()),
                             "exact_match_per_seed": per_seed, "questions": n}  # fmt: skip
            print(f"GSM8K {key}: {accuracy[key]['exact_match_mean']:.3f} exact match "
                  f"(mean of {len(per_seed)} seeds) on {n} questions", flush=True)  # fmt: skip
    save(accuracy)


if __name__ == "__main__":
    main()
