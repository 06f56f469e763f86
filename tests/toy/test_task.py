"""The shortest-path task: graph, checker (right, wrong and malformed answers), generator."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from eopd_ray.toy.task import NODE_LABELS, GraphTask, Verdict

TASK = GraphTask()


def all_shortest_paths(task: GraphTask, source: str, target: str) -> set[str]:
    """Brute force: every simple path of the shortest length, by depth-first search."""
    length = task.distances[source][target]
    found = set()

    def walk(path: str) -> None:
        if len(path) - 1 == length:
            if path[-1] == target:
                found.add(path)
            return
        for nxt in task.neighbours[path[-1]]:
            if nxt not in path:
                walk(path + nxt)

    walk(source)
    return found


def test_graph_is_a_connected_cube_minus_the_removed_edges():
    edges = sum(len(v) for v in TASK.neighbours.values()) // 2
    assert edges == 5 * 16 - TASK.removed_edges  # a 5-cube has 80 edges
    assert all(len(d) == 32 for d in TASK.distances.values())  # every node reaches every node
    for node, adj in TASK.neighbours.items():
        assert node not in adj and all(node in TASK.neighbours[n] for n in adj)  # undirected


def test_graph_is_fixed_by_the_seed():
    assert GraphTask(seed=3).neighbours == GraphTask(seed=3).neighbours
    assert GraphTask(seed=3).neighbours != GraphTask(seed=4).neighbours


def test_split_is_disjoint_and_covers_every_pair():
    train, held_out = TASK.split(0.2)
    assert not set(train) & set(held_out)
    assert len(train) + len(held_out) == len(TASK.pairs)
    assert abs(len(held_out) - 0.2 * len(TASK.pairs)) <= 1
    assert all(TASK.distances[s][t] >= 2 for s, t in TASK.pairs)


@pytest.mark.parametrize("source,target", TASK.pairs[:40])
def test_path_count_and_checker_agree_with_brute_force(source, target):
    paths = all_shortest_paths(TASK, source, target)
    assert TASK.count_shortest_paths(source, target) == len(paths)
    prompt = TASK.prompt(source, target)
    assert all(TASK.check(prompt, p) is Verdict.CORRECT for p in paths)


def test_checker_names_what_is_wrong():
    source, target = next((s, t) for s, t in TASK.pairs if TASK.distances[s][t] == 3)
    prompt = TASK.prompt(source, target)
    good = TASK.sample_answer(source, target, random.Random(0))
    assert TASK.check(prompt, good) is Verdict.CORRECT
    assert TASK.check(prompt, f"  {good}\n") is Verdict.CORRECT  # surrounding whitespace
    stranger = next(n for n in TASK.labels if n not in TASK.neighbours[source] and n != source)
    detour = source + TASK.neighbours[source][0] + good  # there and back: valid edges, too long
    cases = {
        "": Verdict.MALFORMED,
        "   ": Verdict.MALFORMED,
        good[:2] + " " + good[2:]: Verdict.MALFORMED,  # a separator inside
        good + "!": Verdict.MALFORMED,
        good[1:]: Verdict.WRONG_START,
        source + stranger: Verdict.NOT_AN_EDGE,
        good[:-1]: Verdict.WRONG_END,
        detour: Verdict.NOT_SHORTEST,
    }
    for answer, verdict in cases.items():
        assert TASK.check(prompt, answer) is verdict, answer
    # case matters: "a" and "A" are different nodes
    assert TASK.check(prompt, good.swapcase()) is not Verdict.CORRECT


@pytest.mark.parametrize("prompt", ["", "A>B", "A-B:", "A>B:x", "A>?:", "AB>C:", "é>A:"])
def test_unreadable_prompts_are_malformed(prompt):
    assert TASK.check(prompt, "AB") is Verdict.MALFORMED


def test_generator_answers_are_always_correct():
    rng = random.Random(1)
    for source, target in TASK.pairs[:200]:
        assert TASK.is_correct(TASK.prompt(source, target), TASK.sample_answer(source, target, rng))


def test_generator_covers_every_shortest_path_of_a_branching_prompt():
    source, target = max(TASK.pairs, key=lambda p: TASK.count_shortest_paths(*p))
    paths = all_shortest_paths(TASK, source, target)
    assert len(paths) >= 6  # the task really has many correct answers
    rng = random.Random(2)
    seen = Counter(TASK.sample_answer(source, target, rng) for _ in range(200 * len(paths)))
    assert set(seen) == paths
    # Each step is uniform over the correct next hops: the first move is close to uniform.
    first = Counter(path[1] for path in seen.elements())
    hops = TASK.next_hops(source, target)
    assert set(first) == set(hops)
    share = [first[h] / sum(first.values()) for h in hops]
    assert max(share) - min(share) < 0.1


def test_many_prompts_have_several_answers_and_real_branch_points():
    counts = [TASK.count_shortest_paths(s, t) for s, t in TASK.pairs]
    assert sum(c > 1 for c in counts) / len(counts) > 0.7
    branching = [len(TASK.next_hops(s, t)) for s, t in TASK.pairs]
    assert max(branching) >= 4  # first moves with ln(4) > tau = 0.8 nats of ideal entropy


def test_dimensions_are_bounded_by_the_labels():
    with pytest.raises(ValueError, match="dimensions"):
        GraphTask(dimensions=6)
    assert len(NODE_LABELS) >= 32
