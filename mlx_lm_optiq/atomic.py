"""Files and directories written whole or not at all.

Everything is written to a temporary name beside its target and renamed
into place, so an interrupted write leaves the previous file intact. What
lands gets the mode a plain ``open()`` or ``os.makedirs()`` would give under
the user's umask (``mkstemp`` and ``mkdtemp`` alone would keep theirs
private: 0600 and 0700).
"""

import contextlib
import ctypes
import json
import os
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from .errors import OptiqError


def _umask():
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0)  # elsewhere: read it by setting it, and put it back
    os.umask(mask)
    return mask


def _usual_mode(path, directory=False):
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def atomic_write(path: Path, write: Callable[[str], object]) -> None:
    """Call ``write(tmp_path)``, then rename ``tmp_path`` over ``path``.

    A write that fails (a full disk, a read-only directory) raises
    :class:`OptiqError` naming ``path``; the previous file stays as it was.
    """
    path = Path(path)
    try:
        # The real suffix last: mx.save_safetensors appends one when it is missing.
        fd, tmp = tempfile.mkstemp(
            dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}"
        )
    except OSError as e:
        raise OptiqError(f"can't write here: {e.strerror or e}", path.parent) from e
    os.close(fd)
    try:
        write(tmp)
        _usual_mode(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, (OSError, RuntimeError)):  # RuntimeError: MLX's writers
            raise OptiqError(f"could not be written: {e}", path) from e
        raise


def atomic_write_json(path: Path, obj) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=4)
            f.write("\n")

    atomic_write(path, write)


def atomic_write_dir(out: Path, write: Callable[[Path], object]) -> None:
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
        _usual_mode(tmp, directory=True)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, (OSError, RuntimeError)):
            raise OptiqError(f"could not be written: {e}", out) from e
        raise


def new_dir_beside(target: Path, label, token=None) -> Path:
    """A new empty directory ``<target>.<label>-<token>`` next to ``target``."""
    target = Path(target)
    token = token or secrets.token_hex(4)
    path = target.with_name(f"{target.name}.{label}-{token}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        path.mkdir()
    except OSError as e:
        raise OptiqError(f"can't write here: {e.strerror or e}", path.parent) from e
    return path


_RENAME_EXCHANGE = 2


def _exchange(a, b):
    """Swap two paths in one step (Linux ``renameat2``); False where it can't."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    # on any failure the caller's two plain renames say what is wrong, if anything
    done = renameat2(
        at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE
    )
    return done == 0


def replace_dir(new: Path, target: Path) -> None:
    """Make ``new`` the directory ``target``; what else ``target`` held stays.

    Files of the old ``target`` that ``new`` does not have are linked (or
    copied) into ``new`` first; then the two are swapped in one rename where
    the system can (Linux), so no moment leaves ``target`` missing or mixed.
    The old directory is removed last.
    """
    new, target = Path(new), Path(target)
    if not target.exists():
        new.rename(target)
        return
    for entry in target.iterdir():
        keep = new / entry.name
        if keep.exists():
            continue
        if entry.is_dir():
            shutil.copytree(entry, keep, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry, keep)
    if _exchange(new, target):
        shutil.rmtree(new)
        return
    old = new.with_name(new.name + ".old")
    target.rename(old)
    new.rename(target)
    shutil.rmtree(old)


def _link_or_copy(source, dest):
    try:
        os.link(source, dest)
    except OSError:
        shutil.copy2(source, dest)
