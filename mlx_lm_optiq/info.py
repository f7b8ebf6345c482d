"""Show what an adapter directory holds: ``mlx_lm_optiq.info DIR``.

Reads adapters written with ``--rank-scaling``, stock mlx-lm adapters,
mlx-optiq 0.7.7 adapters and PEFT LoRA adapters. ``--plot ranks.png`` draws
where the budget went: a layer x module-type heat map of the ranks, with
each module's KL beside it when the sidecar or the base model has it.
"""

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional

from ._cli import add_version, run_command
from .adapter_record import (
    MLX_LM,
    MLX_OPTIQ,
    OURS,
    PEFT,
    AdapterRecord,
    from_adapter_dir,
)
from .atomic import atomic_write
from .errors import OptiqError
from .metadata import SENSITIVITY, canonical, read_sensitivity
from .ranks import describe, distribution, layer_of, rank_span

TITLES = {
    OURS: "OptiQ LoRA adapter",
    MLX_OPTIQ: "OptiQ LoRA adapter (mlx-optiq)",
    MLX_LM: "mlx-lm LoRA adapter",
    PEFT: "PEFT LoRA adapter",
}


def _layer_sort_key(path):
    return [int(p) if p.isdigit() else p for p in path.split(".")]


def _facts(module):
    f = module.facts
    return {"bits": f.bits, "bits_source": f.bits_source, "kl": f.kl, "kl_source": f.kl_source,
            "grad": f.grad, "grad_source": f.grad_source}  # fmt: skip


def as_dict(record: AdapterRecord) -> dict:
    """The ``--json`` view of an :class:`AdapterRecord`."""
    ranks = record.ranks
    return {
        "path": str(record.path),
        "kind": record.kind,
        "base_model": record.base_model,
        "base_rank": record.base_rank,
        "rank_scaling": record.scaling,
        "rank_budget": record.budget,
        "budget_parameters": record.budget_parameters,
        "scale": record.scale,
        "dropout": record.dropout,
        "rank_distribution": {str(k): v for k, v in distribution(ranks).items()},
        "adapted_modules": sum(1 for r in ranks.values() if r),
        "left_out_modules": record.left_out,
        "trainable_parameters": record.trainable_parameters,
        "constant_rank_parameters": record.constant_rank_parameters,
        "settings": dict(record.settings),
        "modules": {
            p: {
                "rank": record.modules[p].rank,
                "scale": record.scales[p],
                **_facts(record.modules[p]),
            }
            for p in sorted(record.modules, key=_layer_sort_key)
        },
    }


def _scale_text(record: AdapterRecord) -> str:
    """The adapter's scale, and the range of the modules' own where they have one."""
    own = sorted({m.scale for m in record.modules.values() if m.rank and m.scale is not None})  # fmt: skip
    if not own:
        return f"{record.scale}"
    rule = record.settings.get("lora_scale")
    return (f"{record.scale} (per module {own[0]:.4g}-{own[-1]:.4g}"
            + (f", lora_scale {rule})" if rule else ")"))  # fmt: skip


def render(record: AdapterRecord, layers: bool = False) -> str:
    """The block ``info`` prints (and, with ``layers``, a per-module table)."""
    lines = [
        TITLES[record.kind],
        f"  base: {record.base_model or 'unknown'}",
        f"  ranks: {rank_span(record.ranks)} per module (base rank {record.base_rank}"
        + (f", scaling: {record.scaling})" if record.scaling else ")"),
        f"  scale: {_scale_text(record)}  dropout: {record.dropout}",
    ]
    if record.budget_parameters is not None:
        lines.append(
            f"  budget: {record.budget} ({record.budget_parameters:,} parameters)"
        )
    trained = [f"lora_init {record.settings['lora_init']}"] if record.settings.get("lora_init", "default") != "default" else []  # fmt: skip
    if record.settings.get("lora_plus_ratio") not in (None, 1, 1.0):
        trained.append(f"lora_plus_ratio {record.settings['lora_plus_ratio']}")
    if trained:
        lines.append(f"  trained with: {', '.join(trained)}")
    described = describe(record.ranks, record.units, record.base_rank)
    lines += ["  " + line for line in described.splitlines()]
    if layers:
        width = max(len(p) for p in record.modules)
        lines.append("")
        lines.append(f"  {'module':<{width}}  rank  bits  kl          source")
        for path in sorted(record.modules, key=_layer_sort_key):
            module = record.modules[path]
            bits, kl = module.facts.bits, module.facts.kl
            lines.append(
                f"  {path:<{width}}  {module.rank:>4}  "
                f"{bits if bits is not None else '-':>4}  "
                f"{f'{kl:.4g}' if kl is not None else '-':<10}  "
                f"{module.facts.bits_source or '-'}"
            )
    return "\n".join(lines)


def module_kl(record: AdapterRecord) -> Dict[str, float]:
    """``{module path: KL}`` from the sidecar, else from the base model's
    ``optiq/sensitivity.json`` when it is a local directory."""
    kl = {p: f.kl for p, f in record.facts.items() if f.kl is not None}
    if kl or not record.base_model:
        return kl
    sensitivity = Path(record.base_model) / SENSITIVITY
    if not sensitivity.is_file():
        return {}
    measured = read_sensitivity(sensitivity).kl
    return {
        p: measured[canonical(p)] for p in record.modules if canonical(p) in measured
    }


_KIND_ORDER = {
    k: i
    for i, k in enumerate(
        ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    )
}


def _matplotlib():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise OptiqError(
            "--plot needs matplotlib: pip install 'mlx-lm-optiq[plot]'"
        ) from None
    return matplotlib, plt


def heat_grid(record: AdapterRecord) -> tuple:
    """``(layers, module kinds, rank grid, KL grid)`` for the heat map: one row
    per transformer layer, one column per module kind, NaN where empty."""
    import numpy as np

    in_layers = {p: layer_of(p) for p in record.modules if layer_of(p) is not None}
    if not in_layers:
        raise OptiqError("no module of a transformer layer to draw", record.path)
    kind_of = {p: p.split(f"layers.{i}.", 1)[1] for p, i in in_layers.items()}
    layers = sorted(set(in_layers.values()))
    kinds = sorted(
        set(kind_of.values()),
        key=lambda k: (_KIND_ORDER.get(k.rsplit(".", 1)[-1], len(_KIND_ORDER)), k),
    )
    rank = np.full((len(layers), len(kinds)), np.nan)
    kl = np.full_like(rank, np.nan)
    kls = module_kl(record)
    for path, layer in in_layers.items():
        cell = layers.index(layer), kinds.index(kind_of[path])
        if record.modules[path].rank:
            rank[cell] = record.modules[path].rank  # left out: an empty cell
        if kls.get(path, 0) > 0:
            kl[cell] = kls[path]
    return layers, kinds, rank, kl


def plot(record: AdapterRecord, out) -> None:
    """:func:`heat_map` written to the image file ``out``."""
    _, plt = _matplotlib()
    fig = heat_map(record)
    atomic_write(Path(out), lambda tmp: fig.savefig(tmp, dpi=120))
    plt.close(fig)


def heat_map(record: AdapterRecord):
    """A layer x module-type heat map of the ranks (and KL, when known).

    Ranks are whole numbers, so each rank that occurs gets its own colour
    and its own tick; every cell is labelled with its rank when they fit.
    """
    import numpy as np

    matplotlib, plt = _matplotlib()
    layers, kinds, rank, kl = heat_grid(record)
    values = sorted({int(v) for v in rank[~np.isnan(rank)]}) or [0]
    # drawn by the index of each rank among those that occur: one band each
    index = np.vectorize(lambda v: np.nan if np.isnan(v) else values.index(int(v)))
    colours = plt.get_cmap("viridis", max(len(values), 2))
    panels = [
        ("LoRA rank (empty: left out)", index(rank) if rank.size else rank,
         matplotlib.colors.ListedColormap(colours(range(len(values)))),
         matplotlib.colors.BoundaryNorm(np.arange(len(values) + 1) - 0.5, len(values)),
         values),
    ]  # fmt: skip
    if not np.all(np.isnan(kl)):
        norm = matplotlib.colors.LogNorm(np.nanmin(kl), np.nanmax(kl))
        panels.append(("KL at the lowest measured bits", kl, "magma", norm, None))
    height = max(3.5, 0.3 * len(layers) + 1.8)
    fig, axes = plt.subplots(
        1, len(panels), figsize=(2.6 + 1.3 * len(kinds) * len(panels), height)
    )
    for ax, (title, grid, cmap, norm, ticks) in zip(np.atleast_1d(axes), panels):
        image = ax.imshow(
            np.ma.masked_invalid(grid), aspect="auto", cmap=cmap, norm=norm
        )
        ax.set_xticks(range(len(kinds)), [k.rsplit(".", 1)[-1] for k in kinds])
        ax.tick_params(axis="x", labelrotation=45, labelsize=9)
        ax.set_yticks(range(len(layers)), [str(k) for k in layers], fontsize=8)
        ax.set_ylabel("layer")
        ax.set_title(title, fontsize=10)
        bar = fig.colorbar(image, ax=ax, shrink=0.8)
        if ticks is not None:  # a rank per band, at its middle
            bar.set_ticks(range(len(ticks)), labels=[str(t) for t in ticks])
            bar.ax.tick_params(labelsize=9)
    if len(layers) <= 64:
        _label_cells(np.atleast_1d(axes)[0], rank, values, colours)
    adapted = len(record.modules) - len(record.left_out)
    fig.suptitle(
        f"{record.path.name}: {record.scaling or 'constant'}, "
        f"{record.trainable_parameters:,} parameters, "
        f"{adapted} modules adapted, {len(record.left_out)} left out",
        fontsize=10,
    )
    fig.tight_layout()
    return fig


def _label_cells(ax, rank, values, colours):
    """Each cell's rank, in black or white as its colour is light or dark."""
    import numpy as np

    for (row, col), value in np.ndenumerate(rank):
        if not np.isnan(value):
            red, green, blue, _ = colours(values.index(int(value)))
            light = 0.299 * red + 0.587 * green + 0.114 * blue > 0.5
            ax.text(col, row, int(value), ha="center", va="center", fontsize=9,
                    color="black" if light else "white")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlx_lm_optiq.info",
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
    add_version(parser)
    return parser


def show(args: argparse.Namespace) -> None:
    record = from_adapter_dir(args.adapter_path)
    if args.json:
        print(json.dumps(as_dict(record), indent=2))
    else:
        print(render(record, layers=args.layers))
    if args.plot:
        plot(record, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr if args.json else sys.stdout)


def main(argv: Optional[List[str]] = None) -> int:
    return run_command(show, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
