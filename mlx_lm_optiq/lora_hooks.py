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

from pathlib import Path

from . import adapter_load, adapter_record, plugins, settings, staging, train_step
from .errors import OptiqError
from .mlx_lm_hookspecs import hookimpl
from .plan import is_main_process, plan_run, resume_lora_parameters


def run_settings(args) -> settings.RunSettings:
    """The run's :class:`~mlx_lm_optiq.settings.RunSettings`, checked."""
    return settings.from_args(args, list(plugins.rank_policies()))


def _report(line):
    if is_main_process():
        print(line)


@hookimpl
def mlx_lm_lora_add_arguments(parser):
    settings.add_arguments(parser, list(plugins.rank_policies()))


@hookimpl
def mlx_lm_lora_configure(args):
    run_settings(args)  # before the model loads: a bad value fails in a second


@hookimpl
def mlx_lm_lora_parameters(args, model):
    run = run_settings(args)
    params = lora_parameters_for(run, args, model)
    train_step.apply_base_compute(run, model, _report)
    return params


def lora_parameters_for(run, args, model):
    """The ``lora_parameters`` to convert with: planned with ``--rank-scaling``,
    else resumed or stock (``None``)."""
    if run.rank_scaling is None:
        return resume_lora_parameters(args, run)
    try:
        record, params = plan_run(run, args, model)
    except (OptiqError, OSError):
        raise
    except Exception as e:
        # Asked for by name: never fall back to stock training on a bug.
        raise OptiqError(
            f"mlx-lm-optiq could not choose the ranks ({type(e).__name__}: {e}); "
            "this is a bug, please report it"
        ) from e
    staged = staging.stage(args)
    if is_main_process():
        adapter_record.write_sidecar(record, staged)
    return params


@hookimpl
def mlx_lm_lora_training_functions(args, model):
    run = run_settings(args)
    if not run.active:
        return None  # stock mlx-lm: its own batches and loss
    return train_step.training_functions(run, model, _report)


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
            raise OptiqError(
                f"{e}\n{staging.target_of(staged)} is unchanged; this run's files "
                f"are in {staged}"
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
            f"(inspect with: python -m mlx_lm_optiq.info {adapter_dir})"
        )
    return result


@hookimpl
def mlx_lm_load_adapters(model, adapter_path):
    return adapter_load.load_adapter(model, adapter_path)
