"""How a step's sequences are cut into per-rank shards and micro-batches: pure functions from
sequence lengths to plans (no torch, Ray or DeepSpeed), tested like the loss.

    plan = plan_step(lengths, response_lengths, num_updates=4, num_ranks=2,
                     max_tokens_per_micro_batch=16384, attention_weight=1 / (6 * 2048))
    plan[update][rank] -> list of micro-batches, each a list of step rows

Why: real responses are ragged (a few hundred tokens to the 4,096 cap). A fixed count of
sequences per micro-batch, padded to the step's longest response, spends most FLOPs and logits
memory on padding; equal sequence counts per rank leave the rank with the long tail setting the
pace. Here:

- **Balanced ranks.** Each update's sequences are dealt to the ranks longest first, each to the
  rank with the least work so far (LPT scheduling), where a sequence of L tokens costs
  L * (1 + attention_weight * L): the linear layers grow with L, attention with L^2.
- **Token-budget micro-batches.** A rank's sequences of one update, sorted by length, are grouped
  so that each micro-batch's padded size (its count x its longest sequence) stays within
  `max_tokens_per_micro_batch`; a longer sequence gets a micro-batch of its own. Consumers cut
  each micro-batch to its own longest sequence (`trim`), so no LM-head row, logit or loss term
  is spent on padding. `max_tokens_per_micro_batch=None` keeps fixed counts.
- **The same number of micro-batches on every rank** for each update: under ZeRO-3 every forward
  gathers parameters and under ZeRO-2/3 every backward reduces gradients, collectives all ranks
  must join. A rank with fewer micro-batches splits its largest ones; a rank with fewer
  sequences than that gets empty micro-batches (the learner runs them as zero-weight forwards).

The loss stays exact: every micro-batch loss is divided by the mini-batch's GLOBAL token count,
so how rows are grouped changes only the floating-point summation order.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass

from eopd_ray.errors import EopdError

# One rank's micro-batches for one update: lists of step rows ([] = a zero-weight placeholder).
MicroBatches = list[list[int]]


def sequence_cost(length: int, attention_weight: float) -> float:
    """Forward/backward work of one sequence of `length` tokens, in token units."""
    return length * (1.0 + attention_weight * length)


def balance_ranks(
    rows: Sequence[int], lengths: Sequence[int], num_ranks: int, attention_weight: float = 0.0
) -> list[list[int]]:
    """Deal `rows` to `num_ranks` ranks so that their total costs are as even as LPT makes them
    (within the largest single sequence's cost of each other). Every rank gets at least one row
    when there are at least as many rows as ranks."""
    order = sorted(rows, key=lambda r: (-lengths[r], r))
    heap = [(0.0, 0, rank) for rank in range(num_ranks)]  # (cost, rows, rank)
    shards: list[list[int]] = [[] for _ in range(num_ranks)]
    for row in order:
        cost, count, rank = heapq.heappop(heap)
        shards[rank].append(row)
        cost += sequence_cost(lengths[row], attention_weight)
        heapq.heappush(heap, (cost, count + 1, rank))
    return shards


# What one more forward costs, in padded tokens, as a share of the budget: kernel launches, and
# under ZeRO-3 one all-gather of the parameters per forward (for a 1.7B model on A100s ~1,000
# tokens' worth of compute against budgets of 16-32k tokens).
FORWARD_OVERHEAD_SHARE = 1 / 16


def budget_micro_batches(
    rows: Sequence[int],
    lengths: Sequence[int],
    max_tokens: int,
    overhead_tokens: float | None = None,
) -> MicroBatches:
    """Sorted by length, longest first, cut into consecutive groups whose count x longest length
    stays <= `max_tokens` (a longer sequence alone), minimizing padded tokens + `overhead_tokens`
    per group (default max_tokens * FORWARD_OVERHEAD_SHARE): few forwards, little padding.
    Dynamic programming over the cut points, O(n^2) for n rows."""
    if overhead_tokens is None:
        overhead_tokens = max_tokens * FORWARD_OVERHEAD_SHARE
    order = sorted(rows, key=lambda r: (-lengths[r], r))
    n = len(order)
    # best[j]: (cost of order[:j], start of its last group)
    best: list[tuple[float, int]] = [(0.0, 0)] + [(math.inf, 0)] * n
    for j in range(1, n + 1):
        real = 0
        for i in range(j - 1, -1, -1):  # last group = order[i:j], its longest is order[i]
            real += lengths[order[i]]
            size = (j - i) * lengths[order[i]]
            if size > max_tokens and j - i > 1:
                break  # longer groups only grow
            cost = best[i][0] + size - real + overhead_tokens
            if cost < best[j][0]:
                best[j] = (cost, i)
    out: MicroBatches = []
    j = n
    while j > 0:
        i = best[j][1]
        out.append(order[i:j])
        j = i
    return out[::-1]


def count_micro_batches(rows: Sequence[int], size: int) -> MicroBatches:
    """Fixed counts: `size` rows per micro-batch, in the given order."""
    rows = list(rows)
    return [rows[i : i + size] for i in range(0, len(rows), size)]


def padded_tokens(micro_batch: Sequence[int], lengths: Sequence[int]) -> int:
    """Positions a micro-batch cut to its own longest sequence computes."""
    return len(micro_batch) * max((lengths[r] for r in micro_batch), default=0)


def equalize_counts(per_rank: list[MicroBatches], lengths: Sequence[int]) -> list[MicroBatches]:
    """Give every rank the same number of micro-batches: split a rank's largest (padded)
    micro-batch in two, longest half first, until it has as many as the busiest rank; pad with
    empty micro-batches when every one left is a single sequence."""
    target = max(len(mbs) for mbs in per_rank)
    out = []
    for mbs in per_rank:
        mbs = [list(mb) for mb in mbs]
        while len(mbs) < target:
            splittable = [i for i, mb in enumerate(mbs) if len(mb) > 1]
            if not splittable:
                mbs += [[] for _ in range(target - len(mbs))]
                break
            i = max(splittable, key=lambda j: padded_tokens(mbs[j], lengths))
            mb = mbs.pop(i)
            half = (len(mb) + 1) // 2
            mbs[i:i] = [mb[:half], mb[half:]]
        out.append(mbs)
    return out


def contiguous_blocks(rows: list[int], num_ranks: int) -> list[list[int]]:
    """`rows` in `num_ranks` contiguous blocks whose sizes differ by at most one (the first
    len(rows) % num_ranks ranks take one more): every row in exactly one block, whatever the
    count (a whole step's mini-batch divides evenly; a streamed group need not)."""
    per_rank, extra = divmod(len(rows), num_ranks)
    bounds = [r * per_rank + min(r, extra) for r in range(num_ranks + 1)]
    return [rows[bounds[r] : bounds[r + 1]] for r in range(num_ranks)]


def plan_step(
    lengths: Sequence[int],
    num_updates: int,
    num_ranks: int,
    micro_batch_size: int,
    max_tokens_per_micro_batch: int | None = None,
    balance: bool = True,
    attention_weight: float = 0.0,
) -> list[list[MicroBatches]]:
    """plan[update][rank] = that rank's micro-batches of that update, as step rows.

    `lengths[i]`: the tokens row i of the step puts through the model (prompt + response).
    Update u takes rows [u * M, (u + 1) * M), M = len(lengths) / num_updates (the mini-batch).
    balance=False deals each update's rows to ranks in contiguous blocks of equal size, give or
    take one (the layout without balancing); max_tokens_per_micro_batch=None cuts fixed counts
    of micro_batch_size.
    """
    total = len(lengths)
    if total % num_updates:
        raise ValueError(f"{total} sequences do not split into {num_updates} equal mini-batches")
    m = total // num_updates
    plan = []
    for u in range(num_updates):
        rows = list(range(u * m, (u + 1) * m))
        if balance:
            shards = balance_ranks(rows, lengths, num_ranks, attention_weight)
        else:
            shards = contiguous_blocks(rows, num_ranks)
        if max_tokens_per_micro_batch is None:
            per_rank_mbs = [count_micro_batches(s, micro_batch_size) for s in shards]
        else:
            per_rank_mbs = [
                budget_micro_batches(s, lengths, max_tokens_per_micro_batch) for s in shards
            ]
        plan.append(equalize_counts(per_rank_mbs, lengths))
    return plan


class PlanError(EopdError):
    """A plan that would train a row twice or not at all (a bug: the plan is made here)."""


def check_every_row_once(plan: list[list[MicroBatches]], num_rows: int, where: str) -> None:
    """Every row of the step in exactly one micro-batch of one rank: none trained twice, none
    left out (a row left out of a pi_old plan would train on log pi_old = 0)."""
    rows = sorted(r for update in plan for mbs in update for mb in mbs for r in mb)
    if rows != list(range(num_rows)):
        missing = sorted(set(range(num_rows)) - set(rows))
        raise PlanError(
            f"the plan for {where} holds {len(rows)} rows of {num_rows} (missing {missing[:8]}, "
            f"duplicated {len(rows) - len(set(rows))}): every row must be trained exactly once"
        )


def rank_share(plan: list[list[MicroBatches]], rank: int) -> tuple[list[int], list[MicroBatches]]:
    """(step rows of `rank`, in plan order; its plan in positions of those rows): what one
    learner rank receives."""
    rows = [r for update in plan for mb in update[rank] for r in mb]
    local = {row: i for i, row in enumerate(rows)}
    return rows, [[[local[r] for r in mb] for mb in update[rank]] for update in plan]


def rank_imbalance(plan: list[list[MicroBatches]], lengths: Sequence[int]) -> float:
    """max / min - 1 of the ranks' real tokens over the whole step (0 = perfectly even)."""
    num_ranks = len(plan[0])
    tokens = [
        sum(lengths[r] for update in plan for mb in update[rank] for r in mb)
        for rank in range(num_ranks)
    ]
    return max(tokens) / max(1, min(tokens)) - 1.0


@dataclass(frozen=True)
class StepShares:
    """How one step's sequences go to the learner ranks."""

    plan: list[list[MicroBatches]]  # [update][rank] -> micro-batches of step rows
    ranks: list[tuple[list[int], list[MicroBatches]]]  # per rank: rank_share(plan, rank)
    imbalance: float  # rank_imbalance(plan, lengths)


def share_step(
    lengths: Sequence[int], num_updates: int, num_ranks: int, **plan_options
) -> StepShares:
    """`plan_step` plus what each rank receives and the ranks' token imbalance."""
    plan = plan_step(lengths, num_updates, num_ranks, **plan_options)
    check_every_row_once(plan, len(lengths), f"{num_ranks} learner ranks")
    return StepShares(
        plan=plan,
        ranks=[rank_share(plan, rank) for rank in range(num_ranks)],
        imbalance=rank_imbalance(plan, lengths),
    )
