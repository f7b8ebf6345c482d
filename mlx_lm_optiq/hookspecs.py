"""Extension points of mlx-lm-optiq (project name and entry-point group ``mlx_lm_optiq``).

Built-in behaviour is registered through these same hooks
(:mod:`mlx_lm_optiq.builtin`); a third-party plugin is a module with
``@hookimpl`` functions, declared in its ``pyproject.toml`` as::

    [project.entry-points.mlx_lm_optiq]
    my_plugin = "my_package.my_module"

:class:`RankContext`, what a rank policy receives, lives here too; what an
after-save action receives is an
:class:`~mlx_lm_optiq.adapter_record.AdapterRecord`. A hook stops the command on purpose by raising
:class:`mlx_lm_optiq.errors.OptiqError` (a ``ValueError``); any other
exception disables the plugin, with one line saying so.
"""

from dataclasses import dataclass
from typing import Callable, Dict, Optional

import pluggy

hookspec = pluggy.HookspecMarker("mlx_lm_optiq")
hookimpl = pluggy.HookimplMarker("mlx_lm_optiq")


@dataclass
class RankContext:
    """Everything a rank policy is given; new fields only ever get added.

    Attributes:
        base_rank: ``lora_parameters.rank``.
        facts: ``{module path: ModuleFacts}`` (``bits``, ``kl``, ``grad`` and
            where each came from) for every module the run adapts, in mlx-lm's order.
        units: ``{module path: adapter parameters per unit of rank}``
            (``in + out`` for a linear layer).
        budget: the adapter parameters the ranks may spend, when the user
            gave a budget (``--rank-budget``); ``None`` for ``free``. The ranks
            a policy returns are rescaled to it afterwards in any case.
        report: call with one line to tell the user something.
        rank_range: how far sensitivity may move a module from the median
            (``--rank-range``, default 4): weights stay in ``[1/range, range]``.

    A policy returns ``{module path: rank}``; rank 0 leaves a module out.
    """

    base_rank: int
    facts: dict
    units: Dict[str, int]
    budget: Optional[int] = None
    report: Callable[[str], None] = print
    rank_range: float = 4.0


@hookspec
def optiq_register_rank_policies(register):
    """Register rank policies for ``--rank-scaling``.

    A policy is ``policy(context) -> {module path: rank}`` taking one
    :class:`RankContext`. Built-in names can't be replaced. (The older
    ``policy(base_rank, facts, report)`` still works, with a deprecation
    message, until 0.3.)

    :param register: call ``register(name, policy)`` for each policy.
    """


@hookspec
def optiq_register_metadata_readers(register):
    """Register readers of quantization or sensitivity metadata files.

    Files are tried in registration order (built-ins first), one reader per
    file: the first reader registered for a file name wins. A reader returns
    a :class:`~mlx_lm_optiq.metadata.Source`, or ``None`` when the file holds
    nothing for it, and raises ``OptiqError`` for a bad file.

    :param register: call ``register(file name relative to the model
        directory, reader)``; ``reader(path)`` is called when the file exists.
    """


@hookspec
def optiq_adapter_saved(record, adapter_dir, run):
    """Act once an adapter trained with ``--rank-scaling`` is saved.

    Called in the main process only. The built-in actions run first: they
    check the weights for NaN/inf, complete ``adapter_config.json`` with the
    PEFT keys and write the PEFT-layout ``adapter_model.safetensors``; the
    ``optiq_lora_config.json`` sidecar was written before training.

    :param record: the adapter's
        :class:`~mlx_lm_optiq.adapter_record.AdapterRecord` (ranks, facts,
        policy, budget), read back from the sidecar.
    :param adapter_dir: the adapter directory (a ``pathlib.Path``).
    :param run: the same record, under the name this hook gave it before
        0.2 (its ``ranks``, ``units``, ``facts``, ``scaling``, ``budget``,
        ``base_rank``, ``base_model`` and ``model_type`` are still there).
    """
