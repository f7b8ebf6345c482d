"""A run's staging directory: where mlx-lm writes until the run has succeeded.

A run with ``--rank-scaling`` trains into ``ADAPTER.partial-XXXXXXXX`` beside
``--adapter-path`` (:func:`stage`); the finished set replaces the adapter
directory in one rename only once the run has succeeded (:func:`finish`), so
an interrupted or diverged run leaves a previous adapter as it was.
"""

import errno
import os
from pathlib import Path
from typing import Optional

from . import adapter_read, atomic
from .atomic import atomic_write_json
from .errors import OptiqError
from .layout import CONFIG

STAGING = "partial"


def stage(args) -> Path:
    """Point mlx-lm at a new directory beside ``--adapter-path`` for this run.

    mlx-lm writes its config, checkpoints and weights there; the finished set
    replaces the adapter directory only once the run has succeeded
    (:func:`finish`), so an interrupted or diverged run leaves a previous
    adapter as it was. Every process of a distributed run agrees on the name.
    """
    import secrets

    import mlx.core as mx

    target = Path(args.adapter_path)
    for place in (target, target.parent):
        if place.exists() and not os.access(place, os.W_OK | os.X_OK):
            raise OptiqError(
                "is not writable: the adapter can't be saved there; pick another "
                "--adapter-path or make it writable",
                place,
            )
    group = mx.distributed.init()
    token = 0
    if group.rank() == 0:  # made before the others learn its name
        for earlier in sorted(target.parent.glob(f"{target.name}.{STAGING}-*")):
            if target_of(earlier) == target and earlier.is_dir():
                print(f"note: an earlier run left {earlier}: {_what_to_do(earlier)}")
        token = secrets.randbits(31)
        staging = atomic.new_dir_beside(target, STAGING, f"{token:08x}")
        print(
            f"training into {staging}; {target} becomes this adapter once training "
            "has finished and its weights are finite, and stays as it is otherwise"
        )
    if group.size() > 1:  # rank 0's choice, for everyone
        token = mx.distributed.all_sum(mx.array(token), group=group).item()
    staging = target.with_name(f"{target.name}.{STAGING}-{token:08x}")
    args.adapter_path = str(staging)
    return staging


def target_of(staging) -> Optional[Path]:
    """The adapter directory a staging directory of :func:`stage` is for."""
    staging = Path(staging)
    name, sep, token = staging.name.rpartition(f".{STAGING}-")
    return staging.with_name(name) if sep and len(token) == 8 else None


def _what_to_do(staging: Path) -> str:
    checkpoints = sorted(staging.glob("*_adapters.safetensors"))
    if checkpoints:
        return (
            f"resume from its last checkpoint with --resume-adapter-file "
            f"{checkpoints[-1]}, or delete it"
        )
    return "it holds no checkpoint; delete it"


def left_behind(staging: Path) -> str:
    """What to do with the directory of a run that stopped, said once it has."""
    return (
        f"{target_of(staging)} is unchanged; this run's files are in {staging}: "
        f"{_what_to_do(staging)}"
    )


def finish(args, staging: Path) -> Path:
    """Move a finished run from ``staging`` into its adapter directory."""
    target = target_of(staging)
    config = adapter_read.read_json(staging / CONFIG)
    config["adapter_path"] = str(target)
    atomic_write_json(staging / CONFIG, config)
    try:
        atomic.replace_dir(staging, target)
    except OSError as e:
        raise OptiqError(
            f"could not move the finished adapter from {staging} into place: {e}",
            target,
        ) from e
    args.adapter_path = str(target)
    return target


_WRITE_ERRORS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


def write_failure(error: BaseException) -> bool:
    """Whether ``error`` is a file that could not be written (a full disk, a
    file-size or quota limit), as Python or MLX's writers report it."""
    if isinstance(error, OSError):
        return error.errno in _WRITE_ERRORS
    return isinstance(error, RuntimeError) and str(error).startswith("[write]")
