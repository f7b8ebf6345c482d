"""The plan of a run: settings, model and metadata in; the adapter's record out.

:func:`plan_run` decides, before any layer is converted, which modules a run
adapts (asked of mlx-lm's own conversion, once, through the shim's probe),
what each module's metadata says, and every module's rank under the
policy and the budget. The result is the :class:`AdapterRecord` the sidecar
holds and the ``lora_parameters`` mlx-lm converts with. Every process of a
distributed run computes the same plan from the same files.
"""

import copy
from pathlib import Path
from typing import Optional, Tuple

from . import adapter_read, lora_layers, metadata, plugins, ranks, shim
from .adapter_record import AdapterRecord, ModuleRecord, current_versions
from .errors import OptiqError
from .layout import CONFIG
from .settings import RunSettings

# what the sidecar records of how the run trained, as asked
STEP_SETTINGS = (
    "base_compute",
    "align_inputs",
    "loss_chunk",
    "attention_piece",
    "lora_compute",
    "lora_init",
    "lora_scale",
    "lora_plus_ratio",
)


def is_main_process() -> bool:
    """Rank 0 of a distributed run (or the only process): the one that writes."""
    import mlx.core as mx

    return mx.distributed.init().rank() == 0


def _quiet(*args, **kwargs):
    pass


def base_lora_parameters(args, settings: RunSettings) -> dict:
    """``args.lora_parameters`` as a fresh dict, with ``--rank`` applied.

    ``args.lora_parameters`` may be the very dict in mlx-lm's
    ``CONFIG_DEFAULTS``, so it is never changed in place.
    """
    params = copy.deepcopy(args.lora_parameters)
    if settings.rank is not None:
        params["rank"] = settings.rank
    ranks.check_base_rank(params.get("rank"))
    return params


def default_num_layers() -> int:
    """mlx-lm's default ``--num-layers``: the window ``--rank-budget default`` prices."""
    from mlx_lm.lora import CONFIG_DEFAULTS

    return CONFIG_DEFAULTS["num_layers"]


def plan_run(
    settings: RunSettings, args, model, report=print
) -> Tuple[AdapterRecord, dict]:
    """Choose the rank of every module that is about to be adapted.

    Args:
        settings: the run's settings, with ``rank_scaling``.
        args: ``mlx_lm.lora``'s arguments (model, num_layers, lora_parameters,
          fine_tune_type, resume_adapter_file).
        model: the loaded model, its layers not yet converted.
        report: called with each line for the user (main process only).

    Returns:
        The adapter's record and the ``lora_parameters`` to convert with
        (with ``rank_pattern``).
    """
    if not is_main_process():
        report = _quiet
    custom = lora_layers.own_lora_builders(model)
    if custom:
        raise OptiqError(
            f"{custom[0]} builds its own LoRA layer; per-module ranks are not "
            "supported for this architecture"
        )
    params = base_lora_parameters(args, settings)
    targets, default_units = _targets(settings, args, model, params)
    check_rank(params["rank"], targets)
    described = {p: lora_layers.describe_module(m) for p, m in targets}
    units = {p: u for p, (_, u) in described.items()}
    sources = metadata.read_sources(
        metadata.resolve_model_dir(args.model), plugins.metadata_readers()
    )
    facts = metadata.module_facts(
        [(p, bits) for p, (bits, _) in described.items()],
        [p for p, _ in model.named_modules()],
        sources,
        report,
    )
    chosen, allowed = ranks.assign(
        settings,
        facts,
        units,
        base_rank=params["rank"],
        default_units=default_units,
        policies=plugins.rank_policies(),
        report=report,
    )
    chosen = _capped(chosen, targets, report)
    if getattr(args, "resume_adapter_file", None):
        check_resume(Path(args.resume_adapter_file), targets, params, chosen, args)
    scales = ranks.module_scales(chosen, params["rank"], params["scale"], settings.lora_scale)  # fmt: skip
    record = AdapterRecord(
        modules={p: ModuleRecord(chosen[p], units[p], facts[p], scales.get(p)) for p in units},  # fmt: skip
        base_rank=params["rank"],
        scale=params["scale"],
        dropout=params.get("dropout", 0.0),
        scaling=settings.rank_scaling,
        budget=settings.rank_budget,
        budget_parameters=allowed,
        base_model=args.model,
        model_type=getattr(model, "model_type", None),
        metadata_files={s.name: s.sha256 for s in sources if s.path},
        settings={k: getattr(settings, k) for k in STEP_SETTINGS},
        versions=current_versions(),
    )
    _report_plan(record, report)
    return record, {**params, "rank_pattern": chosen, **({"scale_pattern": scales} if scales else {})}  # fmt: skip


def _targets(settings, args, model, params):
    """``[(module path, module)]`` the run adapts, and ``{module path: units}``
    of mlx-lm's default window when the budget prices it: one probe of
    mlx-lm's conversion over every block serves both."""
    every_block = shim.conversion_targets(
        model, -1, params, args.fine_tune_type == "dora"
    )
    default_units = None
    if settings.budget == "default":
        default_units = {
            p: lora_layers.describe_module(m)[1]
            for p, m in lora_layers.in_window(every_block, model, default_num_layers())
        }
    return lora_layers.in_window(every_block, model, args.num_layers), default_units


def check_rank(rank: int, targets) -> None:
    """The base rank fits every adapted module: at most its smaller dimension."""
    over = [(p, lora_layers.rank_limit(m)) for p, m in targets]
    over = [(p, limit) for p, limit in over if rank > limit]
    if over:
        path, limit = min(over, key=lambda pl: pl[1])
        raise OptiqError(
            f"--rank {rank} is larger than the smaller dimension of {len(over)} "
            f"adapted modules (e.g. {path}: at most {limit}); a LoRA rank can't "
            "exceed it"
        )


def _capped(ranks, targets, report):
    """Ranks a policy gave above a module's smaller dimension, brought down to it."""
    limits = {p: lora_layers.rank_limit(m) for p, m in targets}
    capped = {p: min(r, limits[p]) for p, r in ranks.items()}
    changed = sum(1 for p in ranks if capped[p] != ranks[p])
    if changed:
        report(
            f"note: {changed} modules' ranks were above their smaller dimension "
            "and were capped at it"
        )
    return capped


def _report_plan(record, report):
    said = f"budget {record.budget}"
    if record.budget_parameters is not None:
        said += (
            f": {record.budget_parameters:,} parameters, "
            f"{record.trainable_parameters:,} spent"
        )
    report(f"rank scaling: {record.scaling} (base rank {record.base_rank}, {said})")
    report(ranks.describe(record.ranks, record.units, record.base_rank))
    if record.budget_parameters is not None:
        report(ranks.describe_layers(record.ranks, record.units))


def check_resume(resume_file: Path, targets, params: dict, ranks: dict, args) -> None:
    """The file ``--resume-adapter-file`` names fits this run: the ranks it
    chooses and this model's shapes, checked before training starts."""
    shapes = adapter_read.read_safetensors_header(resume_file)
    found = adapter_read.mlx_ranks(shapes)
    differ = sorted(p for p in ranks if p in found and found[p] != ranks[p])
    if differ:
        p = differ[0]
        raise OptiqError(
            f"{len(differ)} modules have other ranks than this run chooses (e.g. "
            f"{p}: {found[p]} in the file, {ranks[p]} now); resume with the "
            "rank scaling, budget and base rank the file was trained with",
            resume_file,
        )
    use_dora = args.fine_tune_type == "dora"
    expected = lora_layers.expected_tensors(targets, params, ranks, use_dora)
    adapter_read.check_tensors_fit(
        resume_file, shapes, expected, ranks, ranks_from="this run's"
    )


def resume_lora_parameters(args, settings: RunSettings, model) -> Optional[dict]:
    """Without rank scaling: apply ``--rank``, and resume a mixed-rank adapter
    at its own ranks, both checked against the model. ``None`` when there is
    nothing to change.

    The ranks come from the file's tensors; the modules its run left out
    (rank 0) from the ``adapter_config.json`` beside it.
    """
    resume = getattr(args, "resume_adapter_file", None)
    if settings.rank is None and resume is None:
        return None
    params = base_lora_parameters(args, settings)
    targets, _ = _targets(settings, args, model, params)
    if settings.rank is not None:
        check_rank(params["rank"], targets)
    if resume is not None:
        resume = Path(resume)
        found = adapter_read.mlx_ranks(adapter_read.read_safetensors_header(resume))
        config_file = resume.parent / CONFIG
        if config_file.is_file():
            lora = adapter_read.read_json(config_file).get("lora_parameters") or {}
            left_out = {
                p for p, r in (lora.get("rank_pattern") or {}).items() if r == 0
            }
            found.update(dict.fromkeys(left_out - set(found), 0))
        if any(r != params["rank"] for r in found.values()):
            params["rank_pattern"] = found
        ranks = {p: params.get("rank_pattern", {}).get(p, params["rank"]) for p, _ in targets}  # fmt: skip
        check_resume(resume, targets, params, ranks, args)
    return params
