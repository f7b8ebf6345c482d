"""The orchestrator: what the plugin does at mlx-lm's call sites.

These pluggy hook implementations run whether a patched mlx-lm calls them
(entry-point group ``mlx_lm``) or the shim does, and they are the only
place that ties the rest together: metadata in (:mod:`.metadata`), ranks out
(:mod:`.ranks`), adapter written (:mod:`.adapter_write`), adapter read back
(:mod:`.adapter_read`), on mlx-lm's LoRA layers (:mod:`.lora_layers`).

A run trains into a staging directory beside ``--adapter-path``; its plan is
written there as the sidecar before training starts and read back once the
weights are saved (no state is kept in between), and the finished set
replaces the adapter directory only then.
"""

import copy
from pathlib import Path
from typing import Optional

from . import adapter_read, adapter_write, lora_layers, metadata, plugins, ranks
from . import staging as staging_dir
from .atomic import atomic_write_json
from .errors import OptiqError
from .hookspecs import Run
from .mlx_lm_hookspecs import hookimpl


def _is_main_process():
    import mlx.core as mx

    return mx.distributed.init().rank() == 0


def _quiet(*args, **kwargs):
    pass


@hookimpl
def mlx_lm_lora_add_arguments(parser):
    group = parser.add_argument_group(
        "per-module LoRA ranks (mlx-lm-optiq)",
        "Give every adapted module its own LoRA rank from how sensitive it is "
        "to quantization. Each option is also a YAML key (rank_scaling, rank, "
        "rank_budget, rank_range, base_compute).",
    )
    group.add_argument(
        "--rank-scaling",
        choices=list(plugins.rank_policies()),
        default=None,
        help="allocate: spend the budget across the adapted modules by measured "
        "KL (optiq/sensitivity.json), most rank where quantizing hurt most, the "
        "least sensitive modules left out when the budget is tight; use it with "
        "--num-layers -1 --rank-budget default. constant: the base rank "
        "everywhere (same as stock mlx-lm); by_bits: rank * bits / 4, so 8-bit "
        "modules get twice the rank of 4-bit ones; by_kl: rank * KL / median KL, "
        "clipped to [0.5, 2] (falls back to by_bits). Others come from plugins.",
    )
    group.add_argument(
        "--rank",
        type=int,
        default=None,
        help="Base LoRA rank (sets lora_parameters.rank; default 8).",
    )
    group.add_argument(
        "--rank-budget",
        default=None,
        metavar="{free,match,default,COUNT}",
        help="free (default): keep the policy's ranks; match: rescale them to "
        "the parameters constant rank would train on the adapted modules; "
        "default: to what constant --rank trains on mlx-lm's default window "
        "(the last 16 layers), whatever --num-layers says; COUNT: to that many "
        "adapter parameters (250000, 250k, 1.3M). Never over the budget.",
    )
    group.add_argument(
        "--base-compute",
        choices=BASE_COMPUTE,
        default=None,
        help="quantized (default): train on the quantized base as loaded; "
        "dequantized: on dequantized copies of its frozen quantized layers (the "
        "same function up to rounding, faster where quantized matmuls are slow, "
        "e.g. CUDA; ~4x the weight memory of 4-bit); auto: dequantized when the "
        "copies take at most a quarter of the device memory. The adapter is for "
        "the quantized model either way.",
    )
    group.add_argument(
        "--rank-range",
        type=float,
        default=None,
        help="allocate: how far a module's KL may count from the median, "
        "[1/R, R] (default 4).",
    )


@hookimpl
def mlx_lm_lora_parameters(args, model):
    params = lora_parameters_for(args, model)
    if choose_base_compute(args, model) == "dequantized":
        layers, size = lora_layers.dequantized_copies(model)
        lora_layers.swap_in(model, layers)
        if _is_main_process():
            print(
                f"base compute: dequantized: {len(layers)} quantized layers run as "
                f"{_size(size)} of float copies; the adapter is for the quantized "
                "model"
            )
    return params


BASE_COMPUTE = ("quantized", "dequantized", "auto")


def choose_base_compute(args, model):
    """``quantized`` or ``dequantized``, from ``--base-compute`` (``auto``: what
    fits in a quarter of the device's memory)."""
    import mlx.core as mx

    choice = getattr(args, "base_compute", None) or "quantized"
    if choice not in BASE_COMPUTE:
        raise OptiqError(
            f"--base-compute {choice!r}: choose one of {', '.join(BASE_COMPUTE)}"
        )
    if choice != "auto":
        return choice
    size = lora_layers.dequantized_size(model)
    if size == 0:
        return "quantized"
    memory = mx.device_info().get("memory_size")
    if memory is None:  # the CPU backend: the machine's memory
        import os

        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    choice = "dequantized" if size <= memory / 4 else "quantized"
    if _is_main_process():
        print(
            f"base compute (auto): {choice}: float copies of the quantized layers "
            f"would take {_size(size)} of {_size(memory)}"
        )
    return choice


def _size(n):
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def lora_parameters_for(args, model):
    """The ``lora_parameters`` to convert with: planned with ``--rank-scaling``,
    else resumed or stock (``None``)."""
    if getattr(args, "rank_scaling", None) is None:
        if getattr(args, "rank_budget", None):
            raise OptiqError("--rank-budget needs --rank-scaling")
        return resume_lora_parameters(args)
    try:
        run = plan_run(args, model)
    except (OptiqError, OSError):
        raise
    except Exception as e:
        # Asked for by name: never fall back to stock training on a bug.
        raise OptiqError(
            f"mlx-lm-optiq could not choose the ranks ({type(e).__name__}: {e}); "
            "this is a bug, please report it"
        ) from e
    staging = staging_dir.stage(args)
    if _is_main_process():
        atomic_write_json(staging / adapter_read.SIDECAR, adapter_write.sidecar(run))
    return run.lora_parameters


@hookimpl(wrapper=True)
def mlx_lm_lora_adapter_saved(args, model, adapter_path):
    """Complete the staged adapter, let other plugins act on it, then move it
    into place (a wrapper: before and after every other implementation)."""
    import mlx.core as mx

    staging = Path(adapter_path)
    staged = getattr(args, "rank_scaling", None) is not None
    ours = staged and _is_main_process()
    if ours:
        run = read_run(staging)
        try:
            plugins.get_plugin_manager().hook.optiq_adapter_saved(
                run=run, adapter_dir=staging
            )
        except OptiqError as e:
            raise OptiqError(
                f"{e}\n{staging_dir.target_of(staging)} is unchanged; this run's files are in "
                f"{staging}"
            ) from e
    result = yield
    group = mx.distributed.init()
    if staged and group.size() > 1:  # every process's plugins are done with it
        mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group))
    if ours:
        adapter_dir = (
            staging_dir.finish(args, staging)
            if staging_dir.target_of(staging)
            else staging
        )
        print(
            f"adapter with per-module ranks saved to {adapter_dir} "
            f"(inspect with: python -m mlx_lm_optiq.info {adapter_dir})"
        )
    return result


@hookimpl
def mlx_lm_load_adapters(model, adapter_path):
    adapter_dir = Path(adapter_path)
    if adapter_read.is_peft_dir(adapter_dir):
        return load_peft_adapter(model, adapter_dir)
    config_file = adapter_dir / adapter_read.CONFIG
    weights_file = adapter_dir / adapter_read.MLX_WEIGHTS
    if not config_file.is_file() or not weights_file.is_file():
        return None  # mlx-lm's own error says what is missing
    config = adapter_read.read_json(config_file)
    if config.get("fine_tune_type", "lora") == "full":
        return None
    shapes = adapter_read.read_safetensors_header(weights_file)
    lora = config.get("lora_parameters") or {}
    inferred = adapter_read.mlx_rank_pattern(config, shapes)
    pattern = inferred or lora.get("rank_pattern")
    use_dora = config.get("fine_tune_type", "lora") == "dora"
    expected, adapted = lora_layers.expected_tensors(
        model, config["num_layers"], lora, pattern, use_dora
    )
    stray = sorted(set(pattern or {}) - set(adapted))
    if stray:
        raise OptiqError(
            f"rank_pattern names {len(stray)} module(s) that are not adapted (e.g. "
            f"{stray[0]}); check num_layers and keys",
            config_file,
        )
    adapter_read.check_tensors_fit(weights_file, shapes, expected, pattern)
    tensors = adapter_read.load_tensors(weights_file)
    adapter_read.check_finite(tensors, weights_file)
    params = {**lora, "rank_pattern": pattern} if pattern else lora
    lora_layers.convert(model, config["num_layers"], params, use_dora)
    return lora_layers.load_weights(model, tensors)


def load_peft_adapter(model, adapter_dir):
    """Build and load a PEFT LoRA adapter directory into an mlx-lm model.

    Every module and tensor shape is checked before the model is changed, so
    an adapter for another base model is refused with the model untouched.
    """
    adapter_dir = Path(adapter_dir)
    adapter_write.check_peft_architecture(getattr(model, "model_type", None))
    modules, dropout = adapter_read.load_modules(adapter_dir)
    adapter_read.check_finite(
        {f"{p}.{leaf}": w for p, (a, b, _) in modules.items()
         for leaf, w in (("lora_a", a), ("lora_b", b))},
        adapter_dir / adapter_read.PEFT_WEIGHTS,
    )  # fmt: skip
    adapter_read.check_modules_fit(
        adapter_dir / adapter_read.PEFT_WEIGHTS,
        modules,
        lora_layers.model_linear_dims(model),
    )
    return lora_layers.swap_in(model, lora_layers.lora_layers(model, modules, dropout))


def base_lora_parameters(args) -> dict:
    """``args.lora_parameters`` as a fresh dict, with ``--rank`` applied.

    ``args.lora_parameters`` may be the very dict in mlx-lm's
    ``CONFIG_DEFAULTS``, so it is never changed in place.
    """
    params = copy.deepcopy(args.lora_parameters)
    if getattr(args, "rank", None) is not None:
        params["rank"] = args.rank
    ranks.check_base_rank(params.get("rank"))
    return params


def resume_lora_parameters(args):
    """Without rank scaling: apply ``--rank``, and resume a mixed-rank adapter
    at its own ranks. ``None`` when there is nothing to change.

    The ranks come from the file's tensors; the modules its run left out
    (rank 0) from the ``adapter_config.json`` beside it.
    """
    resume = getattr(args, "resume_adapter_file", None)
    if getattr(args, "rank", None) is None and resume is None:
        return None
    params = base_lora_parameters(args)
    if resume is not None:
        resume = Path(resume)
        found = adapter_read.mlx_ranks(adapter_read.read_safetensors_header(resume))
        config_file = resume.parent / adapter_read.CONFIG
        if config_file.is_file():
            lora = adapter_read.read_json(config_file).get("lora_parameters") or {}
            left_out = {
                p for p, r in (lora.get("rank_pattern") or {}).items() if r == 0
            }
            found.update(dict.fromkeys(left_out - set(found), 0))
        if any(r != params["rank"] for r in found.values()):
            params["rank_pattern"] = found
    return params


def resolve_model_dir(model) -> Optional[Path]:
    """The local directory of ``--model``: a path, or mlx-lm's Hugging Face cache."""
    path = Path(model)
    if path.is_dir():
        return path
    from mlx_lm.utils import hf_repo_to_path

    try:
        return hf_repo_to_path(model)
    except (OSError, ValueError):  # not cached: no metadata files to read
        return None


def plan_run(args, model, report=print) -> Run:
    """Choose the rank of every module that is about to be adapted.

    Every process of a distributed run computes the same ranks from the same
    files; only the main process prints.
    """
    if not _is_main_process():
        report = _quiet
    if args.fine_tune_type == "full":
        raise OptiqError("--rank-scaling needs --fine-tune-type lora or dora, not full")
    custom = lora_layers.own_lora_builders(model)
    if custom:
        raise OptiqError(
            f"{custom[0]} builds its own LoRA layer; per-module ranks are not "
            "supported for this architecture"
        )
    params = base_lora_parameters(args)
    use_dora = args.fine_tune_type == "dora"
    targets = [
        (path, *lora_layers.describe_module(module))
        for path, module in lora_layers.adapted_modules(
            model, args.num_layers, params, use_dora
        )
    ]
    scaling = args.rank_scaling
    budget = str(getattr(args, "rank_budget", None) or "free")
    base_rank = params["rank"]
    sources = metadata.read_sources(
        resolve_model_dir(args.model), plugins.metadata_readers()
    )
    facts = metadata.module_facts(
        [(p, b) for p, b, _ in targets],
        [p for p, _ in model.named_modules()],
        sources,
        report,
    )
    units = {p: u for p, _, u in targets}
    default_units = None
    if ranks.parse_budget(budget) == "default":
        default_units = {
            path: lora_layers.describe_module(module)[1]
            for path, module in lora_layers.adapted_modules(
                model, default_num_layers(), params, use_dora
            )
        }
    allowed = ranks.budget_parameters(
        ranks.parse_budget(budget), units, base_rank, default_units
    )
    chosen = ranks.assign(
        scaling,
        base_rank,
        facts,
        units,
        budget,
        report,
        policies=plugins.rank_policies(),
        default_units=default_units,
        rank_range=getattr(args, "rank_range", None) or 4.0,
    )
    if getattr(args, "resume_adapter_file", None):
        _check_resume(Path(args.resume_adapter_file), chosen)
    params["rank_pattern"] = chosen
    spent = ranks.parameter_count(chosen, units)
    said = f"budget {budget}"
    if allowed is not None:
        said += f": {allowed:,} parameters, {spent:,} spent"
    report(f"rank scaling: {scaling} (base rank {base_rank}, {said})")
    report(ranks.describe(chosen, units, base_rank))
    if allowed is not None:
        report(ranks.describe_layers(chosen, units))
    return Run(
        scaling=scaling,
        budget=budget,
        base_rank=base_rank,
        base_model=args.model,
        lora_parameters=params,
        ranks=chosen,
        units=units,
        facts=facts,
        sources=sources,
        model_type=getattr(model, "model_type", None),
        budget_parameters=allowed,
    )


def default_num_layers():
    """mlx-lm's default ``--num-layers``: the window ``--rank-budget default`` prices."""
    from mlx_lm.lora import CONFIG_DEFAULTS

    return CONFIG_DEFAULTS["num_layers"]


def read_run(adapter_dir) -> Run:
    """The :class:`Run` that :func:`plan_run` recorded in ``adapter_dir``."""
    doc = adapter_read.read_json(Path(adapter_dir) / adapter_read.SIDECAR)
    config = adapter_read.read_json(Path(adapter_dir) / adapter_read.CONFIG)
    modules = doc["modules"]
    return Run(
        scaling=doc["rank_scaling"],
        budget=doc["rank_budget"],
        base_rank=doc["base_rank"],
        base_model=doc["base_model"],
        lora_parameters=config["lora_parameters"],
        ranks={p: m["rank"] for p, m in modules.items()},
        units=doc["units"],
        facts={
            p: metadata.ModuleFacts(
                m["bits"], m["bits_source"], m["kl"], m["kl_source"]
            )
            for p, m in modules.items()
        },
        sources=[
            metadata.Source(f["file"], Path(f["file"]), sha256=f["sha256"])
            for f in doc["metadata_files"]
        ],
        model_type=doc["model_type"],
        budget_parameters=doc.get("budget_parameters"),
    )


def _check_resume(resume_file, chosen):
    found = adapter_read.mlx_ranks(adapter_read.read_safetensors_header(resume_file))
    differ = sorted(p for p in chosen if p in found and found[p] != chosen[p])
    if differ:
        p = differ[0]
        raise OptiqError(
            f"{len(differ)} modules have other ranks than this run chooses (e.g. "
            f"{p}: {found[p]} in the file, {chosen[p]} now); resume with the "
            "rank scaling, budget and base rank the file was trained with",
            resume_file,
        )
