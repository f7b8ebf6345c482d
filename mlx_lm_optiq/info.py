"""Show what an adapter directory holds: ``python -m mlx_lm_optiq.info DIR``.

Reads adapters written with ``--rank-scaling``, stock mlx-lm adapters,
mlx-optiq 0.7.7 adapters and PEFT LoRA adapters. ``--plot ranks.png`` draws
where the budget went: a layer x module-type heat map of the ranks, with
each module's KL beside it when the sidecar or the base model has it.
"""

import argparse
import json
import sys
from pathlib import Path

from ._cli import run_command
from .adapter_read import read_adapter
from .atomic import atomic_write
from .errors import OptiqError
from .metadata import SENSITIVITY, canonical, read_sensitivity
from .ranks import (
    constant_parameters,
    describe,
    distribution,
    layer_of,
    parameter_count,
)

TITLES = {
    "mlx-lm-optiq": "OptiQ LoRA adapter",
    "mlx-optiq": "OptiQ LoRA adapter (mlx-optiq)",
    "mlx-lm": "mlx-lm LoRA adapter",
    "peft": "PEFT LoRA adapter",
}


def _layer_sort_key(path):
    return [int(p) if p.isdigit() else p for p in path.split(".")]


def as_dict(summary):
    return {
        "path": str(summary.path),
        "kind": summary.kind,
        "base_model": summary.base_model,
        "base_rank": summary.base_rank,
        "rank_scaling": summary.scaling,
        "rank_budget": summary.budget,
        "budget_parameters": summary.budget_parameters,
        "scale": summary.scale,
        "dropout": summary.dropout,
        "rank_distribution": {
            str(k): v for k, v in distribution(summary.ranks).items()
        },
        "adapted_modules": sum(1 for r in summary.ranks.values() if r),
        "left_out_modules": sorted(p for p, r in summary.ranks.items() if not r),
        "trainable_parameters": parameter_count(summary.ranks, summary.units),
        "constant_rank_parameters": constant_parameters(
            summary.units, summary.base_rank
        ),
        "modules": {
            p: {
                "rank": r,
                **{k: v for k, v in summary.modules.get(p, {}).items() if k != "rank"},
            }
            for p, r in sorted(
                summary.ranks.items(), key=lambda kv: _layer_sort_key(kv[0])
            )
        },
    }


def render(summary, layers=False):
    lines = [
        TITLES[summary.kind],
        f"  base: {summary.base_model or 'unknown'}",
        f"  rank: {summary.base_rank} (scaling: {summary.scaling or 'constant'})",
        f"  scale: {summary.scale}  dropout: {summary.dropout}",
    ]
    if summary.budget_parameters is not None:
        lines.append(
            f"  budget: {summary.budget} ({summary.budget_parameters:,} parameters)"
        )
    lines += [
        "  " + line
        for line in describe(
            summary.ranks, summary.units, summary.base_rank
        ).splitlines()
    ]
    if layers:
        width = max(len(p) for p in summary.ranks)
        lines.append("")
        lines.append(f"  {'module':<{width}}  rank  bits  kl          source")
        for path in sorted(summary.ranks, key=_layer_sort_key):
            facts = summary.modules.get(path, {})
            bits = facts.get("bits")
            kl = facts.get("kl")
            lines.append(
                f"  {path:<{width}}  {summary.ranks[path]:>4}  "
                f"{bits if bits is not None else '-':>4}  "
                f"{f'{kl:.4g}' if kl is not None else '-':<10}  "
                f"{facts.get('bits_source') or '-'}"
            )
    return "\n".join(lines)


def module_kl(summary):
    """``{module path: KL}`` from the sidecar, else from the base model's
    ``optiq/sensitivity.json`` when it is a local directory."""
    kl = {p: m["kl"] for p, m in summary.modules.items() if m.get("kl") is not None}
    if kl or not summary.base_model:
        return kl
    sensitivity = Path(summary.base_model) / SENSITIVITY
    if not sensitivity.is_file():
        return {}
    measured = read_sensitivity(sensitivity).kl
    return {
        p: measured[canonical(p)] for p in summary.ranks if canonical(p) in measured
    }


_KIND_ORDER = {
    k: i
    for i, k in enumerate(
        ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    )
}


def plot(summary, out):
    """A layer x module-type heat map of the ranks (and KL, when known) to ``out``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np
    except ImportError:
        raise OptiqError(
            "--plot needs matplotlib: pip install 'mlx-lm-optiq[plot]'"
        ) from None
    in_layers = {p: layer_of(p) for p in summary.ranks if layer_of(p) is not None}
    if not in_layers:
        raise OptiqError("no module of a transformer layer to draw", summary.path)
    layers = sorted(set(in_layers.values()))
    kinds = sorted(
        {p.split(f"layers.{in_layers[p]}.", 1)[1] for p in in_layers},
        key=lambda k: (_KIND_ORDER.get(k.rsplit(".", 1)[-1], len(_KIND_ORDER)), k),
    )
    rank = np.full((len(layers), len(kinds)), np.nan)
    kl = np.full_like(rank, np.nan)
    kls = module_kl(summary)
    for path, layer in in_layers.items():
        row = layers.index(layer)
        col = kinds.index(path.split(f"layers.{layer}.", 1)[1])
        if summary.ranks[path]:
            rank[row, col] = summary.ranks[path]  # left out: an empty cell
        if path in kls and kls[path] > 0:
            kl[row, col] = kls[path]
    adapted = sum(1 for r in summary.ranks.values() if r)
    panels = [("LoRA rank (empty: left out)", rank, "viridis", None)]
    if not np.all(np.isnan(kl)):
        norm = matplotlib.colors.LogNorm(np.nanmin(kl), np.nanmax(kl))
        panels.append(("KL at the lowest measured bits", kl, "magma", norm))
    height = max(3.0, 0.22 * len(layers) + 1.6)
    fig, axes = plt.subplots(
        1, len(panels), figsize=(2.2 + 1.1 * len(kinds) * len(panels), height)
    )
    for ax, (title, values, cmap, norm) in zip(np.atleast_1d(axes), panels):
        image = ax.imshow(
            np.ma.masked_invalid(values), aspect="auto", cmap=cmap, norm=norm
        )
        ax.set_xticks(range(len(kinds)), [k.rsplit(".", 1)[-1] for k in kinds])
        ax.tick_params(axis="x", labelrotation=45)
        ax.set_yticks(range(len(layers)), [str(k) for k in layers])
        ax.set_ylabel("layer")
        ax.set_title(title, fontsize=9)
        fig.colorbar(image, ax=ax, shrink=0.8)
    if len(layers) <= 64:
        first = np.atleast_1d(axes)[0]
        middle = (np.nanmin(rank) + np.nanmax(rank)) / 2 if adapted else 0
        for (row, col), value in np.ndenumerate(rank):
            if not np.isnan(value):
                color = "white" if value < middle else "black"
                first.text(
                    col, row, int(value), ha="center", va="center", fontsize=6,
                    color=color,
                )  # fmt: skip
    fig.suptitle(
        f"{summary.path.name}: {summary.scaling or 'constant'}, "
        f"{parameter_count(summary.ranks, summary.units):,} parameters, "
        f"{adapted} modules adapted, {len(summary.ranks) - adapted} left out",
        fontsize=9,
    )
    fig.tight_layout()
    atomic_write(Path(out), lambda tmp: fig.savefig(tmp, dpi=110))
    plt.close(fig)


def build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m mlx_lm_optiq.info",
        description="Show the rank distribution and parameter counts of a LoRA "
        "adapter directory (mlx-lm-optiq, stock mlx-lm, mlx-optiq or PEFT).",
    )
    parser.add_argument("adapter_path", help="the adapter directory")
    parser.add_argument(
        "--layers", action="store_true", help="also print a per-module table"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead")
    parser.add_argument(
        "--plot",
        metavar="PNG",
        help="also draw a layer x module-type heat map of the ranks (and KL) "
        "to PNG (needs matplotlib: the [plot] extra)",
    )
    return parser


def show(args):
    summary = read_adapter(args.adapter_path)
    if args.json:
        print(json.dumps(as_dict(summary), indent=2))
    else:
        print(render(summary, layers=args.layers))
    if args.plot:
        plot(summary, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr if args.json else sys.stdout)


def main(argv=None):
    return run_command(show, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
