"""The orchestrator: what the plugin does at each of mlx-lm's call sites.

These pluggy hook implementations run whether a patched mlx-lm calls them
(entry-point group ``mlx_lm``) or the shim does, and they are the only
place that ties the rest together: the settings checked before the model
loads (:mod:`.settings`), the plan (:mod:`.plan`: metadata in, ranks out),
the training step (:mod:`.train_step`), the adapter written and read back
(:mod:`.adapter_record`, :mod:`.builtin`) and loaded (:mod:`.adapter_load`).

A run with ``--rank-scaling`` trains into a staging directory beside
``--adapter-path`` (:mod:`.staging`); its record is written there as the
sidecar before training starts and read back once the weights are saved (no
state is kept in between), and the finished set replaces the adapter
directory only then.
"""

import functools
import shutil
from pathlib import Path

from . import (
    adapter_load,
    adapter_record,
    gradient,
    lora_layers,
    metadata,
    plugins,
    ranks,
    settings,
    staging,
    train_step,
)
from .errors import OptiqError
from .mlx_lm_hookspecs import hookimpl
from .plan import is_main_process, plan_run, resume_lora_parameters


def run_settings(args) -> settings.RunSettings:
    """The run's :class:`~mlx_lm_optiq.settings.RunSettings`, checked."""
    return settings.from_args(args, list(plugins.rank_policies()))


def _report(line):
    if is_main_process():
        print(line)


def asked_by_name(hook):
    """Stop a run that asked for mlx-lm-optiq when one of our hooks breaks.

    Any other exception would disable the plugin (that is how a broken
    plugin is isolated) and the run would go on as stock mlx-lm, silently
    training something else than was asked for. A run that names none of
    our options loses nothing by that, so its error passes as it is.
    """

    @functools.wraps(hook)
    def checked(args, *rest, **kwargs):
        try:
            return hook(args, *rest, **kwargs)
        except (OptiqError, OSError):
            raise
        except Exception as e:
            if not any(
                getattr(args, f.name, None) is not None for f in settings.options()
            ):
                raise
            raise OptiqError(
                f"mlx-lm-optiq failed ({hook.__name__}: {type(e).__name__}: {e}); "
                "this is a bug, please report it"
            ) from e

    return checked


@hookimpl
def mlx_lm_lora_add_arguments(parser):
    settings.add_arguments(parser, list(plugins.rank_policies()))


@hookimpl
@asked_by_name
def mlx_lm_lora_configure(args):
    run_settings(args)  # before the model loads: a bad value fails in a second


@hookimpl
@asked_by_name
def mlx_lm_lora_parameters(args, model):
    run = run_settings(args)
    params = lora_parameters_for(run, args, model)
    train_step.apply_base_compute(run, model, _report)
    return params


def lora_parameters_for(run, args, model):
    """The ``lora_parameters`` to convert with: planned with ``--rank-scaling``,
    else resumed or stock (``None``)."""
    if run.rank_scaling is None:
        return resume_lora_parameters(args, run, model)
    record, params = plan_run(run, args, model)
    staged = staging.stage(args)
    if is_main_process():
        adapter_record.write_sidecar(record, staged)
    return params


@hookimpl
@asked_by_name
def mlx_lm_lora_training_functions(args, model):
    run = run_settings(args)
    if not run.active:
        return None  # stock mlx-lm: its own batches and loss
    if run.rank_scaling is not None:  # below mlx-lm's banner, which says "rank N"
        _report(
            f"ranks: {ranks.rank_span(lora_layers.model_ranks(model))} per module (the rank "
            f"above is the base rank {args.lora_parameters['rank']} the budget counts in)"
        )
    return train_step.training_functions(run, model, _report)


@hookimpl
@asked_by_name
def mlx_lm_lora_training_start(args, model, optimizer):
    run = run_settings(args)
    if run.lora_init == "gradient":
        if getattr(args, "resume_adapter_file", None):
            _report("--lora-init gradient: resuming, so lora_a is the resume file's")
        else:
            gradient.init_lora_a(model, metadata.resolve_model_dir(args.model), _report)
    ratio = run.lora_plus_ratio
    if ratio is None or ratio == 1:
        return None
    _report(
        f"LoRA+: every lora_b update {ratio:g}x mlx-lm's ({type(optimizer).__name__})"
    )
    return train_step.lora_plus(optimizer, ratio)


@hookimpl(wrapper=True)
def mlx_lm_lora_adapter_saved(args, model, adapter_path):
    """Complete the staged adapter, let other plugins act on it, then move it
    into place (a wrapper: before and after every other implementation)."""
    import mlx.core as mx

    staged = Path(adapter_path)
    is_staged = getattr(args, "rank_scaling", None) is not None
    ours = is_staged and is_main_process()
    if ours:
        record = adapter_record.from_adapter_dir(staged)
        try:
            plugins.get_plugin_manager().hook.optiq_adapter_saved(
                record=record, adapter_dir=staged, run=record
            )
        except OptiqError as e:
            cause = lora_layers.nonfinite_base(model)
            cause = (
                f"\nthe cause: the base model holds NaN or inf ({cause})"
                if cause
                else ""
            )
            raise OptiqError(
                f"{e}{cause}\n{staging.target_of(staged)} is unchanged; this run's "
                f"files are in {staged}"
            ) from e
    result = yield
    group = mx.distributed.init()
    if is_staged and group.size() > 1:  # every process's plugins are done with it
        mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group))
    if ours:
        target = staging.target_of(staged)
        adapter_dir = staging.finish(args, staged) if target else staged
        print(
            f"adapter with per-module ranks saved to {adapter_dir} "
            f"(inspect with: mlx_lm_optiq.info {adapter_dir})"
        )
    return result


@hookimpl
def mlx_lm_lora_training_failed(args, model, error):
    """Say in one line why a run of ours stopped, where we can, and remove its
    partial directory where it holds nothing worth resuming from.

    A file it could not write (a full disk) takes the directory with it, which
    would only keep the disk full; any other stop (our training functions'
    error, Ctrl-C, a crash) takes it when no weights were saved yet, and
    otherwise says how to resume from it.
    """
    staged = Path(args.adapter_path)
    target = staging.target_of(staged)
    if not is_main_process():
        return
    if target is not None and staging.write_failure(error):
        shutil.rmtree(staged, ignore_errors=True)
        raise OptiqError(
            f"could not write this run's files ({error}): is the disk full? "
            f"{target} is unchanged, and the run's partial directory was removed",
            staged,
        ) from error
    if isinstance(error, OptiqError):  # raised by our training functions
        if target is None:
            raise OptiqError(str(error)) from error  # one line, not a traceback
        if not any(staged.glob("*.safetensors")):
            shutil.rmtree(staged, ignore_errors=True)
        raise OptiqError(f"{error}\n{target} is unchanged") from error
    if target is not None and staged.is_dir():  # stopped: Ctrl-C, a crash
        if any(staged.glob("*.safetensors")):
            print(f"\n{staging.left_behind(staged)}")
        else:
            shutil.rmtree(staged, ignore_errors=True)
            print(f"\n{target} is unchanged; the run saved no weights, and its "
                  "partial directory was removed")  # fmt: skip


@hookimpl
def mlx_lm_load_adapters(model, adapter_path):
    return adapter_load.load_adapter(model, adapter_path)
