"""Export an adapter for other loaders: ``mlx_lm_optiq.export DIR``.

``--peft OUT`` writes a clean PEFT-only directory (``adapter_config.json`` with
only PEFT's keys, ``adapter_model.safetensors``). ``--pad OUT`` writes a
uniform-rank mlx-lm adapter that stock mlx-lm loads without the plugin: every
module is zero-padded to the largest rank, which computes the same function,
and per-module scales are folded into ``lora_b``. Either output is built in a
temporary directory and renamed into place, so a failure leaves nothing behind.
"""

import argparse
import sys
from collections import Counter
from pathlib import Path
from typing import List, Optional

from . import adapter_read
from ._cli import add_version, run_command
from .adapter_read import load_modules
from .adapter_record import from_adapter_dir
from .adapter_write import check_peft_architecture, peft_config, save_peft_tensors
from .atomic import atomic_write_dir, atomic_write_json
from .errors import OptiqError
from .layout import CONFIG, MLX_WEIGHTS, PEFT_WEIGHTS


def _model_type(record, base):
    if record.model_type:
        return record.model_type
    for model_dir in (base, record.base_model):
        if model_dir and (Path(model_dir) / "config.json").is_file():
            return adapter_read.read_json(Path(model_dir) / "config.json").get(
                "model_type"
            )
    raise OptiqError(
        "can't tell the model architecture; pass --base with the local directory "
        "of the base model",
        record.path,
    )


def check_module_names(base: str, paths) -> bool:
    """Refuse paths that the transformers model ``base`` does not have.

    PEFT silently skips a target module that matches nothing, so a wrong path
    would load "fine" and compute the base model.
    """
    try:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError:
        return False
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base))
    names = {n for n, _ in model.named_modules()}
    missing = sorted(set(paths) - names)
    if missing:
        raise OptiqError(
            f"{len(missing)} module paths are not in the transformers model {base} "
            f"(e.g. {missing[0]})"
        )
    return True


def _check_or_warn(base: str, paths) -> None:
    """:func:`check_module_names`, or a warning that says why it could not run."""
    if not (Path(base) / "config.json").is_file():
        why = f"--base {base} is not a local model directory with a config.json"
    elif check_module_names(base, paths):
        return
    else:
        why = (
            "torch and transformers are not installed (pip install "
            "'mlx-lm-optiq[hf]' installs them)"
        )
    print(
        f"WARNING: the module paths were NOT checked against {base}: {why}. PEFT "
        "skips a target module that matches nothing, so a wrong path would load "
        "without error and compute the base model.",
        file=sys.stderr,
    )


def export_peft(adapter_dir, out, base: Optional[str] = None) -> None:
    adapter_dir = Path(adapter_dir)
    record = from_adapter_dir(adapter_dir)
    modules, dropout = load_modules(adapter_dir)
    check_peft_architecture(_model_type(record, base))
    if base:
        _check_or_warn(base, modules)
    scales = Counter(scale for _, _, scale in modules.values())
    scale = scales.most_common(1)[0][0]
    ranks = {p: a.shape[1] for p, (a, _, _) in modules.items()}
    base_rank = record.base_rank
    peft = peft_config(ranks, base_rank, scale, dropout, base or record.base_model)
    # a module whose own scale differs keeps its function through its alpha
    for path, (_, _, s) in modules.items():
        if s != scale or ranks[path] != base_rank:
            peft["alpha_pattern"][path] = s * ranks[path]
    tensors = {}
    for path, (a, b, _) in modules.items():
        tensors[f"{path}.lora_a"], tensors[f"{path}.lora_b"] = a, b

    def write(tmp):
        save_peft_tensors(tmp / PEFT_WEIGHTS, tensors)
        atomic_write_json(tmp / CONFIG, peft)

    atomic_write_dir(out, write)


def export_padded(adapter_dir, out) -> None:
    import mlx.core as mx

    adapter_dir = Path(adapter_dir)
    modules, dropout = load_modules(adapter_dir)
    rank = max(a.shape[1] for a, _, _ in modules.values())
    scale = Counter(s for _, _, s in modules.values()).most_common(1)[0][0]
    tensors = {}
    for path, (a, b, s) in modules.items():
        pad = rank - a.shape[1]
        tensors[f"{path}.lora_a"] = mx.pad(a, [(0, 0), (0, pad)])
        tensors[f"{path}.lora_b"] = mx.pad(b * (s / scale), [(0, pad), (0, 0)])
    if adapter_read.is_peft_dir(adapter_dir):
        layer_keys = sorted(
            {p.split(".", 3)[3] for p in modules if p.startswith("model.layers.")}
        )
        config = {
            "fine_tune_type": "lora",
            "num_layers": -1,
            "lora_parameters": {"keys": layer_keys},
        }
    else:
        config = adapter_read.read_json(adapter_dir / CONFIG)
        peft_keys = set(peft_config({}, 1, 1.0))
        config = {
            k: v
            for k, v in config.items()
            if k not in peft_keys and not k.startswith("rank")
        }
    config["lora_parameters"] = {
        **{
            k: v
            for k, v in config.get("lora_parameters", {}).items()
            if k != "rank_pattern"
        },
        "rank": rank,
        "scale": scale,
        "dropout": dropout,
    }

    def write(tmp):
        mx.save_safetensors(str(tmp / MLX_WEIGHTS), tensors)
        atomic_write_json(tmp / CONFIG, config)

    atomic_write_dir(out, write)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlx_lm_optiq.export",
        description="Export a LoRA adapter directory: a clean PEFT-only copy, or a "
        "uniform-rank copy that stock mlx-lm loads without the plugin.",
    )
    parser.add_argument("adapter_path", help="the adapter directory to export")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--peft", metavar="OUT", help="write a PEFT-only adapter to OUT")
    what.add_argument(
        "--pad",
        metavar="OUT",
        help="write a zero-padded uniform-rank mlx-lm adapter to OUT",
    )
    parser.add_argument(
        "--base",
        help="base model for PEFT's base_model_name_or_path (a Hugging Face id or a "
        "local transformers directory, whose module names are then checked)",
    )
    add_version(parser)
    return parser


def export(args: argparse.Namespace) -> None:
    if args.peft:
        export_peft(args.adapter_path, args.peft, args.base)
        print(f"PEFT adapter written to {args.peft}")
    else:
        export_padded(args.adapter_path, args.pad)
        print(f"uniform-rank mlx-lm adapter written to {args.pad}")


def main(argv: Optional[List[str]] = None) -> int:
    return run_command(export, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
