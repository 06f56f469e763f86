"""The second toy task: long answers whose tokens are mostly forced, with a few branch points.

    task = ChainTask()                          # 16 items A..P, 4-character codewords, seeded
    task.codewords["C"]                         # e.g. "Cq3z": C's secret codeword
    task.prompt("KCAFH")                        # "ACFHK:": the items, sorted
    task.sample_answer("ACFHK", rng)            # e.g. "Cq3zAmr7...": the codewords, any order
    task.check("ACFHK:", answer)                # ChainVerdict.CORRECT, or the first error
    task.explain("ACFHK:", answer)              # the same, in words

Every item letter has a fixed secret codeword of `code_length` characters: the letter itself and
`code_length - 1` characters (lower-case letters and digits) drawn by `seed`, a dictionary the
models must memorise. A prompt lists n distinct items; a correct answer writes the codewords of
exactly those items, each once, in ANY order, so a prompt has n! correct answers.

Why this task beside the shortest paths (task.py): its answers are long (4n + 1 = 21..37 tokens
with the EOS) and most of their tokens are forced: once a block's first letter is written, the
other `code_length - 1` characters follow from the dictionary. Only the first letter of each block
is a real choice, uniform over the r items not written yet (ideal entropy ln r), so an ideal
model is above tau = 0.8 nats (r >= 3) on n - 2 of the 4n + 1 tokens: 14-19%, the share of
high-entropy teacher tokens the paper reports (15-25%). A student must get every forced token
right AND keep track of what is left at the branch points, where the teacher is uncertain: long
chains in which a few uncertain tokens carry the diversity, the structure entropy-aware
distillation is about.

Pure Python; no torch.
"""

from __future__ import annotations

import enum
import itertools
import math
import random
import string
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar

ITEM_LABELS = string.ascii_uppercase  # item letters: the first `items` of these
CODE_CHARS = string.ascii_lowercase + string.digits  # the rest of a codeword


class ChainVerdict(enum.Enum):
    CORRECT = "correct"
    MALFORMED = "malformed"  # empty, a character outside the alphabet, or an unreadable prompt
    BAD_LENGTH = "bad_length"  # ends inside a block: length not a multiple of code_length
    NOT_A_CODEWORD = "not_a_codeword"  # a block is no item's codeword
    NOT_IN_PROMPT = "not_in_prompt"  # the codeword of an item the prompt does not list
    REPEATED = "repeated"  # an item's codeword written a second time
    MISSING = "missing"  # every block fine, but some of the prompt's items never written


@dataclass(frozen=True)
class ChainTask:
    """`items` item letters, each with a secret codeword; prompts are sets of `min_items` to
    `max_items` of them, `num_prompts` distinct ones in a fixed seeded pool."""

    kind: ClassVar[str] = "chain"

    items: int = 16
    code_length: int = 4
    min_items: int = 5
    max_items: int = 9
    num_prompts: int = 2000
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.items <= len(ITEM_LABELS):
            raise ValueError(f"items must be in [1, {len(ITEM_LABELS)}]; got {self.items}")
        if self.code_length < 1:
            raise ValueError(f"code_length must be at least 1; got {self.code_length}")
        if not 1 <= self.min_items <= self.max_items <= self.items:
            raise ValueError(
                f"need 1 <= min_items <= max_items <= items; got {self.min_items}, "
                f"{self.max_items}, {self.items}"
            )
        possible = sum(math.comb(self.items, n) for n in range(self.min_items, self.max_items + 1))
        if not 1 <= self.num_prompts <= possible:
            raise ValueError(
                f"num_prompts must be in [1, {possible}] (the distinct prompts of "
                f"{self.min_items}..{self.max_items} of {self.items} items); got {self.num_prompts}"
            )

    # ------------------------------------------------------------------------- the dictionary

    @cached_property
    def labels(self) -> str:
        """The item letters."""
        return ITEM_LABELS[: self.items]

    @cached_property
    def codewords(self) -> dict[str, str]:
        """item letter -> its codeword: the letter, then code_length - 1 seeded characters."""
        rng = random.Random(self.seed)
        return {
            item: item + "".join(rng.choice(CODE_CHARS) for _ in range(self.code_length - 1))
            for item in self.labels
        }

    @cached_property
    def alphabet(self) -> str:
        """Every character a prompt or an answer of this task contains (the tokenizer's corpus)."""
        return self.labels + CODE_CHARS + ":"

    @property
    def max_answer_tokens(self) -> int:
        """The longest correct answer, in toy tokens (one per character), without the EOS."""
        return self.max_items * self.code_length

    # ------------------------------------------------------------------------- prompts

    def prompt(self, items: Sequence[str]) -> str:
        chosen = sorted(set(items))
        if not chosen or any(item not in self.labels for item in chosen):
            raise ValueError(f"not a set of this task's items ({self.labels}): {items!r}")
        return "".join(chosen) + ":"

    def parse_prompt(self, prompt: str) -> tuple[str, ...] | None:
        """The items of a prompt this task could have written (sorted, distinct), else None."""
        text = prompt.strip()
        if len(text) < 2 or text[-1] != ":":
            return None
        items = tuple(text[:-1])
        if any(item not in self.labels for item in items):
            return None
        if any(a >= b for a, b in itertools.pairwise(items)):
            return None  # unsorted or repeated: not a prompt this task writes
        return items

    @cached_property
    def prompts(self) -> tuple[str, ...]:
        """`num_prompts` distinct prompts in a fixed order; their sizes are uniform over
        [min_items, max_items] (while a size has unused sets left)."""
        rng = random.Random(self.seed + 1)
        seen: set[str] = set()
        out: list[str] = []
        sizes = range(self.min_items, self.max_items + 1)
        full: set[int] = set()  # sizes whose every set has been drawn
        used = {n: 0 for n in sizes}
        while len(out) < self.num_prompts:
            n = rng.choice([m for m in sizes if m not in full])
            prompt = self.prompt(rng.sample(self.labels, n))
            if prompt in seen:
                continue
            seen.add(prompt)
            out.append(prompt)
            used[n] += 1
            if used[n] == math.comb(self.items, n):
                full.add(n)
        return tuple(out)

    def split(self, eval_fraction: float = 0.2) -> tuple[list[str], list[str]]:
        """(train prompts, held-out prompts): a fixed split of the prompt pool."""
        num_eval = max(1, round(len(self.prompts) * eval_fraction))
        return list(self.prompts[num_eval:]), list(self.prompts[:num_eval])

    # ------------------------------------------------------------------------- answers

    def count_answers(self, prompt: str) -> int:
        """The number of distinct correct answers: every order of the items, n!."""
        return math.factorial(len(self._items_of(prompt)))

    def sample_answer(self, items: Sequence[str], rng: random.Random) -> str:
        """The prompt's codewords in a uniformly random order (the task's generator).

        `items`: the item letters, e.g. parse_prompt's result or "ACFHK"."""
        order = list(items)
        rng.shuffle(order)
        return "".join(self.codewords[item] for item in order)

    def sample_answer_for(self, prompt: str, rng: random.Random) -> str:
        return self.sample_answer(self._items_of(prompt), rng)

    def check(self, prompt: str, answer: str) -> ChainVerdict:
        """Whether `answer` is correct for `prompt`; the first thing wrong otherwise.

        Surrounding whitespace is ignored; anything else outside the alphabet is malformed."""
        return self._diagnose(prompt, answer)[0]

    def explain(self, prompt: str, answer: str) -> str:
        """check's verdict in words: which block is wrong and how."""
        return self._diagnose(prompt, answer)[1]

    def is_correct(self, prompt: str, answer: str) -> bool:
        return self.check(prompt, answer) is ChainVerdict.CORRECT

    def _diagnose(self, prompt: str, answer: str) -> tuple[ChainVerdict, str]:
        """Reads the answer block by block, left to right, and stops at the first error."""
        items = self.parse_prompt(prompt)
        if items is None:
            return ChainVerdict.MALFORMED, f"not a prompt of this task: {prompt!r}"
        text = answer.strip()
        if not text:
            return ChainVerdict.MALFORMED, "empty answer"
        strangers = sorted({ch for ch in text if ch not in self.labels + CODE_CHARS})
        if strangers:
            return ChainVerdict.MALFORMED, f"characters outside the alphabet: {strangers}"
        owner = {code: item for item, code in self.codewords.items()}
        written: set[str] = set()
        size = self.code_length
        for index, start in enumerate(range(0, len(text), size)):
            block = text[start : start + size]
            if len(block) < size:
                return ChainVerdict.BAD_LENGTH, (
                    f"ends inside block {index}: {block!r} is {len(block)} of {size} characters"
                )
            item = owner.get(block)
            if item is None:
                expected = self.codewords.get(block[0])
                hint = (
                    f"{block[0]}'s codeword is {expected!r}"
                    if expected
                    else "it does not start with an item letter"
                )
                return ChainVerdict.NOT_A_CODEWORD, (
                    f"block {index} {block!r} is not a codeword ({hint})"
                )
            if item not in items:
                return ChainVerdict.NOT_IN_PROMPT, (
                    f"block {index} {block!r} is item {item}, which the prompt does not list"
                )
            if item in written:
                return ChainVerdict.REPEATED, f"block {index} {block!r} writes item {item} again"
            written.add(item)
        missing = [item for item in items if item not in written]
        if missing:
            return ChainVerdict.MISSING, f"items never written: {''.join(missing)}"
        return ChainVerdict.CORRECT, "correct"

    def _items_of(self, prompt: str) -> tuple[str, ...]:
        items = self.parse_prompt(prompt)
        if items is None:
            raise ValueError(f"not a prompt of this task: {prompt!r}")
        return items
