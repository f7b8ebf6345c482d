"""The command-line boundary of every ``python -m mlx_lm_optiq.<command>``."""

import argparse
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
