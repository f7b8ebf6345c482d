"""Rank policies, by arithmetic."""

import pytest

from mlx_lm_optiq.errors import OptiqError
from mlx_lm_optiq.metadata import ModuleFacts
from mlx_lm_optiq.ranks import (
    MIN_RANK,
    assign,
    constant_parameters,
    describe,
    describe_layers,
    distribution,
    fit_budget,
    parameter_count,
)
from mlx_lm_optiq.settings import RunSettings, parse_budget

def assign_ranks(
    policy, base_rank, facts, units, budget="free", report=print, policies=None,
    rank_range=4.0,
):  # fmt: skip
    """``ranks.assign`` with the settings a run with these options has."""
    settings = RunSettings(
        rank_scaling=policy, rank_budget=budget, rank_range=rank_range
    )
    ranks, _ = assign(
        settings, facts, units, base_rank=base_rank, policies=policies, report=report
    )
    return ranks


def match_budget(ranks, units, base_rank):
    return fit_budget(ranks, units, constant_parameters(units, base_rank))


def facts(**bits_kl):
    return {
        p: ModuleFacts(b, "test", kl, "test" if kl is not None else None)
        for p, (b, kl) in bits_kl.items()
    }


def test_constant():
    f = facts(a=(4, None), b=(8, None))
    assert assign_ranks("constant", 8, f, {"a": 1, "b": 1}) == {"a": 8, "b": 8}


@pytest.mark.parametrize(
    "bits, base, rank",
    [
        (4, 8, 8),
        (8, 8, 16),
        (3, 8, 6),
        (2, 8, 4),
        (16, 8, 32),
        (3, 5, 4),
        (2, 2, 2),
        (2, 1, 2),
    ],
)
def test_by_bits_is_ceil_r_bits_over_4_with_floor(bits, base, rank):
    assert assign_ranks("by_bits", base, facts(m=(bits, None)), {"m": 10}) == {
        "m": rank
    }


def test_by_bits_without_any_bits_explains():
    with pytest.raises(OptiqError, match="needs quantization information"):
        assign_ranks("by_bits", 8, facts(a=(None, None)), {"a": 1})


def test_by_kl_clips_to_half_and_double_of_median():
    f = facts(a=(4, 1.0), b=(4, 2.0), c=(4, 100.0), d=(4, 0.01), e=(4, 1.5))
    # median 1.5: a -> ceil(8 * 0.667) = 6, b -> ceil(8 * 1.333) = 11
    ranks = assign_ranks("by_kl", 8, f, dict.fromkeys(f, 1))
    assert ranks == {"a": 6, "b": 11, "c": 16, "d": 4, "e": 8}


def test_by_kl_falls_back_to_by_bits_and_says_so():
    said = []
    ranks = assign_ranks(
        "by_kl",
        4,
        facts(a=(4, None), b=(8, None)),
        {"a": 1, "b": 1},
        report=said.append,
    )
    assert ranks == {"a": 4, "b": 8}
    assert any("falls back to by_bits" in line for line in said)


def test_unknown_policy_and_bad_base_rank():
    with pytest.raises(OptiqError, match="choose one of constant, by_bits, by_kl"):
        assign_ranks("by_depth", 8, facts(a=(4, None)), {"a": 1})
    for bad in (0, -2, 2.5, True):
        with pytest.raises(OptiqError, match="positive integer"):
            assign_ranks("constant", bad, facts(a=(4, None)), {"a": 1})


def test_match_budget_never_exceeds_constant_and_keeps_order():
    units = {"q": 128, "k": 96, "v": 96, "o": 128, "down": 192, "up": 192}
    ranks = {"q": 8, "k": 8, "v": 16, "o": 8, "down": 16, "up": 8}
    matched = match_budget(ranks, units, base_rank=8)
    budget = 8 * sum(units.values())
    spent = parameter_count(matched, units)
    assert spent <= budget
    assert budget - spent < min(units.values())  # within one rank step
    assert matched["v"] > matched["k"] and matched["down"] > matched["up"]
    assert min(matched.values()) >= MIN_RANK


def test_match_budget_can_grow_ranks():
    units = {"a": 100, "b": 100}
    matched = match_budget({"a": 2, "b": 4}, units, base_rank=8)
    assert parameter_count(matched, units) == 1600
    assert matched["b"] > matched["a"]


def test_distribution_and_description():
    ranks = {"a": 16, "b": 8, "c": 8}
    assert distribution(ranks) == {8: 2, 16: 1}
    text = describe(ranks, {"a": 10, "b": 10, "c": 10}, 8)
    assert "rank distribution: {8: 2, 16: 1} across 3 adapted modules" in text
    assert "adapter parameters: 320 (1.33x the 240 of constant rank 8)" in text


@pytest.mark.parametrize(
    "text, count",
    [("250000", 250000), ("250k", 250000), ("1.3M", 1300000), (" 2K ", 2000),
     (1234, 1234), ("default", "default"), ("MATCH", "match"), ("free", "free")],
)  # fmt: skip
def test_parse_budget(text, count):
    assert parse_budget(text) == count


@pytest.mark.parametrize("bad", ["lots", "-5", "0", "1.5x", "", True, 0])
def test_parse_budget_refuses(bad):
    with pytest.raises(OptiqError, match="rank-budget"):
        RunSettings(rank_scaling="constant", rank_budget=bad)


UNITS = {f"model.layers.{i}.{m}": u for i in range(4) for m, u in
         (("self_attn.q_proj", 128), ("self_attn.k_proj", 96), ("mlp.down_proj", 192))}  # fmt: skip


@pytest.mark.parametrize("budget", [500, 1000, 2345, 4000, 10000])
def test_fit_budget_never_over_and_within_one_step(budget):
    ranks = {p: 8 if "down" in p else 4 for p in UNITS}
    fitted = fit_budget(ranks, UNITS, budget)
    spent = parameter_count(fitted, UNITS)
    assert spent <= budget
    kept = [p for p, r in fitted.items() if r]
    assert all(fitted[p] >= MIN_RANK for p in kept)
    # nothing more fits: no kept module can grow, no left-out one can come in
    assert all(spent + UNITS[p] > budget for p in kept)
    assert all(spent + MIN_RANK * UNITS[p] > budget for p in fitted if not fitted[p])


def test_a_small_budget_leaves_modules_out_instead_of_overspending():
    ranks = dict.fromkeys(UNITS, 8)
    everything_at_min = MIN_RANK * sum(UNITS.values())  # 3,328
    fitted = fit_budget(ranks, UNITS, everything_at_min // 2)
    assert parameter_count(fitted, UNITS) <= everything_at_min // 2
    left_out = [p for p, r in fitted.items() if r == 0]
    assert 0 < len(left_out) < len(UNITS)
    # the first layers go first, as mlx-lm adapts the last layers first
    assert {int(p.split(".")[2]) for p in left_out} <= {0, 1}
    assert fit_budget(ranks, UNITS, 100) == dict.fromkeys(UNITS, 0)


def test_allocate_follows_kl_and_leaves_the_least_sensitive_out():
    kl = {p: (100.0 if "layers.2.mlp" in p else 0.001 if "k_proj" in p else 1.0)
          for p in UNITS}  # fmt: skip
    f = facts(**{p: (4, k) for p, k in kl.items()})
    budget = constant_parameters(UNITS, 4)
    ranks = assign_ranks("allocate", 4, f, UNITS, "match", rank_range=4.0)
    assert parameter_count(ranks, UNITS) <= budget
    assert budget - parameter_count(ranks, UNITS) < min(UNITS.values())
    assert all(ranks[p] == 0 for p in UNITS if "k_proj" in p)  # 1/1000: left out
    top = ranks["model.layers.2.mlp.down_proj"]
    assert (
        top == max(ranks.values())
        and top > 2 * ranks["model.layers.2.self_attn.q_proj"]
    )
    # a wider range concentrates more; range 1 is constant rank over the budget
    wide = assign_ranks("allocate", 4, f, UNITS, "match", rank_range=100.0)
    assert wide["model.layers.2.mlp.down_proj"] > top
    flat = assign_ranks("allocate", 4, f, UNITS, "match", rank_range=1.0)
    assert set(flat.values()) <= {4, 5} and parameter_count(flat, UNITS) == budget


def test_allocate_without_kl_spreads_evenly_and_says_so():
    said = []
    f = facts(**{p: (4, None) for p in UNITS})
    ranks = assign_ranks("allocate", 4, f, UNITS, 2000, said.append)
    assert any("spread evenly" in line for line in said)
    assert len({r for r in ranks.values() if r}) <= 2  # one rank, maybe one step above
    assert parameter_count(ranks, UNITS) <= 2000


def test_policies_may_leave_modules_out_and_budgets_keep_them_out():
    def half(context):
        return {p: 0 if i % 2 else 6 for i, p in enumerate(context.facts)}

    f = facts(**{p: (4, None) for p in UNITS})
    ranks = assign_ranks("half", 4, f, UNITS, "match", policies={"half": half})
    assert [r for i, r in enumerate(ranks.values()) if i % 2] == [0] * 6
    assert parameter_count(ranks, UNITS) <= constant_parameters(UNITS, 4)
    assert "6 left out (rank 0)" in describe(ranks, UNITS, 4)


def test_describe_layers():
    ranks = {p: 4 for p in UNITS}
    text = describe_layers(ranks, UNITS)
    assert text == "parameters per layer: 0:1.7k 1:1.7k 2:1.7k 3:1.7k"
