"""What the plugin does at mlx-lm's call sites, as pluggy hook implementations.

The same functions run whether a patched mlx-lm calls them (through its
``mlx_lm`` entry-point group) or the shim does. They see plain data; what
needs mlx-lm internals is asked of :mod:`mlx_lm_optiq.shim`.
"""

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional

from . import RANK_BUDGET_CHOICES, adapter_read, plugins
from .metadata import module_facts, read_sources
from .mlx_lm_hookspecs import hookimpl
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
    model_type: Optional[str] = None


# Runs between mlx_lm_lora_parameters and mlx_lm_lora_adapter_saved, by args.
_runs: Dict[int, Run] = {}


def _shim():
    from . import shim

    return shim


def _is_main_process():
    import mlx.core as mx

    return mx.distributed.init().rank() == 0


@hookimpl
def mlx_lm_lora_add_arguments(parser):
    group = parser.add_argument_group(
        "per-module LoRA ranks (mlx-lm-optiq)",
        "Give every adapted module its own LoRA rank from how sensitive it is "
        "to quantization. Each option is also a YAML key (rank_scaling, rank, "
        "rank_budget).",
    )
    group.add_argument(
        "--rank-scaling",
        choices=list(plugins.rank_policies()),
        default=None,
        help="constant: the base rank everywhere (same as stock mlx-lm); "
        "by_bits: rank * bits / 4, so 8-bit modules get twice the rank of "
        "4-bit ones; by_kl: rank * KL / median KL, clipped to [0.5, 2], from "
        "optiq/sensitivity.json (falls back to by_bits). Others come from plugins.",
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


@hookimpl
def mlx_lm_lora_parameters(args, model):
    try:
        if getattr(args, "rank_scaling", None) is not None:
            run = prepare_run(args, model)
            _runs[id(args)] = run
            return run.lora_parameters
        if getattr(args, "rank_budget", None):
            raise RankPolicyError("--rank-budget needs --rank-scaling")
        return resume_lora_parameters(args)
    except (ValueError, OSError) as e:
        raise SystemExit(f"mlx_lm.lora: error: {e}") from None


@hookimpl
def mlx_lm_lora_adapter_saved(args, model, adapter_path):
    run = _runs.pop(id(args), None)
    if run is None or not _is_main_process():
        return
    adapter_dir = Path(adapter_path)
    try:
        plugins.get_plugin_manager().hook.optiq_adapter_saved(
            run=run, adapter_dir=adapter_dir
        )
    except (ValueError, OSError) as e:
        raise SystemExit(f"mlx_lm.lora: error: {e}") from None
    print(
        f"adapter with per-module ranks saved to {adapter_dir} "
        f"(inspect with: python -m mlx_lm_optiq.info {adapter_dir})"
    )


@hookimpl
def mlx_lm_load_adapters(model, adapter_path):
    adapter_dir = Path(adapter_path)
    if adapter_read.is_peft_dir(adapter_dir):
        return _shim().load_peft_adapter(model, adapter_dir)
    config_file = adapter_dir / adapter_read.CONFIG
    weights_file = adapter_dir / adapter_read.MLX_WEIGHTS
    if not config_file.is_file() or not weights_file.is_file():
        return None  # mlx-lm's own error says what is missing
    config = adapter_read.read_json(config_file)
    if config.get("fine_tune_type", "lora") == "full":
        return None
    inferred = adapter_read.rank_pattern_for_mlx(adapter_dir)
    pattern = inferred or (config.get("lora_parameters") or {}).get("rank_pattern")
    _shim().check_mlx_adapter(model, weights_file, config, pattern)
    if inferred is None:
        return None  # stock loading gets it right
    return _shim().load_mlx_adapter(model, adapter_dir, inferred)


def base_lora_parameters(args) -> dict:
    """``args.lora_parameters`` as a fresh dict, with ``--rank`` applied.

    ``args.lora_parameters`` may be the very dict in mlx-lm's
    ``CONFIG_DEFAULTS``, so it is never changed in place.
    """
    params = copy.deepcopy(args.lora_parameters)
    if getattr(args, "rank", None) is not None:
        params["rank"] = args.rank
    rank = params.get("rank")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise RankPolicyError(f"the LoRA rank must be a positive integer, got {rank!r}")
    return params


def resume_lora_parameters(args):
    """Without rank scaling: apply ``--rank``, and resume a mixed-rank adapter
    at its own ranks. ``None`` when there is nothing to change."""
    resume = getattr(args, "resume_adapter_file", None)
    if getattr(args, "rank", None) is None and resume is None:
        return None
    params = base_lora_parameters(args)
    if resume is not None:
        ranks = adapter_read.mlx_ranks(
            adapter_read.read_safetensors_header(Path(resume))
        )
        if any(r != params["rank"] for r in ranks.values()):
            params["rank_pattern"] = ranks
    return params


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


def _model_type(model_dir):
    try:
        return adapter_read.read_json(model_dir / "config.json").get("model_type")
    except (OSError, TypeError, ValueError):
        return None


def prepare_run(args, model, report=print) -> Run:
    """Choose the rank of every module that is about to be adapted.

    Every process of a distributed run computes the same ranks from the same
    files; only the main process prints.
    """
    if not _is_main_process():
        report = lambda *a, **k: None  # noqa: E731
    if args.fine_tune_type == "full":
        raise RankPolicyError(
            "--rank-scaling needs --fine-tune-type lora or dora, not full"
        )
    shim = _shim()
    params = base_lora_parameters(args)
    targets = [
        (path, *shim.describe_module(module))
        for path, module in shim.adapted_modules(
            model, args.num_layers, params, use_dora=args.fine_tune_type == "dora"
        )
    ]
    all_paths = [p for p, _ in model.named_modules()]
    scaling = args.rank_scaling
    budget = getattr(args, "rank_budget", None) or "free"
    base_rank = params["rank"]
    model_dir = resolve_model_dir(args.model)
    sources = read_sources(model_dir)
    facts = module_facts([(p, b) for p, b, _ in targets], all_paths, sources, report)
    units = {p: u for p, _, u in targets}
    ranks = assign(
        scaling,
        base_rank,
        facts,
        units,
        budget,
        report,
        policies=plugins.rank_policies(),
    )
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
        model_type=_model_type(model_dir) if model_dir else None,
    )


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
