"""What the plugin does at each mlx-lm call site, as plain functions.

The shim (or a patched mlx-lm) calls these at three points of ``mlx_lm.lora``:
when the parser is built (:func:`add_arguments`), before the model's layers
are converted to LoRA (:func:`prepare_run`), and once the adapter is saved
(:func:`adapter_config_saving`, :func:`adapter_saved`); and one point of
loading (:func:`rank_pattern_for_loading`). Nothing here knows mlx-lm
internals: the shim hands over plain data.
"""

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from . import RANK_BUDGET_CHOICES, RANK_SCALING_CHOICES, adapter_read, adapter_write
from .adapter_read import is_peft_dir, peft_import_plan  # noqa: F401 - call sites
from .adapter_write import PeftExportError, check_peft_architecture
from .metadata import module_facts, read_sources
from .ranks import RankPolicyError, assign, describe


@dataclass
class Run:
    """Everything decided about one training run's adapter before it starts."""

    scaling: str
    budget: str
    base_rank: int
    base_model: str
    lora_parameters: dict  # what mlx-lm gets, with rank_pattern
    ranks: Dict[str, int]
    units: Dict[str, int]
    facts: dict
    sources: list = field(default_factory=list)
    adapter_path: Optional[Path] = None
    model_type: Optional[str] = None


def add_arguments(parser):
    """Add ``--rank-scaling``, ``--rank`` and ``--rank-budget`` to ``mlx_lm.lora``."""
    group = parser.add_argument_group(
        "per-module LoRA ranks (mlx-lm-optiq)",
        "Give every adapted module its own LoRA rank from how sensitive it is "
        "to quantization. Each option is also a YAML key (rank_scaling, rank, "
        "rank_budget).",
    )
    group.add_argument(
        "--rank-scaling",
        choices=RANK_SCALING_CHOICES,
        default=None,
        help="constant: the base rank everywhere (same as stock mlx-lm); "
        "by_bits: rank * bits / 4, so 8-bit modules get twice the rank of "
        "4-bit ones; by_kl: rank * KL / median KL, clipped to [0.5, 2], from "
        "optiq/sensitivity.json (falls back to by_bits).",
    )
    group.add_argument(
        "--rank",
        type=int,
        default=None,
        help="Base LoRA rank (sets lora_parameters.rank; default 8).",
    )
    group.add_argument(
        "--rank-budget",
        choices=RANK_BUDGET_CHOICES,
        default=None,
        help="free (default): keep the policy's ranks; match: rescale them so "
        "the adapter has no more parameters than constant rank would.",
    )


def requested(args) -> bool:
    """True when the run asks for per-module ranks."""
    return getattr(args, "rank_scaling", None) is not None


def base_lora_parameters(args) -> dict:
    """``args.lora_parameters`` as a fresh dict, with ``--rank`` applied.

    ``args.lora_parameters`` may be the very dict in mlx-lm's
    ``CONFIG_DEFAULTS``, so it is never changed in place.
    """
    params = copy.deepcopy(args.lora_parameters)
    if getattr(args, "rank", None) is not None:
        params["rank"] = args.rank
    if not isinstance(params.get("rank"), int) or params["rank"] <= 0:
        raise RankPolicyError(
            f"the LoRA rank must be a positive integer, got {params.get('rank')!r}"
        )
    return params


def apply_rank_alias(args):
    """Without rank scaling, ``--rank`` alone still sets the base rank."""
    if getattr(args, "rank", None) is not None or getattr(args, "rank_budget", None):
        if getattr(args, "rank_budget", None) and not requested(args):
            raise RankPolicyError("--rank-budget needs --rank-scaling")
        args.lora_parameters = base_lora_parameters(args)


def resolve_model_dir(model) -> Optional[Path]:
    """The local directory of ``--model``: a path, or a Hugging Face cache hit."""
    path = Path(model)
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached: no metadata files to read
        return None


def _is_main_process():
    import mlx.core as mx

    return mx.distributed.init().rank() == 0


def prepare_run(args, targets, all_paths, report=print) -> Run:
    """Choose the rank of every module that is about to be adapted.

    Args:
        args: the ``mlx_lm.lora`` arguments.
        targets: ``[(module path, live bits or None, params per rank)]`` for
          the modules mlx-lm will convert, in its order.
        all_paths: every module path in the model.
        report: where the summary lines go (only the main process prints).

    Returns:
        The :class:`Run`; ``run.lora_parameters`` carries ``rank_pattern``.
    """
    if not _is_main_process():
        report = lambda *a, **k: None  # noqa: E731 - every process decides, one speaks
    scaling = args.rank_scaling
    budget = getattr(args, "rank_budget", None) or "free"
    params = base_lora_parameters(args)
    base_rank = params["rank"]
    model_dir = resolve_model_dir(args.model)
    sources = read_sources(model_dir)
    model_type = _model_type(model_dir)
    facts = module_facts([(p, b) for p, b, _ in targets], all_paths, sources, report)
    units = {p: u for p, _, u in targets}
    ranks = assign(scaling, base_rank, facts, units, budget, report)
    if getattr(args, "resume_adapter_file", None):
        _check_resume(Path(args.resume_adapter_file), ranks)
    params["rank_pattern"] = ranks
    report(f"rank scaling: {scaling} (base rank {base_rank}, budget {budget})")
    report(describe(ranks, units, base_rank))
    return Run(
        scaling=scaling,
        budget=budget,
        base_rank=base_rank,
        base_model=args.model,
        lora_parameters=params,
        ranks=ranks,
        units=units,
        facts=facts,
        sources=sources,
        adapter_path=Path(args.adapter_path),
        model_type=model_type,
    )


def _model_type(model_dir):
    try:
        return adapter_read.read_json(model_dir / "config.json").get("model_type")
    except (OSError, TypeError, ValueError):
        return None


def _check_resume(resume_file, ranks):
    found = adapter_read.mlx_ranks(adapter_read.read_safetensors_header(resume_file))
    differ = sorted(p for p in ranks if p in found and found[p] != ranks[p])
    if differ:
        p = differ[0]
        raise RankPolicyError(
            f"{resume_file}: {len(differ)} modules have other ranks than this run "
            f"chooses (e.g. {p}: {found[p]} in the file, {ranks[p]} now); resume "
            "with the rank scaling and base rank the file was trained with"
        )


def resume_rank_pattern(args):
    """Without rank scaling, resume a mixed-rank adapter at its own ranks."""
    if getattr(args, "resume_adapter_file", None) is None or requested(args):
        return
    ranks = adapter_read.mlx_ranks(
        adapter_read.read_safetensors_header(Path(args.resume_adapter_file))
    )
    base = args.lora_parameters.get("rank")
    if any(r != base for r in ranks.values()):
        args.lora_parameters = {**args.lora_parameters, "rank_pattern": ranks}


def adapter_config_saving(config, config_path, run, save):
    """Write ``adapter_config.json`` with the PEFT keys, and the sidecar.

    Args:
        config: the dict mlx-lm is about to save (``vars(args)``).
        config_path: where it goes.
        run: the :class:`Run`.
        save: mlx-lm's ``save_config(config, path)``.
    """
    config = {**config, **adapter_write.peft_config_keys(run)}
    adapter_write.atomic_write(config_path, lambda tmp: save(config, tmp))
    if _is_main_process():
        adapter_write.atomic_write_json(
            config_path.parent / adapter_write.SIDECAR, adapter_write.sidecar(run)
        )


def write_peft_layout(run, weights, report=print):
    """``adapter_model.safetensors`` beside mlx-lm's weights, where PEFT can use it."""
    try:
        check_peft_architecture(run.model_type)
    except PeftExportError as e:
        report(f"note: {e}")
        return
    adapter_write.write_peft_weights(weights, weights.parent / adapter_read.PEFT_WEIGHTS)


# Writers run, in order, once the final adapters.safetensors is on disk.
AFTER_SAVE: List = [
    lambda run, weights: adapter_write.check_finite(weights),
    write_peft_layout,
]


def adapter_saved(args, run, report=print):
    """Run the after-save writers on the main process, then say where it went."""
    if not _is_main_process():
        return
    weights = run.adapter_path / adapter_read.MLX_WEIGHTS
    for writer in AFTER_SAVE:
        writer(run, weights)
    report(
        f"adapter with per-module ranks saved to {run.adapter_path} "
        f"(inspect with: python -m mlx_lm_optiq.info {run.adapter_path})"
    )


def rank_pattern_for_loading(adapter_dir: Path):
    """Per-module ranks to build when loading ``adapter_dir``, or ``None``."""
    return adapter_read.rank_pattern_for_mlx(adapter_dir)
