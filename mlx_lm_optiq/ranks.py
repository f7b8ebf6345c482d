"""Ranks out: a LoRA rank for every adapted module (0: left out).

Policies (base rank ``r``; a module's rank is 0 or at least :data:`MIN_RANK`):

- ``constant``: ``r`` everywhere, exactly what stock mlx-lm trains;
- ``by_bits``: ``ceil(r * bits / 4)``: 4-bit -> r, 8-bit -> 2r, 3-bit -> 0.75r;
- ``by_kl``: ``ceil(r * clip(kl / median_kl, 0.5, 2))``, the median over the
  adapted modules; without any KL it falls back to ``by_bits``;
- ``allocate``: spends the budget over the adapted modules by measured KL
  (:func:`allocate`), leaving the least sensitive out when it is tight;
- ``by_grad``: ``r`` times the number of modules, shared in proportion to
  each module's gradient importance (:func:`by_grad`), rank 0 allowed.

A budget (``--rank-budget``: ``match``, ``default`` or a parameter count)
then rescales any policy's ranks so the adapter's parameter count is as
close as possible to, and never above, the budget (:func:`fit_budget`).
"""

import heapq
import inspect
import math
import re
import statistics
import warnings
from collections import Counter, defaultdict
from typing import Callable, Dict, Mapping, Optional, Tuple

from .checks import is_whole
from .errors import OptiqError
from .hookspecs import RankContext

MIN_RANK = 2


def check_base_rank(rank) -> int:
    """The base LoRA rank, if it is a positive integer."""
    if not is_whole(rank) or rank <= 0:
        raise OptiqError(f"the LoRA rank must be a positive integer, got {rank!r}")
    return rank


def _floor(rank):
    return max(MIN_RANK, int(rank))


def constant(context: RankContext) -> Dict[str, int]:
    return {path: context.base_rank for path in context.facts}


def by_bits(context: RankContext) -> Dict[str, int]:
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


def by_kl(context: RankContext) -> Dict[str, int]:
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


def sensitivity_weights(
    facts: dict, rank_range: float, report=print
) -> Dict[str, float]:
    """``{module path: KL / median KL}`` clipped to ``[1/range, range]``.

    Modules without KL weigh 1 (the median); without any KL every module
    does, and that is said.
    """
    kls = [f.kl for f in facts.values() if f.kl is not None]
    if not kls:
        report(
            "note: no KL sensitivity for the adapted modules (no "
            "optiq/sensitivity.json): the budget is spread evenly"
        )
        return dict.fromkeys(facts, 1.0)
    median = statistics.median(kls)
    low, high = 1.0 / rank_range, rank_range
    return {
        p: 1.0 if f.kl is None or median <= 0 else min(high, max(low, f.kl / median))
        for p, f in facts.items()
    }


def allocate(context: RankContext) -> Dict[str, int]:
    """Spend the budget across the adapted modules by measured sensitivity.

    Greedy water-filling: every module starts left out (rank 0); each step
    gives one more unit of rank (the first step :data:`MIN_RANK` units) to the
    module where it buys the most, until no step fits the budget. A module
    ``i`` at rank ``r`` is worth ``w_i * units_i * log(1 + r)``: ``w_i`` is its
    KL over the median KL, clipped to ``[1/range, range]`` (``--rank-range``,
    default 4), ``units_i`` its adapter parameters per rank, and the log says
    each doubling of rank buys about the same. So per adapter parameter a step
    buys ``w_i`` times the log gain, whatever the module's size: equal KL gives
    equal ranks (constant rank over the budget), and the less sensitive a
    module, the sooner it is left out when the budget is tight. Without a
    budget it spends what constant rank would.
    """
    units = context.units
    budget = context.budget
    if budget is None:
        budget = constant_parameters(units, context.base_rank)
    weights = sensitivity_weights(context.facts, context.rank_range, context.report)
    ranks = dict.fromkeys(context.facts, 0)

    def step(path):
        """(buys per parameter, parameters) of ``path``'s next rank step."""
        rank = ranks[path]
        new = MIN_RANK if rank == 0 else rank + 1
        cost = (new - rank) * units[path]
        buys = weights[path] * (math.log1p(new) - math.log1p(rank)) / (new - rank)
        return buys, cost, new

    order = {p: -i for i, p in enumerate(ranks)}  # ties: the later layers first
    heap = []
    for path in ranks:
        buys, _, _ = step(path)
        heapq.heappush(heap, (-buys, order[path], path))
    spent = 0
    while heap:
        _, _, path = heapq.heappop(heap)
        _, cost, new = step(path)
        if spent + cost > budget:
            continue  # it never fits again: spent only grows, its steps cost the same
        ranks[path], spent = new, spent + cost
        buys, _, _ = step(path)
        heapq.heappush(heap, (-buys, order[path], path))
    return ranks


def by_grad(context: RankContext) -> Dict[str, int]:
    """GoRA's allocation: the ranks constant ``r`` would give (``r`` times the
    number of modules), shared in proportion to each module's gradient
    importance (``mean |W * G|`` from ``optiq/gradient.json``), each share
    capped at ``range * r`` (``--rank-range``); a share under
    :data:`MIN_RANK` leaves the module out (rank 0). Modules without an
    entry keep ``r``. A budget then rescales the ranks as for any policy.
    """
    base_rank, facts = context.base_rank, context.facts
    known = {p: f.grad for p, f in facts.items() if f.grad is not None}
    if not known:
        raise OptiqError(
            "--rank-scaling by_grad needs each module's gradient importance, and "
            "there is no optiq/gradient.json: run mlx_lm_optiq.sensitivity MODEL "
            "--data DATA --signal gradient first"
        )
    if len(known) < len(facts):
        context.report(
            f"note: {len(facts) - len(known)} adapted modules have no gradient "
            f"importance; they keep rank {base_rank}"
        )
    total, cap = base_rank * len(known), base_rank * context.rank_range
    spread = sum(known.values())
    ranks = {}
    for path in facts:
        if path not in known or spread <= 0:
            ranks[path] = base_rank
            continue
        share = min(cap, total * known[path] / spread)
        ranks[path] = 0 if share < MIN_RANK else round(share)
    return ranks


POLICIES: Dict[str, Callable] = {
    "constant": constant,
    "by_bits": by_bits,
    "by_kl": by_kl,
    "allocate": allocate,
    "by_grad": by_grad,
}


SCALE_RULES: Dict[str, Callable[[float], float]] = {
    "per-rank": lambda ratio: ratio,  # scale * r0 / r: the same alpha everywhere
    "rslora": math.sqrt,  # scale * sqrt(r0 / r)
}


def module_scales(
    ranks: Mapping[str, int], base_rank: int, scale: float, rule: str
) -> Dict[str, float]:
    """``{module path: LoRA scale}`` for the adapted modules under ``rule``
    (``--lora-scale``): ``fixed`` gives none (mlx-lm's one ``scale``),
    ``per-rank`` ``scale * r0 / r``, ``rslora`` ``scale * sqrt(r0 / r)``."""
    if rule == "fixed":
        return {}
    follow = SCALE_RULES[rule]
    return {p: scale * follow(base_rank / r) for p, r in ranks.items() if r > 0}


def parameter_count(ranks: Mapping[str, int], units: Mapping[str, int]) -> int:
    """Adapter parameters: the sum of ``rank_i * (in_i + out_i)``."""
    return sum(ranks[p] * units[p] for p in ranks)


def constant_parameters(units: Mapping[str, int], base_rank: int) -> int:
    """Adapter parameters of constant rank ``base_rank`` on every module of ``units``."""
    return parameter_count(dict.fromkeys(units, base_rank), units)


def fit_budget(
    ranks: Dict[str, int], units: Mapping[str, int], budget: int
) -> Dict[str, int]:
    """Rescale ``ranks`` to spend at most ``budget`` adapter parameters.

    Finds the largest common factor ``s`` such that ``max(2, floor(r_i * s))``
    fits, then hands out single rank steps, largest remainder first, while
    they still fit: what is left unspent is less than one module's step.
    Modules at rank 0 stay out; if the budget can't hold every other module
    at :data:`MIN_RANK`, the lowest-ranked ones are left out too (the first
    layers first, as mlx-lm adapts the last layers first).
    """
    kept = [p for p in ranks if ranks[p] > 0]
    by_priority = sorted(kept, key=lambda p: ranks[p])  # stable: module order
    while by_priority and MIN_RANK * sum(units[p] for p in by_priority) > budget:
        by_priority.pop(0)
    kept = [p for p in kept if p in set(by_priority)]
    result = dict.fromkeys(ranks, 0)
    if not kept:
        return result

    def scaled(s):
        return {p: _floor(math.floor(ranks[p] * s)) for p in kept}

    lo, hi = 0.0, 1.0
    while parameter_count(scaled(hi), units) <= budget:
        lo, hi = hi, hi * 2
    for _ in range(60):
        mid = (lo + hi) / 2
        if parameter_count(scaled(mid), units) <= budget:
            lo = mid
        else:
            hi = mid
    result.update(scaled(lo))
    spent = parameter_count(result, units)
    by_remainder = sorted(kept, key=lambda p: ranks[p] * lo - result[p], reverse=True)
    grew = True
    while grew:
        grew = False
        for p in by_remainder:
            if spent + units[p] <= budget:
                result[p] += 1
                spent += units[p]
                grew = True
    return result


def budget_parameters(budget, units, base_rank, default_units=None) -> Optional[int]:
    """The adapter parameters a budget allows; ``None`` for ``free``.

    Args:
        budget: a parsed ``--rank-budget`` (:attr:`RunSettings.budget`).
        units: ``{module path: units}`` of the modules the run adapts.
        base_rank: the base rank.
        default_units: the same for mlx-lm's default window (``default``).
    """
    if budget == "free":
        return None
    if budget == "match":
        return constant_parameters(units, base_rank)
    if budget == "default":
        return constant_parameters(default_units, base_rank)
    return budget


def call_policy(name: str, policy: Callable, context: RankContext) -> Dict[str, int]:
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
    except (Exception, SystemExit) as e:  # the policy's failure, not the plugin's
        raise OptiqError(f"rank policy {name!r} failed: {type(e).__name__}: {e}") from e
    if not isinstance(ranks, dict) or set(ranks) != set(context.facts):
        raise OptiqError(
            f"rank policy {name!r} must return a rank for each adapted module"
        )
    for path, rank in ranks.items():
        if not is_whole(rank) or rank < 0:
            raise OptiqError(
                f"rank policy {name!r} gave {path} the rank {rank!r}; ranks are "
                "integers >= 0 (0 leaves the module out)"
            )
    return ranks


def assign(
    settings,
    facts,
    units,
    *,
    base_rank,
    default_units=None,
    policies=None,
    report=print,
) -> Tuple[Dict[str, int], Optional[int]]:
    """Ranks for every adapted module, and the parameters the budget allowed.

    Args:
        settings: the run's :class:`~mlx_lm_optiq.settings.RunSettings`
          (``rank_scaling``, ``budget``, ``rank_range``).
        facts: ``{module path: ModuleFacts}`` from :mod:`mlx_lm_optiq.metadata`.
        units: ``{module path: in_dims + out_dims}`` (adapter parameters per rank).
        base_rank: ``lora_parameters.rank``.
        default_units: ``{module path: units}`` of mlx-lm's default window
          (what ``--rank-budget default`` prices).
        policies: ``{name: policy}``; default :data:`POLICIES`.
        report: called with one line for each thing worth telling the user.

    Returns:
        ``({module path: rank}, allowed)``: ranks in the modules' order (0
        leaves a module out), never over the budget; ``allowed`` is ``None``
        for ``free``.
    """
    policies = POLICIES if policies is None else policies
    check_base_rank(base_rank)
    name = settings.rank_scaling
    if name not in policies:
        raise OptiqError(
            f"unknown rank scaling {name!r}; choose one of {', '.join(policies)}"
        )
    allowed = budget_parameters(settings.budget, units, base_rank, default_units)
    context = RankContext(
        base_rank=base_rank,
        facts=facts,
        units=units,
        budget=allowed,
        report=report,
        rank_range=settings.rank_range,
    )
    ranks = call_policy(name, policies[name], context)
    if allowed is not None:
        ranks = fit_budget(ranks, units, allowed)
    if ranks and not any(ranks.values()):
        smallest = MIN_RANK * min(units.values())
        if allowed is not None and allowed < smallest:
            raise OptiqError(
                f"--rank-budget {settings.rank_budget}: {allowed:,} adapter "
                f"parameters can't hold even one module at rank {MIN_RANK} (the "
                f"smallest takes {smallest:,}); give a larger budget"
            )
        raise OptiqError(
            f"rank policy {name!r} left every module out: nothing to train"
        )
    return ranks, allowed


def distribution(ranks: Mapping[str, int]) -> Dict[int, int]:
    """``{rank: number of modules}`` of the adapted modules, smallest rank first."""
    return dict(sorted(Counter(r for r in ranks.values() if r > 0).items()))


def rank_span(ranks) -> str:
    """The adapted modules' ranks as ``"4-6"`` (or ``"8"``, or ``"none"``)."""
    adapted = [r for r in ranks.values() if r > 0]
    if not adapted:
        return "none"
    low, high = min(adapted), max(adapted)
    return str(low) if low == high else f"{low}-{high}"


def describe(ranks, units, base_rank) -> str:
    """The lines printed before training and by ``mlx_lm_optiq.info``."""
    trainable = parameter_count(ranks, units)
    constant_count = constant_parameters(units, base_rank)
    ratio = trainable / constant_count if constant_count else 0.0
    adapted = sum(1 for r in ranks.values() if r > 0)
    left_out = len(ranks) - adapted
    out = f"; {left_out} left out (rank 0)" if left_out else ""
    return (
        f"rank distribution: {distribution(ranks)} across {adapted} adapted modules{out}\n"
        f"adapter parameters: {trainable:,} ({ratio:.2f}x the {constant_count:,} "
        f"of constant rank {base_rank})"
    )


_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def layer_of(path) -> Optional[int]:
    """The transformer block index in a module path (``model.layers.7.mlp`` -> 7)."""
    found = _LAYER.search(path)
    return int(found.group(1)) if found else None


def describe_layers(ranks, units) -> str:
    """Where the parameters went, per transformer block, in one line per 10."""
    per_layer = defaultdict(int)
    for path, rank in ranks.items():
        per_layer[layer_of(path)] += rank * units[path]
    layers = sorted(k for k in per_layer if k is not None)
    cells = [f"{k}:{_short(per_layer[k])}" for k in layers]
    lines = [
        "parameters per layer: " + " ".join(cells[i : i + 10])
        for i in range(0, len(cells), 10)
    ]
    if per_layer.get(None):
        lines.append(f"outside the layers: {_short(per_layer[None])}")
    return "\n".join(lines)


def _short(n):
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e3 else str(n)
