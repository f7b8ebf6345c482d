"""The built-in rank policies, metadata readers and after-save actions.

An ordinary plugin of :mod:`mlx_lm_optiq.plugins`, registered before any
third-party one; ``tryfirst`` keeps its registrations ahead of theirs.
"""

import functools

from . import adapter_read, adapter_write, metadata, ranks
from .atomic import atomic_write_json
from .errors import OptiqError
from .hookspecs import hookimpl


@hookimpl(tryfirst=True)
def optiq_register_rank_policies(register):
    for name, policy in ranks.POLICIES.items():
        register(name, policy)


@hookimpl(tryfirst=True)
def optiq_register_metadata_readers(register):
    for name in (metadata.OPTIQ_METADATA, metadata.LEGACY_OPTIQ_METADATA):
        register(name, functools.partial(metadata.read_optiq_metadata, name=name))
    register(metadata.SENSITIVITY, metadata.read_sensitivity)
    register(metadata.MODEL_CONFIG, metadata.read_config_quantization)


@hookimpl(tryfirst=True)
def optiq_adapter_saved(run, adapter_dir):
    """The built-in actions, in this order, before any other plugin's."""
    adapter_write.check_finite(adapter_dir / adapter_read.MLX_WEIGHTS)
    write_adapter_config_and_sidecar(run, adapter_dir)
    write_peft_layout(run, adapter_dir)


def write_adapter_config_and_sidecar(run, adapter_dir):
    config_file = adapter_dir / adapter_read.CONFIG
    config = adapter_read.read_json(config_file)
    atomic_write_json(config_file, {**config, **adapter_write.peft_config_keys(run)})
    atomic_write_json(adapter_dir / adapter_read.SIDECAR, adapter_write.sidecar(run))


def write_peft_layout(run, adapter_dir):
    try:
        adapter_write.check_peft_architecture(run.model_type)
    except OptiqError as e:
        print(f"note: {e}")
        return
    adapter_write.write_peft_weights(
        adapter_dir / adapter_read.MLX_WEIGHTS, adapter_dir / adapter_read.PEFT_WEIGHTS
    )
