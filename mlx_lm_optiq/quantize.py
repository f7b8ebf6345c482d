"""Mixed-precision quantization from sensitivity: ``mlx_lm_optiq.quantize``.

Chooses per-module bits under a bits-per-weight budget, greedily: every
module starts at the lowest candidate bits; then, while the budget allows, the
upgrade with the largest KL saved per extra bit of storage is taken (one
candidate step at a time). The model is quantized with mlx-lm's own
``quantize_model``; modules outside the transformer blocks that mlx-lm
quantizes (embeddings, ``lm_head``) are kept at the highest candidate bits.

Writes an mlx-lm model directory with per-module ``quantization`` entries in
``config.json``, ``optiq/metadata.json`` (``per_layer``, ``target_bpw``,
``achieved_bpw``) and a copy of ``optiq/sensitivity.json``.
"""

import argparse
import shutil
import sys
from collections import Counter
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from ._cli import add_version, run_command
from .atomic import atomic_write_dir, atomic_write_json
from .checks import is_whole
from .errors import OptiqError
from .metadata import OPTIQ_METADATA, SENSITIVITY, read_sensitivity, resolve_model_dir


def storage_bits(bits: int, group_size: int) -> float:
    """Bits per weight of affine quantization: the codes plus an fp16 scale and
    bias per group."""
    return bits + 32 / group_size


def choose_bits(
    modules: Dict[str, Tuple[int, Dict[int, float]]],
    candidates: List[int],
    group_size: int,
    target_bpw: float,
) -> Tuple[Dict[str, int], float]:
    """Per-module bits under ``target_bpw``.

    Args:
        modules: ``{module path: (param_count, {bits: kl})}``.
        candidates: the allowed bit-widths.
        group_size: quantization group size.
        target_bpw: the bits-per-weight budget over these modules.

    Returns:
        ``({module path: bits}, achieved bits per weight)``.
    """
    candidates = sorted(candidates)
    total = sum(n for n, _ in modules.values())
    chosen = {p: candidates[0] for p in modules}

    def cost(p, b):
        return modules[p][0] * storage_bits(b, group_size)

    spent = sum(cost(p, b) for p, b in chosen.items())
    budget = target_bpw * total
    if spent > budget:
        raise OptiqError(
            f"--target-bpw {target_bpw} is below the {spent / total:.3f} bits per weight "
            f"of quantizing everything at {candidates[0]} bits (group size {group_size})"
        )
    while True:
        best = None
        for p, b in chosen.items():
            i = candidates.index(b)
            if i + 1 == len(candidates):
                continue
            up = candidates[i + 1]
            extra = cost(p, up) - cost(p, b)
            if spent + extra > budget:
                continue
            kl = modules[p][1]
            gain = (kl[b] - kl[up]) / extra
            if best is None or gain > best[0]:
                best = (gain, p, up, extra)
        if best is None:
            return chosen, spent / total
        _, p, up, extra = best
        chosen[p] = up
        spent += extra


def _sensitivity_modules(source_path, candidates):
    """``({module path: (weights, {bits: kl})}, skipped, partial)`` from a
    sensitivity file, checked: ``partial`` when it measured a subset
    (``--layers``/``--modules``) on purpose."""
    from .adapter_read import read_json

    doc = read_json(source_path)
    read_sensitivity(source_path)  # validates: names the file and the problem
    measured = [l for l in doc["layers"] if not l.get("skipped")]
    bad = [l["layer_name"] for l in doc["layers"] if not is_whole(l.get("param_count"))]
    if bad:
        raise OptiqError(f"{bad[0]}: 'param_count' must be a whole number", source_path)
    missing = [
        b
        for b in candidates
        if str(b) not in {k for l in measured for k in l["sensitivities"]}
    ]
    if missing:
        raise OptiqError(
            f"no KL measured at {missing} bits; rerun sensitivity with "
            f"--bits {','.join(map(str, candidates))}",
            source_path,
        )
    modules = {
        l["layer_name"]: (l["param_count"], {int(b): kl for b, kl in l["sensitivities"].items()})
        for l in doc["layers"]
    }  # fmt: skip
    skipped = {l["layer_name"] for l in doc["layers"] if l.get("skipped")}
    return modules, skipped, doc.get("measured") is not None


def _check_coverage(modules, linears, model_path, sensitivity, partial):
    """The sensitivity file names the model's block linear modules, every one
    unless it measured a subset on purpose; returns those it did not measure."""
    unknown = sorted(set(modules) - set(linears))
    if unknown:
        raise OptiqError(
            f"{len(unknown)} layer names are not linear modules of {model_path} "
            f"(e.g. {unknown[0]})",
            sensitivity,
        )
    uncovered = sorted(set(linears) - set(modules))
    if uncovered and partial:
        print(
            f"note: {len(uncovered)} modules were not measured (sensitivity "
            "--layers/--modules): they stay at the highest candidate bits, outside "
            "the bits-per-weight budget"
        )
        return uncovered
    if uncovered:
        raise OptiqError(
            f"no entry for {len(uncovered)} modules (e.g. {uncovered[0]}); was it "
            "measured on this model?",
            sensitivity,
        )


def _kept_float(linears, not_measured, group_size, sensitivity):
    """``{module path: why}`` of the modules that stay float, as mlx-lm leaves
    a module whose input doesn't split into groups."""
    from .sensitivity import unquantizable

    kept = {p: why for p, m in linears.items() if (why := unquantizable(m, group_size))}
    unmeasured = sorted(not_measured - set(kept))
    if unmeasured:
        raise OptiqError(
            f"{len(unmeasured)} modules were not measured (e.g. {unmeasured[0]}) but "
            f"quantize at group size {group_size}; measure with this group size",
            sensitivity,
        )
    if kept:
        names = sorted(kept)
        print(
            f"note: {len(kept)} modules stay unquantized ({kept[names[0]]}"
            f"{', and others' if len(names) > 1 else ''}): {', '.join(names[:3])}"
            + (f", … ({len(names)} in all)" if len(names) > 3 else "")
        )
    return kept


def _metadata(args, chosen, achieved, kept_float, top):
    """``optiq/metadata.json``: OptiQ's ``per_layer`` and our provenance."""
    return {
        "method": "greedy: largest KL saved per extra bit, within target_bpw",
        "target_bpw": args.target_bpw,
        "achieved_bpw": round(achieved, 4),
        "candidate_bits": args.bits,
        "group_size": args.group_size,
        "per_layer": {
            **{
                p: {"bits": b, "group_size": args.group_size} for p, b in chosen.items()
            },
            # OptiQ's way of recording a float layer
            **{p: {"bits": 16, "kept_float": why} for p, why in kept_float.items()},
        },
        "other_modules": top,
    }


def _sensitivity_file(args, model_path):
    sensitivity = (
        Path(args.sensitivity) if args.sensitivity else model_path / SENSITIVITY
    )
    if not sensitivity.is_file():
        raise OptiqError(
            "no sensitivity file; measure it first with "
            f"mlx_lm_optiq.sensitivity {model_path} --data DIR",
            sensitivity,
        )
    return sensitivity


def quantize(args: argparse.Namespace) -> Path:
    import mlx.nn as nn
    import mlx_lm
    from mlx_lm.utils import quantize_model, save

    from .measuring import block_linears

    model_path = resolve_model_dir(args.model) or Path(args.model)
    sensitivity = _sensitivity_file(args, model_path)
    modules, not_measured, partial = _sensitivity_modules(sensitivity, args.bits)
    out = Path(args.output)
    if out.exists() and any(out.iterdir()):  # before the slow part
        raise OptiqError("exists and is not empty; remove it or pick another path", out)
    model, tokenizer, config = mlx_lm.load(str(model_path), return_config=True)
    if "quantization" in config:
        raise OptiqError(
            "is already quantized; quantize needs a float model "
            "(mlx_lm.convert --dequantize gives one)",
            model_path,
        )
    linears = dict(block_linears(model))
    _check_coverage(modules, linears, model_path, sensitivity, partial)
    kept_float = _kept_float(linears, not_measured, args.group_size, sensitivity)
    quantized = {p: v for p, v in modules.items() if p not in kept_float}
    if not quantized:
        raise OptiqError(
            f"no block linear module can be quantized at group size {args.group_size}",
            model_path,
        )
    chosen, achieved = choose_bits(
        quantized, args.bits, args.group_size, args.target_bpw
    )
    top = {"bits": max(args.bits), "group_size": args.group_size}

    def predicate(path, module):
        if path in chosen:
            return {"bits": chosen[path], "group_size": args.group_size}
        if path in kept_float:
            return False
        return dict(top) if isinstance(module, (nn.Linear, nn.Embedding)) else False

    model, config = quantize_model(
        model, config, args.group_size, min(args.bits), quant_predicate=predicate
    )
    metadata = _metadata(args, chosen, achieved, kept_float, top)

    def write(tmp):
        save(tmp, model_path, model, tokenizer, config, donate_model=False)
        (tmp / "optiq").mkdir(exist_ok=True)
        atomic_write_json(tmp / OPTIQ_METADATA, metadata)
        shutil.copyfile(sensitivity, tmp / SENSITIVITY)

    atomic_write_dir(out, write)
    counts = dict(sorted(Counter(chosen.values()).items()))
    print(
        f"wrote {out}: {achieved:.3f} bits per weight over the {len(chosen)} block "
        f"linear modules (target {args.target_bpw}); bits: {counts}"
    )
    return out


def build_parser() -> argparse.ArgumentParser:
    from .sensitivity import add_quantization_arguments, positive

    parser = argparse.ArgumentParser(
        prog="mlx_lm_optiq.quantize",
        description=__doc__.split("\n\n")[1].replace("\n", " "),
    )
    parser.add_argument(
        "model",
        help="a float mlx-lm model: a local directory, or a Hugging Face id that "
        "mlx_lm_optiq.sensitivity has measured (in the Hugging Face cache)",
    )
    parser.add_argument("-o", "--output", required=True, help="directory to write")
    parser.add_argument(
        "--target-bpw",
        type=positive(float),
        required=True,
        help="bits per weight budget, e.g. 5.0",
    )
    add_quantization_arguments(parser)
    parser.add_argument(
        "--sensitivity", help="sensitivity file (default MODEL/optiq/sensitivity.json)"
    )
    add_version(parser)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    return run_command(quantize, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
