"""The command-line boundary of every ``mlx_lm_optiq.<command>``."""

import argparse
import importlib.metadata
import sys
from typing import Callable

from .errors import OptiqError


def run_command(action: Callable[[argparse.Namespace], object], args) -> int:
    """Run ``action(args)``; what the user must fix exits 1 with one line."""
    try:
        action(args)
    except (OptiqError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def version_line(prog: str) -> str:
    """``prog 0.1.0 (mlx-lm 0.32.2, mlx 0.32.4)``, read without importing them."""

    def version(name):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    return (
        f"{prog} {version('mlx-lm-optiq')} (mlx-lm {version('mlx-lm')}, "
        f"mlx {version('mlx')})"
    )


def add_version(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``--version`` for a command's parser."""
    parser.add_argument(
        "--version", action="version", version=version_line(parser.prog),
        help="print the versions of mlx-lm-optiq, mlx-lm and mlx",
    )  # fmt: skip
    return parser
