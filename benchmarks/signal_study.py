"""Does a pre-training signal beat constant rank over all layers, each arm at its best learning rate?

Every arm trains mlx-lm's default budget (constant rank 8 on the last 16
layers) spread over all layers, except ``default`` (stock mlx-lm, the last
16 layers, the reference window). The arms, and why these combinations:

- ``constant_all``: the baseline to beat (``--rank-scaling constant``);
- ``by_kl_all``, ``by_grad_all``: the budget spread by quantization KL or by
  gradient importance (GoRA's ``mean |W*G|``);
- ``by_kl_scaled``, ``by_grad_scaled``: the same with ``--lora-scale
  per-rank``, so a module given more rank does not also take larger steps
  (with ``fixed`` scale every rank policy mixes allocation with step size;
  with constant rank the two scales are the same, so no ``constant_scaled``);
- ``constant_init``, ``by_grad_init``: ``--lora-init gradient`` (lora_a on
  the gradient's top directions), which is independent of the allocation, on
  the baseline and on the gradient allocation (GoRA's pairing);
- ``constant_plus``: LoRA+ (``--lora-plus-ratio 16``) on the baseline: it
  changes the optimizer, not the allocation;
- ``by_grad_all_in``: gradient allocation, gradient init, per-rank scale and
  LoRA+ together.

Each arm at each of ``--lrs`` (default 1e-4, 2e-4, 4e-4; the LoRA+ arms at a
quarter of each, ``LR_GRID_SCALE``) and ``--seeds`` seeds on each base
(``q50``, ``q40`` as in ``allocation.py``, from our own ``sensitivity`` +
``quantize``; the gradient signal is measured on each base). The best
learning rate of an arm is the one with the lowest mean final validation
loss (flagged when it is the grid's first or last); arms are compared with
``constant_all`` at its own best,
seed by seed, at the end and at iteration 50 (convergence). ``--arms`` and
``--lrs-from`` (an earlier result: each arm at the learning rate it was best
at there) run the second model; ``--gsm8k N`` adds exact match on N test
questions with McNemar tests against ``constant_all``.

    python benchmarks/signal_study.py --model SMOLLM2 --data GSM8K --name smollm2 --work W --jobs 8
    python benchmarks/signal_study.py --model QWEN --data GSM8K --name qwen1.5b --work W2 \\
        --bases q50 --arms default,constant_all,best3 --lrs-from results/signal_smollm2.json --gsm8k 219

Runs land in ``--work``/runs.jsonl as they finish (a second invocation
resumes); every invocation writes ``signal_NAME.json`` and ``.png``.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import allocation  # noqa: E402
from common import (  # noqa: E402
    append_jsonl,
    environment,
    print_table,
    read_jsonl,
    run_all,
    train_in_process,
    write_result,
)

ALL = dict(rank_budget="default", num_layers=-1)
ARMS = {
    "default": dict(rank_scaling=None, rank_budget=None, num_layers=None),
    "constant_all": dict(rank_scaling="constant", **ALL),
    "by_kl_all": dict(rank_scaling="by_kl", **ALL),
    "by_grad_all": dict(rank_scaling="by_grad", **ALL),
    "by_kl_scaled": dict(rank_scaling="by_kl", lora_scale="per-rank", **ALL),
    "by_grad_scaled": dict(rank_scaling="by_grad", lora_scale="per-rank", **ALL),
    "constant_init": dict(rank_scaling="constant", lora_init="gradient", **ALL),
    "by_grad_init": dict(rank_scaling="by_grad", lora_init="gradient", **ALL),
    "constant_plus": dict(rank_scaling="constant", lora_plus_ratio=16.0, **ALL),
    "by_grad_all_in": dict(rank_scaling="by_grad", lora_init="gradient",
                           lora_scale="per-rank", lora_plus_ratio=16.0, **ALL),
}  # fmt: skip
BASELINE = "constant_all"
# LoRA+ steps B at 16x the learning rate: its arms search a grid 4x lower, so
# that each arm's best learning rate lies inside the grid it searched
LR_GRID_SCALE = {"constant_plus": 0.25, "by_grad_all_in": 0.25}


def prepare(args, work):
    """The bases of ``allocation.py``, each with its gradient signal."""
    from mlx_lm_optiq import gradient, sensitivity

    models = allocation.prepare(args, work, args.bases.split(","))
    for base, model_dir in models.items():
        if base != allocation.REFERENCE and not (model_dir / "optiq" / "gradient.json").is_file():  # fmt: skip
            gradient.measure(sensitivity.build_parser().parse_args([
                str(model_dir), "--data", str(args.data), "--signal", "gradient",
                "--samples", str(args.sensitivity_samples),
                "--max-seq-length", str(args.sensitivity_length),
            ]))  # fmt: skip
    return models


def train(args, model_dir, arm, lr, seed, adapter_path):
    settings = dict(ARMS[arm])
    if settings["num_layers"] is None:
        settings["num_layers"] = allocation.default_window(model_dir)
    result = train_in_process(
        True,
        model=str(model_dir), data=str(args.data), adapter_path=str(adapter_path),
        iters=args.iters, batch_size=args.batch_size, learning_rate=lr,
        steps_per_eval=args.early, steps_per_report=args.early, val_batches=args.val_batches,
        save_every=10**9, max_seq_length=args.max_seq_length, mask_prompt=True, seed=seed,
        lora_parameters={"rank": args.rank, "dropout": 0.0, "scale": args.scale},
        **settings,
    )  # fmt: skip
    val = {
        r["iteration"] + 1: r["val_loss"] for r in result["val"]
    }  # mlx-lm reports it - 1
    return {
        "val_loss_early": val.get(args.early),
        "val_loss_final": val.get(args.iters),
        "trainable_parameters": result["trainable_parameters"],
        "wall_seconds": result["wall_seconds"],
    }


def work(kind, *a):
    return {"train": train, "gsm8k": allocation.evaluate}[kind](*a)


def best_learning_rates(runs):
    """``{(base, arm): lr}`` with the lowest mean final validation loss."""
    means = {}
    for r in runs:
        means.setdefault((r["base"], r["arm"], r["lr"]), []).append(r["val_loss_final"])
    best = {}
    for (base, arm, lr), losses in sorted(means.items()):
        mean = statistics.mean(losses)
        if (base, arm) not in best or mean < best[(base, arm)][1]:
            best[(base, arm)] = (lr, mean)
    return {key: lr for key, (lr, _) in best.items()}


def summarize(runs, arms):
    """Per base and arm at its best learning rate: the means, and the paired
    change from ``constant_all`` at its own best, at the end and at iteration ``--early``.
    """
    best = best_learning_rates(runs)
    at = {}
    for r in runs:
        if best.get((r["base"], r["arm"])) == r["lr"]:
            at.setdefault((r["base"], r["arm"]), {})[r["seed"]] = r
    summary, table = {}, []
    for base, arm in sorted(at, key=lambda k: (k[0], list(ARMS).index(k[1]))):
        if arm not in arms:
            continue
        mine, ref = at[(base, arm)], at.get((base, BASELINE), {})
        stats = {"best_lr": best[(base, arm)], "seeds": sorted(mine)}
        lrs = sorted({r["lr"] for r in runs if r["base"] == base and r["arm"] == arm})
        # a best at the end of a grid of three or more may lie beyond it
        stats["best_at_grid_edge"] = len(lrs) >= 3 and stats["best_lr"] in (lrs[0], lrs[-1])  # fmt: skip
        stats["val_final_by_lr"] = {
            str(lr): statistics.mean(r["val_loss_final"] for r in runs
                                     if (r["base"], r["arm"], r["lr"]) == (base, arm, lr))
            for lr in lrs
        }  # fmt: skip
        for when in ("final", "early"):
            losses = [r[f"val_loss_{when}"] for r in mine.values()]
            stats[f"val_{when}_mean"] = statistics.mean(losses)
            stats[f"val_{when}_std"] = statistics.pstdev(losses)
            paired = [mine[s][f"val_loss_{when}"] - ref[s][f"val_loss_{when}"] for s in mine if s in ref]  # fmt: skip
            if arm != BASELINE and paired:
                ref_mean = statistics.mean(ref[s][f"val_loss_{when}"] for s in mine if s in ref)  # fmt: skip
                stats[f"delta_{when}_percent"] = (
                    100 * statistics.mean(paired) / ref_mean
                )
                stats[f"seeds_lower_{when}"] = (
                    f"{sum(d < 0 for d in paired)}/{len(paired)}"
                )
        summary[f"{base}/{arm}"] = stats
        table.append((
            base, arm, f"{stats['best_lr']:g}" + (" (edge)" if stats["best_at_grid_edge"] else ""), len(mine),
            f"{stats['val_final_mean']:.4f} ± {stats['val_final_std']:.4f}",
            f"{stats['delta_final_percent']:+.2f}% ({stats['seeds_lower_final']})"
            if "delta_final_percent" in stats else "-",
            f"{stats['val_early_mean']:.4f}",
            f"{stats['delta_early_percent']:+.2f}% ({stats['seeds_lower_early']})"
            if "delta_early_percent" in stats else "-",
        ))  # fmt: skip
    return summary, table


def plot(summary, name, out, early):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bases = sorted({k.split("/")[0] for k in summary})
    fig, axes = plt.subplots(
        1, len(bases), figsize=(5.5 * len(bases), 4), squeeze=False
    )
    for ax, base in zip(axes[0], bases):
        shown = [a for a in ARMS if a != BASELINE and f"{base}/{a}" in summary
                 and "delta_final_percent" in summary[f"{base}/{a}"]]  # fmt: skip
        for i, arm in enumerate(shown):
            stats = summary[f"{base}/{arm}"]
            ax.bar(i - 0.2, stats["delta_final_percent"], 0.4, color="#8ab",
                   label="at the end" if i == 0 else None)  # fmt: skip
            ax.bar(i + 0.2, stats.get("delta_early_percent", 0), 0.4, color="#db8",
                   label=f"at iteration {early}" if i == 0 else None)  # fmt: skip
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xticks(range(len(shown)), [f"{a}\n{summary[f'{base}/{a}']['best_lr']:g}" for a in shown],
                      rotation=35, fontsize=7)  # fmt: skip
        ax.set_ylabel(f"val loss vs {BASELINE}, %, each at its best lr")
        ax.set_title(f"{name}, base {base}", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def chosen_arms(args):
    """``(arms, {arm: [lr]})``; ``bestN`` and ``--lrs-from`` read an earlier result."""
    lrs = [float(x) for x in args.lrs.split(",")]
    arms = args.arms.split(",")
    if not args.lrs_from:
        return arms, {arm: [lr * LR_GRID_SCALE.get(arm, 1.0) for lr in lrs] for arm in arms}  # fmt: skip
    earlier = json.loads(Path(args.lrs_from).read_text())["summary"]
    ranked = sorted(
        {k.split("/")[1] for k, s in earlier.items() if "delta_final_percent" in s},
        key=lambda a: statistics.mean(s["delta_final_percent"] for k, s in earlier.items()
                                      if k.endswith("/" + a) and "delta_final_percent" in s),
    )  # fmt: skip
    expanded = []
    for arm in arms:
        expanded += ranked[: int(arm[4:])] if arm.startswith("best") else [arm]
    arms = list(dict.fromkeys(expanded))
    best = {k.split("/")[1]: s["best_lr"] for k, s in earlier.items()}
    return arms, {arm: [best[arm]] if arm in best else lrs for arm in arms}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="float mlx-lm model directory")
    parser.add_argument("--data", required=True, help="GSM8K (train/valid/test.jsonl)")
    parser.add_argument("--name", required=True)
    parser.add_argument("--bases", default="q50,q40")
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--lrs", default="1e-4,2e-4,4e-4")
    parser.add_argument("--lrs-from", help="an earlier result: each arm at its best lr there; bestN: its N best arms")  # fmt: skip
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--early", type=int, default=50,
                        help="the iteration whose validation loss tells convergence")  # fmt: skip
    parser.add_argument("--val-batches", type=int, default=25)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--scale", type=float, default=20.0)
    parser.add_argument("--max-seq-length", type=int, default=512)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--sensitivity-samples", type=int, default=32)
    parser.add_argument("--sensitivity-length", type=int, default=256)
    parser.add_argument("--gsm8k", type=int, default=0, help="test questions (0: none)")
    parser.add_argument("--gsm8k-batch", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--budget-seconds", type=float, default=float("inf"))
    parser.add_argument("--work", required=True)
    parser.add_argument("--out-dir", default=str(HERE / "results"))
    args = parser.parse_args()
    start = time.monotonic()
    deadline = start + args.budget_seconds
    work_dir = Path(args.work)
    work_dir.mkdir(parents=True, exist_ok=True)
    arms, lrs = chosen_arms(args)
    print(f"arms: {', '.join(f'{a} at {lrs[a]}' for a in arms)}", flush=True)
    models = prepare(args, work_dir)
    print(f"bases and signals ready after {time.monotonic() - start:.0f} s", flush=True)
    log = work_dir / "runs.jsonl"
    runs = read_jsonl(log)
    have = {(r["base"], r["arm"], r["lr"], r["seed"]) for r in runs}
    tasks = {}
    for seed in range(args.seeds):
        for base in args.bases.split(","):
            for arm in arms:
                for lr in lrs[arm]:
                    if (base, arm, lr, seed) not in have:
                        name = f"{base}/{arm}/{lr:g}/seed{seed}"
                        tasks[name] = ("train", args, models[base], arm, lr, seed,
                                       work_dir / "adapters" / name)  # fmt: skip

    def keep(name, result):
        base, arm, lr, seed = name.split("/")
        print(f"{name}: val {result['val_loss_final']:.4f} (at {args.early}: {result['val_loss_early']:.4f}), "
              f"{result['wall_seconds']:.0f} s", flush=True)  # fmt: skip
        run = {
            "base": base,
            "arm": arm,
            "lr": float(lr),
            "seed": int(seed[4:]),
            **result,
        }
        runs.append(run)
        append_jsonl(log, run)

    _, failed = run_all(tasks, args.jobs, deadline, work, keep)
    summary, table = summarize(runs, arms)
    gsm8k = gsm8k_results(args, work_dir, models, arms, summary, deadline, failed)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    print_table(["base", "arm", "best lr", "seeds", "val loss @end", f"vs {BASELINE} @end",
                 f"val @{args.early}", f"vs {BASELINE} @{args.early}"], table)  # fmt: skip
    for arm, g in gsm8k.items():
        extra = (f", {g['points_vs_default']:+.1f} points vs {BASELINE}, p={g['p_mcnemar']:.3f} (McNemar)"
                 if "p_mcnemar" in g else "")  # fmt: skip
        print(f"GSM8K {arm}: {100 * g['exact_match']:.1f}%{extra}")
    write_result(out_dir / f"signal_{args.name}.json", {
        "benchmark": "signal", "model": args.name, "command": " ".join(sys.argv),
        "environment": environment(), "settings": {k: str(v) for k, v in vars(args).items()},
        "arms": {a: ARMS[a] for a in arms}, "summary": summary, "gsm8k": gsm8k,
        "failed": failed, "not_run": sorted(set(tasks) - {f"{r['base']}/{r['arm']}/{r['lr']:g}/seed{r['seed']}" for r in runs}),
        "runs": runs, "elapsed_seconds": time.monotonic() - start,
    })  # fmt: skip
    plot(summary, args.name, out_dir / f"signal_{args.name}.png", args.early)


def gsm8k_results(args, work_dir, models, arms, summary, deadline, failed):
    """Exact match of each arm at its best learning rate on the first base,
    McNemar against ``constant_all`` (``allocation.compare_gsm8k``'s tests)."""
    if not args.gsm8k:
        return {}
    base = args.bases.split(",")[0]
    answers_log = work_dir / "gsm8k.jsonl"
    answers = {(a["arm"], a["seed"]): a["answers"] for a in read_jsonl(answers_log)}
    evals = {}
    for arm in arms:
        lr = summary.get(f"{base}/{arm}", {}).get("best_lr")
        for seed in range(args.seeds):
            adapter = (
                work_dir / "adapters" / f"{base}/{arm}/{lr:g}/seed{seed}"
                if lr
                else None
            )
            if adapter and (arm, seed) not in answers and (adapter / "adapters.safetensors").is_file():  # fmt: skip
                evals[f"{arm}/seed{seed}"] = ("gsm8k", args, models[base], adapter)

    def keep(name, result):
        arm, seed = name.split("/")
        answers[(arm, int(seed[4:]))] = result
        print(f"{name}: GSM8K {sum(result)}/{len(result)}", flush=True)
        append_jsonl(
            answers_log, {"arm": arm, "seed": int(seed[4:]), "answers": result}
        )

    _, eval_failed = run_all(evals, args.jobs, deadline, work, keep)
    failed.update(eval_failed)
    return allocation.compare_gsm8k(answers, arms, against=BASELINE)


if __name__ == "__main__":
    main()
