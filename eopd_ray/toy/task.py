"""The toy reasoning task: shortest paths in a fixed graph whose steps partly commute.

    task = GraphTask()                      # 32 nodes labelled A..Z a..f, seeded
    task.prompt("K", "d")                   # "K>d:"
    task.sample_answer("K", "d", rng)       # e.g. "KQTd": one shortest path, chosen at random
    task.check("K>d:", "KQTd")              # Verdict.CORRECT

A prompt names a source and a target node; a correct answer is ANY shortest path from the source to
the target, written as its node labels (source first, target last, no separators). Many prompts
have several shortest paths, so a good model is uncertain exactly at the branch points (where
two, three or four neighbours lead on equally fast) and confident everywhere else: the structure
that entropy-aware distillation is about. The graph is fixed by `seed`, so a model must learn it
(the edges and the distances) from samples; every answer is checked exactly. Answers are short
(3-6 tokens): for long answers whose tokens are mostly forced, see the chain task (chain.py).

Both tasks offer the interface `ToyTask` below, which is all that training (train.py),
evaluation (evaluate.py), preparation (prepare.py) and the held-out evaluation during a run use.

Pure Python; no torch.
"""

from __future__ import annotations

import enum
import itertools
import random
import string
from collections import deque
from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar, Protocol

NODE_LABELS = string.ascii_uppercase + string.ascii_lowercase


class ToyTask(Protocol):
    """What every toy task offers (GraphTask here, ChainTask in chain.py). Prompts and answers
    are plain strings; the toy tokenizer writes one token per character."""

    kind: ClassVar[str]  # "graph" | "chain": how settings.json names the task

    @property
    def alphabet(self) -> str:
        """Every character of the task's prompts and answers (the tokenizer's corpus)."""
        ...

    @property
    def max_answer_tokens(self) -> int:
        """The longest correct answer, in toy tokens (one per character), without the EOS."""
        ...

    def split(self, eval_fraction: float = 0.2) -> tuple[list[str], list[str]]:
        """(train prompts, held-out prompts): fixed, disjoint."""
        ...

    def is_correct(self, prompt: str, answer: str) -> bool:
        """Surrounding whitespace of the answer ignored; False for a prompt of another task."""
        ...

    def count_answers(self, prompt: str) -> int:
        """The number of distinct correct answers to `prompt`."""
        ...

    def sample_answer_for(self, prompt: str, rng: random.Random) -> str:
        """One correct answer drawn from the task's generator (ValueError for a foreign prompt)."""
        ...


@dataclass(frozen=True)
class AnswerStats:
    """One prompt's samples judged: which are correct, how many distinct correct answers, and
    those over min(samples, the prompt's number of correct answers) — 1.0 is full coverage."""

    correct: list[bool]
    distinct: int
    coverage: float


def judge_answers(task: ToyTask, prompt: str, answers: list[str]) -> AnswerStats:
    """The samples `answers` of `prompt` judged by the task's checker (the toy evaluation and
    the held-out evaluation during training share this)."""
    correct = [task.is_correct(prompt, a) for a in answers]
    distinct = len({a.strip() for a, ok in zip(answers, correct, strict=True) if ok})
    return AnswerStats(correct, distinct, distinct / min(len(answers), task.count_answers(prompt)))


class Verdict(enum.Enum):
    CORRECT = "correct"
    MALFORMED = "malformed"  # not a string of node labels, or a prompt this task cannot read
    WRONG_START = "wrong_start"
    NOT_AN_EDGE = "not_an_edge"  # two consecutive nodes are not adjacent
    WRONG_END = "wrong_end"
    NOT_SHORTEST = "not_shortest"  # a valid path, but longer than the shortest


@dataclass(frozen=True)
class GraphTask:
    """A `dimensions`-cube (nodes = bit strings, edges = one-bit flips) under a random labelling,
    with `removed_edges` random edges taken out (never disconnecting it).

    A shortest path flips each differing bit once, in any order: steps that commute, so a prompt at
    distance h has up to h! answers and h equally good first moves. The removed edges break the
    symmetry: some orders become impossible, some prompts have a single answer, and the model
    cannot shortcut the lookup by reading bits off the labels.
    """

    dimensions: int = 5
    removed_edges: int = 10
    seed: int = 0
    min_distance: int = 2  # prompts whose nodes are closer are too easy to be interesting

    kind: ClassVar[str] = "graph"  # a class constant, not a field: settings keys stay as they were

    def __post_init__(self) -> None:
        if not self.dimensions >= 1 or 2**self.dimensions > len(NODE_LABELS):
            raise ValueError(
                f"dimensions must be in [1, 5] ({len(NODE_LABELS)} node labels); "
                f"got {self.dimensions}"
            )

    # ------------------------------------------------------------------------- the graph

    @cached_property
    def labels(self) -> str:
        return NODE_LABELS[: 2**self.dimensions]

    @cached_property
    def alphabet(self) -> str:
        """Every character a prompt or an answer of this task contains (the tokenizer's corpus)."""
        return self.labels + ">:"

    @cached_property
    def neighbours(self) -> dict[str, tuple[str, ...]]:
        rng = random.Random(self.seed)
        num_nodes = len(self.labels)
        names = list(self.labels)
        rng.shuffle(names)  # node i (a bit string) is called names[i]
        edges = [
            (a, a ^ (1 << bit))
            for a in range(num_nodes)
            for bit in range(self.dimensions)
            if a < a ^ (1 << bit)
        ]
        rng.shuffle(edges)
        kept = set(edges)
        removed = 0
        for edge in edges:
            if removed == self.removed_edges:
                break
            if _connected(num_nodes, kept - {edge}):
                kept.discard(edge)
                removed += 1
        adjacency: dict[str, list[str]] = {label: [] for label in self.labels}
        for a, b in kept:
            adjacency[names[a]].append(names[b])
            adjacency[names[b]].append(names[a])
        return {node: tuple(sorted(adj)) for node, adj in adjacency.items()}

    @cached_property
    def distances(self) -> dict[str, dict[str, int]]:
        """All-pairs hop distances (breadth-first search from every node)."""
        out = {}
        for source in self.labels:
            dist = {source: 0}
            queue = deque([source])
            while queue:
                node = queue.popleft()
                for nxt in self.neighbours[node]:
                    if nxt not in dist:
                        dist[nxt] = dist[node] + 1
                        queue.append(nxt)
            out[source] = dist
        return out

    def next_hops(self, node: str, target: str) -> tuple[str, ...]:
        """Neighbours of `node` one hop closer to `target`: the correct choices at this step."""
        d = self.distances[target]
        return tuple(n for n in self.neighbours[node] if d[n] == d[node] - 1)

    def count_shortest_paths(self, source: str, target: str) -> int:
        if source == target:
            return 1
        return sum(self.count_shortest_paths(n, target) for n in self.next_hops(source, target))

    @cached_property
    def max_answer_tokens(self) -> int:
        """The longest correct answer, in toy tokens (one per node label), without the EOS:
        the graph's diameter + 1."""
        return 1 + max(max(d.values()) for d in self.distances.values())

    # ------------------------------------------------------------------------- prompts

    def prompt(self, source: str, target: str) -> str:
        return f"{source}>{target}:"

    def parse_prompt(self, prompt: str) -> tuple[str, str] | None:
        """(source, target) of a prompt this task wrote, else None."""
        text = prompt.strip()
        if len(text) != 4 or text[1] != ">" or text[3] != ":":
            return None
        source, target = text[0], text[2]
        if source not in self.labels or target not in self.labels:
            return None
        return source, target

    @cached_property
    def pairs(self) -> tuple[tuple[str, str], ...]:
        """Every (source, target) at distance >= min_distance, in a fixed shuffled order."""
        pairs = [
            (s, t)
            for s in self.labels
            for t in self.labels
            if self.distances[s][t] >= self.min_distance
        ]
        random.Random(self.seed + 1).shuffle(pairs)
        return tuple(pairs)

    def split(self, eval_fraction: float = 0.2) -> tuple[list[str], list[str]]:
        """(train prompts, held-out prompts): a fixed split of all pairs."""
        num_eval = max(1, round(len(self.pairs) * eval_fraction))
        prompts = [self.prompt(s, t) for s, t in self.pairs]
        return prompts[num_eval:], prompts[:num_eval]

    # ------------------------------------------------------------------------- answers

    def count_answers(self, prompt: str) -> int:
        """The number of distinct correct answers: the prompt's shortest paths."""
        return self.count_shortest_paths(*self._pair_of(prompt))

    def sample_answer_for(self, prompt: str, rng: random.Random) -> str:
        return self.sample_answer(*self._pair_of(prompt), rng)

    def _pair_of(self, prompt: str) -> tuple[str, str]:
        parsed = self.parse_prompt(prompt)
        if parsed is None:
            raise ValueError(f"not a prompt of this task: {prompt!r}")
        return parsed

    def sample_answer(self, source: str, target: str, rng: random.Random) -> str:
        """A shortest path, each step uniform over the correct next hops (the task's generator)."""
        path = [source]
        while path[-1] != target:
            path.append(rng.choice(self.next_hops(path[-1], target)))
        return "".join(path)

    def check(self, prompt: str, answer: str) -> Verdict:
        """Whether `answer` is a shortest path for `prompt`; the first thing wrong otherwise.

        Surrounding whitespace is ignored; anything else that is not a node label is malformed.
        """
        parsed = self.parse_prompt(prompt)
        path = answer.strip()
        if parsed is None or not path or any(ch not in self.labels for ch in path):
            return Verdict.MALFORMED
        source, target = parsed
        if path[0] != source:
            return Verdict.WRONG_START
        for a, b in itertools.pairwise(path):
            if b not in self.neighbours[a]:
                return Verdict.NOT_AN_EDGE
        if path[-1] != target:
            return Verdict.WRONG_END
        if len(path) - 1 != self.distances[source][target]:
            return Verdict.NOT_SHORTEST
        return Verdict.CORRECT

    def is_correct(self, prompt: str, answer: str) -> bool:
        return self.check(prompt, answer) is Verdict.CORRECT


def _connected(num_nodes: int, edges: set[tuple[int, int]]) -> bool:
    adjacency: dict[int, list[int]] = {n: [] for n in range(num_nodes)}
    for a, b in edges:
        adjacency[a].append(b)
        adjacency[b].append(a)
    seen, stack = {0}, [0]
    while stack:
        for nxt in adjacency[stack.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return len(seen) == num_nodes
