"""What every ``python -m mlx_lm_optiq.<command>`` does with bad input."""

import sys


def run_command(action, args):
    """Run ``action(args)``; a bad file or argument exits 1 with one line, no traceback."""
    try:
        action(args)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
