"""Where the adapter budget goes: mlx-lm's default window against allocation over the model.

Every row trains the same budget, mlx-lm's default: constant rank 8 on the
last 16 layers, all 7 projections. The rows differ in where it goes:

- ``default``: stock mlx-lm (no plugin option), the last 16 layers;
- ``constant_all``: constant rank over all layers (``--num-layers -1
  --rank-scaling constant --rank-budget default``);
- ``by_bits_all``, ``by_kl_all``: the older policies over all layers, fitted
  to the budget;
- ``allocate``, ``allocate_r16``: the allocator (``--rank-scaling allocate``)
  with ``--rank-range`` 4 and 16.

on quantized bases made by our own commands from the float model:
``q50`` = ``sensitivity --bits 3,4,8`` + ``quantize --target-bpw 5.0 --bits
4,8``, ``q40`` = ``quantize --target-bpw 4.0 --bits 3,4,8``; plus
``--reference``: mlx-lm's default LoRA on the float model, which gives each
row's share of the quantization gap recovered. Several seeds per row, paired
by seed. ``--gsm8k N`` adds exact match on N GSM8K test questions for
``--gsm8k-rows`` on the first base, with significance tests against
``default``.

    python benchmarks/allocation.py --model SMOLLM2 --data GSM8K --name smollm2 --jobs 8
    python benchmarks/allocation.py --model QWEN --data GSM8K --name qwen1.5b \\
        --bases q50 --rows default,constant_all,winner \\
        --winner-from results/allocation_smollm2.json --gsm8k 219

Runs land in ``--work``/runs.jsonl as they finish, so a second invocation
with the same ``--work`` resumes (or adds bases and rows) and every
invocation writes the full ``allocation_NAME.json`` and ``.png``.
"""

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import (  # noqa: E402
    append_jsonl,
    environment,
    gsm8k_answers,
    print_table,
    read_jsonl,
    run_all,
    train_in_process,
    write_result,
)

ROWS = {
    # num_layers None: mlx-lm's default window, the last 16 layers (or all of fewer)
    "default": dict(rank_scaling=None, rank_budget=None, num_layers=None),
    "constant_all": dict(rank_scaling="constant", rank_budget="default", num_layers=-1),
    "by_bits_all": dict(rank_scaling="by_bits", rank_budget="default", num_layers=-1),
    "by_kl_all": dict(rank_scaling="by_kl", rank_budget="default", num_layers=-1),
    "allocate": dict(rank_scaling="allocate", rank_budget="default", num_layers=-1,
                     rank_range=4.0),
    "allocate_r16": dict(rank_scaling="allocate", rank_budget="default",
                         num_layers=-1, rank_range=16.0),
}  # fmt: skip
SENSITIVITY_POLICIES = ("by_bits_all", "by_kl_all", "allocate", "allocate_r16")
BASES = {
    "q50": dict(target_bpw=5.0, bits=[4, 8]),
    "q40": dict(target_bpw=4.0, bits=[3, 4, 8]),
}
REFERENCE = "float"


def prepare(args, work, bases):
    """The quantized bases (made once per ``--work``); ``{base: model dir}``."""
    from mlx_lm_optiq import quantize, sensitivity

    sens = work / "sensitivity.json"
    if not sens.is_file():  # through the commands' own parsers: every default set
        sensitivity.measure(sensitivity.build_parser().parse_args([
            str(args.model), "--data", str(args.data), "--bits", "3,4,8",
            "--group-size", str(args.group_size), "--samples", str(args.sensitivity_samples),
            "--max-seq-length", str(args.sensitivity_length), "-o", str(sens),
        ]))  # fmt: skip
    models = {REFERENCE: Path(args.model)}
    for base in bases:
        out = work / base
        if not (out / "config.json").is_file():
            spec = BASES[base]
            quantize.quantize(quantize.build_parser().parse_args([
                str(args.model), "-o", str(out), "--sensitivity", str(sens),
                "--group-size", str(args.group_size), "--target-bpw", str(spec["target_bpw"]),
                "--bits", ",".join(map(str, spec["bits"])),
            ]))  # fmt: skip
        models[base] = out
    return models


def default_window(model_dir) -> int:
    """mlx-lm's default ``--num-layers`` for this model: 16, or all of fewer."""
    from mlx_lm.lora import CONFIG_DEFAULTS

    layers = json.loads((Path(model_dir) / "config.json").read_text())
    return min(CONFIG_DEFAULTS["num_layers"], layers["num_hidden_layers"])


def train(args, model_dir, row, seed, adapter_path):
    settings = dict(ROWS[row])
    if settings["num_layers"] is None:
        settings["num_layers"] = default_window(model_dir)
    result = train_in_process(
        True,
        model=str(model_dir), data=str(args.data), adapter_path=str(adapter_path),
        iters=args.iters, batch_size=args.batch_size, learning_rate=args.learning_rate,
        steps_per_eval=args.iters, steps_per_report=max(args.iters // 4, 1),
        val_batches=args.val_batches, save_every=10**9,
        max_seq_length=args.max_seq_length, mask_prompt=True, seed=seed,
        lora_parameters={"rank": args.rank, "dropout": 0.0, "scale": args.scale},
        **settings,
    )  # fmt: skip
    val = {r["iteration"] + 1: r["val_loss"] for r in result["val"]}  # it - 1
    sidecar = Path(adapter_path) / "optiq_lora_config.json"
    ranks = json.loads(sidecar.read_text())["modules"] if sidecar.is_file() else {}
    return {
        "val_loss_start": val.get(1),
        "val_loss_final": val.get(args.iters),
        "trainable_parameters": result["trainable_parameters"],
        "left_out_modules": sum(1 for m in ranks.values() if m["rank"] == 0),
        "ranks": {p: m["rank"] for p, m in ranks.items()},
        "wall_seconds": result["wall_seconds"],
        "peak_memory_gb": result["peak_memory_gb"],
    }


def evaluate(args, model_dir, adapter_path):
    return gsm8k_answers(
        model_dir,
        adapter_path,
        args.data,
        args.gsm8k,
        args.max_tokens,
        args.gsm8k_batch,
    )


def work(kind, *a):
    """One task in a worker process: a training run or a GSM8K evaluation."""
    return {"train": train, "gsm8k": evaluate}[kind](*a)


def report(name, result):
    if isinstance(result, dict):
        print(f"{name}: val {result['val_loss_final']:.4f}, "
              f"{result['trainable_parameters']:,} parameters, "
              f"{result['left_out_modules']} left out, {result['wall_seconds']:.0f} s",
              flush=True)  # fmt: skip
    else:
        print(f"{name}: GSM8K {sum(result)}/{len(result)}", flush=True)


def winner_of(path):
    """The sensitivity policy with the lowest final validation loss relative to
    ``default`` in an earlier result, over all its bases."""
    summary = json.loads(Path(path).read_text())["summary"]
    deltas = {}
    for key, stats in summary.items():
        base, row = key.split("/")
        if row in SENSITIVITY_POLICIES and "delta_vs_default" in stats:
            deltas.setdefault(row, []).append(stats["delta_vs_default"])
    return min(deltas, key=lambda r: statistics.mean(deltas[r]))


def summarize(runs, bases, rows):
    """Per base and row: mean, spread, paired change from default, gap recovered."""
    by = {}
    for r in runs:
        by.setdefault((r["base"], r["row"]), {})[r["seed"]] = r
    reference = by.get((REFERENCE, "default"), {})
    ref_mean = (
        statistics.mean(r["val_loss_final"] for r in reference.values())
        if reference
        else None
    )
    summary, table = {}, []
    for base in ([REFERENCE] if reference else []) + bases:
        default = by.get((base, "default"), {})
        default_mean = (
            statistics.mean(r["val_loss_final"] for r in default.values())
            if default
            else None
        )
        for row in rows:
            mine = by.get((base, row))
            if not mine or (base == REFERENCE and row != "default"):
                continue
            final = [r["val_loss_final"] for r in mine.values()]
            stats = {
                "seeds": sorted(mine),
                "val_final_mean": statistics.mean(final),
                "val_final_std": statistics.pstdev(final),
                "trainable_parameters": statistics.mean(
                    r["trainable_parameters"] for r in mine.values()
                ),
                "left_out_modules": max(r["left_out_modules"] for r in mine.values()),
            }
            paired = [mine[s]["val_loss_final"] - default[s]["val_loss_final"]
                      for s in mine if s in default]  # fmt: skip
            if row != "default" and paired:
                stats["delta_vs_default"] = statistics.mean(paired)
                stats["delta_vs_default_percent"] = (
                    100 * stats["delta_vs_default"] / default_mean
                )
                stats["seeds_lower_than_default"] = sum(d < 0 for d in paired)
                stats["paired_seeds"] = len(paired)
            if base != REFERENCE and ref_mean is not None and default_mean is not None:
                gap = default_mean - ref_mean
                stats["quantization_gap"] = gap
                stats["gap_recovered"] = (
                    (default_mean - stats["val_final_mean"]) / gap if gap > 0 else None
                )
                stats["vs_float_default"] = stats["val_final_mean"] - ref_mean
            summary[f"{base}/{row}"] = stats
            table.append((
                base, row, len(mine), f"{stats['trainable_parameters']:,.0f}",
                stats["left_out_modules"],
                f"{stats['val_final_mean']:.4f} ± {stats['val_final_std']:.4f}",
                f"{stats['delta_vs_default']:+.4f} ({stats['delta_vs_default_percent']:+.1f}%, "
                f"{stats['seeds_lower_than_default']}/{stats['paired_seeds']} lower)"
                if "delta_vs_default" in stats else "-",
                f"{100 * stats['gap_recovered']:.0f}%"
                if stats.get("gap_recovered") is not None else "-",
            ))  # fmt: skip
    return summary, table


def normal_p(z):
    """Two-sided p of a standard normal ``z``."""
    return math.erfc(abs(z) / math.sqrt(2))


def binomial_p(k, n):
    """Two-sided exact sign test: ``k`` of ``n`` discordant pairs one way."""
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(0, min(k, n - k) + 1)) / 2**n
    return min(1.0, 2 * tail)


def compare_gsm8k(answers, rows, against="default"):
    """Exact match per row and, against row ``against`` (the ``*_vs_default``
    keys), a two-proportion z-test on the pooled answers and an exact McNemar
    test on seed-paired questions."""
    out = {}
    for row in rows:
        per_seed = {s: a for (r, s), a in answers.items() if r == row}
        if not per_seed:
            continue
        pooled = [x for a in per_seed.values() for x in a]
        out[row] = {
            "exact_match": sum(pooled) / len(pooled),
            "correct_per_seed": {str(s): sum(a) for s, a in sorted(per_seed.items())},
            "questions": len(next(iter(per_seed.values()))),
        }
    base = {s: a for (r, s), a in answers.items() if r == against}
    for row in out:
        mine = {s: a for (r, s), a in answers.items() if r == row}
        seeds = sorted(set(mine) & set(base))
        if row == against or not seeds:
            continue
        x1 = sum(sum(mine[s]) for s in seeds)
        x0 = sum(sum(base[s]) for s in seeds)
        n = sum(len(mine[s]) for s in seeds)
        p = (x1 + x0) / (2 * n)
        z = (x1 - x0) / n / math.sqrt(2 * p * (1 - p) / n) if 0 < p < 1 else 0.0
        wins = sum(a and not b for s in seeds for a, b in zip(mine[s], base[s]))
        losses = sum(b and not a for s in seeds for a, b in zip(mine[s], base[s]))
        out[row].update(
            points_vs_default=100 * (x1 - x0) / n,
            z_vs_default=z,
            p_two_proportion=normal_p(z),
            mcnemar_wins=wins,
            mcnemar_losses=losses,
            p_mcnemar=binomial_p(min(wins, losses), wins + losses),
        )
    return out


def plot(summary, runs, bases, rows, name, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        1, len(bases), figsize=(4.8 * len(bases), 3.8), squeeze=False
    )
    for ax, base in zip(axes[0], bases):
        default = {r["seed"]: r["val_loss_final"] for r in runs
                   if r["base"] == base and r["row"] == "default"}  # fmt: skip
        shown = [r for r in rows if r != "default" and f"{base}/{r}" in summary]
        for i, row in enumerate(shown):
            deltas = [r["val_loss_final"] - default[r["seed"]] for r in runs
                      if r["base"] == base and r["row"] == row and r["seed"] in default]  # fmt: skip
            ax.bar(i, summary[f"{base}/{row}"].get("delta_vs_default", 0), color="#8ab")
            ax.scatter([i] * len(deltas), deltas, color="k", s=10, zorder=3)
        stats = summary.get(f"{base}/default", {})
        if stats.get("quantization_gap"):
            ax.axhline(-stats["quantization_gap"], color="r", ls="--", lw=1,
                       label="float-base default LoRA")  # fmt: skip
            ax.legend(fontsize=7)
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xticks(range(len(shown)), shown, rotation=30, fontsize=8)
        ax.set_ylabel("val loss − default (same seed)")
        ax.set_title(f"{name}, base {base}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="float mlx-lm model directory")
    parser.add_argument("--data", required=True, help="GSM8K (train/valid/test.jsonl)")
    parser.add_argument(
        "--name", required=True, help="what the model is called in the results"
    )
    parser.add_argument("--bases", default="q50,q40")
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--winner-from", help="earlier result naming the row 'winner'")
    parser.add_argument("--reference", action="store_true",
                        help="also mlx-lm's default LoRA on the float model")  # fmt: skip
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--val-batches", type=int, default=25)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--scale", type=float, default=20.0)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--max-seq-length", type=int, default=512)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--sensitivity-samples", type=int, default=32)
    parser.add_argument("--sensitivity-length", type=int, default=256)
    parser.add_argument("--gsm8k", type=int, default=0, help="test questions (0: none)")
    parser.add_argument("--gsm8k-rows", default="default,constant_all,winner")
    parser.add_argument("--gsm8k-batch", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time")
    parser.add_argument("--budget-seconds", type=float, default=float("inf"),
                        help="start no new task after this many seconds")  # fmt: skip
    parser.add_argument("--work", required=True, help="working directory (kept)")
    parser.add_argument("--out-dir", default=str(HERE / "results"))
    args = parser.parse_args()
    start = time.monotonic()
    deadline = start + args.budget_seconds
    work_dir = Path(args.work)
    work_dir.mkdir(parents=True, exist_ok=True)
    bases = args.bases.split(",")
    winner = winner_of(args.winner_from) if args.winner_from else None
    rows = [winner if r == "winner" else r for r in args.rows.split(",")]
    rows = list(dict.fromkeys(r for r in rows if r))
    if winner:
        print(f"winner from {args.winner_from}: {winner}", flush=True)

    models = prepare(args, work_dir, bases)
    print(f"bases ready after {time.monotonic() - start:.0f} s", flush=True)
    log = work_dir / "runs.jsonl"
    runs = read_jsonl(log)
    have = {(r["base"], r["row"], r["seed"]) for r in runs}
    tasks = {}
    for seed in range(args.seeds):
        for base in ([REFERENCE] if args.reference else []) + bases:
            for row in ["default"] if base == REFERENCE else rows:
                if (base, row, seed) not in have:
                    name = f"{base}/{row}/seed{seed}"
                    adapter = work_dir / "adapters" / name
                    tasks[name] = ("train", args, models[base], row, seed, adapter)

    def keep(name, result):
        report(name, result)
        base, row, seed = name.split("/")
        run = {"base": base, "row": row, "seed": int(seed[4:]), **result}
        runs.append(run)
        append_jsonl(log, run)

    _, failed = run_all(tasks, args.jobs, deadline, work, keep)
    all_rows = list(dict.fromkeys(["default", *ROWS, *rows]))
    all_bases = list(
        dict.fromkeys([*bases, *(r["base"] for r in runs if r["base"] in BASES)])
    )
    summary, table = summarize(runs, all_bases, all_rows)

    answers_log = work_dir / "gsm8k.jsonl"
    answers = {(a["row"], a["seed"]): a["answers"] for a in read_jsonl(answers_log)}
    if args.gsm8k:
        gsm_rows = [winner if r == "winner" else r for r in args.gsm8k_rows.split(",")]
        evals = {}
        for row in dict.fromkeys(gsm_rows):
            for seed in range(args.seeds):
                adapter = work_dir / "adapters" / f"{bases[0]}/{row}/seed{seed}"
                if (row, seed) not in answers and (
                    adapter / "adapters.safetensors"
                ).is_file():
                    evals[f"{row}/seed{seed}"] = (
                        "gsm8k",
                        args,
                        models[bases[0]],
                        adapter,
                    )

        def keep_answers(name, result):
            report(name, result)
            row, seed = name.split("/")
            answers[(row, int(seed[4:]))] = result
            append_jsonl(answers_log, {"row": row, "seed": int(seed[4:]), "answers": result})  # fmt: skip

        _, eval_failed = run_all(evals, args.jobs, deadline, work, keep_answers)
        failed.update(eval_failed)
    gsm8k = compare_gsm8k(answers, all_rows)

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    print_table(["base", "row", "seeds", "trainable", "left out", "val loss @end",
                 "Δ vs default (same seed)", "gap recovered"], table)  # fmt: skip
    for row, g in gsm8k.items():
        extra = (f", {g['points_vs_default']:+.1f} points vs default, p={g['p_two_proportion']:.3f}"
                 f" (two-proportion), p={g['p_mcnemar']:.3f} (McNemar)"
                 if "p_mcnemar" in g else "")  # fmt: skip
        print(f"GSM8K {row}: {100 * g['exact_match']:.1f}% "
              f"({g['correct_per_seed']} of {g['questions']}){extra}")  # fmt: skip
    write_result(out_dir / f"allocation_{args.name}.json", {
        "benchmark": "allocation",
        "model": args.name,
        "command": " ".join(sys.argv),
        "environment": environment(),
        "settings": {k: str(v) for k, v in vars(args).items()},
        "winner": winner,
        "summary": summary,
        "gsm8k": gsm8k,
        "failed": failed,
        "not_run": sorted(n for n in tasks if n not in {f"{r['base']}/{r['row']}/seed{r['seed']}" for r in runs}),
        "runs": runs,
        "elapsed_seconds": time.monotonic() - start,
    })  # fmt: skip
    plot(
        summary,
        runs,
        all_bases,
        all_rows,
        args.name,
        out_dir / f"allocation_{args.name}.png",
    )


if __name__ == "__main__":
    main()
