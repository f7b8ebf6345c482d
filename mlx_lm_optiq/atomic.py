"""Files and directories written whole or not at all.

Everything is written to a temporary name in the same directory and renamed
into place, so an interrupted write leaves the previous file intact.
"""

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from .errors import OptiqError


def atomic_write(path: Path, write):
    """Call ``write(tmp_path)``, then rename ``tmp_path`` over ``path``."""
    path = Path(path)
    # The real suffix last: mx.save_safetensors appends one when it is missing.
    fd, tmp = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}"
    )
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path, obj):
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=4)
            f.write("\n")

    atomic_write(path, write)


def atomic_write_dir(out: Path, write):
    """Call ``write(tmp_dir)``, then rename ``tmp_dir`` to ``out``.

    ``out`` must not exist or be empty; a failure leaves nothing behind.
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise OptiqError("exists and is not empty; remove it or pick another path", out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        write(tmp)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
