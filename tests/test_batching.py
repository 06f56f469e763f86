"""Shard and micro-batch plans (eopd_ray.core.micro_batches) on random ragged lengths."""

from __future__ import annotations

import random

import pytest

from eopd_ray.core.micro_batches import (
    balance_ranks,
    budget_micro_batches,
    count_micro_batches,
    equalize_counts,
    padded_tokens,
    plan_step,
    rank_imbalance,
    rank_share,
    sequence_cost,
)


def ragged(n: int, seed: int, cap: int = 4096) -> list[int]:
    """Log-normal lengths, median ~cap/6, a few percent at the cap (as math reasoning)."""
    rng = random.Random(seed)
    return [min(cap, max(1, int(rng.lognormvariate(6.5, 0.9)))) for _ in range(n)]


@pytest.mark.parametrize("seed", range(5))
def test_budget_micro_batches_cover_every_row_once_within_the_budget(seed):
    lengths = ragged(64, seed)
    budget = 8192
    mbs = budget_micro_batches(range(64), lengths, budget)
    assert sorted(r for mb in mbs for r in mb) == list(range(64))
    for mb in mbs:
        assert padded_tokens(mb, lengths) <= budget or len(mb) == 1
    # Sorted by length: padding is a small share of what is computed.
    computed = sum(padded_tokens(mb, lengths) for mb in mbs)
    assert 1 - sum(lengths) / computed < 0.10


@pytest.mark.parametrize("seed", range(20))
def test_budget_grouping_is_optimal_against_brute_force(seed):
    """Least padding + overhead per micro-batch, over every way to cut the sorted rows."""
    import itertools

    rng = random.Random(seed)
    lengths = [rng.randint(1, 60) for _ in range(9)]
    budget, overhead = rng.randint(60, 200), rng.choice([0, 5, 30, 1000])
    got = budget_micro_batches(range(9), lengths, budget, overhead)
    order = sorted(range(9), key=lambda r: (-lengths[r], r))
    best = None
    for cuts in itertools.product([False, True], repeat=8):
        groups, start = [], 0
        for i, cut in enumerate(cuts, 1):
            if cut:
                groups.append(order[start:i])
                start = i
        groups.append(order[start:])
        if any(padded_tokens(g, lengths) > budget and len(g) > 1 for g in groups):
            continue
        cost = sum(padded_tokens(g, lengths) for g in groups) + overhead * len(groups)
        best = cost if best is None or cost < best else best
    assert sum(padded_tokens(g, lengths) for g in got) + overhead * len(got) == best


@pytest.mark.parametrize("seed", range(5))
def test_balanced_ranks_are_within_ten_percent_and_within_one_sequence(seed):
    lengths = ragged(32, seed)
    shards = balance_ranks(range(32), lengths, 2, attention_weight=1 / (6 * 2048))
    costs = [sum(sequence_cost(lengths[r], 1 / (6 * 2048)) for r in s) for s in shards]
    biggest = max(sequence_cost(x, 1 / (6 * 2048)) for x in lengths)
    assert abs(costs[0] - costs[1]) <= biggest  # LPT's guarantee
    assert sorted(r for s in shards for r in s) == list(range(32))
    blocks = [list(range(16)), list(range(16, 32))]  # equal counts, as without balancing
    by_count = [sum(lengths[r] for r in b) for b in blocks]
    by_tokens = [sum(lengths[r] for r in s) for s in shards]
    assert max(by_tokens) / min(by_tokens) - 1 <= max(max(by_count) / min(by_count) - 1, 0.10)


def test_equalize_splits_the_largest_then_pads_with_placeholders():
    lengths = [10, 9, 2, 2, 5, 5, 5]
    out = equalize_counts([[[0, 1, 2, 3]], [[4], [5], [6]]], lengths)
    assert [len(mbs) for mbs in out] == [3, 3]
    assert sorted(r for mb in out[0] for r in mb) == [0, 1, 2, 3]
    out = equalize_counts([[[0]], [[4], [5], [6]]], lengths)
    assert out[0] == [[0], [], []]


@pytest.mark.parametrize("budget", [None, 3000, 20000])
@pytest.mark.parametrize("balance", [False, True])
def test_plan_takes_every_row_once_per_update_with_equal_counts(budget, balance):
    lengths = ragged(64, 7)
    plan = plan_step(lengths, 4, 2, 4, budget, balance=balance)
    assert len(plan) == 4
    for u, update in enumerate(plan):
        assert len({len(mbs) for mbs in update}) == 1  # same count on every rank
        rows = sorted(r for mbs in update for mb in mbs for r in mb)
        assert rows == list(range(u * 16, (u + 1) * 16))
    for rank in range(2):
        rows, local = rank_share(plan, rank)
        assert [[[rows[i] for i in mb] for mb in u] for u in local] == [u[rank] for u in plan]


def test_without_balance_or_budget_the_plan_is_the_fixed_layout():
    plan = plan_step([5] * 16, 2, 2, 2, None, balance=False)
    assert plan[0] == [[[0, 1], [2, 3]], [[4, 5], [6, 7]]]
    assert plan[1] == [[[8, 9], [10, 11]], [[12, 13], [14, 15]]]
    assert count_micro_batches(range(5), 2) == [[0, 1], [2, 3], [4]]


@pytest.mark.parametrize("balance", [False, True])
@pytest.mark.parametrize("budget", [None, 64])
@pytest.mark.parametrize("ranks", [2, 3, 4])
@pytest.mark.parametrize("size", [1, 5, 7, 8, 9])
def test_a_group_of_any_size_gives_every_row_to_exactly_one_rank(size, ranks, budget, balance):
    """A streamed group is planned as a one-update step of whatever size finished: without
    balancing, m % ranks rows used to be dropped (and trained on log pi_old = 0)."""
    lengths = ragged(size, size * ranks)
    plan = plan_step(lengths, 1, ranks, 2, budget, balance=balance)
    dealt = sorted(r for rank in range(ranks) for r in rank_share(plan, rank)[0])
    assert dealt == list(range(size))
    assert len({len(mbs) for mbs in plan[0]}) == 1  # every rank runs as many forwards


def test_rank_imbalance_of_a_ragged_step():
    lengths = ragged(128, 3)
    fixed = plan_step(lengths, 4, 2, 4, None, balance=False)
    balanced = plan_step(lengths, 4, 2, 4, 16384, balance=True)
    assert rank_imbalance(balanced, lengths) <= 0.10
    assert rank_imbalance(balanced, lengths) <= rank_imbalance(fixed, lengths)


def test_share_step_gives_each_rank_its_rows_and_the_imbalance():
    from eopd_ray.core.micro_batches import share_step

    lengths = ragged(32, 5)
    shares = share_step(lengths, 2, 2, micro_batch_size=4, max_tokens_per_micro_batch=8192)
    assert shares.plan == plan_step(lengths, 2, 2, 4, 8192)
    assert shares.ranks == [rank_share(shares.plan, r) for r in range(2)]
    assert sorted(r for rows, _ in shares.ranks for r in rows) == list(range(32))
    assert shares.imbalance == rank_imbalance(shares.plan, lengths)


def test_a_plan_that_loses_or_repeats_a_row_is_refused():
    from eopd_ray.core.micro_batches import PlanError, check_every_row_once

    check_every_row_once([[[[0, 1]], [[2]]]], 3, "2 ranks")
    with pytest.raises(PlanError, match=r"missing \[2\].*every row must be trained exactly once"):
        check_every_row_once([[[[0, 1]], [[]]]], 3, "2 ranks")
    with pytest.raises(PlanError, match="duplicated 1"):
        check_every_row_once([[[[0, 1]], [[1, 2]]]], 3, "2 ranks")
