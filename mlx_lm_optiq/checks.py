"""What a number read from a file or an option must be, written once.

JSON and YAML ``true`` arrive as Python ``bool``, which is an ``int``: every
check of a count or a measure goes through these two functions, so none
takes ``true`` for 1.
"""

import math


def is_whole(value) -> bool:
    """An ``int`` and not a ``bool``."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_finite(value) -> bool:
    """A finite ``int`` or ``float``, and not a ``bool``."""
    return (is_whole(value) or isinstance(value, float)) and math.isfinite(value)
