"""Pictures of the last results: ``quality.png``, ``ceiling.png``, ``sensitivity_speed.png``.

    pip install matplotlib
    python benchmarks/plot.py [--results benchmarks/results]

Reads ``quality.json`` and ``ceiling.json`` (plus any ``ceiling_refine_*.json``,
single-length measurements of the same setup) and ``sensitivity_speed*.json``,
and writes the PNGs beside them.
"""

import argparse
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
ORDER = ["by_bits", "by_bits+match", "by_kl", "by_kl+match"]


def quality_plot(doc, out):
    import matplotlib.pyplot as plt

    bases = list(dict.fromkeys(r["base"] for r in doc["runs"]))
    ran = {r["policy"] for r in doc["runs"]}
    policies = [p for p in ORDER if p in ran] + sorted(ran - set(ORDER) - {"constant"})
    fig, axes = plt.subplots(1, len(bases), figsize=(5 * len(bases), 4), sharey=True)
    axes = [axes] if len(bases) == 1 else axes
    iters = doc["settings"]["iters"]
    for ax, base in zip(axes, bases):
        const = {r["seed"]: r["val_loss_final"] for r in doc["runs"]
                 if r["base"] == base and r["policy"] == "constant"}  # fmt: skip
        for x, policy in enumerate(policies):
            deltas = [r["val_loss_final"] - const[r["seed"]] for r in doc["runs"]
                      if r["base"] == base and r["policy"] == policy and r["seed"] in const]  # fmt: skip
            ax.scatter([x] * len(deltas), deltas, color="tab:blue", alpha=0.6, zorder=3)
            if deltas:
                ax.scatter([x], [sum(deltas) / len(deltas)], marker="_", s=600, color="black", zorder=4)  # fmt: skip
        spread = [r["val_loss_final"] for r in doc["runs"] if r["base"] == base and r["policy"] == "constant"]  # fmt: skip
        if len(spread) > 1:
            half = (max(spread) - min(spread)) / 2
            ax.axhspan(-half, half, color="0.9", zorder=1, label="± half the seed range of constant")  # fmt: skip
        ax.axhline(0, color="0.4", linewidth=1, zorder=2)
        ax.set_xticks(range(len(policies)), policies, rotation=20)
        ax.set_title(f"{base} base")
        ax.legend(loc="upper right", fontsize=8)
    axes[0].set_ylabel(f"val loss @ {iters} − constant's (same seed)")
    fig.suptitle("Rank policies vs constant rank: below zero is better (dots: seeds, bar: mean)")  # fmt: skip
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def ceiling_points(results):
    points = {}
    docs = [json.loads((results / "ceiling.json").read_text())]
    docs += [json.loads(p.read_text()) for p in sorted(results.glob("ceiling_refine_*.json"))]  # fmt: skip
    for doc in docs:
        for size, res in doc["qlora_by_bits"].items():
            for length, r in res["lengths"].items():
                if "error" not in r:
                    points.setdefault(size, {})[int(length)] = r
    return points, docs[0]


def ceiling_plot(results, out):
    import matplotlib.pyplot as plt

    points, doc = ceiling_points(results)
    fig, (mem, tps) = plt.subplots(1, 2, figsize=(11, 4))
    for size, rows in points.items():
        lengths = sorted(rows)
        mem.plot(lengths, [rows[n]["peak_memory_gb"] for n in lengths], marker="o", label=size)  # fmt: skip
        tps.plot(lengths, [rows[n]["tokens_per_second"] for n in lengths], marker="o", label=size)  # fmt: skip
    limit = doc.get("gpu_memory_limit_gb")
    if limit:
        mem.axhline(limit, color="0.5", linestyle="--", label=f"search limit {limit:.0f} GB")  # fmt: skip
    for ax, label in ((mem, "peak memory (GB)"), (tps, "tokens/s")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length (batch 1)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    tps.set_yscale("log")
    fig.suptitle("QLoRA by_bits on one H200 (MLX CUDA): random-init Llama-family shapes, 4/8-bit base")  # fmt: skip
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def sensitivity_plot(docs, out):
    """Seconds per trial of each way the pass has run, one group of bars per
    run (log scale: CPU and GPU differ by 100x)."""
    import matplotlib.pyplot as plt

    ways = list(dict.fromkeys(w for d in docs for w in d["seconds_per_trial"]))
    colours = dict(zip(ways, ["tab:gray", "tab:cyan", "tab:blue", "tab:purple"]))
    labels = {"before": "whole model per trial", "per module": "a module's bit-widths per pass",
              "now": "a block's modules per pass, then the head"}  # fmt: skip
    width = 0.8 / len(ways)
    fig, ax = plt.subplots(figsize=(3 + 2.2 * len(docs), 4.4))
    top = max(s for d in docs for s in d["seconds_per_trial"].values())
    for x, doc in enumerate(docs):
        seconds = doc["seconds_per_trial"]
        for k, way in enumerate(w for w in ways if w in seconds):
            ax.bar(x - 0.4 + width * (k + 0.5), seconds[way], width=width * 0.95,
                   color=colours[way], label=labels.get(way, way) if x == 0 else None)  # fmt: skip
            if way != "before":
                ax.text(x - 0.4 + width * (k + 0.5), seconds[way] * 1.15,
                        f"{seconds['before'] / seconds[way]:.1f}x", ha="center", fontsize=8)  # fmt: skip
    names = [f"{d['environment'].get('gpu_name') or 'CPU'}\n{d['samples']} x {d['max_seq_length']} tokens"
             for d in docs]  # fmt: skip
    ax.set_xticks(range(len(docs)), names, fontsize=9)
    ax.set_yscale("log")
    ax.set_ylim(top=top * 30)
    ax.set_ylabel("seconds per trial (mean of the timed modules)")
    ax.set_title(f"sensitivity on {docs[0]['model']}\n(a trial: one module at one bit-width)", fontsize=10)  # fmt: skip
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default=str(HERE / "results"))
    args = parser.parse_args()
    results = Path(args.results)
    if (results / "quality.json").exists():
        quality_plot(json.loads((results / "quality.json").read_text()), results / "quality.png")  # fmt: skip
        print(f"wrote {results / 'quality.png'}")
    if (results / "ceiling.json").exists():
        ceiling_plot(results, results / "ceiling.png")
        print(f"wrote {results / 'ceiling.png'}")
    runs = sorted(results.glob("sensitivity_speed*.json"))
    if runs:
        sensitivity_plot([json.loads(p.read_text()) for p in runs], results / "sensitivity_speed.png")  # fmt: skip
        print(f"wrote {results / 'sensitivity_speed.png'}")


if __name__ == "__main__":
    main()
