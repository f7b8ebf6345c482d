"""Extension points of mlx-lm-optiq (project name and entry-point group ``mlx_lm_optiq``).

Built-in behaviour is registered through these same hooks
(:mod:`mlx_lm_optiq.builtin`); a third-party plugin is a module with
``@hookimpl`` functions, declared in its ``pyproject.toml`` as::

    [project.entry-points.mlx_lm_optiq]
    my_plugin = "my_package.my_module"
"""

import pluggy

hookspec = pluggy.HookspecMarker("mlx_lm_optiq")
hookimpl = pluggy.HookimplMarker("mlx_lm_optiq")


@hookspec
def optiq_register_rank_policies(register):
    """Register rank policies for ``--rank-scaling``.

    A policy is ``policy(base_rank, facts, report) -> {module path: rank}``,
    where ``facts`` maps each adapted module path to its
    :class:`~mlx_lm_optiq.metadata.ModuleFacts` (bits, KL) and ``report``
    prints one line for the user. Built-in names can't be replaced.

    :param register: call ``register(name, policy)`` for each policy.
    """


@hookspec
def optiq_register_metadata_readers(register):
    """Register readers of quantization or sensitivity metadata files.

    Files are tried in registration order (built-ins first), one reader per
    file: the first reader registered for a file name wins. A reader returns
    a :class:`~mlx_lm_optiq.metadata.Source`, or ``None`` when the file holds
    nothing for it, and raises ``MetadataError`` for a bad file.

    :param register: call ``register(file name relative to the model
        directory, reader)``; ``reader(path)`` is called when the file exists.
    """


@hookspec
def optiq_adapter_saved(run, adapter_dir):
    """Act once an adapter trained with ``--rank-scaling`` is saved.

    Called in the main process only. The built-in actions run first: they
    check the weights for NaN/inf, complete ``adapter_config.json`` with the
    PEFT keys, write the ``optiq_lora_config.json`` sidecar and the
    PEFT-layout ``adapter_model.safetensors``.

    :param run: the :class:`~mlx_lm_optiq.lora_hooks.Run` (ranks, facts, policy).
    :param adapter_dir: the adapter directory (a ``pathlib.Path``).
    """
