"""Show what an adapter directory holds: ``python -m mlx_lm_optiq.info DIR``.

Reads adapters written with ``--rank-scaling``, stock mlx-lm adapters,
mlx-optiq 0.7.7 adapters and PEFT LoRA adapters.
"""

import argparse
import json
import sys

from ._cli import run_command
from .adapter_read import read_adapter
from .ranks import constant_parameters, describe, distribution, parameter_count

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
        "scale": summary.scale,
        "dropout": summary.dropout,
        "rank_distribution": {
            str(k): v for k, v in distribution(summary.ranks).items()
        },
        "adapted_modules": len(summary.ranks),
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
    return parser


def show(args):
    summary = read_adapter(args.adapter_path)
    if args.json:
        print(json.dumps(as_dict(summary), indent=2))
    else:
        print(render(summary, layers=args.layers))


def main(argv=None):
    return run_command(show, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
