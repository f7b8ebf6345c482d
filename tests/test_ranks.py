"""Rank policies, by arithmetic."""

import pytest

from mlx_lm_optiq.errors import OptiqError
from mlx_lm_optiq.metadata import ModuleFacts
from mlx_lm_optiq.ranks import (
    MIN_RANK,
    assign,
    describe,
    distribution,
    match_budget,
    parameter_count,
)


def facts(**bits_kl):
    return {
        p: ModuleFacts(b, "test", kl, "test" if kl is not None else None)
        for p, (b, kl) in bits_kl.items()
    }


def test_constant():
    f = facts(a=(4, None), b=(8, None))
    assert assign("constant", 8, f, {"a": 1, "b": 1}) == {"a": 8, "b": 8}


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
    assert assign("by_bits", base, facts(m=(bits, None)), {"m": 10}) == {"m": rank}


def test_by_bits_without_any_bits_explains():
    with pytest.raises(OptiqError, match="needs quantization information"):
        assign("by_bits", 8, facts(a=(None, None)), {"a": 1})


def test_by_kl_clips_to_half_and_double_of_median():
    f = facts(a=(4, 1.0), b=(4, 2.0), c=(4, 100.0), d=(4, 0.01), e=(4, 1.5))
    # median 1.5: a -> ceil(8 * 0.667) = 6, b -> ceil(8 * 1.333) = 11
    ranks = assign("by_kl", 8, f, dict.fromkeys(f, 1))
    assert ranks == {"a": 6, "b": 11, "c": 16, "d": 4, "e": 8}


def test_by_kl_falls_back_to_by_bits_and_says_so():
    said = []
    ranks = assign(
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
        assign("by_depth", 8, facts(a=(4, None)), {"a": 1})
    for bad in (0, -2, 2.5, True):
        with pytest.raises(OptiqError, match="positive integer"):
            assign("constant", bad, facts(a=(4, None)), {"a": 1})


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
