"""The hooks mlx-lm calls plugins at: the backport of ``patches/``' ``mlx_lm/plugins.py``.

A patched mlx-lm declares these itself (project name ``mlx_lm``, entry-point
group ``mlx_lm``); with an unpatched mlx-lm, ``mlx_lm_optiq.shim`` provides
the call sites and :func:`mlx_lm_optiq.plugins.host_plugin_manager` the
plugin manager. Keep this file identical to the hookspecs in the patch.
"""

import pluggy

hookspec = pluggy.HookspecMarker("mlx_lm")
hookimpl = pluggy.HookimplMarker("mlx_lm")


@hookspec
def mlx_lm_lora_add_arguments(parser):
    """Add command-line arguments to ``mlx_lm.lora``.

    Each argument is also a YAML config key, as for mlx-lm's own options.

    :param parser: the ``argparse.ArgumentParser`` of ``mlx_lm.lora``.
    """


@hookspec(firstresult=True)
def mlx_lm_lora_parameters(args, model):
    """Choose the LoRA parameters the model is converted with.

    Called once per training run, before any layer is converted. Return a new
    ``lora_parameters`` dict (``rank``, ``scale``, ``dropout``, optional
    ``keys`` and ``rank_pattern``), or ``None`` to keep ``args.lora_parameters``.
    Stops at the first non-None result.

    :param args: the ``mlx_lm.lora`` arguments (a namespace).
    :param model: the loaded model, its layers not yet converted.
    :returns: a ``lora_parameters`` dict or ``None``.
    """


@hookspec
def mlx_lm_lora_adapter_saved(args, model, adapter_path):
    """Act once training has saved the final adapter weights.

    Called in every process of a distributed run; write files only where
    ``mx.distributed.init().rank() == 0``.

    :param args: the ``mlx_lm.lora`` arguments.
    :param model: the trained model.
    :param adapter_path: the adapter directory (a ``pathlib.Path``).
    """


@hookspec(firstresult=True)
def mlx_lm_load_adapters(model, adapter_path):
    """Load an adapter directory that mlx-lm can't load by itself.

    Stops at the first non-None result; return ``None`` to let mlx-lm load it.

    :param model: the model to add the adapter to.
    :param adapter_path: the adapter directory.
    :returns: the model with the adapter applied, or ``None``.
    """
