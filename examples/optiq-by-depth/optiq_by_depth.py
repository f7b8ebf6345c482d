"""An example third-party plugin for mlx-lm-optiq: the ``by_depth`` rank policy.

Later layers get more rank: 0.5x the base rank at the first adapted layer,
growing linearly to 2x at the last. After ``pip install``::

    mlx_lm.lora --model M --train --data D --rank-scaling by_depth --rank 8
"""

import math
import re

from mlx_lm_optiq.hookspecs import hookimpl

LAYER = re.compile(r"layers\.(\d+)\.")


def by_depth(context):
    """``ceil(r * (0.5 + 1.5 * depth))``, depth from 0 (first adapted layer) to 1.

    Args:
        context: a ``mlx_lm_optiq.hookspecs.RankContext`` (base rank, facts
          and rank units of every adapted module, budget, report).
    """
    base_rank, facts = context.base_rank, context.facts
    layers = {p: int(m.group(1)) for p in facts if (m := LAYER.search(p))}
    first, last = min(layers.values()), max(layers.values())

    def rank(path):
        if path not in layers:
            return base_rank
        depth = (layers[path] - first) / (last - first) if last > first else 1.0
        return max(2, math.ceil(base_rank * (0.5 + 1.5 * depth)))

    return {path: rank(path) for path in facts}


@hookimpl
def optiq_register_rank_policies(register):
    register("by_depth", by_depth)
