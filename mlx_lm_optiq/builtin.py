"""The built-in rank policies, metadata readers and after-save actions.

An ordinary plugin of :mod:`mlx_lm_optiq.plugins`, registered before any
third-party one; ``tryfirst`` keeps its registrations ahead of theirs.
"""

import functools
from pathlib import Path

from . import adapter_read, adapter_write, metadata, ranks
from .atomic import atomic_write, atomic_write_json
from .errors import OptiqError
from .hookspecs import hookimpl
from .layout import CONFIG, MLX_WEIGHTS, PEFT_WEIGHTS


@hookimpl(tryfirst=True)
def optiq_register_rank_policies(register):
    for name, policy in ranks.POLICIES.items():
        register(name, policy)


@hookimpl(tryfirst=True)
def optiq_register_metadata_readers(register):
    for name in (metadata.OPTIQ_METADATA, metadata.LEGACY_OPTIQ_METADATA):
        register(name, functools.partial(metadata.read_optiq_metadata, name=name))
    register(metadata.SENSITIVITY, metadata.read_sensitivity)
    register(metadata.GRADIENT, metadata.read_gradient)
    register(metadata.MODEL_CONFIG, metadata.read_config_quantization)


@hookimpl(tryfirst=True)
def optiq_adapter_saved(record, adapter_dir):
    """The built-in actions, in this order, before any other plugin's."""
    check_finite(adapter_dir / MLX_WEIGHTS)
    write_peft_config_keys(record, adapter_dir)
    write_peft_layout(record, adapter_dir)


def check_finite(adapter_file: Path) -> None:
    """Refuse to call an adapter trained if any tensor in it is NaN or inf."""
    adapter_read.check_finite(
        adapter_read.load_tensors(adapter_file),
        adapter_file,
        "; training diverged — lower the learning rate or the scale",
    )


def write_peft_config_keys(record, adapter_dir: Path) -> None:
    config_file = adapter_dir / CONFIG
    config = adapter_read.read_json(config_file)
    peft = adapter_write.peft_config_keys(record)
    atomic_write_json(config_file, {**config, **peft})


def write_peft_layout(record, adapter_dir: Path) -> None:
    try:
        adapter_write.check_peft_architecture(record.model_type)
    except OptiqError as e:
        print(f"note: {e}")
        return
    import mlx.core as mx

    tensors = mx.load(str(adapter_dir / MLX_WEIGHTS))
    atomic_write(
        adapter_dir / PEFT_WEIGHTS,
        lambda tmp: adapter_write.save_peft_tensors(tmp, tensors),
    )
