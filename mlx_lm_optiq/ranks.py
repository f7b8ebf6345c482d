"""Ranks out: a LoRA rank for every adapted module.

Policies (base rank ``r``, floor :data:`MIN_RANK`):

- ``constant``: ``r`` everywhere, exactly what stock mlx-lm trains;
- ``by_bits``: ``ceil(r * bits / 4)``: 4-bit -> r, 8-bit -> 2r, 3-bit -> 0.75r;
- ``by_kl``: ``ceil(r * clip(kl / median_kl, 0.5, 2))``, the median over the
  adapted modules; without any KL it falls back to ``by_bits``.

``match_budget`` then optionally rescales any policy's ranks so the adapter's
parameter count is as close as possible to, and never above, ``constant``'s.
"""

import inspect
import math
import statistics
import warnings
from collections import Counter
from typing import Callable, Dict, Mapping

from .errors import OptiqError
from .hookspecs import RankContext

MIN_RANK = 2


def check_base_rank(rank):
    """The base LoRA rank, if it is a positive integer."""
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise OptiqError(f"the LoRA rank must be a positive integer, got {rank!r}")
    return rank


def _floor(rank):
    return max(MIN_RANK, int(rank))


def constant(context):
    return {path: context.base_rank for path in context.facts}


def by_bits(context):
    base_rank, facts = context.base_rank, context.facts
    unknown = [p for p, f in facts.items() if f.bits is None]
    if len(unknown) == len(facts):
        raise OptiqError(
            "--rank-scaling by_bits needs quantization information, and this model "
            "has none: no module is quantized and there is no optiq/metadata.json, "
            "optiq_metadata.json or per-module config.json quantization. Use "
            "--rank-scaling constant, or quantize the model with mixed precision first."
        )
    return {
        path: _floor(math.ceil(base_rank * f.bits / 4)) if f.bits else base_rank
        for path, f in facts.items()
    }


def by_kl(context):
    base_rank, facts, report = context.base_rank, context.facts, context.report
    kls = [f.kl for f in facts.values() if f.kl is not None]
    if not kls:
        report(
            "note: no KL sensitivity for the adapted modules (no optiq/sensitivity.json); "
            "by_kl falls back to by_bits"
        )
        return by_bits(context)
    missing = len(facts) - len(kls)
    if missing:
        report(
            f"note: {missing} adapted modules have no KL; they keep rank {base_rank}"
        )
    median = statistics.median(kls)
    ranks = {}
    for path, f in facts.items():
        if f.kl is None:
            ranks[path] = base_rank
            continue
        ratio = f.kl / median if median > 0 else 1.0
        ranks[path] = _floor(math.ceil(base_rank * min(2.0, max(0.5, ratio))))
    return ranks


POLICIES: Dict[str, Callable] = {
    "constant": constant,
    "by_bits": by_bits,
    "by_kl": by_kl,
}


def parameter_count(ranks: Mapping[str, int], units: Mapping[str, int]) -> int:
    """Adapter parameters: the sum of ``rank_i * (in_i + out_i)``."""
    return sum(ranks[p] * units[p] for p in ranks)


def constant_parameters(units: Mapping[str, int], base_rank: int) -> int:
    """Adapter parameters of constant rank ``base_rank`` on every module of ``units``."""
    return parameter_count(dict.fromkeys(units, base_rank), units)


def match_budget(ranks, units, base_rank):
    """Rescale ``ranks`` to spend at most what ``constant`` would.

    Finds the largest common factor ``s`` such that ``max(2, floor(r_i * s))``
    fits the budget, then hands out single rank steps, largest remainder first,
    while they still fit: what is left unspent is less than one module's step.
    """
    budget = constant_parameters(units, base_rank)
    if constant_parameters(units, MIN_RANK) > budget:
        raise OptiqError(
            f"--rank-budget match: a base rank of {base_rank} is below the minimum "
            f"rank {MIN_RANK}"
        )

    def scaled(s):
        return {p: _floor(math.floor(r * s)) for p, r in ranks.items()}

    lo, hi = 0.0, 1.0
    while parameter_count(scaled(hi), units) <= budget:
        lo, hi = hi, hi * 2
    for _ in range(60):
        mid = (lo + hi) / 2
        if parameter_count(scaled(mid), units) <= budget:
            lo = mid
        else:
            hi = mid
    result = scaled(lo)
    spent = parameter_count(result, units)
    by_remainder = sorted(ranks, key=lambda p: ranks[p] * lo - result[p], reverse=True)
    grew = True
    while grew:
        grew = False
        for p in by_remainder:
            if spent + units[p] <= budget:
                result[p] += 1
                spent += units[p]
                grew = True
    return result


def call_policy(name, policy, context):
    """``policy(context)``, checked.

    A policy of the old form ``policy(base_rank, facts, report)`` is called
    that way, with a warning; a policy that breaks (raises anything but
    :class:`OptiqError`) or hands back no rank for some module stops the run
    with its name.
    """
    try:
        parameters = inspect.signature(policy).parameters.values()
    except (TypeError, ValueError):
        parameters = ()
    required = [
        p
        for p in parameters
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        and p.default is p.empty
    ]
    try:
        if len(required) < 2:
            ranks = policy(context)
        else:
            warnings.warn(
                f"rank policy {name!r} takes (base_rank, facts, report); take one "
                "RankContext instead (mlx_lm_optiq.hookspecs): the old form goes "
                "in 0.3",
                DeprecationWarning,
                stacklevel=2,
            )
            ranks = policy(context.base_rank, context.facts, context.report)
    except OptiqError:
        raise
    except Exception as e:
        raise OptiqError(f"rank policy {name!r} failed: {type(e).__name__}: {e}") from e
    if not isinstance(ranks, dict) or set(ranks) != set(context.facts):
        raise OptiqError(
            f"rank policy {name!r} must return a rank for each adapted module"
        )
    for path, rank in ranks.items():
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise OptiqError(
                f"rank policy {name!r} gave {path} the rank {rank!r}; ranks are "
                "positive integers"
            )
    return ranks


def assign(policy, base_rank, facts, units, budget="free", report=print, policies=None):
    """Ranks for every adapted module.

    Args:
        policy: a key of :data:`POLICIES`.
        base_rank: ``lora_parameters.rank``.
        facts: ``{module path: ModuleFacts}`` from :mod:`mlx_lm_optiq.metadata`.
        units: ``{module path: in_dims + out_dims}`` (adapter parameters per rank).
        budget: ``"free"`` keeps the policy's ranks, ``"match"`` rescales them to
          ``constant``'s parameter count.
        report: called with one line for each thing worth telling the user.
        policies: ``{name: policy}``; default :data:`POLICIES`.

    Returns:
        ``{module path: rank}`` in the modules' order.
    """
    policies = POLICIES if policies is None else policies
    check_base_rank(base_rank)
    if policy not in policies:
        raise OptiqError(
            f"unknown rank scaling {policy!r}; choose one of {', '.join(policies)}"
        )
    if budget not in ("free", "match"):
        raise OptiqError(f"unknown rank budget {budget!r}; choose free or match")
    context = RankContext(
        base_rank=base_rank,
        facts=facts,
        units=units,
        budget=constant_parameters(units, base_rank) if budget == "match" else None,
        report=report,
    )
    ranks = call_policy(policy, policies[policy], context)
    if budget == "match":
        ranks = match_budget(ranks, units, base_rank)
    return ranks


def distribution(ranks: Mapping[str, int]) -> Dict[int, int]:
    """``{rank: number of modules}``, smallest rank first."""
    return dict(sorted(Counter(ranks.values()).items()))


def describe(ranks, units, base_rank) -> str:
    """The lines printed before training and by ``mlx_lm_optiq.info``."""
    trainable = parameter_count(ranks, units)
    constant_count = constant_parameters(units, base_rank)
    ratio = trainable / constant_count if constant_count else 0.0
    return (
        f"rank distribution: {distribution(ranks)} across {len(ranks)} adapted modules\n"
        f"adapter parameters: {trainable:,} ({ratio:.2f}x the {constant_count:,} "
        f"of constant rank {base_rank})"
    )
